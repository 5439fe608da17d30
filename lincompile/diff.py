"""What each compiler pass changed in the graph: the data behind `lincompile diff`.

    d = converted.diff()                  # GraphDiff over converted.history (one snapshot per pass)
    d.passes()                            # [PassDiff(name, added, removed, replaced, rewired)] per pass pair
    print("\\n".join(d.summary()))        # model.layers.{0..29}.self_attn: aten.sdpa → lincompile.liger_attention
    d.to_text(layer=3) / d.to_html() / d.to_dot()

Rows are `pipeline.snapshot` rows ({name, op, target, module, layer, args[, opname]}). Passes edit the graph in
place and fx keeps the names of surviving nodes, so nodes are matched by name (a name whose op changed counts as
removed and added); a surviving node whose inputs changed is "rewired".
"""

from __future__ import annotations

import difflib
import html
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

from .errors import UsageError

ARROW = "→"


class Replacement(NamedTuple):
    module: str
    removed: list[str]  # op kinds, graph order
    added: list[str]


@dataclass
class PassDiff:
    name: str
    added: list[dict]
    removed: list[dict]
    replaced: list[Replacement]
    rewired: list[tuple[dict, dict]] = field(default_factory=list)  # (before row, after row): same node, new args
    seconds: float = 0.0
    nodes: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.added or self.removed or self.rewired)


def op_kind(row: dict) -> str:
    """'aten.mul', 'lincompile.liger_attention' (operator call_modules), 'get_attr', 'module:<target>'."""
    if row.get("opname"):
        return row["opname"]
    op = row.get("op", "?")
    if op.startswith("module:") and str(row.get("target", "")).startswith("ops."):
        return "lincompile.operator"  # snapshot without "opname": operator name unknown
    return op


def is_key(kind: str) -> bool:
    """The ops a conversion is about: attention/softmax kernels, lincompile operators and their kernel ops."""
    return kind.startswith(("lincompile.", "kernel.")) or "attention" in kind or "softmax" in kind


def module_of(row: dict) -> str:
    return row.get("module") or "(root)"


def _key(row: dict) -> tuple:
    # op_kind, not the raw op: an operator node the fuse pass moved onto kernel ops counts as replaced.
    return row["name"], op_kind(row), row.get("target")


def diff_rows(name: str, before: list[dict], after: list[dict]) -> PassDiff:
    b, a = {_key(r): r for r in before}, {_key(r): r for r in after}
    removed = [r for r in before if _key(r) not in a]
    added = [r for r in after if _key(r) not in b]
    rewired = [(b[_key(r)], r) for r in after if _key(r) in b and b[_key(r)].get("args") != r.get("args")]
    mods: dict[str, tuple[list, list]] = {}
    for side, rows in ((0, removed), (1, added)):
        for r in rows:
            mods.setdefault(module_of(r), ([], []))[side].append(op_kind(r))
    replaced = [Replacement(m, rm, ad) for m, (rm, ad) in mods.items() if rm and ad]
    return PassDiff(name, added, removed, replaced, rewired)


# ---- grouping modules that differ only by integer components --------------------------------------------------

def compress_ints(values) -> str:
    """[0,1,2] -> '{0..2}', [0,2,5,6,7] -> '{0,2,5..7}', [3] -> '3'."""
    vs = sorted(set(values))
    if len(vs) == 1:
        return str(vs[0])
    runs, start, prev = [], vs[0], vs[0]
    for x in vs[1:] + [None]:
        if x is not None and x == prev + 1:
            prev = x
            continue
        runs.append(str(start) if start == prev else f"{start}..{prev}")
        if x is not None:
            start = prev = x
    return "{" + ",".join(runs) + "}"


def _collapse(paths: list[str]) -> list[str]:
    """Module paths with the same shape (only integer components differ) -> one pattern each; a group whose
    members are not the full product of their varying positions is split on its first varying position."""
    groups: dict[tuple, list[list[str]]] = {}
    for p in paths:
        parts = p.split(".")
        shape = tuple("#" if x.isdigit() else x for x in parts)
        groups.setdefault(shape, []).append(parts)
    out = []
    for members in groups.values():
        out += _collapse_group(members)
    return out


def _collapse_group(members: list[list[str]]) -> list[str]:
    n = len(members[0])
    vals = [sorted({int(m[i]) for m in members}) if members[0][i].isdigit() else None for i in range(n)]
    varying = [i for i in range(n) if vals[i] is not None and len(vals[i]) > 1]
    product = 1
    for i in varying:
        product *= len(vals[i])
    if len(varying) > 1 and product != len({tuple(m) for m in members}):
        i = varying[0]
        out = []
        for v in vals[i]:
            out += _collapse_group([m for m in members if int(m[i]) == v])
        return out
    return [".".join(compress_ints(vals[i]) if i in varying else members[0][i] for i in range(n))]


