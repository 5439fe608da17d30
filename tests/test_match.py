"""Match pass: bindings, mask classification, rule selection, mixed specs, node counts after substitute."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lincompile
from lincompile.errors import SpecError, VerifyError
from lincompile.graph import op_counts
from lincompile.kernels.base import Operator
from lincompile.passes.capture import capture
from lincompile.passes.match import classify_mask, match
from lincompile.spec import CaptureConfig

from conftest import make_spec, spec_text, tiny_config, tiny_model


def test_bindings_on_gqa_llama():
    model = tiny_model("llama")
    spec = make_spec(spec_text("liger_attention"))
    result = match(capture(model, CaptureConfig()), spec)
    site = result.sites[0]
    assert (site.module, site.layer, site.pattern) == ("model.layers.0.self_attn", 0, "sdpa")
    a = site.attrs
    assert (a["num_heads"], a["num_kv_heads"], a["head_dim"], a["scale"]) == (4, 2, 16, 0.25)
    assert a["q_proj"] == "model.layers.0.self_attn.q_proj" and a["o_proj"] == "model.layers.0.self_attn.o_proj"
    assert a["k_proj"].endswith("k_proj") and a["v_proj"].endswith("v_proj")
    assert a["mask_kind"] == "causal" and a["rope"]
    shapes = site.describe_bindings()
    assert shapes["k"].startswith("[") and ", 4, " in shapes["k"]  # repeated for GQA
    assert ", 2, " in shapes["k_kv"] and ", 2, " in shapes["k_pre_rope"]
    # The weight accessor reaches the projection's parameters through the graph module.
    assert site.weight("q_proj").shape == (64, 64)


def test_pre_rope_values_are_the_projection_outputs():
    model = tiny_model("llama")
    cap = capture(model, CaptureConfig())
    site = match(cap, make_spec(spec_text("softmax"))).sites[0]
    from lincompile.graph import record

    vals = record(cap.gm, [site.bindings["k_pre_rope"], site.bindings["hidden"]], cap.probe)
    hidden = vals[site.bindings["hidden"]]
    k = model.model.layers[0].self_attn.k_proj(hidden)  # [B, T, 2*16]
    expected = k.view(*k.shape[:2], 2, 16).transpose(1, 2)
    assert torch.allclose(vals[site.bindings["k_pre_rope"]], expected, atol=1e-6)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_sliding_window_masks_are_classified(impl):
    # Gemma2: alternating sliding (window 4) and full layers; it has no sdpa path, capture falls back to eager.
    model = tiny_model("gemma2", impl)
    cap = capture(model, CaptureConfig(attn_implementation=impl))
    result = match(cap, make_spec(spec_text("softmax", impl)))
    kinds = [(s.layer, s.attrs["mask_kind"], s.attrs.get("window")) for s in result.sites]
    assert kinds == [(0, "sliding", 4), (1, "causal", None)]
    assert result.sites[0].attrs["softcap"] == 50.0
    if impl == "sdpa":
        assert any("captured with eager" in n for n in cap.notes)


def test_rules_select_on_mask_kind_and_keep_sliding_layers():
    model = tiny_model("gemma2", "eager")
    spec = make_spec("capture: {attn_implementation: eager}\nrules:\n"
                     "  - {mask: sliding, op: keep}\n  - {op: liger_attention, params: {window: 8}}\n")
    converted = lincompile.convert(model, spec)
    assert [(s["layer"], s["op"]) for s in converted.report["sites"]] == [(0, "keep"), (1, "liger_attention")]
    counts = op_counts(converted.graph_module.graph)
    assert counts["aten.softmax"] == 1 and counts["call_module"] >= 1


def test_classify_mask_kinds():
    T = 12
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    i = torch.arange(T)
    assert classify_mask(causal, False) == ("causal", None)
    assert classify_mask(causal & (i[:, None] - i[None, :] < 5), False) == ("sliding", 5)
    assert classify_mask(causal & (i[:, None] // 4 == i[None, :] // 4), False) == ("chunked", 4)
    assert classify_mask(torch.ones(T, T, dtype=torch.bool), False) == ("bidirectional", None)
    additive = torch.zeros(T, T).masked_fill(~causal, float("-inf"))
    assert classify_mask(additive[None, None], False) == ("causal", None)
    assert classify_mask(None, True) == ("causal", None)


def test_mixed_spec_inter_layer_hybrid():
    cfg = tiny_config("llama")
    cfg.num_hidden_layers = 4
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    spec = make_spec("rules:\n  - {layers: [0, '2-3'], op: liger_gla}\n  - {layers: {every: 4, offset: 1}, op: keep}\n")
    converted = lincompile.convert(model, spec)
    assert [s["op"] for s in converted.report["sites"]] == ["liger_gla", "keep", "liger_gla", "liger_gla"]
    assert op_counts(converted.graph_module.graph)["aten.scaled_dot_product_attention"] == 1
    ids = torch.randint(0, 128, (1, 20))
    assert torch.isfinite(converted(ids)).all()
    # layers {except: ...} and module regexes
    spec = make_spec("rules:\n  - {layers: {except: [1]}, modules: 'model\\.layers\\.[0-2]\\.self_attn', op: liger_gla}\n")
    converted = lincompile.convert(tiny_model("llama").eval() if False else model, spec)
    assert [s["layer"] for s in converted.report["sites"]] == [0, 2]


def test_selector_matching_nothing_lists_what_exists():
    model = tiny_model("llama")
    spec = make_spec("rules:\n  - {modules: 'decoder\\..*', op: liger_gla}\n")
    with pytest.raises(SpecError) as info:
        lincompile.convert(model, spec)
    msg = str(info.value)
    assert msg.startswith("test.yaml:2:5:") and "selects no site" in msg and "model.layers.0.self_attn" in msg


class _NaNOp(Operator):
    name = "nan_op"
    inputs = ("q", "v")

    def forward(self, q, v):
        return q * float("nan")


def test_nan_output_is_refused_naming_the_layer(monkeypatch):
    from lincompile.kernels import registry

    monkeypatch.setitem(registry._OPS, "nan_op", _NaNOp)
    model = tiny_model("llama")
    with pytest.raises(VerifyError, match=r"nan_op at model.layers.0.self_attn \(layer 0\) produced NaN"):
        lincompile.convert(model, make_spec(spec_text("nan_op")))


def test_converted_graph_re_exports_at_any_length():
    model = tiny_model("llama")
    converted = lincompile.convert(model, make_spec(spec_text("liger_attention")))
    ids = torch.randint(0, 128, (2, 10))
    seq = torch.export.Dim("seq", min=2, max=512)
    ep = torch.export.export(converted.eval(), (ids,), dynamic_shapes={"input_ids": {1: seq}}, strict=False)
    other = torch.randint(0, 128, (2, 77))
    assert torch.allclose(ep.module()(other), converted(other), atol=1e-5)


def test_user_op_without_opt_in_is_refused():
    from lincompile.errors import UsageError

    with pytest.raises(UsageError, match="--allow-code"):
        lincompile.convert(tiny_model("llama"), make_spec(spec_text("mypkg.ops:Op")))


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_bfloat16_models_convert(impl):
    model = tiny_model("llama", impl).to(torch.bfloat16)
    identity = lincompile.convert(model, make_spec(spec_text("softmax", impl)))
    assert identity.report["capture_max_abs_diff"] == 0.0
    assert identity.report["logits_max_abs_diff"] <= 0.02
    converted = lincompile.convert(tiny_model("llama", impl).to(torch.bfloat16),
                                   make_spec(spec_text("liger_attention", impl)))
    out = converted(torch.randint(0, 128, (1, 70)))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
