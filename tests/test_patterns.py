"""User-declared patterns: validation with file:line:col, and matching on captured graphs (tiny, CPU)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lincompile.errors import SpecError
from lincompile.graph import short_op
from lincompile.patterns import match_user_pattern
from lincompile.spec import Spec, builtin_description, load_yaml

# A complete spec around one pattern; tests replace parts of it to provoke each error.
SPEC = """\
name: t
capture: {attn_implementation: eager}
patterns:
  p:
    nodes:
      kt: {op: transpose}
      scores: {op: [matmul, bmm]}
      scale: {op: [mul, div], optional: true}
      masked: {op: add, optional: true}
      probs: {op: softmax}
      out: {op: matmul}
    edges:
      - kt -> scores.args[1]
      - scores -> scale -> masked.args[0] -> probs -> out.args[0]
    captures:
      q: scores.args[0]
      k: kt.args[0]
      v: out.args[1]
      output: out
rules:
  - pattern: p
    op: liger_attention
"""


def parse(text: str) -> Spec:
    data, loc = load_yaml(text, "t.yaml")
    return Spec.from_dict(data, loc)


def where(text: str, needle: str, offset: int = 0) -> str:
    """'t.yaml:LINE:COL' of the first occurrence of needle (+offset columns) in text."""
    before = text[:text.index(needle) + offset]
    return f"t.yaml:{before.count(chr(10)) + 1}:{len(before) - before.rfind(chr(10))}"


# --------------------------------------------------------------------------------------------------
# Validation


def test_template_spec_is_valid():
    spec = parse(SPEC)
    assert list(spec.patterns) == ["p"] and spec.rules[0].pattern == "p"


@pytest.mark.parametrize("old,new,needle,offset,message", [
    # unknown key in a node: points at the key, suggests the right one
    ("probs: {op: softmax}", "probs: {op: softmax, optinal: true}", "optinal", 0,
     'unknown key "optinal" in node "probs" (did you mean "optional"?)'),
    # edge naming a node that is not declared
    ("-> probs -> out", "-> prob -> out", "- scores ->", 2, 'edge names undefined node "prob" (did you mean "probs"?)'),
    # bad capture expression
    ("q: scores.args[0]", "q: scores.arg[0]", "scores.arg[0]", 0, 'capture q: "scores.arg[0]" must be node'),
    # capture of an undefined node
    ("v: out.args[1]", "v: outt.args[1]", "outt", 0, 'capture v: undefined node "outt" (did you mean "out"?)'),
    # op name typo, caught without any model
    ("probs: {op: softmax}", "probs: {op: softmx}", "softmx", 0, 'op "softmx" is not an ATen op (did you mean "softmax"?)'),
    # q on an optional node: it might not exist
    ("q: scores.args[0]", "q: scale.args[0]", "scale.args[0]", 0, 'node "scale" is optional'),
    # a cycle: located at the edges list
    ("- kt -> scores.args[1]", "- kt -> scores.args[1]\n      - out -> kt", "- kt ->", 0,
     "edges form a cycle (kt -> scores -> scale -> masked -> probs -> out -> kt)"),
    # a node no edge reaches
    ("      - kt -> scores.args[1]\n", "", "- scores ->", 0, 'pattern "p" is not connected'),
    # wrong type for optional
    ("masked: {op: add, optional: true}", "masked: {op: add, optional: 3}", "3}", 0, "optional must be true"),
    # unknown capture name
    ("output: out", "outptu: out", "outptu", 0, 'unknown capture "outptu" (did you mean "output"?)'),
])
def test_validation_errors_are_located(old, new, needle, offset, message):
    assert old in SPEC
    text = SPEC.replace(old, new, 1)
    with pytest.raises(SpecError) as err:
        parse(text)
    assert message in str(err.value)
    assert str(err.value).startswith(where(text, needle, offset) + ": "), str(err.value)


def test_missing_output_capture():
    text = SPEC.replace("      output: out\n", "")
    with pytest.raises(SpecError) as err:
        parse(text)
    assert 'does not capture "output"' in str(err.value)
    assert str(err.value).startswith(where(text, "q: scores") + ": ")  # the captures mapping


def test_too_many_optional_groups():
    extra = "".join(f"      x{i}: {{op: mul, optional: true}}\n" for i in range(6))
    chain = " -> ".join(f"x{i}" for i in range(6))
    text = SPEC.replace("    edges:\n", extra + f"    edges:\n      - out -> {chain}\n")
    with pytest.raises(SpecError, match="at most 6"):
        parse(text)


def test_builtin_custom_pattern_spec_validates():
    spec = Spec.builtin("custom-pattern")
    assert spec.capture.attn_implementation == "eager"
    assert spec.rules[0].pattern == "eager_attention" and spec.rules[0].op == "liger_attention"
    assert spec.rules[0].params == {"window": 64}
    assert builtin_description("custom-pattern").startswith("Custom pattern: eager softmax attention")


# --------------------------------------------------------------------------------------------------
# Matching on a tiny eager Llama


@pytest.fixture(scope="module")
def llama():
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lincompile.passes.capture import capture
    from lincompile.spec import CaptureConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=16, intermediate_size=128, vocab_size=128)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    return capture(model, CaptureConfig(attn_implementation="eager")).gm


def custom_body():
    return copy.deepcopy(Spec.builtin("custom-pattern").patterns["eager_attention"])


def test_custom_pattern_matches_like_builtin(llama):
    from lincompile.passes.match import match_eager

    sites, misses = match_user_pattern(llama, "eager_attention", custom_body())
    ref, _ = match_eager(llama)
    assert len(sites) == len(ref) == 2 and misses == []
    for s, r in zip(sites, ref):
        assert (s.module, s.layer, s.pattern) == (r.module, r.layer, "eager_attention")
        assert s.output is r.output
        assert s.bindings == {k: r.bindings[k] for k in ("q", "k", "v", "mask")}
        assert s.attrs["scale"] == pytest.approx(r.attrs["scale"]) == 0.25
        assert set(s.nodes) == set(r.nodes)  # cast, dropout and the metadata check included


def test_find_sites_completes_user_sites(llama):
    from lincompile.passes.match import find_sites

    result = find_sites(llama, ["eager_attention"], {"eager_attention": custom_body()})
    assert [s.layer for s in result.sites] == [0, 1]
    site = result.sites[0]
    assert site.attrs["num_heads"] == 4 and site.attrs["num_kv_heads"] == 2 and site.attrs["rope"]
    assert site.attrs["q_proj"] == "model.layers.0.self_attn.q_proj"


def small(**changes):
    """The template's pattern, with cast/dropout (present in the graph) added as optional nodes."""
    data, _ = load_yaml(SPEC, "t.yaml")
    body = data["patterns"]["p"]
    body["nodes"].update(cast={"op": "to", "optional": True}, drop={"op": "dropout", "optional": True})
    body["edges"][1] = "scores -> scale -> masked.args[0] -> probs -> cast -> drop -> out.args[0]"
    for key, value in changes.items():
        body["nodes"][key] = value
    return body


