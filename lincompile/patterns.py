"""User-declared attention patterns ("patterns are data"): validate a spec's `patterns:` and match them.

A pattern is a small dataflow graph: named nodes (op alternatives, optional alone or in groups), edges
(producer -> consumer, optionally at an argument position) and captures (q, k, v, output, mask, scale,
softcap) read off the matched nodes. Reference with a worked example: specs/PATTERNS.md.

Matching: every combination of present/absent optional groups is compiled to a networkx DiGraph (absent nodes
bypassed: producer -> consumer), fullest first. The captured graph becomes a DiGraph of the call_function
nodes whose op occurs in the pattern (nothing else can take part in a match); around each candidate for the
pattern's rarest required node we run DiGraphMatcher (subgraph monomorphism) on the neighbourhood within the
pattern's radius only. The first variant whose captures all resolve wins.
"""

from __future__ import annotations

import itertools
import operator
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import networkx as nx
import torch
from networkx.algorithms.isomorphism import DiGraphMatcher
from torch import fx

from .errors import did_you_mean
from .graph import layer_index, module_path, shape, short_op
from .site import NearMiss, Site
from .walk import const_value

if TYPE_CHECKING:
    from .spec import Located

KEYS = ("description", "nodes", "edges", "captures", "anchor")
NODE_KEYS = ("op", "optional", "args")
CAPTURES = ("output", "q", "k", "v", "mask", "scale", "softcap")
REQUIRED_CAPTURES = ("output", "q", "k", "v")
NODE_CAPTURES = ("output", "q", "k", "v", "mask")  # must resolve to graph nodes; scale/softcap to numbers
MAX_OPTIONAL_GROUPS = 6  # 2^6 = 64 variants: more would make matching slow and the pattern hard to read
MAX_NEAR_MISSES = 10
IGNORED_OPS = ("_assert_tensor_metadata",)  # side nodes that only check metadata: never part of the dataflow
# For "did you mean" hints only: dir(torch.ops.aten) lists just the ops loaded so far.
COMMON_OPS = ("matmul bmm baddbmm mul div add sub softmax _softmax _safe_softmax to _to_copy type_as dropout "
              "native_dropout transpose permute tanh where masked_fill scaled_dot_product_attention").split()

_NAME = re.compile(r"[A-Za-z_]\w*")
_ENDPOINT = re.compile(r"\s*([A-Za-z_]\w*)(?:\.args\[(\d+)\])?\s*")
_EXPR = re.compile(r"([A-Za-z_]\w*)((?:\.args\[\d+\]|\.kwargs\[[A-Za-z_]\w*\])*)")
_STEP = re.compile(r"\.(args|kwargs)\[(\w+)\]")


@dataclass
class PNode:
    ops: frozenset
    group: str | None  # optional group (None: required)
    args: dict = field(default_factory=dict)  # position -> allowed constant values


@dataclass
class Pattern:
    name: str
    nodes: dict[str, PNode]
    edges: list[tuple[str, str, int | None]]  # (producer, consumer, consumer arg position or None)
    captures: dict[str, Any]  # name -> float, or (node, steps)
    anchor: str
    variants: list[nx.DiGraph] = field(default_factory=list)


# Validation and compilation (no model needed) -----------------------------------------------------


def validate_pattern(name: str, body, path: tuple, loc: "Located") -> None:
    """Raise a located SpecError for anything wrong in one `patterns:` entry."""
    compile_pattern(name, body, path, loc)


