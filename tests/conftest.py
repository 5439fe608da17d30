"""Tiny random models of several architectures, built offline from configs (no downloads)."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

# Tests run on small CPU machines; one intra-op thread avoids thread wake-up overhead on tiny tensors.
torch.set_num_threads(int(os.environ.get("LINCOMPILE_TEST_THREADS", "1")))
# The kernel tests set their own configurations (tests/test_fuse.py sets this variable for its subprocesses)
os.environ.pop("LINCOMPILE_GLA_TUNING", None)


@pytest.fixture(scope="session", autouse=True)
def _interpreter_without_overflow_checks():
    """The Triton interpreter checks every int32 add, sub and mul for overflow, a quarter of its time in the
    kernel tests. The GPU compiler does so only in debug mode, and at the tests' sizes no index can come near
    2**31 anyway: real sizes are where overflow could happen, and the kernels widen program ids to int64
    before they scale offsets. LINCOMPILE_TEST_SANITIZE=1 keeps the checks."""
    builder = options = None
    # the kernel test modules set TRITON_INTERPRET when they are collected
    if os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("LINCOMPILE_TEST_SANITIZE") != "1":
        try:
            from triton.runtime import interpreter

            builder = interpreter.interpreter_builder
            options = builder.options
        except Exception:  # no (usable) Triton: the kernel tests skip or fail on their own, with their own message
            pass
    if hasattr(options, "sanitize_overflow"):
        builder.options = dataclasses.replace(options, sanitize_overflow=False)
    yield
    if hasattr(options, "sanitize_overflow"):
        builder.options = options


COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2)


def _configs():
    import transformers as tf

    gqa = dict(COMMON, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    return {
        "llama": lambda: tf.LlamaConfig(**gqa),
        "mistral": lambda: tf.MistralConfig(**gqa, sliding_window=None),
        "qwen2": lambda: tf.Qwen2Config(**gqa),
        "qwen3": lambda: tf.Qwen3Config(**gqa),
        "gemma2": lambda: tf.Gemma2Config(**gqa, sliding_window=4, attn_logit_softcapping=50.0,
                                          final_logit_softcapping=30.0, layer_types=["sliding_attention", "full_attention"]),
        "phi3": lambda: tf.Phi3Config(**gqa, pad_token_id=0, partial_rotary_factor=0.5),
        "gpt_neox": lambda: tf.GPTNeoXConfig(**dict(COMMON, num_attention_heads=4), rotary_pct=0.25),
        "gpt2": lambda: tf.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=512),
        "olmo2": lambda: tf.Olmo2Config(**gqa),
    }


ARCHS = list(_configs())


def exhaustive(cases, keep):
    """`cases` for pytest.mark.parametrize, those whose index is not in `keep` marked `exhaustive`: left out of
    `make test` (the interpreter is slow; the kept ones cover every code path) and run by `make test-all`."""
    return [c if i in keep else pytest.param(*(c if isinstance(c, tuple) else (c,)), marks=pytest.mark.exhaustive)
            for i, c in enumerate(cases)]


def tiny_config(arch: str):
    return _configs()[arch]()


def tiny_model(arch: str = "llama", attn_implementation: str = "sdpa", seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(arch)
    try:
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn_implementation)
    except ValueError:
        # Architectures without an sdpa path (Gemma2) are loaded eager; capture falls back the same way.
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    return model.eval()


def spec_text(op: str = "softmax", impl: str = "sdpa", extra: str = "") -> str:
    return f"name: test\ncapture: {{attn_implementation: {impl}}}\nrules:\n  - op: {op}\n{extra}"


def make_spec(text: str, file: str = "test.yaml"):
    from lincompile.spec import Spec, load_yaml

    return Spec.from_dict(*load_yaml(text, file))


@pytest.fixture
def llama():
    return tiny_model("llama")
