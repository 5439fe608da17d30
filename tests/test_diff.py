"""GraphDiff: what each pass changed, grouped by module, and one site before/after (text, HTML, DOT)."""

from __future__ import annotations

import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
from conftest import make_spec, spec_text, tiny_model

import lincompile
from lincompile.diff import GraphDiff, compress_ints, diff_rows, op_kind
from lincompile.pipeline import PassRecord

SDPA = "aten.scaled_dot_product_attention"


@pytest.fixture(scope="module")
def conv():
    return lincompile.convert(tiny_model("llama"), make_spec(spec_text("liger_attention")), verify=False)


@pytest.fixture(scope="module")
def d(conv):
    return conv.diff()


def _by_name(d, name):
    return next(p for p in d.passes() if p.name == name)


def test_substitute_swaps_sdpa_for_operators(d):
    names = [p.name for p in d.passes()]
    assert names == ["match", "substitute", "fuse"]
    sub = _by_name(d, "substitute")
    removed_sdpa = [r for r in sub.removed if r["op"] == SDPA]
    assert len(removed_sdpa) == 2
    ops = [r for r in sub.added if r["op"].startswith("module:")]
    assert len(ops) == 2 and len(sub.added) == 2
    assert {op_kind(r) for r in ops} == {"lincompile.liger_attention"}
    assert {r["layer"] for r in ops} == {0, 1}
    # replaced: per module, removed and added op kinds
    attn = {m: (rm, ad) for m, rm, ad in sub.replaced}
    assert set(attn) == {"model.layers.0.self_attn", "model.layers.1.self_attn"}
    assert all(SDPA in rm and ad == ["lincompile.liger_attention"] for rm, ad in attn.values())
    # the consumer of the attention output survives, rewired to the operator
    assert any(any(a.startswith("ops_") for a in after["args"]) for _, after in sub.rewired)


def test_match_changes_nothing(d):
    m = _by_name(d, "match")
    assert not m.changed and m.added == m.removed == m.replaced == m.rewired == []
    assert m.notes == ["2 sites, 2 selected"]


def test_summary_groups_layers(d):
    lines = d.summary()
    assert lines[0].startswith(f"model.layers.{{0..1}}.self_attn: {SDPA} → lincompile.liger_attention")
    text = "\n".join(lines)
    assert "scaled_dot_product_attention" in text
    assert "model.layers.0.self_attn" not in text  # collapsed
    # dead nodes are counted per op kind
    assert re.search(r"-\d+ nodes \(aten\.\w+ ×\d+", text)
    assert d.summary(_by_name(d, "match")) == []


def test_to_text_site_view(d):
    text = d.to_text(layer=1)
    assert "match: 222 nodes" in text or "match:" in text
    assert "substitute:" in text and "model.layers.{0..1}.self_attn" in text
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("site model.layers.1.self_attn"))
    site = lines[start + 1:]
    minus = [x for x in site if x.startswith("- ")]
    plus = [x for x in site if x.startswith("+ ")]
    assert any("scaled_dot_product_attention" in x for x in minus)
    assert any("lincompile.liger_attention" in x for x in plus)
    assert all("layers_0" not in x for x in site)  # layer 1 only
    assert any(x.startswith("  linear_") for x in site)  # unchanged context lines
    assert "site " not in d.to_text()


def test_bad_layer(d):
    with pytest.raises(lincompile.errors.UsageError, match="layer 7"):
        d.to_text(layer=7)


class _Checker(HTMLParser):
    VOID = {"meta", "br", "hr", "img", "link", "input"}

    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.attrs = [], [], []

    def handle_starttag(self, tag, attrs):
        self.attrs += attrs
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(tag)


def test_to_html_self_contained(d):
    page = d.to_html(layer=1)
    p = _Checker()
    p.feed(page)
    p.close()
    assert not p.errors and not p.stack
    assert "http://" not in page and "https://" not in page
    assert not any(k in ("src", "href") for k, _ in p.attrs)
    assert "<link" not in page and "@import" not in page and "url(" not in page
    assert "model.layers.{0..1}.self_attn" in page and "lincompile.liger_attention" in page
    assert "Site model.layers.1.self_attn" in page
    assert "Site model.layers.0.self_attn" in d.to_html()  # default: first converted layer


def test_to_dot(d, tmp_path):
    dot = d.to_dot()
    assert dot.startswith("digraph") and dot.count("{") == dot.count("}")
    assert '"cluster_before"' in dot and '"cluster_after"' in dot
    assert "red" in dot and "darkgreen" in dot
    assert '"before:scaled_dot_product_attention"' in dot and '"after:ops_model_layers_0_self_attn"' in dot
    if shutil.which("dot") is None:
        pytest.skip("graphviz `dot` not installed")
    f = tmp_path / "d.dot"
    f.write_text(d.to_dot(layer=1))
    res = subprocess.run(["dot", "-Tsvg", str(f)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "<svg" in res.stdout


def test_identity_spec_summary():
    conv = lincompile.convert(tiny_model("llama"), make_spec(spec_text("softmax")), verify=False)
    lines = conv.diff().summary()
    assert lines[0].startswith(f"model.layers.{{0..1}}.self_attn: {SDPA} → lincompile.softmax")


def _row(name, op, module=None, layer=None, args=(), target=None, **kw):
    return dict(name=name, op=op, target=target or op, module=module, layer=layer, args=list(args), **kw)


def test_grouping_and_escaping_without_model():
    assert compress_ints([0, 1, 2]) == "{0..2}" and compress_ints([0, 2, 5, 6, 7]) == "{0,2,5..7}"
    assert compress_ints([3]) == "3"
    mods = [f"m.layers.{i}.attn" for i in (0, 2, 5, 6, 7)]
    before = [_row("x", "placeholderish")] + [_row(f"a{i}", SDPA, m, i, ["x"]) for i, m in enumerate(mods)]
    # a call_module row without "opname" (older snapshots): falls back to a generic operator name
    after = [_row("x", "placeholderish")] + [
        _row(f"o{i}", f"module:ops.{m}", m, i, ["x"], target=f"ops.{m}") for i, m in enumerate(mods)]
    after.append(_row("weird<&>\"", "aten.add", "m.<b>", None, ["x"]))
    hist = [PassRecord("capture", 0.1, before), PassRecord("substitute", 0.2, after)]
    d = GraphDiff(hist)
    lines = d.summary()
    assert lines[0].startswith(f"m.layers.{{0,2,5..7}}.attn: {SDPA} → lincompile.operator")
    page = d.to_html()
    assert "weird<&>" not in page and "m.<b>" not in page and "weird&lt;&amp;&gt;" in page
    assert d.to_dot(layer=2).count("{") == d.to_dot(layer=2).count("}")
    # a node whose op changed under the same name counts as removed and added
    pd = diff_rows("p", [_row("n", "aten.mul")], [_row("n", "aten.add")])
    assert len(pd.removed) == len(pd.added) == 1 and pd.replaced[0].removed == ["aten.mul"]
    # no history / one record: empty diffs, no crash
    assert GraphDiff([]).passes() == [] and GraphDiff(hist[:1]).to_text().startswith("capture")