def compile_pattern(name: str, body, path: tuple, loc: "Located") -> Pattern:
    from .spec import _check_keys, _expect, _type_name

    if not isinstance(body, dict):
        raise loc.error(path, f'pattern "{name}" must be a mapping (nodes, edges, captures), got {_type_name(body)}')
    _check_keys(body, KEYS, path, loc, f'pattern "{name}"')
    _expect(body.get("description", ""), str, path + ("description",), loc, "description")
    if "nodes" not in body:
        raise loc.error(path, f'pattern "{name}" needs "nodes" (name -> {{op: ...}})')
    if not _expect(body["nodes"], dict, path + ("nodes",), loc, "nodes"):
        raise loc.error(path + ("nodes",), "nodes is empty")
    nodes = {n: _parse_node(n, b, path + ("nodes", n), loc) for n, b in body["nodes"].items()}
    edges = []
    for i, item in enumerate(_expect(body.get("edges", []), list, path + ("edges",), loc, "edges")):
        edges += _parse_edge(item, path + ("edges", i), loc, nodes)
    pat = Pattern(name, nodes, edges, {}, "")
    if "captures" not in body:
        raise loc.error(path, f'pattern "{name}" needs "captures" (at least {", ".join(REQUIRED_CAPTURES)})')
    raw_caps = _expect(body["captures"], dict, path + ("captures",), loc, "captures")
    for cap, expr in raw_caps.items():
        pat.captures[cap] = _parse_capture(cap, expr, path + ("captures", cap), loc, nodes)
    missing = [c for c in REQUIRED_CAPTURES if c not in raw_caps]
    if missing:
        raise loc.error(path + ("captures",), f'pattern "{name}" does not capture "{missing[0]}" '
                                              f"(required: {', '.join(REQUIRED_CAPTURES)})")
    pat.anchor = _node_ref(body["anchor"], path + ("anchor",), loc, nodes, "anchor") if "anchor" in body \
        else pat.captures["output"][0]
    _compile_variants(pat, path, loc)
    return pat


def _parse_node(name, body, path, loc) -> PNode:
    from .spec import _check_keys, _type_name

    if not _NAME.fullmatch(str(name)):
        raise loc.error(path, f'node name "{name}" must be an identifier (letters, digits, _)', at_key=True)
    if isinstance(body, (str, list)):
        body = {"op": body}  # shorthand: `probs: softmax` or `probs: [softmax, _softmax]`
    if not isinstance(body, dict):
        raise loc.error(path, f'node "{name}" must be an op, a list of ops or a mapping, got {_type_name(body)}')
    _check_keys(body, NODE_KEYS, path, loc, f'node "{name}"')
    if "op" not in body:
        raise loc.error(path, f'node "{name}" needs "op" (an ATen op name such as matmul, or a list of them)')
    raw_ops = body["op"] if isinstance(body["op"], list) else [body["op"]]
    if not raw_ops:
        raise loc.error(path + ("op",), f'node "{name}": op is an empty list')
    ops = [_check_op(o, path + ("op",) + ((i,) if isinstance(body["op"], list) else ()), loc)
           for i, o in enumerate(raw_ops)]
    group = body.get("optional", False)
    if not isinstance(group, (bool, str)) or group == "":
        raise loc.error(path + ("optional",), "optional must be true, false or a group name (a group's nodes "
                                              "come and go together)")
    group = (name if group is True else group) or None
    args = body.get("args", {})
    if not isinstance(args, dict):
        raise loc.error(path + ("args",), f"args must map argument positions to constants ({{1: [-1, 3]}}), "
                                          f"got {_type_name(args)}")
    allowed = {}
    for pos, value in args.items():
        if not isinstance(pos, int) or isinstance(pos, bool) or pos < 0:
            raise loc.error(path + ("args", pos), f'args key "{pos}" must be an argument position (0, 1, ...)',
                            at_key=True)
        values = tuple(value) if isinstance(value, list) else (value,)
        for v in values:
            if not isinstance(v, (int, float, str, bool, type(None))):
                raise loc.error(path + ("args", pos), f"args[{pos}] must be constants, got {_type_name(v)}")
        allowed[pos] = values
    return PNode(frozenset(ops), group, allowed)


def _check_op(op, path, loc) -> str:
    """Normalise an op name to what graph.short_op reports, rejecting names that can't occur."""
    if not isinstance(op, str) or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)?", op):
        raise loc.error(path, f'op "{op}" must be an op name like "matmul" or "aten.softmax" (no overload)')
    ns, _, short = op.rpartition(".")
    if ns in ("", "aten"):
        # ATen names are checked now so typos fail before a model is loaded; operator.* covers getitem & co.
        if not hasattr(torch.ops.aten, short) and not hasattr(operator, short):
            hint = did_you_mean(short, set(COMMON_OPS) | set(dir(torch.ops.aten)))
            raise loc.error(path, f'op "{op}" is not an ATen op{hint} (ops of other namespaces: mylib.my_op)')
    return short


