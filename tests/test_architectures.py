"""Every architecture: capture, match every layer (sdpa and eager), identity-reproduce, convert with
liger_attention, forward at two lengths, backward with finite grads. The compiler names no architecture."""

from __future__ import annotations

import pytest
import torch

import lincompile
from lincompile.graph import op_counts

from conftest import ARCHS, make_spec, spec_text, tiny_model

IMPLS = ["sdpa", "eager"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", ARCHS)
def test_identity_reproduces_logits(arch, impl):
    model = tiny_model(arch, impl)
    converted = lincompile.convert(model, make_spec(spec_text("softmax", impl)))
    report = converted.report
    assert report["capture_max_abs_diff"] <= 1e-5
    assert len(report["sites"]) == model.config.num_hidden_layers == report["sites_found"]
    assert sorted(s["layer"] for s in report["sites"]) == list(range(model.config.num_hidden_layers))
    ids = torch.randint(0, 128, (2, 23))
    with torch.no_grad():
        assert (converted(ids) - model(ids).logits).abs().max() <= 1e-5
    # After substitution no softmax attention is left in the graph.
    counts = op_counts(converted.graph_module.graph)
    assert counts["aten.scaled_dot_product_attention"] == 0
    assert counts["aten.softmax"] == 0
    assert counts["call_module"] >= model.config.num_hidden_layers


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", ARCHS)
def test_liger_attention_converts_and_trains(arch, impl):
    model = tiny_model(arch, impl)
    converted = lincompile.convert(model, make_spec(spec_text("liger_attention", impl, "    params: {window: 8}\n")))
    details = converted.report["site_details"]
    assert all(d["op"] == "liger_attention" for d in details)
    for T in (9, 40):
        ids = torch.randint(0, 128, (2, T))
        logits = converted(ids)
        assert logits.shape == (2, T, 128)
        assert torch.isfinite(logits).all()
    logits.float().pow(2).mean().backward()
    grads = [p.grad for p in converted.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads if g is not None)
    assert sum(g is not None for g in grads) > 0
    rope = {d["rope"] for d in details}
    if arch == "gpt2":
        # No rotary embedding in GPT-2: the report says so and the operator uses q/k as they are.
        assert rope == {False}
        assert any("no rotary embedding" in n for d in details for n in d["notes"])
    else:
        assert rope == {True}


def test_positions_capture_of_a_model_that_never_reads_positions():
    """ALiBi Falcon takes no position_ids: export gives them symbols of their own, which is no narrowing (the
    runtime's (input_ids, position_ids) capture used to be refused for it)."""
    import transformers as tf

    from lincompile.passes.capture import capture
    from lincompile.spec import CaptureConfig

    torch.manual_seed(0)
    cfg = tf.FalconConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, alibi=True,
                          multi_query=True, parallel_attn=True, new_decoder_architecture=False)
    model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    cap = capture(model, CaptureConfig(), positions=True)
    ids = torch.randint(0, 128, (3, 21))
    with torch.no_grad():
        got = cap.gm(ids, torch.arange(21).expand_as(ids))
        assert (got - model(ids).logits).abs().max() <= 1e-5


class _Positions(torch.nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how

    def forward(self, input_ids, position_ids):
        x = input_ids.float()
        if self.how == "same":
            return x + position_ids
        if self.how == "free":  # read, but nothing ties their shape to input_ids'
            return x + position_ids.float().mean()
        torch._check(position_ids.shape[1] <= 64)  # "narrowed": a guard the model's code puts on their length
        return x + position_ids.float().mean()


@pytest.mark.parametrize("how", ["same", "free", "narrowed"])
def test_position_ids_dims_must_be_free_or_input_ids(how):
    from lincompile.errors import CaptureError
    from lincompile.passes.capture import _check_dynamic

    ids = torch.zeros(2, 8, dtype=torch.long)
    dims = {0: torch.export.Dim.DYNAMIC(min=1, max=4096), 1: torch.export.Dim.DYNAMIC(min=2, max=512)}
    program = torch.export.export(_Positions(how), (ids, ids.clone()), strict=False,
                                  dynamic_shapes={"input_ids": dims, "position_ids": dims})
    if how == "narrowed":
        with pytest.raises(CaptureError, match="narrowed the length of position_ids"):
            _check_dynamic(program, True, 512)
    else:
        _check_dynamic(program, True, 512)


# --------------------------------------------------------------------------------------------------
# Eager-only architectures whose attention code differs from the modern chain: 3-D [B·H, T, D] bmm / baddbmm
# with views around the softmax (BLOOM, XGLM), masked_fill (MPT) and where (GPT-Neo) as mask application,
# ALiBi added to the scores (BLOOM through baddbmm's bias, MPT through an add), queries scaled in the
# projection (XGLM). Tiny configs; the capture length is capped at 256 (MPT's ALiBi buffer, GPT-Neo's bias).

CAPTURE = "capture: {max_seq_len: 256}\n"


def _eager_only(arch: str):
    import transformers as tf

    configs = {
        "bloom": lambda: tf.BloomConfig(vocab_size=128, hidden_size=64, n_layer=2, n_head=4),
        "xglm": lambda: tf.XGLMConfig(vocab_size=128, d_model=64, ffn_dim=128, num_layers=2, attention_heads=4,
                                      max_position_embeddings=256),
        "gpt_neo": lambda: tf.GPTNeoConfig(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, window_size=8,
                                           attention_types=[[["global", "local"], 1]], max_position_embeddings=256),
        "mpt": lambda: tf.MptConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=4, max_seq_len=256,
                                    expansion_ratio=2),
    }
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(configs[arch]()).eval()


