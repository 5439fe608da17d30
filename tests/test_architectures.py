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