def _parse_edge(item, path, loc, nodes) -> list[tuple[str, str, int | None]]:
    """`"a -> b.args[0] -> c"` or `[a, b.args[0], c]`: a chain of producer -> consumer edges."""
    if isinstance(item, str):
        parts, paths = item.split("->"), [path] * len(item.split("->"))
    elif isinstance(item, list) and all(isinstance(p, str) for p in item):
        parts, paths = item, [path + (j,) for j in range(len(item))]
    else:
        raise loc.error(path, 'an edge must be a string like "a -> b -> c" or a list like [a, b]')
    if len(parts) < 2:
        raise loc.error(path, f'edge "{item}" needs a producer and a consumer ("a -> b")')
    ends = []
    for j, (part, where) in enumerate(zip(parts, paths)):
        m = _ENDPOINT.fullmatch(part)
        if not m:
            raise loc.error(where, f'edge endpoint "{part.strip()}" must be a node name or name.args[i]')
        if m.group(1) not in nodes:
            raise loc.error(where, f'edge names undefined node "{m.group(1)}"{did_you_mean(m.group(1), nodes)}')
        if j == 0 and m.group(2) is not None:
            raise loc.error(where, f'"{part.strip()}": the first node of an edge only produces (no .args[i])')
        ends.append((m.group(1), None if m.group(2) is None else int(m.group(2))))
    return [(a, b, pos) for (a, _), (b, pos) in zip(ends, ends[1:])]


def _parse_capture(cap, expr, path, loc, nodes):
    if cap not in CAPTURES:
        raise loc.error(path, f'unknown capture "{cap}"{did_you_mean(cap, CAPTURES)}; captures: {", ".join(CAPTURES)}',
                        at_key=True)
    if cap in ("scale", "softcap") and isinstance(expr, (int, float)) and not isinstance(expr, bool):
        return float(expr)  # a declared constant
    if not isinstance(expr, str) or not (m := _EXPR.fullmatch(expr.strip())):
        number = ", or a number" if cap in ("scale", "softcap") else ""
        raise loc.error(path, f'capture {cap}: "{expr}" must be node, node.args[i] or node.kwargs[name], '
                              f"chained as in scores.args[1].args[0]{number}")
    node = _node_ref(m.group(1), path, loc, nodes, f"capture {cap}", required=cap in REQUIRED_CAPTURES)
    steps = tuple((kind, int(key) if kind == "args" else key) for kind, key in _STEP.findall(m.group(2)))
    if cap == "output" and steps:
        raise loc.error(path, f'capture output: "{expr}" must name a pattern node (the attention result)')
    return node, steps


def _node_ref(name, path, loc, nodes, what, required=True) -> str:
    if not isinstance(name, str) or name not in nodes:
        raise loc.error(path, f'{what}: undefined node "{name}"{did_you_mean(name, nodes)}')
    if required and nodes[name].group is not None:
        raise loc.error(path, f'{what}: node "{name}" is optional; it must be a required node')
    return name


def _rewire(edges, absent) -> list:
    """Bypass absent nodes: each producer of one feeds each of its consumers (at the consumer's position)."""
    for x in absent:
        ins = [a for a, b, _ in edges if b == x]
        outs = [(b, pos) for a, b, pos in edges if a == x]
        edges = [e for e in edges if x not in e[:2]] + [(a, b, pos) for a in ins for b, pos in outs]
    return edges


def _compile_variants(pat: Pattern, path, loc):
    graph = nx.DiGraph((a, b) for a, b, _ in pat.edges)
    graph.add_nodes_from(pat.nodes)
    if not nx.is_directed_acyclic_graph(graph):
        cycle = [a for a, _ in nx.find_cycle(graph)]
        cycle = " -> ".join(cycle + cycle[:1])
        raise loc.error(path + ("edges",), f'edges form a cycle ({cycle}): patterns are acyclic dataflow')
    groups = list(dict.fromkeys(n.group for n in pat.nodes.values() if n.group is not None))
    if len(groups) > MAX_OPTIONAL_GROUPS:
        raise loc.error(path + ("nodes",), f"{len(groups)} optional nodes/groups; at most {MAX_OPTIONAL_GROUPS} "
                                           "(put nodes that come and go together in one group)")
    for flags in itertools.product((False, True), repeat=len(groups)):
        gone = {g for g, f in zip(groups, flags) if f}
        absent = [n for n, p in pat.nodes.items() if p.group in gone]
        g = nx.DiGraph()
        g.add_nodes_from((n, {"name": n}) for n in pat.nodes if n not in absent)
        for a, b, pos in _rewire(pat.edges, absent):  # edge attr `args`: positions the consumer must take it at
            old = g.edges[a, b]["args"] if g.has_edge(a, b) else frozenset()
            g.add_edge(a, b, args=old | ({pos} if pos is not None else set()))
        if not nx.is_weakly_connected(g):
            parts = " | ".join(", ".join(sorted(c)) for c in nx.weakly_connected_components(g))
            without = f" without optional {', '.join(sorted(absent))}" if absent else ""
            raise loc.error(path + ("edges",), f'pattern "{pat.name}" is not connected{without}: '
                                               f"its edges leave separate pieces ({parts})")
        pat.variants.append(g)
    pat.variants.sort(key=len, reverse=True)  # stable: more present nodes first, so the fullest match wins