def test_optional_node_absent_from_graph(llama):
    # Llama has no tanh: an optional one is bypassed, a required one makes the pattern fail.
    body = small(cap={"op": "tanh", "optional": True})
    body["edges"][1] = "scores -> scale -> cap -> masked.args[0] -> probs -> cast -> drop -> out.args[0]"
    sites, _ = match_user_pattern(llama, "p", body)
    assert len(sites) == 2 and not any(n.name.startswith("tanh") for s in sites for n in s.nodes)
    body["nodes"]["cap"]["optional"] = False
    assert match_user_pattern(llama, "p", body)[0] == []


def test_optional_nodes_present_are_matched_and_required(llama):
    sites, _ = match_user_pattern(llama, "p", small())
    assert len(sites) == 2
    assert {short_op(n) for n in sites[0].nodes} >= {"to", "dropout", "_assert_tensor_metadata"}
    # Without the cast/dropout nodes the chain softmax -> matmul is not direct: no match, but near misses.
    data, _ = load_yaml(SPEC, "t.yaml")
    sites, misses = match_user_pattern(llama, "p", data["patterns"]["p"])
    assert sites == [] and len(misses) == 2
    assert 'chain breaks at "out"' in misses[0].reason and misses[0].module == "model.layers.0.self_attn"


def test_optional_group_comes_and_goes_together(llama):
    # scale (present in Llama) grouped with a tanh (absent): the whole group is absent, so no match.
    body = small(scale={"op": "mul", "optional": "g"}, cap={"op": "tanh", "optional": "g"})
    body["edges"][1] = "scores -> scale -> cap -> masked.args[0] -> probs -> cast -> drop -> out.args[0]"
    assert match_user_pattern(llama, "p", body)[0] == []
    body["nodes"]["cap"]["optional"] = "h"
    assert len(match_user_pattern(llama, "p", body)[0]) == 2


def test_alternatives(llama):
    assert len(match_user_pattern(llama, "p", small(scores={"op": ["bmm", "matmul"]}))[0]) == 2
    assert match_user_pattern(llama, "p", small(scores={"op": "bmm"}))[0] == []
    # args constraints: softmax over the last dim only
    assert len(match_user_pattern(llama, "p", small(probs={"op": "softmax", "args": {1: [-1, 3]}}))[0]) == 2
    assert match_user_pattern(llama, "p", small(probs={"op": "softmax", "args": {1: 0}}))[0] == []


def test_capture_that_is_not_a_constant_is_a_near_miss(llama):
    body = small()
    body["captures"]["scale"] = "scale.args[0]"  # the scores tensor, not the constant
    sites, misses = match_user_pattern(llama, "p", body)
    assert sites == [] and "capture scale: scale.args[0] is not a constant" in misses[0].reason


# --------------------------------------------------------------------------------------------------
# Softcap, divided scale and a declared constant, on a hand-written attention (no transformers)


class Softcapped(nn.Module):
    def forward(self, q, k, v):
        s = torch.matmul(q, k.transpose(-1, -2)) / 8.0
        s = torch.tanh(s / 30.0) * 30.0
        return torch.matmul(torch.softmax(s, dim=-1), v)


def test_softcap_group_and_div_scale():
    q = torch.randn(1, 2, 5, 64)
    gm = torch.export.export(Softcapped(), (q, q, q), strict=False).module()
    body = custom_body()
    sites, _ = match_user_pattern(gm, "eager_attention", body)
    assert len(sites) == 1
    assert sites[0].attrs["scale"] == pytest.approx(1 / 8) and sites[0].attrs["softcap"] == 30.0
    assert "mask" not in sites[0].bindings  # optional add absent
    body["captures"]["scale"] = 0.5  # a declared constant wins over the graph
    assert match_user_pattern(gm, "eager_attention", body)[0][0].attrs["scale"] == 0.5