# arch: (mask kind and window per layer, scale)
EAGER_ONLY = {
    "bloom": ([("custom", None)] * 2, 0.25),  # ALiBi in baddbmm's bias, scale in its alpha
    "mpt": ([("custom", None)] * 2, 0.25),  # ALiBi added, then masked_fill
    "xglm": ([("causal", None)] * 2, 0.25),  # q scaled in the projection
    "gpt_neo": ([("causal", None), ("sliding", 8)], 1.0),  # where(causal, scores, min) + mask; GPT-Neo has no scale
}


@pytest.mark.parametrize("arch", list(EAGER_ONLY))
def test_eager_only_architectures_match_and_identity_reproduces(arch):
    from lincompile.passes.capture import capture
    from lincompile.passes.match import match
    from lincompile.spec import CaptureConfig

    model = _eager_only(arch)
    kinds, scale = EAGER_ONLY[arch]
    cap = capture(model, CaptureConfig(max_seq_len=256))
    result = match(cap, make_spec(CAPTURE + "rules:\n  - op: softmax\n"))
    assert [(s.mask_kind, s.attrs.get("window")) for s in result.sites] == kinds
    for site in result.sites:
        a = site.attrs
        assert site.pattern == "eager_softmax_attention" and a["scale"] == pytest.approx(scale)
        assert (a["num_heads"], a["num_kv_heads"], a["head_dim"]) == (4, 4, 16)
        # [B, H, T, D] bindings, also where the model computes attention on [B·H, T, D] views.
        assert all(len(site.bindings[b].meta["val"].shape) == 4 for b in ("q", "k", "v", "k_kv", "v_kv"))
        assert len(site.output.meta["val"].shape) == 4
        assert a["o_proj"] and "hidden" in site.bindings
    converted = lincompile.convert(model, make_spec(CAPTURE + "rules:\n  - op: softmax\n"))
    assert len(converted.report["sites"]) == 2
    for T in (23, 70):
        ids = torch.randint(0, 128, (2, T))
        with torch.no_grad():
            assert (converted(ids) - model(ids).logits).abs().max() <= 1e-5
    counts = op_counts(converted.graph_module.graph)
    assert counts["aten.softmax"] == 0 and counts["call_module"] >= 2