def _counts(kinds: list[str], limit: int = 6) -> str:
    c = Counter(kinds).most_common()
    parts = [k if n == 1 else f"{k} ×{n}" for k, n in c[:limit]] + (["…"] if len(c) > limit else [])
    return ", ".join(parts)


def _nodes(n: int) -> str:
    return f"{n} node" + ("" if n == 1 else "s")


class SummaryLine(NamedTuple):
    modules: str  # 'model.layers.{0..1}.self_attn'
    key_removed: list[str]  # distinct key op kinds, graph order
    key_added: list[str]
    removed: list[str]  # all removed op kinds of one member module
    added: list[str]
    count: int  # how many modules the line stands for

    def text(self) -> str:
        head = f"{self.modules}: "
        if self.key_removed or self.key_added:
            head += f"{', '.join(self.key_removed) or '(nothing)'} {ARROW} {', '.join(self.key_added) or '(nothing)'}"
        elif self.removed and self.added:
            head += "rewritten"
        else:
            head += "removed" if self.removed else "added"
        tail = []
        if self.removed:
            tail.append(f"-{_nodes(len(self.removed))} ({_counts(self.removed)})")
        if self.added:
            tail.append(f"+{_nodes(len(self.added))} ({_counts(self.added)})")
        return head + "  [" + ("each: " if self.count > 1 else "") + "; ".join(tail) + "]"


def summarize(pd: PassDiff) -> list[SummaryLine]:
    """One line per group of modules with the same change, layer indices compressed; key-op lines first."""
    per: dict[str, tuple[list, list]] = {}
    for side, rows in ((0, pd.removed), (1, pd.added)):
        for r in rows:
            per.setdefault(module_of(r), ([], []))[side].append(op_kind(r))
    by_sig: dict[tuple, list[str]] = {}
    for m, (rm, ad) in per.items():
        by_sig.setdefault((tuple(sorted(Counter(rm).items())), tuple(sorted(Counter(ad).items()))), []).append(m)
    lines = []
    for sig, mods in by_sig.items():
        rm, ad = per[mods[0]]
        for pattern in _collapse(mods):
            n = sum(1 for m in mods if re.fullmatch(_pattern_regex(pattern), m))
            lines.append(SummaryLine(pattern, _keys(rm), _keys(ad), rm, ad, max(n, 1)))
    lines.sort(key=lambda s: (not (s.key_removed or s.key_added), -len(s.removed) - len(s.added)))
    return lines


def _keys(kinds: list[str]) -> list[str]:
    return list(dict.fromkeys(k for k in kinds if is_key(k)))


def _pattern_regex(pattern: str) -> str:
    return re.sub(r"\\\{[^}]*\\\}", r"\\d+", re.escape(pattern))


# ---- the whole history -----------------------------------------------------------------------------------------