# Matching -------------------------------------------------------------------------------------------


def match_user_pattern(gm: fx.GraphModule, name: str, body):
    """All sites of a user pattern in the captured graph, and near misses (rarest node matched, chain broke)."""
    from .spec import Located  # spec imports this module

    pat = compile_pattern(name, body, ("patterns", name), Located("<spec>"))
    target = _target_graph(gm, frozenset().union(*(p.ops for p in pat.nodes.values())))
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    cands = {p: sorted((t for t in target if _node_ok(target.nodes[t], pat.nodes[p])), key=order.get)
             for p in pat.nodes}
    root = min((n for n, p in pat.nodes.items() if p.group is None), key=lambda n: len(cands[n]))
    radius = max(max(nx.single_source_shortest_path_length(v.to_undirected(as_view=True), root).values())
                 for v in pat.variants)
    sites, failed, both_ways = {}, {}, target.to_undirected(as_view=True)
    for cand in cands[root]:
        # A subgraph view, not nx.ego_graph: that deep-copies node attributes, and ours hold fx nodes.
        ego = target.subgraph(nx.single_source_shortest_path_length(both_ways, cand, cutoff=radius))
        found = _first_match(pat, ego, root, cand, failed)
        if found is None or found[1]["output"] in sites:
            continue
        of, values = found
        path = module_path(of[pat.anchor]) or ""
        matched = set(of.values()) | {u for n in of.values() for u in n.users if short_op(u) in IGNORED_OPS}
        site = Site(module=path, layer=layer_index(path), pattern=name, output=values["output"],
                    nodes=sorted(matched, key=order.get))
        site.bindings.update({k: values[k] for k in ("q", "k", "v", "mask") if k in values})
        site.attrs.update({k: values[k] for k in ("scale", "scale_node", "softcap") if k in values})
        sites[site.output] = site
    # Near misses: candidates for the rarest node (softmax, typically) left out of every site.
    covered = {n for s in sites.values() for n in s.nodes}
    misses = []
    for cand in cands[root]:
        reason = None if cand in covered else failed.get(cand) or _explain(pat, target, root, cand)
        if reason and len(misses) < MAX_NEAR_MISSES:
            misses.append(NearMiss(cand.name, module_path(cand), f'pattern "{name}": {reason}'))
    return sorted(sites.values(), key=lambda s: order[s.output]), misses


def _first_match(pat: Pattern, ego: nx.DiGraph, root: str, cand, failed: dict):
    """(pattern node -> fx node, capture values) for the fullest variant that matches with `root` at `cand`;
    capture failures are remembered in `failed` (by candidate) for the near-miss report."""
    def node_match(t, p):
        return _node_ok(t, pat.nodes[p["name"]]) and (p["name"] != root or t["node"] is cand)

    for variant in pat.variants:
        if not all(any(_node_ok(ego.nodes[t], pat.nodes[p]) for t in ego) for p in variant):
            continue  # some pattern node has no candidate here: skip the search
        matcher = DiGraphMatcher(ego, variant, node_match, lambda t, p: p["args"] <= t["pos"])
        for mapping in matcher.subgraph_monomorphisms_iter():
            of = {p: t for t, p in mapping.items()}
            values, reason = _resolve(pat, of)
            if reason is None:
                return of, values
            failed.setdefault(cand, reason)
    return None


