"""Every registered operator, checked against itself: chunked vs naive (outputs and gradients), decode steps
vs chunked, state hand-over between calls, bf16 at long range, constant decode state; fla's reference
recurrences as a second oracle where fla is installed; and every built-in spec converting a tiny Llama.

Operators are built from their constructor with 6 query heads over 2 kv heads (GQA), head_dim 16, and small
windows, and fed random values for each binding they ask for. Relative errors are ‖a - b‖ / ‖b‖, fp32.
"""

from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path

import pytest
import torch

import lincompile
from lincompile.graph import op_counts
from lincompile.kernels import registry
from lincompile.kernels.swa import MAX_WINDOW
from lincompile.spec import builtin_specs

from conftest import tiny_config, tiny_model

OPS = registry.names()
KV_CACHE_OPS = {"softmax"}  # keeps every key and value by design: its decode state grows with T
H, HK, D = 6, 2, 16
TOL = 1e-5


WINDOW_OPS = [n for n in OPS if "window" in registry.get(n).params]


def build(name, heads=H, kv_heads=HK, head_dim=D, window=8):
    cls = registry.get(name)
    params = {"window": window} if "window" in cls.params else {}
    extra = {"is_causal": True} if "is_causal" in inspect.signature(cls.__init__).parameters else {}
    torch.manual_seed(0)  # operators with parameters initialise them the same way every time
    return cls(num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, **params, **extra)


def make_inputs(op, B, T, dtype=torch.float32, seed=0):
    """Random values for every binding the operator asks for (mask: causal bool when it takes one)."""
    gen = torch.Generator().manual_seed(seed)
    Hq, Hk, Dh = op.num_heads, op.num_kv_heads, op.head_dim
    shapes = {"q": (B, Hq, T, Dh), "q_pre_rope": (B, Hq, T, Dh), "k": (B, Hk, T, Dh), "k_kv": (B, Hk, T, Dh),
              "k_pre_rope": (B, Hk, T, Dh), "v": (B, Hk, T, op.v_head_dim), "v_kv": (B, Hk, T, op.v_head_dim),
              "hidden": (B, T, getattr(op, "hidden_size", Hq * Dh))}
    out = {}
    for name in op.inputs:
        if name not in shapes:
            raise AssertionError(f"test_operators does not know how to make input {name!r} of op {op.name}")
        out[name] = torch.randn(*shapes[name], generator=gen).to(dtype)
    if "mask" in op.inputs + op.optional_inputs:
        out["mask"] = torch.ones(T, T, dtype=torch.bool).tril()
    return out


def span(inputs, start, stop):
    """The inputs of positions [start, stop); the mask becomes those query rows over all keys seen so far."""
    out = {}
    for name, x in inputs.items():
        if name == "mask":
            out[name] = x[start:stop, :stop]
        else:
            out[name] = x[:, start:stop] if name == "hidden" else x[:, :, start:stop]
    return out


def at(inputs, t):
    """The inputs of position t, as `step` takes them (no time axis, no mask: steps are causal)."""
    return {name: (x[:, t] if name == "hidden" else x[:, :, t]) for name, x in inputs.items() if name != "mask"}


def rel(a, b, floor: float = 0.0) -> float:
    """‖a - b‖ / ‖b‖; with `floor`, ‖b‖ counts as at least floor · sqrt(numel) (an RMS of `floor`)."""
    a, b = a.detach().double(), b.detach().double()
    den = max(float(b.norm()), floor * b.numel() ** 0.5)
    return float((a - b).norm() / den) if den > 0 else float((a - b).norm())


def flat_state(state):
    """The tensors of a (nested) state dict, in a fixed order."""
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for key in sorted(state) for t in flat_state(state[key])]
    if isinstance(state, (list, tuple)):
        return [t for item in state for t in flat_state(item)]
    return []


def assert_states_close(a, b, tol=TOL):
    ta, tb = flat_state(a), flat_state(b)
    assert len(ta) == len(tb)
    for x, y in zip(ta, tb):
        assert x.shape == y.shape
        if x.is_floating_point():
            assert rel(x, y) <= tol
        else:
            assert torch.equal(x, y)


# --------------------------------------------------------------------------------------------------
# Chunked vs naive


@pytest.mark.parametrize("T", [1, 7, 8, 64, 65, 300])  # the window is 8
@pytest.mark.parametrize("name", OPS)
def test_chunked_matches_naive_outputs_and_grads(name, T):
    op = build(name)
    inputs = make_inputs(op, 2, T)
    leaves = {k: v.requires_grad_() for k, v in inputs.items() if v.is_floating_point()}
    params = [p for p in op.parameters() if p.requires_grad]
    weight = torch.randn(2, op.num_heads, T, op.v_head_dim, generator=torch.Generator().manual_seed(1))

    def run(form):
        out = form(**inputs)
        out = out[0] if isinstance(out, tuple) else out
        grads = torch.autograd.grad((out.float() * weight).sum(), [*leaves.values(), *params], allow_unused=True)
        return out, grads

    ref, ref_grads = run(op.naive)
    out, grads = run(op.chunked)
    assert out.shape == (2, op.num_heads, T, op.v_head_dim)
    assert rel(out, ref) <= TOL, f"{name} output"
    names = [*leaves, *(f"param {n}" for n, p in op.named_parameters() if p.requires_grad)]
    for label, g, r in zip(names, grads, ref_grads):
        assert (g is None) == (r is None), f"{name}: gradient of {label} present in one form only"
        if g is not None:
            assert torch.isfinite(g).all()
            # Gradients that are ~0 by the math (e.g. the normalised elu_linear at T = 1, where o = v) are fp32
            # noise: below an RMS of 1e-2 they are compared in absolute terms (1e-7 RMS).
            assert rel(g, r, floor=1e-2) <= TOL, f"{name}: gradient of {label}"