class GraphDiff:
    def __init__(self, history):
        self.history = list(history)

    def passes(self) -> list[PassDiff]:
        out = []
        for before, after in zip(self.history, self.history[1:]):
            pd = diff_rows(after.name, before.nodes, after.nodes)
            pd.seconds, pd.nodes, pd.notes = after.seconds, len(after.nodes), list(after.notes)
            out.append(pd)
        return out

    def overall(self) -> PassDiff:
        """First snapshot (capture) against the last one."""
        if not self.history:
            return PassDiff("(none)", [], [], [])
        first, last = self.history[0], self.history[-1]
        pd = diff_rows(f"{first.name} {ARROW} {last.name}", first.nodes, last.nodes)
        pd.nodes = len(last.nodes)
        return pd

    def summary(self, pd: PassDiff | None = None) -> list[str]:
        """Grouped lines for one pass diff, or for capture → last pass when `pd` is None."""
        return [s.text() for s in summarize(pd or self.overall())]

    # -- one site, before and after --

    def converted_layers(self) -> list[int]:
        pd = self.overall()
        return sorted({r["layer"] for r in pd.removed + pd.added if r.get("layer") is not None and is_key(op_kind(r))})

    def site(self, layer: int | None = None):
        """(module, layer, before rows, after rows, difflib opcodes) for the site in `layer` (None: the first
        converted layer). Site = the nodes of that layer under the module holding the changed key op."""
        if len(self.history) < 2:
            raise UsageError("diff: the history has fewer than two passes")
        pd = self.overall()
        if layer is None:
            layers = self.converted_layers() or sorted({r["layer"] for r in pd.removed + pd.added
                                                        if r.get("layer") is not None})
            if not layers:
                raise UsageError("diff: no layer changed, so there is no site to show")
            layer = layers[0]
        changed = [r for r in pd.removed + pd.added if r.get("layer") == layer and r.get("module")]
        if not changed:
            raise UsageError(f"--layer {layer}: nothing changed in that layer "
                             f"(converted layers: {self.converted_layers()})")
        key = [r for r in changed if is_key(op_kind(r))]
        module = Counter(module_of(r) for r in (key or changed)).most_common(1)[0][0]

        def under(r):
            m = r.get("module") or ""
            return r.get("layer") == layer and (m == module or m.startswith(module + "."))

        before = [r for r in self.history[0].nodes if under(r)]
        after = [r for r in self.history[-1].nodes if under(r)]
        sig = lambda r: (r["name"], r.get("op"), tuple(r.get("args", [])))  # noqa: E731
        sm = difflib.SequenceMatcher(None, [sig(r) for r in before], [sig(r) for r in after], autojunk=False)
        return module, layer, before, after, sm.get_opcodes()

    # -- renderings --

    def to_text(self, layer: int | None = None) -> str:
        out = []
        if self.history:
            h = self.history[0]
            out.append(f"{h.name}: {_nodes(len(h.nodes))} ({h.seconds:.2f} s)" + "".join(f"  [{n}]" for n in h.notes))
        for pd in self.passes():
            head = f"{pd.name}: {_nodes(pd.nodes)} ({pd.seconds:.2f} s)"
            if not pd.changed:
                head += ": no change"
            else:
                head += (f": +{len(pd.added)} added, -{len(pd.removed)} removed, {len(pd.rewired)} rewired, "
                         f"{len(pd.replaced)} module(s) replaced")
            out.append(head + "".join(f"  [{n}]" for n in pd.notes))
            out += [f"  {line}" for line in self.summary(pd)]
        if layer is not None:
            module, layer, before, after, ops = self.site(layer)
            out += ["", f"site {module} (layer {layer}), {self.history[0].name} {ARROW} {self.history[-1].name}:"]
            for tag, i1, i2, j1, j2 in ops:
                if tag == "equal":
                    out += [f"  {_line(r)}" for r in before[i1:i2]]
                    continue
                out += [f"- {_line(r)}" for r in before[i1:i2]]
                out += [f"+ {_line(r)}" for r in after[j1:j2]]
        return "\n".join(out) + "\n"

    def to_html(self, layer: int | None = None) -> str:
        e = html.escape
        parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                 f"<title>lincompile diff</title><style>{_CSS}</style></head><body>",
                 "<h1>lincompile diff</h1>", "<h2>Passes</h2>",
                 "<table><tr><th>pass</th><th>nodes</th><th>seconds</th><th>added</th><th>removed</th>"
                 "<th>rewired</th><th>replaced modules</th><th>notes</th></tr>"]
        if self.history:
            h = self.history[0]
            parts.append(f"<tr><td>{e(h.name)}</td><td>{len(h.nodes)}</td><td>{h.seconds:.2f}</td>"
                         f"<td></td><td></td><td></td><td></td><td>{e('; '.join(h.notes))}</td></tr>")
        diffs = self.passes()
        for pd in diffs:
            parts.append(f"<tr><td>{e(pd.name)}</td><td>{pd.nodes}</td><td>{pd.seconds:.2f}</td>"
                         f"<td class=add>{len(pd.added)}</td><td class=rem>{len(pd.removed)}</td>"
                         f"<td>{len(pd.rewired)}</td><td>{len(pd.replaced)}</td><td>{e('; '.join(pd.notes))}</td></tr>")
        parts.append("</table>")
        parts.append(f"<h2>Summary ({e(self.overall().name)})</h2>" + _html_summary(summarize(self.overall())))
        for pd in diffs:
            parts.append(f"<h2>Pass {e(pd.name)}</h2>")
            if not pd.changed:
                parts.append("<p>No change.</p>")
                continue
            parts.append(_html_summary(summarize(pd)))
            for label, rows, cls in (("removed", pd.removed, "rem"), ("added", pd.added, "add")):
                if rows:
                    body = "".join(f"<tr class={cls}><td>{e(module_of(r))}</td><td><code>{e(_line(r))}</code></td></tr>"
                                   for r in rows)
                    parts.append(f"<details><summary>{len(rows)} {label}</summary><table>"
                                 f"<tr><th>module</th><th>node</th></tr>{body}</table></details>")
        try:
            module, lay, before, after, ops = self.site(layer)
        except UsageError as err:
            if layer is not None:
                raise
            parts.append(f"<p>{e(str(err))}</p>")
        else:
            parts.append(f"<h2>Site {e(module)} (layer {lay})</h2><table class=site><tr>"
                         f"<th>before ({e(self.history[0].name)})</th><th>after ({e(self.history[-1].name)})</th></tr>")
            for tag, i1, i2, j1, j2 in ops:
                left, right = before[i1:i2], after[j1:j2]
                for k in range(max(len(left), len(right))):
                    lc = "" if tag == "equal" else " class=rem"
                    rc = "" if tag == "equal" else " class=add"
                    lt = f"<td{lc}><code>{e(_line(left[k]))}</code></td>" if k < len(left) else "<td></td>"
                    rt = f"<td{rc}><code>{e(_line(right[k]))}</code></td>" if k < len(right) else "<td></td>"
                    parts.append(f"<tr>{lt}{rt}</tr>")
            parts.append("</table>")
        parts.append("</body></html>\n")
        return "\n".join(parts)

    def to_dot(self, layer: int | None = None) -> str:
        module, lay, before, after, ops = self.site(layer)
        gone = {r["name"] for tag, i1, i2, _, _ in ops if tag != "equal" for r in before[i1:i2]}
        new = {r["name"] for tag, _, _, j1, j2 in ops if tag != "equal" for r in after[j1:j2]}
        out = ["digraph lincompile_diff {", "  rankdir=TB;", '  node [shape=box, fontname="monospace", fontsize=10];',
               f"  label={_q(f'{module} (layer {lay})')};", "  labelloc=t;"]
        for side, rows, marked, color in (("before", before, gone, "#ffd6d6"), ("after", after, new, "#d6f5d6")):
            out += [f"  subgraph {_q('cluster_' + side)} {{", f"    label={_q(side)};"]
            names = {r["name"] for r in rows}
            for r in rows:
                style = f', style=filled, fillcolor="{color}", color="{"red" if side == "before" else "darkgreen"}"' \
                    if r["name"] in marked else ""
                out.append(f"    {_q(side + ':' + r['name'])} [label={_q(r['name'] + chr(10) + op_kind(r))}{style}];")
            for ext in dict.fromkeys(a for r in rows for a in r.get("args", []) if a not in names):
                out.append(f"    {_q(side + ':' + ext)} [label={_q(ext)}, shape=plaintext, fontcolor=gray40];")
            for r in rows:
                out += [f"    {_q(side + ':' + a)} -> {_q(side + ':' + r['name'])};" for a in r.get("args", [])]
            out.append("  }")
        out.append("}")
        return "\n".join(out) + "\n"