@pytest.mark.parametrize("arch", ["xglm", "gpt_neo"])
def test_eager_only_architectures_convert_with_liger_attention(arch):
    model = _eager_only(arch)
    converted = lincompile.convert(model, make_spec(CAPTURE + "rules:\n  - op: liger_attention\n"
                                                               "    params: {window: 8}\n"))
    assert [d["op"] for d in converted.report["site_details"]] == ["liger_attention"] * 2
    logits = converted(torch.randint(0, 128, (2, 40)))
    assert torch.isfinite(logits).all()
    logits.float().pow(2).mean().backward()
    grads = [p.grad for p in converted.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("arch", ["bloom", "mpt"])
def test_alibi_of_eager_attention_is_kept(arch):
    from lincompile.errors import SpecError

    model = _eager_only(arch)
    with pytest.raises(SpecError, match="liger_attention takes no attention mask.*custom"):
        lincompile.convert(model, make_spec(CAPTURE + "rules:\n  - op: liger_attention\n"))
    kept = lincompile.convert(model, make_spec(CAPTURE + "rules:\n  - {mask: custom, op: keep}\n"))
    assert [s["op"] for s in kept.report["sites"]] == ["keep", "keep"]
    assert [s["alibi_slopes"] for s in kept.report["site_details"]] == [[2.0 ** -(2 * h + 2) for h in range(4)]] * 2
    ids = torch.randint(0, 128, (2, 19))
    with torch.no_grad():
        assert (kept(ids) - model(ids).logits).abs().max() <= 1e-5


def test_the_capture_length_stops_at_the_models_own_limit():
    """MPT names its length max_seq_len (and builds its ALiBi bias that long): the default capture must not
    evaluate masks past it ("size of tensor a (1024) must match … (256)")."""
    from types import SimpleNamespace

    from lincompile.passes.capture import capture, length_limit
    from lincompile.passes.match import match
    from lincompile.spec import CaptureConfig

    cfg = CaptureConfig()
    assert length_limit(SimpleNamespace(max_seq_len=256), cfg) == 256
    assert length_limit(SimpleNamespace(n_ctx=300, max_position_embeddings=512), cfg) == 512  # the first field
    assert length_limit(SimpleNamespace(), cfg) == cfg.max_seq_len
    cap = capture(_eager_only("mpt"), cfg)
    assert cap.max_seq_len == 256
    assert [s.mask_kind for s in match(cap, make_spec("rules:\n  - op: softmax\n")).sites] == ["custom", "custom"]


def _sweep():
    """benchmarks/architectures.py: its tiny models of any transformers type, and its per-type check."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "architectures.py"
    spec = importlib.util.spec_from_file_location("sweep_architectures", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("model_type, outcome", [
    ("jetmoe", "converts and decodes"),  # views sdpa's output in its own memory layout
    ("deepseek_v32", "converts and decodes"),  # its sparse-attention indexer reads the positions into the mask
    ("granite_swa", "converts and decodes"),  # sinks as an output scale: sigmoid(logsumexp(scores) − sink)
    ("gemma3", "converts and decodes"),  # multimodal: vocabulary and position limit in its text config
    ("gemma3n_text", "converts and decodes"),  # its last layers attend with an earlier layer's keys and values
    ("openai-gpt", "converts and decodes"),  # scores·b − 1e4·(1 − b), keys permuted straight to [B, H, D, T]
    ("xlm", "converts and decodes"),  # an in-place masked_fill_ with the mask expanded to the scores' shape
    ("mimo_v2_flash", "converts and decodes"),  # its full-attention layers subtract each row's max before softmax
    ("roberta", "converts and decodes"),  # numbers its positions from padding_idx + 1 unless given them
    ("mllama", "converts and decodes"),  # a text config AutoModelForCausalLM does not map: rebuilt from its class
    ("bart", "converts; runtime refuses"),  # positions made inside the model: generate would be wrong
    ("qwen3_next", "capture refused"),  # its gated delta rule loops over 64-token chunks: a guard on the length
])
def test_sweep_types_convert_and_decode_or_refuse(model_type, outcome):
    """Types the architecture sweep found failing, each for a different reason, through the sweep's own check:
    identity logits, liger-attention saved and loaded, prefill, decodes and a continued prefill vs the full
    forward (or the runtime's or the capture's one-line refusal)."""
    result = _sweep().worker(model_type, ["liger-attention"])
    assert result["outcome"] == outcome, result
    if outcome == "capture refused":
        assert "the captured graph does not take 64 tokens" in result["error"]
        return
    assert result["identity_max_diff"] <= 1e-4
    got = result["specs"]["liger-attention"]
    if outcome == "converts and decodes":
        assert got["decode_max_diff"] <= 1e-4 and got["continue_max_diff"] <= 1e-4
    else:
        assert got["failed"] == "runtime" and "cannot be run from a state" in got["error"]


def test_configs_auto_does_not_map_are_rebuilt_from_their_class(tmp_path):
    """Mllama's causal LM has a text config that AutoModelForCausalLM does not map: rebuilding it (lincompile.load,
    the runtime) takes the class named in lincompile.json (or report.json, in outputs written before that), and
    only a class that takes that config."""
    import json

    import transformers as tf

    from lincompile.emit import architecture
    from lincompile.models import build_from_config

    cfg = tf.MllamaTextConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                              num_key_value_heads=1, intermediate_size=64, cross_attention_layers=[], pad_token_id=0,
                              bos_token_id=1, eos_token_id=2)
    with pytest.raises(ValueError, match="Unrecognized configuration class"):
        build_from_config(cfg)
    with pytest.raises(ValueError, match="Unrecognized configuration class"):
        build_from_config(cfg, architecture="LlamaForCausalLM")  # a class for another config
    assert type(build_from_config(cfg, architecture="MllamaForCausalLM")).__name__ == "MllamaForCausalLM"
    assert architecture(tmp_path, {"architecture": "MllamaForCausalLM"}) == "MllamaForCausalLM"
    assert architecture(tmp_path, {}) is None
    (tmp_path / "report.json").write_text(json.dumps({"architecture": "MllamaForCausalLM"}))
    assert architecture(tmp_path, {}) == "MllamaForCausalLM"


def test_runtime_refuses_a_model_whose_tokens_mix_outside_attention(tmp_path):
    """BART's decoder makes its positions from the length, not from position_ids: prefill is right, a decode step
    is not. Loading OUT for generation says so in one line; the converted model itself is right."""
    import transformers as tf

    import lincompile.runtime as lr
    from lincompile.errors import LincompileError

    cfg = tf.BartConfig(vocab_size=128, d_model=64, decoder_layers=2, encoder_layers=2, decoder_attention_heads=4,
                        encoder_attention_heads=4, decoder_ffn_dim=128, encoder_ffn_dim=128,
                        max_position_embeddings=256)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    converted = lincompile.convert(model, make_spec(spec_text("softmax")))
    ids = torch.randint(3, 128, (2, 15))
    with torch.no_grad():
        assert (converted(ids) - model(ids).logits).abs().max() <= 1e-5
    converted.save(tmp_path / "out")
    with pytest.raises(LincompileError, match="cannot be run from a state .* generate and export would be wrong"):
        lr.load(tmp_path / "out")
    with pytest.raises(LincompileError, match="cannot be run from a state"):
        lr.runtime_of(converted)
