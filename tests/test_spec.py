"""Spec loading and validation: every error names file:line:col and says what was expected."""

from __future__ import annotations

import pytest

from lincompile.errors import SpecError
from lincompile.spec import LayerSelector, Spec, builtin_specs, load_yaml


def parse(text: str) -> Spec:
    return Spec.from_dict(*load_yaml(text, "t.yaml"))


def error(text: str) -> str:
    with pytest.raises(SpecError) as info:
        parse(text)
    return str(info.value)


def test_minimal_spec_and_defaults():
    spec = parse("rules:\n  - op: liger_attention\n")
    assert spec.name == "t"
    assert spec.capture.attn_implementation == "sdpa"
    rule = spec.rules[0]
    assert rule.pattern == "softmax_attention" and rule.layers.kind == "all" and rule.mask == ("any",)
    resolved = spec.resolved()
    assert resolved["rules"][0]["params"]["window"] == 64  # defaults filled in
    assert parse_roundtrip(resolved).rules[0].params["window"] == 64


def parse_roundtrip(data):
    return Spec.from_dict(data)


@pytest.mark.parametrize("name", builtin_specs())
def test_builtin_specs_validate(name):
    spec = Spec.builtin(name)
    assert spec.rules
    assert spec.raw  # each comes with its description comment (checked by `lincompile specs`)


def test_invalid_yaml_points_at_line():
    msg = error("rules:\n  - op: [liger\n")
    assert msg.startswith("t.yaml:3:") and "invalid YAML" in msg


def test_unknown_key_did_you_mean():
    msg = error("rules:\n  - op: softmax\n    layer: all\n")
    assert msg.startswith("t.yaml:3:5:") and 'unknown key "layer"' in msg and 'did you mean "layers"' in msg


def test_unknown_top_level_key():
    assert 'did you mean "rules"' in error("rule:\n  - op: softmax\n")


def test_unknown_op_did_you_mean():
    msg = error("rules:\n  - op: liger_atention\n")
    assert msg.startswith("t.yaml:2:9:") and 'did you mean "liger_attention"' in msg


def test_unknown_pattern():
    msg = error("rules:\n  - op: softmax\n    pattern: spda\n")
    assert msg.startswith("t.yaml:3:14:") and 'did you mean "sdpa"' in msg


def test_unknown_param_and_wrong_param_type():
    assert 'unknown param "windw"' in error("rules:\n  - op: liger_attention\n    params: {windw: 3}\n")
    msg = error("rules:\n  - op: liger_attention\n    params: {window: big}\n")
    assert msg.startswith("t.yaml:3:") and "must be an integer, got a string" in msg


def test_param_values_are_checked_before_any_model():
    """Each operator's own range and choice checks run when the spec loads, at the value's line and column."""
    msg = error("rules:\n  - op: liger_gla\n    params: {feature_map: tanh}\n")
    assert msg.startswith("t.yaml:3:27:") and 'feature_map must be one of' in msg and '"tanh"' in msg
    msg = error("rules:\n  - op: liger_attention\n    params:\n      window: -5\n")
    assert msg.startswith("t.yaml:4:15:") and 'op "liger_attention": window must be at least 1' in msg
    assert "gate_normalizer must be positive" in error("rules:\n  - op: liger_gla\n    params: {gate_normalizer: 0}\n")
    assert "num_sinks must be at least 0" in error("rules:\n  - op: lizard\n    params: {num_sinks: -1}\n")
    parse("rules:\n  - op: liger_attention\n    params: {window: 1}\n")  # the smallest valid value passes
    # a window's decode state is allocated whole: 10**20 overflowed and 10**9 asked for 256 GB
    msg = error("rules:\n  - op: lizard\n    params: {window: 100000000000000000000}\n")
    assert msg.startswith("t.yaml:3:22:") and "window must be at most 65536" in msg
    parse("rules:\n  - op: swa_sinks\n    params: {window: 65536}\n")


def test_exponent_numbers_are_numbers():
    """PyYAML follows YAML 1.1, where an unquoted 1e-3 is a string; users (and YAML 1.2) mean a number."""
    spec = parse("rules:\n  - op: liger_gla\n    params: {gate_normalizer: 1e1}\n")
    assert spec.rules[0].params["gate_normalizer"] == 10.0
    data, _ = load_yaml("a: 1e-3\nb: '1e-3'\nc: -2.5E+2\nd: 1e\ne: !!str 1e-3\n", "t.yaml")
    assert data == {"a": 0.001, "b": "1e-3", "c": -250.0, "d": "1e", "e": "1e-3"}  # quoted or tagged: text
    with pytest.raises(SpecError, match="t.yaml:1:4: 1e400 is out of range"):
        load_yaml("a: 1e400\n", "t.yaml")


