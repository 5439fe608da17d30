"""Pass `match`: find every softmax attention site in the captured graph and bind what operators need.

Built-in patterns (data about op names, not about architectures):
- `sdpa`: one `aten.scaled_dot_product_attention` node.
- `eager_softmax_attention`: scores = matmul/bmm/baddbmm(q, kᵀ) → [scale: mul/div] → [softcap: div → tanh → mul]
  → [mask applications: + mask or bias, masked_fill(·, m, c) / where(m, ·, c) with a blocking c, max(·, c)]
  → softmax → [cast] → [dropout] → matmul(·, v). Views that only split or merge the batch·heads axis may sit
  anywhere in the chain (attention on [B·H, T, D] tensors with bmm / baddbmm): q, k, v and the output are then
  bound as the [B, H, T, D] values those views come from (or new unflatten nodes). baddbmm's alpha is a scale,
  its bias (beta · input) a mask term (not under a softcap). The mask applications are combined into one site
  mask, so that softmax(scale · q kᵀ + mask) is the original: a single `+ mask` on 4-D scores is bound as it is,
  anything else (several terms, masked_fill / where, 3-D scores) gets new nodes before the softmax. Scores
  concatenated with one logit per head before softmax, that column sliced off after (attention sinks), bind
  the logits as `sinks`.
- `softmax_attention`: either.
A spec may declare its own patterns (see lincompile/patterns.py). The eager pattern lives in
lincompile/eager_pattern.py, the walks below in lincompile/walk.py.

For each site, values are bound by walking back from q/k/v: through the GQA repeat (k_kv, v_kv; also a repeat
before RoPE: expand of a size-1 axis merged into the heads through layout ops, then k_kv is one head per group of
the roped keys), through the rotary embedding (q_pre_rope, k_pre_rope), to the projections (their module paths,
and `hidden`, the input of the q projection), and forward to the output projection. A constant factor on q
before layout ops (queries scaled in the projection) moves into the scale. What can't be found stays absent,
with a note. Masks are evaluated on a long probe and classified (causal, sliding window w, chunked,
bidirectional, custom).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
from torch import fx

from lincompile.eager_pattern import match_eager
from lincompile.errors import MatchError
from lincompile.graph import module_path, record, shape, short_op
from lincompile.models import text_config
from lincompile.site import NearMiss, Site
from lincompile.walk import (BLOCKED, find_output_projection, find_pre_rope_through_layout, find_projection,
                             fold_q_scale, heads, is_op, kv_heads_slice, kv_repeat, new_site, through_repeat)


@dataclass
class MatchResult:
    sites: list[Site]
    near_misses: list[NearMiss] = field(default_factory=list)
    patterns_tried: tuple[str, ...] = ()




def match_sdpa(gm: fx.GraphModule) -> tuple[list[Site], list[NearMiss]]:
    sites = []
    for n in gm.graph.nodes:
        if not is_op(n, "scaled_dot_product_attention"):
            continue
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
        args = dict(zip(names, n.args))
        args.update(n.kwargs)
        site = new_site(n, "sdpa", [n])
        site.bindings.update(q=args["query"], k=args["key"], v=args["value"])
        if isinstance(args.get("attn_mask"), fx.Node):
            site.bindings["mask"] = args["attn_mask"]
        site.attrs["is_causal"] = bool(args.get("is_causal", False))
        if args.get("scale") is not None:
            site.attrs["scale"] = float(args["scale"])
        sites.append(site)
    return sites, []


BUILTIN_MATCHERS = {"sdpa": (match_sdpa,), "eager_softmax_attention": (match_eager,),
                    "softmax_attention": (match_sdpa, match_eager)}




def complete_site(site: Site) -> None:
    """Walk the graph from q/k/v to fill in the derived bindings and static facts."""
    b, a = site.bindings, site.attrs
    q, k, v = b["q"], b["k"], b["v"]
    b["k_kv"], b["v_kv"] = through_repeat(k), through_repeat(v)
    kr = None
    if b["k_kv"] is k:
        # Heads repeated before the rotary embedding (RoPE acts on every head alike): k_kv is one head per group
        # of the roped keys, k_pre_rope the same heads before it.
        pre = find_pre_rope_through_layout(k)
        rep = kv_repeat(pre if pre is not None else k)
        if rep is not None:
            b["k_kv"] = kv_heads_slice(k, *rep)
            kr = kv_heads_slice(pre, *rep) if pre is not None else None
        else:
            kr = pre  # k_kv is k: found once (finding it adds its layout nodes to the graph)
    if b["v_kv"] is v and (rep := kv_repeat(v)) is not None:
        b["v_kv"] = kv_heads_slice(v, *rep)
    a["num_heads"] = heads(q)
    a["num_kv_heads"] = heads(b["k_kv"]) or heads(k)
    qs, vs = shape(q), shape(v)
    a["head_dim"] = int(qs[-1]) if qs else None
    a["v_head_dim"] = int(vs[-1]) if vs else None
    if a.get("scale") is None and a["head_dim"]:
        a["scale"] = 1.0 / math.sqrt(a["head_dim"])
    folded = fold_q_scale(q) if a.get("scale") is not None else None
    if folded is not None:
        q, factor = folded
        b["q"] = q
        a["scale"] *= factor
    qr = find_pre_rope_through_layout(q)
    if kr is None:
        kr = find_pre_rope_through_layout(b["k_kv"])
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
    """(kind, window) from a mask evaluated at probe length: bool (True = attend) or additive (0 = attend).

    A mask is causal / sliding / chunked / bidirectional only when it is exactly that pattern of attend / block,
    the same for every batch row and head. An additive mask whose attended values differ within a query's row
    carries a bias (e.g. ALiBi's per-head distance penalty), and one whose pattern differs across heads is no
    single pattern: both are `custom`, as is any other pattern. (A constant added to a whole row changes
    nothing after softmax, so it is no bias.)
    """
    if mask is None:
        return ("causal", None) if is_causal else ("none", None)
    if mask.dim() < 2:
        return "custom", None
    if mask.dtype == torch.bool:
        allowed = mask
    else:
        m = mask.float()
        top = m.amax(-1, keepdim=True)
        # (a row blocked everywhere: its largest value is the dtype's minimum or -inf, and nothing is attended)
        allowed = (m > top + BLOCKED) & (m > torch.finfo(mask.dtype).min / 2)
        lowest = torch.where(allowed, m, float("inf")).amin(-1)
        seen = allowed.any(-1)
        if bool(((top.squeeze(-1) - lowest)[seen] > 1e-6).any()):
            return "custom", None
    allowed = allowed.reshape(-1, *allowed.shape[-2:])
    if not bool((allowed == allowed[:1]).all()):
        return "custom", None  # heads (or batch rows) see different keys
    allowed = allowed[0]
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


def alibi_slopes(mask: torch.Tensor | None) -> list[float] | None:
    """Per-head slopes s_h of an additive causal mask whose attended values are −s_h·(i − j) (plus any constant per
    query row, which softmax ignores): ALiBi, as BLOOM, MPT and Falcon fold it into their masks. None for any
    other mask. The cached softmax (kept layers) rebuilds the bias from them when decoding."""
    if mask is None or mask.dtype == torch.bool or mask.dim() != 4 or not mask.dtype.is_floating_point:
        return None
    m = mask.float()
    if not bool((m == m[:1]).all()):
        return None  # batch rows differ
    m = m[0]
    H, T, S = m.shape
    if T != S or T < 2:
        return None
    causal = torch.ones(T, T, dtype=torch.bool, device=m.device).tril()
    # Blocked: the dtype's lowest value, -inf, or a -1e9 style fill. A long ALiBi distance (−s·T, thousands below
    # the row's top at most) is not blocked, though classify_mask's margin would say so.
    allowed = (m > torch.finfo(mask.dtype).min / 2) & (m > m.amax(-1, keepdim=True) - 1e6)
    if not bool((allowed == causal).all()):
        return None
    i = torch.arange(T, device=m.device)
    distance = (i[:, None] - i[None, :]).float()
    relative = m - m.diagonal(dim1=-2, dim2=-1)[..., :, None]  # 0 on the diagonal, −s·(i − j) to its left
    # From the longest distance: values near s·T are only as exact as the dtype there, and dividing by T − 1
    # shrinks that error (the slopes of 12, 16, 32 or 112 heads are no powers of two).
    slopes = -relative[:, T - 1, 0] / (T - 1)
    expected = -slopes[:, None, None] * distance
    tolerance = 4 * torch.finfo(mask.dtype).eps * (m.abs()[:, causal].amax() + 1.0)  # of the attended values
    if bool((slopes < 0).any()) or not bool(((relative - expected).abs() <= tolerance)[:, causal].all()):
        return None
    return [float(s) for s in slopes]


def evaluate_facts(gm: fx.GraphModule, sites: list[Site], vocab_size: int, mask_probe_len: int) -> None:
    """Evaluate masks (and in-graph scale constants) on a long probe, once per distinct node."""
    from lincompile.passes.capture import probe_ids

    wanted = {s.bindings["mask"] for s in sites if "mask" in s.bindings}
    wanted |= {s.attrs["scale_node"] for s in sites if "scale_node" in s.attrs}
    if not wanted:
        values = {}
    else:
        ids = probe_ids(vocab_size, 1, mask_probe_len)
        inputs = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
        # a positions capture takes (input_ids, position_ids); a mask may read the positions (DeepSeek-V3.2's
        # sparse-attention indexer ropes its keys)
        args = (ids, torch.arange(mask_probe_len).expand_as(ids)) if "position_ids" in inputs else (ids,)
        values = record(gm, wanted, *args, only_needed=True)
    kinds: dict = {}  # per distinct mask node: the layers of a model usually share one
    for s in sites:
        node = s.bindings.get("mask")
        m = values.get(node)
        key = (node, s.attrs.get("is_causal", False))
        if key not in kinds:
            got = classify_mask(m if isinstance(m, torch.Tensor) else None, key[1])
            kinds[key] = (*got, alibi_slopes(m) if got[0] == "custom" and isinstance(m, torch.Tensor) else None)
        kind, window, slopes = kinds[key]
        heads = s.attrs.get("num_heads")
        if slopes is not None and heads:
            # one per query head (a mask with one head gives one slope, the same for all); any other count does not
            # say which head is which: no slopes, and the site stays a plain custom one
            slopes = slopes * heads if len(slopes) == 1 else slopes
            if len(slopes) == heads:
                s.attrs["alibi_slopes"] = slopes
        if kind == "none" and s.pattern in ("sdpa", "eager_softmax_attention"):
            kind = "bidirectional"  # the built-in patterns see every mask: none, and not causal, attends to all
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
    config = captured.model.config
    length = mask_probe_length(config, spec.capture.mask_probe_len, captured.max_seq_len)
    evaluate_facts(captured.gm, result.sites, text_config(config).vocab_size, length)
    w = declared_window(config)
    if w is not None and length <= w < captured.max_seq_len:  # past MAX_MASK_PROBE: say what a causal site may be
        for s in result.sites:
            if s.attrs.get("mask_kind") == "causal":
                s.notes.append(f"the config declares a window of {w} tokens, longer than the {length}-token mask "
                               f"probe: a sliding layer reads as causal here (capture.mask_probe_len: {w + 64} "
                               "tells them apart)")
    return result


# What configs call the width of a sliding attention window or of an attention chunk (int, or one per layer).
WINDOW_FIELDS = ("sliding_window", "sliding_window_size", "window_size", "attention_window", "attention_chunk_size")
# Masks are T x T: a config's window lengthens the probe up to this many tokens (at 16k, the float mask is 1 GiB
# and classifying it takes a few GiB more).
MAX_MASK_PROBE = 16384


def declared_window(config) -> int | None:
    """The largest sliding window (or attention chunk) the model's config declares, its text config's included:
    a hint for how long masks must be probed (the graph is what says which layers use it)."""
    text = text_config(config)
    found = []
    for cfg in (config, text) if text is not config else (config,):
        for name in WINDOW_FIELDS:
            value = getattr(cfg, name, None)
            values = value if isinstance(value, (list, tuple)) else [value]
            found += [v for v in values if isinstance(v, int) and not isinstance(v, bool) and v > 0]
    return max(found, default=None)


def mask_probe_length(config, asked: int, max_len: int) -> int:
    """How long the mask probe is: the spec's capture.mask_probe_len, lengthened past a window the config declares
    (a window of 4096 probed at 1024 tokens reads as causal: no row is long enough to show it), up to
    MAX_MASK_PROBE, within the length the graph takes (a window that long never applies)."""
    w = declared_window(config)
    if w is not None and w < max_len:
        asked = max(asked, min(w + 64, MAX_MASK_PROBE))
    return min(asked, max_len)


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
    assignments = [(s, claimed[id(s)]) for s in result.sites if id(s) in claimed]
    check_masks(assignments)
    return assignments


# Mask kinds an operator that takes no mask still computes faithfully: causal attention, and a sliding window
# it replaces by its own (linear or windowed) attention. `none` is a user pattern's site that captures no mask (the
# pattern's author vouches for it); a built-in pattern's unmasked, non-causal site is `bidirectional`.
MASKLESS_KINDS = ("causal", "sliding", "none")


def takes_input(op: str, what: str = "mask", at_init: bool = False) -> bool | None:
    """Whether operator `op` receives the site's binding `what` (the mask by default: one of its `inputs`, or
    with `at_init` of the bindings it reads to initialise); None when that is unknown without running user code
    (`module:Class` not imported yet)."""
    import sys

    if op == "keep":
        return True
    if ":" in op:
        module, _, attr = op.partition(":")
        cls = getattr(sys.modules.get(module), attr, None)
        if cls is None:
            return None
    else:
        from lincompile.kernels import registry

        cls = registry.get(op)
    names = tuple(getattr(cls, "inputs", ())) + tuple(getattr(cls, "optional_inputs", ()))
    return what in names + (tuple(getattr(cls, "init_bindings", ())) if at_init else ())


def _reads_alibi(rule) -> bool:
    import sys

    from lincompile.kernels import registry

    if rule.op == "keep":
        return False
    if ":" in rule.op:  # a user operator: only when imported already (no user code runs here)
        module, _, attr = rule.op.partition(":")
        cls = getattr(sys.modules.get(module), attr, None)
    else:
        cls = registry.get(rule.op)
    reads = getattr(cls, "reads_alibi", None)
    return bool(reads(dict(rule.params or {}))) if reads is not None else False


MASK_MEANING = {
    "custom": "an additive bias such as ALiBi, or a pattern other than causal / sliding window / chunked",
    "chunked": "each query sees only the keys of its own chunk",
    "bidirectional": "every query sees every key",
}


def check_masks(assignments) -> None:
    """Refuse to convert, with an operator that never sees the mask, a site whose mask is more than a causal or
    sliding pattern (an additive bias such as ALiBi, a chunked or bidirectional pattern, anything custom): the
    operator would silently drop it. A rule that names that mask kind (`mask: custom`) asks for it: the site is
    converted, with a note."""
    dropped: dict[int, tuple[object, list]] = {}
    for site, rule in assignments:
        kind = site.mask_kind
        if kind in MASKLESS_KINDS or takes_input(rule.op) is not False:
            continue
        if kind == "custom" and site.attrs.get("alibi_slopes") is not None and _reads_alibi(rule):
            continue  # the operator turns the bias into its own (simple_decay's decays), and notes it
        if kind in rule.mask:
            note = f"the site's {kind} attention mask is dropped: {rule.op} takes no mask"
            if note not in site.notes:
                site.notes.append(note)
            continue
        dropped.setdefault(id(rule), (rule, []))[1].append(site)
    for site, rule in assignments:  # attention sinks: the new operator learns without them (healing)
        # (an operator that reads them at init says itself whether it could)
        if "sinks" in site.bindings and takes_input(rule.op, "sinks", at_init=True) is False:
            note = f"the site's attention sinks (one learned logit per head) are dropped: {rule.op} takes none"
            if note not in site.notes:
                site.notes.append(note)
    for rule, sites in dropped.values():
        kinds = sorted({s.mask_kind for s in sites})
        layers = ", ".join(str(s.layer) if s.layer is not None else s.module for s in sites)
        kind = kinds[0] if len(kinds) == 1 else "[" + ", ".join(kinds) + "]"
        meaning = "; ".join(MASK_MEANING.get(k, k) for k in kinds)
        raise rule.error(
            f"rule {rule.index}: op {rule.op} takes no attention mask, but layer(s) {layers} ({sites[0].module}"
            f"{', …' if len(sites) > 1 else ''}) have a {'/'.join(kinds)} mask ({meaning}) that it would silently "
            f"drop; keep them with a rule "
            f"`{{mask: {kind}, op: keep}}` before this one, or convert them anyway with `mask: {kind}` in this rule")