def _target_graph(gm, ops) -> nx.DiGraph:
    """call_function nodes whose op occurs in the pattern; edge attr `pos` = the consumer's arg positions."""
    g = nx.DiGraph()
    g.add_nodes_from((n, {"op": short_op(n), "node": n}) for n in gm.graph.nodes if n.op == "call_function"
                     and short_op(n) in ops and short_op(n) not in IGNORED_OPS)
    for n in g:
        for pos, a in list(enumerate(n.args)) + list(n.kwargs.items()):
            for x in (a if isinstance(a, (list, tuple)) else [a]):
                if isinstance(x, fx.Node) and x in g:
                    g.add_edge(x, n, pos=g.edges[x, n]["pos"] | {pos} if g.has_edge(x, n) else {pos})
    return g


def _node_ok(t: dict, p: PNode) -> bool:
    """Op among the alternatives, and constant arguments as declared."""
    if t["op"] not in p.ops:
        return False
    args = t["node"].args
    return all(pos < len(args) and any(_same(args[pos], v) for v in allowed) for pos, allowed in p.args.items())


def _same(actual, wanted) -> bool:
    if isinstance(wanted, bool) or isinstance(actual, bool) or wanted is None:
        return actual is wanted
    if isinstance(wanted, (int, float)):
        return isinstance(actual, (int, float)) and actual == wanted
    return not isinstance(actual, fx.Node) and str(actual) in (wanted, f"torch.{wanted}")  # dtypes by name


def _resolve(pat: Pattern, of: dict) -> tuple[dict, str | None]:
    """Evaluate the captures on one structural match: (values, None) or ({}, why it doesn't count)."""
    values = {}
    for cap, spec in pat.captures.items():
        if isinstance(spec, float):
            values[cap] = spec
            continue
        node, steps = spec
        if node not in of:
            continue  # on an absent optional node: not captured
        value, parent, text = of[node], None, node
        for kind, key in steps:
            if not isinstance(value, fx.Node):
                return {}, f"capture {cap}: {text} is {value!r}, not a node"
            parent, seq = value, value.args if kind == "args" else value.kwargs
            text += f".{kind}[{key}]"
            if (kind == "args" and key >= len(seq)) or (kind == "kwargs" and key not in seq):
                return {}, f"capture {cap}: {value.name} ({short_op(value)}) has no {kind}[{key}]"
            value = seq[key]
        if cap in NODE_CAPTURES and not isinstance(value, fx.Node):
            return {}, f"capture {cap}: {text} is {value!r}, not a tensor node"
        if cap in NODE_CAPTURES:
            values[cap] = value
            continue
        number = const_value(value)
        if number is None and cap == "scale" and isinstance(value, fx.Node) and shape(value) == ():
            values["scale"], values["scale_node"] = 1.0, value  # a 0-d tensor: evaluated on the probe later
            continue
        if number is None:
            return {}, f"capture {cap}: {text} is not a constant"
        if cap == "scale" and parent is not None and short_op(parent) == "div" and steps[-1] == ("args", 1):
            if number == 0:
                return {}, f"capture scale: {text} divides by zero"
            number = 1.0 / number  # scores are divided by it: the softmax scale is its inverse
        values[cap] = number
    return values, None


def _explain(pat: Pattern, g: nx.DiGraph, root: str, cand) -> str | None:
    """Greedy walk from a root candidate along the pattern's edges: where the chain breaks, or None when not
    even the root's neighbours match (an unrelated node with the same op: not worth a report)."""
    of, used, absent = {root: cand}, {cand}, set()
    while True:
        for a, b, pos in _rewire(pat.edges, absent):
            if (a in of) == (b in of):
                continue
            known, other = (a, b) if a in of else (b, a)
            t = of[known]
            near = g.successors(t) if known == a else g.predecessors(t)
            hits = [x for x in near if x not in used and _node_ok(g.nodes[x], pat.nodes[other])
                    and (pos is None or pos in g.edges[(t, x) if known == a else (x, t)]["pos"])]
            if hits:
                of[other] = hits[0]
                used.add(hits[0])
            elif pat.nodes[other].group is not None:
                absent |= {n for n, p in pat.nodes.items() if p.group == pat.nodes[other].group}
                for n in absent & set(of) - {root}:
                    used.discard(of.pop(n))
            else:
                ops, how = "|".join(sorted(pat.nodes[other].ops)), "consumes" if known == a else "feeds"
                return None if len(of) < 2 else \
                    f'chain breaks at "{other}": no {ops} node {how} {t.name} (matched as "{known}")'
            break
        else:
            return None if len(of) < 2 else "structure matched in part; argument positions or captures differ"