def test_value_checks_allocate_nothing_and_draw_no_random_numbers():
    """The stand-in operator lives on the meta device: a size no machine could allocate still validates (its own
    checks pass; a real model would fail later, as before), and the global random state is left as it was."""
    import torch

    torch.manual_seed(0)
    want = torch.rand(4)
    torch.manual_seed(0)
    parse("rules:\n  - op: lizard\n    params: {num_sinks: 100000000000}\n")  # 800 GB of sink rows for real
    parse("rules:\n  - op: lolcats\n    params: {window: 32}\n")
    assert torch.equal(torch.rand(4), want)


def test_wrong_types():
    assert "rules must be a list, got a mapping" in error("rules: {op: softmax}\n")
    assert "capture.attn_implementation" in error("capture: {attn_implementation: flash}\nrules:\n  - op: softmax\n")
    assert "a spec must be a mapping" in error("- 1\n- 2\n")


def test_probe_sizes_that_export_would_freeze():
    assert "t.yaml:2:26: capture.probe.batch must be at least 2" in error(
        "rules: [{op: softmax}]\ncapture: {probe: {batch: 1}}\n")
    assert "capture.probe.seq_len must be at least 2" in error("rules: [{op: softmax}]\ncapture: {probe: {seq_len: 1}}\n")
    assert parse("rules: [{op: softmax}]\ncapture: {probe: {batch: 2, seq_len: 2}}\n").capture.probe_batch == 2


def test_missing_rules_and_empty():
    assert 'no "rules"' in error("name: x\n")
    assert "empty" in error("")


def test_duplicate_key():
    assert 'duplicate key "op"' in error("rules:\n  - op: softmax\n    op: softmax\n")


def test_python_tags_are_refused():
    msg = error("rules:\n  - op: !!python/object/apply:os.system ['true']\n")
    assert "invalid YAML" in msg


def test_layer_selectors():
    have = list(range(10))
    assert LayerSelector.parse("all").select(have) == have
    assert LayerSelector.parse([0, 3, "5-7"]).select(have) == [0, 3, 5, 6, 7]
    assert LayerSelector.parse({"except": [0, "8-9"]}).select(have) == list(range(1, 8))
    assert LayerSelector.parse({"every": 4, "offset": 3}).select(have) == [3, 7]
    with pytest.raises(SpecError, match="out of range"):
        LayerSelector.parse([12]).select(have)


def test_bad_layer_selectors():
    assert "every >= 1" in error("rules:\n  - op: softmax\n    layers: {every: 0}\n")
    assert 'layer "x"' in error("rules:\n  - op: softmax\n    layers: [x]\n")
    assert "empty" in error("rules:\n  - op: softmax\n    layers: ['9-3']\n")


def test_custom_op_format():
    assert parse("rules:\n  - op: pkg.mod:Cls\n").rules[0].op == "pkg.mod:Cls"
    assert "package.module:ClassName" in error("rules:\n  - op: 'pkg.mod:'\n")


def test_bad_regex():
    assert "not a valid regular expression" in error("rules:\n  - op: softmax\n    modules: '(['\n")


def test_missing_file(tmp_path):
    with pytest.raises(SpecError, match="spec file not found"):
        Spec.from_yaml(tmp_path / "nope.yaml")


def test_unknown_builtin():
    with pytest.raises(SpecError, match='did you mean "liger-attention"'):
        Spec.resolve("liger-atention")


def test_specs_readme_lists_every_operator_and_its_defaults():
    """The operator table in specs/README.md is the spec writer's reference: it must not drift from the code."""
    from pathlib import Path

    from lincompile.kernels import registry

    text = (Path(__file__).resolve().parents[1] / "specs" / "README.md").read_text(encoding="utf-8")
    rows = {line.split("|")[1].strip().strip("`"): line for line in text.splitlines() if line.startswith("| `")}
    for name in registry.names():
        assert name in rows, f"specs/README.md has no row for operator {name}"
        for param, default in registry.get(name).params.items():
            shown = "null" if default is None else str(default).lower() if isinstance(default, bool) else str(default)
            assert f"`{param}` {shown}" in rows[name], f"{name}: `{param}` {shown} missing from {rows[name]!r}"