@pytest.mark.parametrize("name", WINDOW_OPS)
def test_window_longer_than_the_input(name):
    # The largest window over 9 tokens is causal attention over them. The blocked forms used to build [w, 2w]
    # score blocks whatever the input (terabytes for 10⁶); they now cost what the input does.
    op, T = build(name, heads=2, kv_heads=1, head_dim=4, window=MAX_WINDOW), 9
    inputs = make_inputs(op, 1, T)
    leaves = [x.requires_grad_() for x in inputs.values() if x.is_floating_point()]
    weight = torch.randn(1, op.num_heads, T, op.v_head_dim, generator=torch.Generator().manual_seed(1))

    def grads(out):
        return torch.autograd.grad((out.float() * weight).sum(), leaves, allow_unused=True)

    ref = op.naive(**inputs)
    out = op.chunked(**inputs)[0]
    assert rel(out, ref) <= TOL
    for g, r in zip(grads(out), grads(ref)):
        assert (g is None) == (r is None)
        assert g is None or rel(g, r, floor=1e-2) <= TOL
    with torch.no_grad():  # and from a state: the cached keys of a 65,536-slot ring, of which 4 exist
        head, state = op.chunked(**span(inputs, 0, 4))
        tail = op.chunked(**span(inputs, 4, T), state=state)[0]
    assert rel(torch.cat([head, tail], dim=2), ref) <= TOL


# --------------------------------------------------------------------------------------------------
# Decode and state hand-over


@pytest.mark.parametrize("name", OPS)
def test_steps_match_chunked(name):
    op, T = build(name), 23
    inputs = make_inputs(op, 2, T)
    with torch.no_grad():
        whole, final = op.chunked(**inputs)
        state = op.init_state(2)
        outs = []
        for t in range(T):
            o, state = op.step(state, **at(inputs, t))
            outs.append(o)
    assert rel(torch.stack(outs, dim=2), whole) <= TOL
    assert_states_close(state, final)


@pytest.mark.parametrize("name", OPS)
def test_prefix_chunked_then_steps(name):
    op, T, P = build(name), 45, 37
    inputs = make_inputs(op, 2, T)
    with torch.no_grad():
        whole, final = op.chunked(**inputs)
        head, state = op.chunked(**span(inputs, 0, P))
        outs = [head]
        for t in range(P, T):
            o, state = op.step(state, **at(inputs, t))
            outs.append(o[:, :, None])
    assert rel(torch.cat(outs, dim=2), whole) <= TOL
    assert_states_close(state, final)


@pytest.mark.parametrize("P", [1, 70])
@pytest.mark.parametrize("name", OPS)
def test_prefix_chunked_then_chunked(name, P):
    op, T = build(name), 150
    inputs = make_inputs(op, 2, T)
    with torch.no_grad():
        whole, final = op.chunked(**inputs)
        head, state = op.chunked(**span(inputs, 0, P))
        tail, state = op.chunked(**span(inputs, P, T), state=state)
    assert rel(torch.cat([head, tail], dim=2), whole) <= TOL
    assert_states_close(state, final)


@pytest.mark.parametrize("name", sorted(set(OPS) - KV_CACHE_OPS))
def test_decode_state_does_not_grow(name):
    op = build(name, heads=2, kv_heads=1)
    short = make_inputs(op, 1, 16)
    long = make_inputs(op, 1, 4096)
    with torch.no_grad():
        state = op.init_state(1)
        for t in range(16):
            _, state = op.step(state, **at(short, t))
        # 4096 positions: 4080 through the chunked form, the last 16 through steps.
        _, long_state = op.chunked(**span(long, 0, 4080))
        for t in range(4080, 4096):
            _, long_state = op.step(long_state, **at(long, t))
    sizes = [(tuple(t.shape), t.dtype) for t in flat_state(state)]
    assert sizes == [(tuple(t.shape), t.dtype) for t in flat_state(long_state)]
    for t in flat_state(long_state):
        assert not t.is_floating_point() or torch.isfinite(t).all()


# --------------------------------------------------------------------------------------------------
# Long sequences in bf16