def _line(row: dict) -> str:
    return f"{row['name']} = {op_kind(row)}({', '.join(row.get('args', []))})"


def _q(s: str) -> str:
    """A DOT quoted id: backslashes and quotes escaped, newlines as \\n."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _html_summary(lines: list[SummaryLine]) -> str:
    if not lines:
        return "<p>No change.</p>"
    e = html.escape
    rows = []
    for s in lines:
        if s.key_removed or s.key_added:
            what = (f"<mark class=rem>{e(', '.join(s.key_removed) or '(nothing)')}</mark> {ARROW} "
                    f"<mark class=add>{e(', '.join(s.key_added) or '(nothing)')}</mark>")
        else:
            what = "rewritten" if s.removed and s.added else ("removed" if s.removed else "added")
        each = " each" if s.count > 1 else ""
        rm = f"-{_nodes(len(s.removed))}{each} ({e(_counts(s.removed))})" if s.removed else ""
        ad = f"+{_nodes(len(s.added))}{each} ({e(_counts(s.added))})" if s.added else ""
        rows.append(f"<tr><td><code>{e(s.modules)}</code></td><td>{what}</td><td class=rem>{rm}</td>"
                    f"<td class=add>{ad}</td></tr>")
    return ("<table><tr><th>modules</th><th>change</th><th>removed</th><th>added</th></tr>"
            + "".join(rows) + "</table>")


_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: .5em 0 1em; }
th, td { border: 1px solid #ccc; padding: 2px 8px; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
code { font-family: ui-monospace, monospace; font-size: 90%; white-space: pre; }
.rem { background: #ffecec; } .add { background: #eaffea; }
mark.rem { background: #ffc8c8; font-weight: bold; } mark.add { background: #bff0bf; font-weight: bold; }
table.site td { width: 50%; }
details { margin: .3em 0; }
"""
