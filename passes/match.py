"""Pass `match`: find every softmax attention site in the captured graph and bind what operators need.

Built-in patterns (data about op names, not about architectures):
- `sdpa`: one `aten.scaled_dot_product_attention` node.
- `eager_softmax_attention`: scores = matmul/bmm/baddbmm(q, kᵀ) → [scale: mul/div] → [softcap: div → tanh → mul]
  → [+ mask or bias] → softmax → [cast] → [dropout] → matmul(·, v).
- `softmax_attention`: either.
A spec may declare its own patterns (see lincompile/patterns.py).

For each site, values are bound by walking back from q/k/v: through the GQA repeat (k_kv, v_kv), through the
rotary embedding (q_pre_rope, k_pre_rope), to the projections (their module paths, and `hidden`, the input of
the q projection), and forward to the output projection. What can't be found stays absent, with a note.
Masks are evaluated on a long probe and classified (causal, sliding window w, chunked, bidirectional).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
from torch import fx

from lincompile.errors import MatchError
from lincompile.graph import ancestors, layer_index, module_path, record, same_int, shape, short_op, users, val
from lincompile.site import Site

SOFTMAX = ("softmax", "_softmax", "_safe_softmax")
CASTS = ("to", "_to_copy", "type_as", "contiguous", "clone", "alias", "detach", "lift_fresh_copy")
MATMULS = ("matmul", "bmm", "baddbmm")
PROJECTIONS = ("linear", "addmm", "mm", "matmul")
RESHAPES = ("view", "reshape", "_unsafe_view", "transpose", "permute", "contiguous", "clone", "unflatten",
            "flatten", "expand", "squeeze", "unsqueeze", "split", "split_with_sizes", "getitem", "chunk",
            "unbind", "select", "slice", "narrow") + CASTS
ROTATE = ("slice", "neg", "cat", "stack", "view", "reshape", "flatten", "unflatten", "select", "unsqueeze",
          "squeeze", "mul", "unbind", "getitem", "chunk", "split", "split_with_sizes", "narrow") + CASTS


@dataclass
class NearMiss:
    node: str
    module: str | None
    reason: str


@dataclass
class MatchResult:
    sites: list[Site]
    near_misses: list[NearMiss] = field(default_factory=list)
    patterns_tried: tuple[str, ...] = ()


# --------------------------------------------------------------------------------------------------
# Walking helpers


def strip(node):
    """Skip casts/copies that don't change the value's meaning."""
    while isinstance(node, fx.Node) and short_op(node) in CASTS and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def is_op(node, *names) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and short_op(node) in names


def const_value(x):
    """A Python number for literals and simple constant nodes (full / scalar_tensor / tensor), else None."""
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return float(x)
    if is_op(x, "full") and len(x.args) >= 2 and isinstance(x.args[1], (int, float)):
        return float(x.args[1])
    if is_op(x, "scalar_tensor") and isinstance(x.args[0], (int, float)):
        return float(x.args[0])
    if is_op(x, "sqrt") and const_value(x.args[0]) is not None:
        return math.sqrt(const_value(x.args[0]))
    return None


def heads(node) -> int | None:
    s = shape(node)
    if s is None or len(s) != 4:
        return None
    try:
        return int(s[1])
    except (TypeError, ValueError):
        return None


def through_repeat(node) -> fx.Node:
    """k/v before a GQA repeat: reshape(expand(unsqueeze(x))) or repeat_interleave(x), else the node itself."""
    n = strip(node)
    if is_op(n, "repeat_interleave"):
        return n.args[0]
    if is_op(n, "reshape", "view", "_unsafe_view", "flatten"):
        e = strip(n.args[0])
        if is_op(e, "expand", "repeat"):
            u = strip(e.args[0])
            while is_op(u, "unsqueeze", "slice"):
                u = strip(u.args[0])
            if heads(u) is not None and heads(u) <= (heads(node) or 0):
                return u
    return node


def _reachable(start, targets, ops, depth=8) -> bool:
    """Is any of `targets` an ancestor of `start` through nodes whose op is in `ops` (bounded depth)?"""
    frontier, seen = [start], set()
    for _ in range(depth):
        nxt = []
        for n in frontier:
            if n in targets:
                return True
            if n in seen or not isinstance(n, fx.Node):
                continue
            seen.add(n)
            if n is start or is_op(n, *ops):
                nxt.extend(n.all_input_nodes)
        frontier = nxt
    return any(n in targets for n in frontier)


def _rope_full(n):
    """x for n = x·cos + rotate(x)·sin (rotate built from slices/neg/cat of x, either order), else None."""
    n = strip(n)
    if not is_op(n, "add") or len(n.args) < 2:
        return None
    m1, m2 = strip(n.args[0]), strip(n.args[1])
    if not (is_op(m1, "mul") and is_op(m2, "mul")):
        return None
    c1 = [strip(a) for a in m1.args if isinstance(a, fx.Node)]
    c2 = [strip(a) for a in m2.args if isinstance(a, fx.Node)]
    for x in c1:
        for y in c2:
            if x is not y and _reachable(y, {x}, ROTATE, depth=6):
                return x
            if x is not y and _reachable(x, {y}, ROTATE, depth=6):
                return y
    return None


def _slice_source(n):
    n = strip(n)
    while is_op(n, "slice", "narrow"):
        n = strip(n.args[0])
    return n


def find_pre_rope(node):
    """The tensor before the rotary embedding that produced `node`, or None when there is none."""
    n = strip(node)
    x = _rope_full(n)
    if x is not None:
        # Partial rotary applied to a slice: the source is what the slice came from (handled below).
        return x
    if is_op(n, "cat") and isinstance(n.args[0], (list, tuple)) and len(n.args[0]) == 2:
        rot, passthrough = n.args[0]
        x = _rope_full(rot)
        if x is not None:
            src, src2 = _slice_source(x), _slice_source(passthrough)
            if src is src2:
                return src
    return None


def find_projection(node, max_depth: int = 12):
    """The nearest linear/addmm/mm above `node` through reshapes/norms; (proj_node, input) or (None, None)."""
    frontier = [node]
    for _ in range(max_depth):
        nxt = []
        for n in frontier:
            if not isinstance(n, fx.Node):
                continue
            if is_op(n, *PROJECTIONS) and _has_weight(n):
                return n, _proj_input(n)
            if n.op == "call_function":
                # Tuple-valued nodes (split / chunk of a fused qkv projection) are walked through as well.
                nxt.extend(a for a in n.all_input_nodes if a.op == "call_function")
        frontier = nxt
    return None, None


def _has_weight(n) -> bool:
    return any(isinstance(a, fx.Node) and a.op == "get_attr" for a in n.all_input_nodes)


def _proj_input(n):
    args = [a for a in n.args if isinstance(a, fx.Node) and a.op != "get_attr"]
    if short_op(n) == "addmm":
        args = [a for a in n.args[1:] if isinstance(a, fx.Node) and a.op != "get_attr"]
    x = args[0] if args else None
    # 2-D projections (addmm on a flattened [B*T, d] view): report the [B, T, d] tensor it came from.
    while is_op(x, "view", "reshape", "_unsafe_view", "flatten") and len(shape(x) or ()) == 2:
        x = x.args[0]
    return x


def find_output_projection(node, max_depth: int = 8):
    frontier = [node]
    for _ in range(max_depth):
        nxt = []
        for n in frontier:
            for u in users(n):
                if is_op(u, *PROJECTIONS) and _has_weight(u):
                    return u
                if is_op(u, *RESHAPES):
                    nxt.append(u)
        frontier = nxt
    return None


# --------------------------------------------------------------------------------------------------
# Built-in patterns


def match_sdpa(gm: fx.GraphModule) -> tuple[list[Site], list[NearMiss]]:
    sites = []
    for n in gm.graph.nodes:
        if not is_op(n, "scaled_dot_product_attention"):
            continue
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
        args = dict(zip(names, n.args))
        args.update(n.kwargs)
        site = _new_site(n, "sdpa", [n])
        site.bindings.update(q=args["query"], k=args["key"], v=args["value"])
        if isinstance(args.get("attn_mask"), fx.Node):
            site.bindings["mask"] = args["attn_mask"]
        site.attrs["is_causal"] = bool(args.get("is_causal", False))
        if args.get("scale") is not None:
            site.attrs["scale"] = float(args["scale"])
        sites.append(site)
    return sites, []


def match_eager(gm: fx.GraphModule) -> tuple[list[Site], list[NearMiss]]:
    sites, misses = [], []
    for n in gm.graph.nodes:
        if not is_op(n, *SOFTMAX):
            continue
        try:
            sites.append(_match_eager_at(n))
        except _Miss as miss:
            misses.append(NearMiss(n.name, module_path(n), str(miss)))
    return sites, misses


class _Miss(Exception):
    pass


def _match_eager_at(softmax: fx.Node) -> Site:
    nodes = [softmax]
    dim = softmax.args[1] if len(softmax.args) > 1 else softmax.kwargs.get("dim")
    if dim not in (-1, 3):
        raise _Miss(f"softmax over dim {dim}, not the key dimension")
    # Forward: [cast] → [dropout] → matmul with v.
    out = softmax
    while True:
        nxt = users(out)
        if len(nxt) != 1:
            raise _Miss(f"softmax output has {len(nxt)} users, expected one chain to matmul(·, v)")
        u = nxt[0]
        if is_op(u, *CASTS, "dropout", "native_dropout", "getitem"):
            nodes.append(u)
            out = u
            continue
        break
    if not (is_op(u, "matmul", "bmm") and u.args[0] is out):
        raise _Miss(f"softmax output feeds {short_op(u)}, not matmul(·, v)")
    output = u
    nodes.append(output)
    v = output.args[1]
    # Backward from the softmax input: [cast] ← [+ mask] ← [softcap] ← [scale] ← matmul(q, kᵀ).
    x = softmax.args[0]
    while is_op(x, *CASTS):
        nodes.append(x)
        x = x.args[0]
    scale, softcap, mask, scale_node = 1.0, None, None, None
    if is_op(x, "add"):
        nodes.append(x)
        a, b = x.args[0], x.args[1]
        side = _scores_side(a), _scores_side(b)
        if side[0] and not side[1]:
            x, mask = a, b
        elif side[1] and not side[0]:
            x, mask = b, a
        else:
            raise _Miss("softmax input is a sum, but neither side leads to matmul(q, kᵀ)")
    x, scale, softcap, scale_node, more = _scores_chain(x)
    nodes.extend(more)
    if not is_op(x, *MATMULS):
        raise _Miss(f"no matmul(q, kᵀ) before softmax (found {short_op(x) if isinstance(x, fx.Node) else x})")
    nodes.append(x)
    if short_op(x) == "baddbmm":
        q, kt = x.args[1], x.args[2]
    else:
        q, kt = x.args[0], x.args[1]
    k = _untranspose(kt)
    if k is None:
        raise _Miss("scores matmul's second operand is not a transposed key")
    nodes.append(kt)
    site = _new_site(softmax, "eager_softmax_attention", nodes)
    site.output = output
    site.bindings.update(q=q, k=k, v=v)
    if mask is not None:
        site.bindings["mask"] = mask
    site.attrs["scale"] = scale
    if scale_node is not None:
        site.attrs["scale_node"] = scale_node
    if softcap is not None:
        site.attrs["softcap"] = softcap
    # Side nodes that only check metadata of matched values go with them.
    for node in list(nodes):
        site.nodes.extend(u for u in node.users if short_op(u) == "_assert_tensor_metadata")
    return site


def _scores_side(x) -> bool:
    try:
        node, *_ = _scores_chain(x)
    except _Miss:
        return False
    return is_op(node, *MATMULS)


def _scores_chain(x):
    """Walk back through [scale] and [softcap]: returns (matmul?, scale, softcap, scale_node, nodes)."""
    scale, softcap, scale_node, nodes = 1.0, None, None, []
    for _ in range(6):
        x = strip(x)
        if is_op(x, "mul") and is_op(strip(x.args[0]), "tanh") and const_value(x.args[1]) is not None:
            t = strip(x.args[0])  # softcap: tanh(s / cap) * cap
            d = strip(t.args[0])
            if is_op(d, "div") and const_value(d.args[1]) is not None:
                softcap = const_value(x.args[1])
                nodes += [x, t, d]
                x = d.args[0]
                continue
        if is_op(x, "mul", "div") and len(x.args) == 2:
            a, b = x.args
            c = const_value(b)
            if c is None and isinstance(b, fx.Node) and shape(b) == ():
                scale_node = b  # a 0-d tensor computed in the graph: evaluated on the probe later
                c = 1.0
            if c is not None:
                scale *= c if short_op(x) == "mul" else 1.0 / c
                nodes.append(x)
                x = a
                continue
        break
    return strip(x), scale, softcap, scale_node, nodes


def _untranspose(kt):
    kt = strip(kt)
    if is_op(kt, "transpose"):
        d = sorted(int(d) % 4 for d in kt.args[1:3])
        if d == [2, 3]:
            return kt.args[0]
    if is_op(kt, "permute"):
        perm = list(kt.args[1])
        if perm[-2:] in ([3, 2], [-1, -2]) or perm == [0, 1, 3, 2]:
            return kt.args[0]
    if is_op(kt, "t"):
        return kt.args[0]
    return None


def _new_site(anchor: fx.Node, pattern: str, nodes) -> Site:
    path = module_path(anchor) or ""
    return Site(module=path, layer=layer_index(path), pattern=pattern, output=anchor, nodes=list(nodes))


BUILTIN_MATCHERS = {"sdpa": (match_sdpa,), "eager_softmax_attention": (match_eager,),
                    "softmax_attention": (match_sdpa, match_eager)}


# --------------------------------------------------------------------------------------------------
# Bindings and facts


def complete_site(site: Site) -> None:
    """Walk the graph from q/k/v to fill in the derived bindings and static facts."""
    b, a = site.bindings, site.attrs
    q, k, v = b["q"], b["k"], b["v"]
    b["k_kv"], b["v_kv"] = through_repeat(k), through_repeat(v)
    a["num_heads"] = heads(q)
    a["num_kv_heads"] = heads(b["k_kv"]) or heads(k)
    qs, vs = shape(q), shape(v)
    a["head_dim"] = int(qs[-1]) if qs else None
    a["v_head_dim"] = int(vs[-1]) if vs else None
    if a.get("scale") is None and a["head_dim"]:
        a["scale"] = 1.0 / math.sqrt(a["head_dim"])
    qr, kr = find_pre_rope(q), find_pre_rope(b["k_kv"])
    a["rope"] = qr is not None and kr is not None
    if qr is not None:
        b["q_pre_rope"] = qr
    if kr is not None:
        b["k_pre_rope"] = kr
    if not a["rope"]:
        site.notes.append("no rotary embedding found: q_pre_rope / k_pre_rope absent")
    for name, start in (("q_proj", b.get("q_pre_rope", q)), ("k_proj", b.get("k_pre_rope", b["k_kv"])),
                        ("v_proj", b["v_kv"])):
        proj, inp = find_projection(start)
        if proj is not None:
            a[name] = module_path(proj)
            if name == "q_proj" and inp is not None and len(shape(inp) or ()) == 3:
                b["hidden"] = inp
        else:
            site.notes.append(f"{name} not found")
    o = find_output_projection(site.output)
    if o is not None:
        a["o_proj"] = module_path(o)
    else:
        site.notes.append("o_proj not found")
    if "hidden" not in b:
        site.notes.append("attention input (hidden) not found as a [batch, seq, d_model] tensor")


def classify_mask(mask: torch.Tensor | None, is_causal: bool) -> tuple[str, int | None]:
    """(kind, window) from a mask evaluated at probe length: bool (True = attend) or additive (0 = attend)."""
    if mask is None:
        return ("causal", None) if is_causal else ("none", None)
    m = mask
    while m.dim() > 2:
        m = m[0]
    allowed = m if m.dtype == torch.bool else (m == 0)
    T, S = allowed.shape[-2:]
    if T != S:
        return "custom", None
    causal = torch.ones(T, T, dtype=torch.bool, device=allowed.device).tril()
    if bool(allowed.all()):
        return "bidirectional", None
    if torch.equal(allowed, causal):
        return "causal", None
    if bool((allowed & ~causal).any()):
        return "custom", None
    w = int(allowed.sum(-1).max())
    i = torch.arange(T, device=allowed.device)
    band = causal & ((i[:, None] - i[None, :]) < w)
    if torch.equal(allowed, band):
        return "sliding", w
    # Chunked: each query sees the keys of its own chunk up to itself.
    first = allowed.float().argmax(-1)
    c = int((first[1:] != first[:-1]).nonzero()[0].item() + 1) if bool((first[1:] != first[:-1]).any()) else T
    chunked = causal & ((i[:, None] // c) == (i[None, :] // c))
    if torch.equal(allowed, chunked):
        return "chunked", c
    return "custom", None


def evaluate_facts(gm: fx.GraphModule, sites: list[Site], vocab_size: int, mask_probe_len: int) -> None:
    """Evaluate masks (and in-graph scale constants) on a long probe, once per distinct node."""
    from lincompile.passes.capture import probe_ids

    wanted = {s.bindings["mask"] for s in sites if "mask" in s.bindings}
    wanted |= {s.attrs["scale_node"] for s in sites if "scale_node" in s.attrs}
    if not wanted:
        values = {}
    else:
        ids = probe_ids(vocab_size, 1, mask_probe_len)
        values = record(gm, wanted, ids, only_needed=True)
    for s in sites:
        m = values.get(s.bindings.get("mask"))
        kind, window = classify_mask(m if isinstance(m, torch.Tensor) else None, s.attrs.get("is_causal", False))
        if kind == "causal" and m is not None:
            s.attrs["mask_probe_len"] = mask_probe_len
        s.attrs["mask_kind"] = kind
        if window is not None:
            s.attrs["window"] = window
        node = s.attrs.pop("scale_node", None)
        if node is not None:
            c = values[node]
            # The graph divides or multiplies by this value; _scores_chain folded 1.0 in its place.
            user = next(u for u in node.users if is_op(u, "mul", "div"))
            s.attrs["scale"] *= float(c) if short_op(user) == "mul" else 1.0 / float(c)


# --------------------------------------------------------------------------------------------------


def find_sites(gm: fx.GraphModule, patterns, user_patterns: dict | None = None) -> MatchResult:
    """All sites for the given pattern names (built-in or the spec's), without duplicates."""
    sites, misses, seen = [], [], set()
    for name in patterns:
        if name in BUILTIN_MATCHERS:
            found = []
            for fn in BUILTIN_MATCHERS[name]:
                s, m = fn(gm)
                found += s
                misses += m
        else:
            from lincompile.patterns import match_user_pattern

            found, m = match_user_pattern(gm, name, user_patterns[name])
            misses += m
        for site in found:
            if site.output in seen:
                continue
            seen.add(site.output)
            sites.append(site)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    sites.sort(key=lambda s: order[s.output])
    for site in sites:
        site.gm = gm
        complete_site(site)
    return MatchResult(sites, misses, tuple(patterns))


def _capture_hint(gm: fx.GraphModule, patterns, spec) -> str:
    """Patterns of one capture mode tried on a graph captured in the other: say which mode finds attention."""
    fused = sum(is_op(n, "scaled_dot_product_attention") for n in gm.graph.nodes)
    impl = spec.capture.attn_implementation
    if fused and any(p not in BUILTIN_MATCHERS for p in patterns):
        return (f"; the graph was captured with {impl} and has {fused} scaled_dot_product_attention node(s): a "
                "pattern of matmul/softmax ops needs `capture: {attn_implementation: eager}`")
    if not fused and impl == "eager" and "sdpa" in patterns:
        return "; the sdpa pattern needs `capture: {attn_implementation: sdpa}` (this graph was captured eager)"
    return ""


def match(captured, spec) -> MatchResult:
    """Run the match pass for a spec: find sites for every pattern its rules use, classify their masks."""
    patterns = []
    for rule in spec.rules:
        if rule.pattern not in patterns:
            patterns.append(rule.pattern)
    result = find_sites(captured.gm, patterns, spec.patterns)
    if not result.sites:
        tried = ", ".join(patterns)
        hint = f"; near misses: {result.near_misses[0].reason} at {result.near_misses[0].node}" if result.near_misses else ""
        raise MatchError(f"0 sites matched; patterns tried: {tried}{hint}{_capture_hint(captured.gm, patterns, spec)}")
    evaluate_facts(captured.gm, result.sites, captured.model.config.vocab_size,
                   min(spec.capture.mask_probe_len, captured.max_seq_len))
    return result


def select(result: MatchResult, spec) -> list[tuple[Site, object]]:
    """Assign sites to rules: first rule that selects a site wins. Each rule must select something."""
    claimed: dict[int, object] = {}
    layers = sorted({s.layer for s in result.sites if s.layer is not None})
    for rule in spec.rules:
        candidates = [s for s in result.sites if s.pattern == rule.pattern or rule.pattern == "softmax_attention"
                      and s.pattern in ("sdpa", "eager_softmax_attention")]
        chosen_layers = set(rule.layers.select(layers)) if rule.layers.kind != "all" else None
        picked = []
        for s in candidates:
            if chosen_layers is not None and s.layer not in chosen_layers:
                continue
            if rule.modules is not None and not re.fullmatch(rule.modules, s.module):
                continue
            if "any" not in rule.mask and s.mask_kind not in rule.mask:
                continue
            picked.append(s)
        if not picked:
            have = sorted({s.module for s in candidates})
            shown = ", ".join(have[:4]) + (f", … ({len(have)} in all)" if len(have) > 4 else "")
            kinds = sorted({s.mask_kind for s in candidates})
            raise rule.error(f"rule {rule.index} selects no site (pattern {rule.pattern}, layers "
                             f"{rule.layers.raw}, modules {rule.modules or 'any'}, mask {'/'.join(rule.mask)}); "
                             f"sites found: {shown or 'none'}; mask kinds: {', '.join(kinds) or 'none'}")
        taken = [claimed[id(s)] for s in picked if id(s) in claimed]
        if len(taken) == len(picked):
            # Every site it selects went to earlier rules: it would silently do nothing.
            earlier = sorted({r.index for r in taken})
            raise rule.error(f"rule {rule.index} selects only sites that earlier rule(s) {', '.join(map(str, earlier))} "
                             f"already took ({len(picked)} site(s); the first rule that selects a site converts it): "
                             "narrow the earlier rule or move this one before it")
        for s in picked:
            claimed.setdefault(id(s), rule)
    return [(s, claimed[id(s)]) for s in result.sites if id(s) in claimed]