@pytest.mark.parametrize("name", OPS)
def test_bf16_long_sequence(name):
    op, T = build(name, heads=2, kv_heads=1), 8192
    inputs = make_inputs(op, 1, T, dtype=torch.bfloat16)
    inputs.pop("mask", None)  # softmax is built causal: no 8192² mask needed
    with torch.no_grad():
        out = op(**inputs)
        ref = op(**{k: v.float() for k, v in inputs.items()})  # the same (bf16-rounded) values in fp32
    assert out.dtype == torch.bfloat16 and out.shape == (1, 2, T, op.v_head_dim)
    assert torch.isfinite(out).all()
    assert rel(out, ref) <= 1e-2


# --------------------------------------------------------------------------------------------------
# fla's reference recurrences (optional second oracle: only the pure-PyTorch naive files are loaded, so
# fla's Triton kernels need not import)


def fla_naive(module: str, func: str):
    pytest.importorskip("einops")
    spec = importlib.util.find_spec("fla")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("fla (fla-core) is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "ops" / module / "naive.py"
    if not path.exists():
        pytest.skip(f"fla has no {path}")
    loaded = importlib.util.spec_from_file_location(f"fla_naive_{module}", path)
    mod = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(mod)
    return getattr(mod, func)


def bthd(*xs):
    return [x.transpose(1, 2) for x in xs]  # fla's layout is [B, T, H, D]


def test_liger_gla_matches_fla_naive_recurrent_gla():
    naive_recurrent_gla = fla_naive("gla", "naive_recurrent_gla")
    op = registry.get("liger_gla")(num_heads=H, num_kv_heads=HK, head_dim=D, feature_map="identity")
    x = make_inputs(op, 2, 50)
    q, k, v, g = op.gla_inputs(x["q_pre_rope"], x["k_pre_rope"], x["v_kv"])
    ref, _ = naive_recurrent_gla(*bthd(q, k, v, g))
    # fla scales q by head_dim^-1/2; Liger GLA uses scale 1.
    assert rel(op.chunked(**x)[0], ref.transpose(1, 2) * D ** 0.5) <= TOL


@pytest.mark.parametrize("slots", [8, 16])
def test_liger_gsa_matches_fla_naive_recurrent_gsa(slots):
    naive_recurrent_gsa = fla_naive("gsa", "naive_recurrent_gsa")
    op = registry.get("liger_gsa")(num_heads=H, num_kv_heads=HK, head_dim=D, window=0, num_slots=slots)
    x = make_inputs(op, 2, 50)
    g, s = op.slot_gates(x["k_pre_rope"])
    ref, _ = naive_recurrent_gsa(*bthd(x["q_pre_rope"], x["k_pre_rope"], x["v_kv"], s, g), scale=1.0)
    assert rel(op.chunked(**x)[0], ref.transpose(1, 2)) <= TOL


# --------------------------------------------------------------------------------------------------
# Built-in specs on a tiny Llama


SDPA = "aten.scaled_dot_product_attention"
SOFTMAX = ("aten.softmax", "aten._softmax", "aten._safe_softmax")


def attention_nodes(converted) -> int:
    counts = op_counts(converted.graph_module.graph)
    return counts[SDPA] + sum(counts[s] for s in SOFTMAX)


def needs_code(spec) -> bool:
    return any(":" in rule.op for rule in spec.rules)


@pytest.mark.parametrize("name", builtin_specs())
def test_builtin_spec_converts_tiny_llama(name):
    spec = lincompile.Spec.builtin(name)
    if needs_code(spec):
        pytest.skip("the spec loads user Python code (see test_cli for --allow-code)")
    if spec.name == "identity" or all(rule.op == "softmax" for rule in spec.rules):
        pytest.skip("identity conversion: checked exactly in test_architectures")
    if any(rule.op == "keep" for rule in spec.rules):
        pytest.skip("inter-layer hybrid: needs more layers than the tiny model has (test_hybrid_every_4_...)")
    model = tiny_model("llama", spec.capture.attn_implementation)
    converted = lincompile.convert(model, spec)
    sites = converted.report["sites"]
    kept = [s for s in sites if s["op"] == "keep"]
    assert attention_nodes(converted) == len(kept)  # no softmax attention left in the converted layers
    ids = torch.randint(0, 128, (2, 21), generator=torch.Generator().manual_seed(0))
    logits = converted(ids)
    assert logits.shape == (2, 21, 128) and torch.isfinite(logits).all()
    logits.float().pow(2).mean().backward()
    grads = [p.grad for p in converted.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_hybrid_every_4_keeps_every_fourth_layer():
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("llama")
    cfg.num_hidden_layers = 4
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    converted = lincompile.convert(model, lincompile.Spec.builtin("hybrid-every-4"))
    ops = {s["layer"]: s["op"] for s in converted.report["sites"]}
    assert ops == {0: "liger_attention", 1: "liger_attention", 2: "liger_attention", 3: "keep"}
    assert op_counts(converted.graph_module.graph)[SDPA] == 1  # layer 3
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(0))
    logits = converted(ids)
    assert torch.isfinite(logits).all()
    logits.float().pow(2).mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in converted.parameters() if p.grad is not None)
