"""The built-in `eager_softmax_attention` pattern (what passes/match.py registers under that name).

scores = matmul/bmm/baddbmm(q, kᵀ) → [scale: mul/div] → [softcap: div → tanh → mul] → [mask applications:
+ mask or bias, masked_fill(·, m, c) / where(m, ·, c) with a blocking c, max(·, c)] → softmax → [cast] →
[dropout] → matmul(·, v). Views that only split or merge the batch·heads axis may sit anywhere in the chain
(attention on [B·H, T, D] tensors with bmm / baddbmm): q, k, v and the output are then bound as the
[B, H, T, D] values those views come from (or new unflatten nodes). The mask applications are combined into
one site mask (see `_build_mask`). Attention sinks (GPT-OSS): softmax over cat([scores, one logit per head
expanded], key axis), optionally less its row max, and the last key column sliced off the probabilities: the
logits are bound as `sinks` ([heads]). Nothing is added to the graph until a site has matched completely.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from lincompile.graph import ancestors, fmt_shape, module_path, shape, short_op, users, val
from lincompile.site import NearMiss, Site
from lincompile.walk import (BLOCKED, CASTS, const_value, emit, heads, is_op, new_site, strip, sym_eq,
                             sym_expr)


SOFTMAX = ("softmax", "_softmax", "_safe_softmax")
MATMULS = ("matmul", "bmm", "baddbmm")


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
    rank = len(shape(softmax) or ())
    dim = softmax.args[1] if len(softmax.args) > 1 else softmax.kwargs.get("dim")
    if rank not in (3, 4):
        raise _Miss(f"softmax over a {rank}-D tensor, not attention scores ([batch, heads, query, key])")
    if not isinstance(dim, int) or dim % rank != rank - 1:
        raise _Miss(f"softmax over dim {dim}, not the key dimension")
    # Forward: [cast] → [drop the sink column] → [dropout] → matmul with v, through views that only split / merge
    # the batch·heads axis.
    out, sink_slice = softmax, None
    while True:
        nxt = users(out)
        if len(nxt) != 1:
            raise _Miss(f"softmax output has {len(nxt)} users, expected one chain to matmul(·, v)")
        u = nxt[0]
        if sink_slice is None and _drops_last_key(u, rank):
            sink_slice = u
            nodes.append(u)
            out = u
            continue
        if is_op(u, *CASTS, "dropout", "native_dropout", "getitem") or _is_head_view(u):
            nodes.append(u)
            out = u
            continue
        break
    if not (is_op(u, "matmul", "bmm") and u.args[0] is out):
        if is_op(u, "slice", "narrow") and _key_axis_cat(softmax.args[0]):
            raise _Miss("attention sinks in a form not matched: the scores are concatenated with other logits "
                        "before softmax and sliced off after it, but not as one sink column dropped by [..., :-1]")
        raise _Miss(f"softmax output feeds {short_op(u)}, not matmul(·, v)")
    output = u
    nodes.append(output)
    v = output.args[1]
    # Attention sinks: softmax over the scores and one more logit per row, whose column is sliced off after.
    scores, sinks = softmax.args[0], None
    if sink_slice is not None:
        found = _sink_logits(scores)
        if found is None:
            raise _Miss("softmax output's last key column is sliced off, but its input is not the scores "
                        "concatenated with one sink logit per row")
        scores, sinks, sink_nodes = found
        nodes.extend(sink_nodes)
    # Backward from the softmax input: mask applications ← [softcap] ← [scale] ← matmul(q, kᵀ).
    sc = _walk_scores(scores)
    nodes.extend(sc.nodes)
    x, scale, terms = sc.mm, sc.scale, list(sc.terms)
    nodes.append(x)
    if short_op(x) == "baddbmm":
        # baddbmm(bias, q, kᵀ, beta, alpha) = beta · bias + alpha · q kᵀ: alpha is a scale, the bias a mask term
        # applied first (scaled by what scales the scores after it).
        bias, q, kt = x.args[0], x.args[1], x.args[2]
        alpha, beta = x.kwargs.get("alpha", 1), x.kwargs.get("beta", 1)
        if not isinstance(alpha, (int, float)) or not isinstance(beta, (int, float)):
            raise _Miss("baddbmm with a tensor alpha / beta")
        if beta != 0 and isinstance(bias, fx.Node):
            if sc.scale_node is not None:
                raise _Miss("baddbmm bias scaled by a value computed in the graph")
            if sc.softcap is not None:  # cap·tanh((bias + α·qkᵀ)/cap) is no mask added to capped scores
                raise _Miss("baddbmm bias inside a logit softcap")
            terms.insert(0, _Term("add", bias, float(beta) * scale, x))
        scale *= float(alpha)
    else:
        q, kt = x.args[0], x.args[1]
    k, k_perm = _untranspose(kt), None
    if k is None:
        k_perm = _key_permute(kt)  # GPT-1 permutes [B, T, H, D] keys straight to [B, H, D, T]: k gets its own node
        if k_perm is None or len(shape(x) or ()) != 4:
            raise _Miss("scores matmul's second operand is not a transposed key")
    nodes.append(kt)
    # Scores over [batch·heads, T, S] (bmm on 3-D views): bind q, k, v and the output as [B, H, T, D].
    flat = len(shape(x) or ()) == 3
    num_heads = None
    if flat:
        four = [_heads_of(t) for t in (q, k, v)]
        num_heads = next((heads(t) for t in four if t is not None and _int(heads(t)) is not None), None)
        if num_heads is None:
            num_heads = next((_int(shape(n)[1]) for n in nodes if _is_head_view(n) and len(shape(n)) == 4), None)
        if num_heads is None:
            raise _Miss("attention on [batch·heads, T, D] tensors, but the number of heads is not in the graph")
        q, k, v = (t4 if t4 is not None else t for t, t4 in zip((q, k, v), four))
        view = _heads_view_user(output)
        if view is not None:
            nodes.append(view)
            output = view
    if sinks is None and not flat:
        found = _lse_sinks(softmax.args[0], output)
        if found is not None:  # Granite SWA: out · sigmoid(logsumexp(scores) − sink), the same as a sink column
            sinks, sink_nodes, output = found
            nodes.extend(sink_nodes)
    _check_contained(nodes, output, kt)
    for t in terms:  # (raises _Miss now, before anything is added to the graph)
        _heads_plan(t, num_heads)
        if val(t.value) is None:
            raise _Miss(f"mask {t.value.name} has no recorded value")
    # Everything matched: from here on nodes may be added (4-D views, the site's combined mask).
    graph = softmax.graph
    if k_perm is not None:
        k = emit(strip(kt), torch.ops.aten.permute.default, k_perm)
    if flat:
        q, k, v = (_unflatten_heads(t, num_heads) if len(shape(t)) == 3 else t for t in (q, k, v))
        if len(shape(output)) == 3:
            output = _split_output(output, num_heads)
    mask = _build_mask(graph, softmax, terms, num_heads)
    site = new_site(softmax, "eager_softmax_attention", nodes)
    site.output = output
    site.bindings.update(q=q, k=k, v=v)
    if mask is not None:
        site.bindings["mask"] = mask
    site.attrs["scale"] = scale
    if sc.scale_node is not None:
        site.attrs["scale_node"] = sc.scale_node
    if sc.softcap is not None:
        site.attrs["softcap"] = sc.softcap
    if sinks is not None:
        site.bindings["sinks"] = sinks
    # Side nodes that only check metadata of matched values go with them.
    for node in list(nodes):
        site.nodes.extend(u for u in node.users if short_op(u) == "_assert_tensor_metadata")
    return site


# Views that split [B·H, T, S] into [B, H, T, S] or merge them back (eager attention on 3-D bmm tensors).
HEAD_VIEWS = ("view", "reshape", "_unsafe_view", "unflatten", "flatten")


def _int(d) -> int | None:
    return d if isinstance(d, int) else None


def _is_head_view(n) -> bool:
    """A reshape between [B·H, T, S] and [B, H, T, S] (either way), or one that changes nothing."""
    if not is_op(n, *HEAD_VIEWS) or not n.args or not isinstance(n.args[0], fx.Node):
        return False
    a, b = shape(n.args[0]), shape(n)
    if a is None or b is None:
        return False
    if len(a) == len(b):
        return all(sym_eq(x, y) for x, y in zip(a, b))
    if sorted((len(a), len(b))) != [3, 4]:
        return False
    lo, hi = (a, b) if len(a) == 3 else (b, a)
    return sym_eq(lo[1], hi[2]) and sym_eq(lo[2], hi[3]) and sym_eq(lo[0], sym_expr(hi[0]) * sym_expr(hi[1]))


def _heads_of(x):
    """The [B, H, T, D] value that a [B·H, T, D] operand is a view of, or None."""
    n = strip(x)
    if _is_head_view(n) and len(shape(n)) == 3 and len(shape(n.args[0])) == 4:
        return n.args[0]
    return None


def _heads_view_user(x):
    """The [B, H, T, D] view that is the only user of a [B·H, T, D] attention output, or None."""
    us = users(x)
    if len(us) == 1 and _is_head_view(us[0]) and len(shape(us[0])) == 4:
        return us[0]
    return None


def _unflatten_heads(x: fx.Node, num_heads: int) -> fx.Node:
    """[B·H, …] → [B, H, …], right after x."""
    return emit(x, torch.ops.aten.unflatten.int, (x, 0, [-1, num_heads]), "after")


def _split_output(out: fx.Node, num_heads: int) -> fx.Node:
    """Route a [B·H, T, D] attention output through a [B, H, T, D] node (the site's output) and back."""
    four = _unflatten_heads(out, num_heads)
    back = emit(four, torch.ops.aten.flatten.using_ints, (four, 0, 1), "after")
    out.replace_all_uses_with(back, delete_user_cb=lambda u: u is not four)
    return four


@dataclass
class _Term:
    """One mask application on the scores: `add` (scores + value · factor), `block` (where value: blocked, as in
    masked_fill(scores, value, c)) or `allow` (where value: kept, as in where(value, scores, c)); `at` is the node
    that applies it (its rank says whether the value broadcasts against [B·H, T, S] or [B, H, T, S])."""
    kind: str
    value: fx.Node
    factor: float | None
    at: fx.Node


@dataclass
class _Scores:
    mm: fx.Node
    scale: float
    softcap: float | None
    scale_node: fx.Node | None
    nodes: list
    terms: list  # innermost (applied first) first


def _blocking(c) -> bool:
    v = const_value(c)
    return v is not None and v <= BLOCKED


def _noop_clamp(n) -> bool:
    """max(scores, c) / clamp_min(scores, c) with c at or below the blocking value: changes no softmax output."""
    if is_op(n, "max", "maximum", "clamp_min") and len(n.args) == 2 and isinstance(n.args[0], fx.Node):
        return _blocking(n.args[1])
    if is_op(n, "clamp") and len(n.args) >= 2 and isinstance(n.args[0], fx.Node):
        hi = n.args[2] if len(n.args) > 2 else n.kwargs.get("max")
        return hi is None and _blocking(n.args[1])
    return False


def _walk_scores(x, depth: int = 0) -> _Scores:
    """From the softmax input back to matmul(q, kᵀ): casts, head views, no-op clamps and mask applications
    (+ mask, masked_fill, where with a blocking constant), then [softcap] and [scale]."""
    nodes, terms = [], []
    for _ in range(16):
        n = x
        if not isinstance(n, fx.Node):
            break
        if (is_op(n, *CASTS) and n.args and isinstance(n.args[0], fx.Node)) or _is_head_view(n) or _noop_clamp(n):
            nodes.append(n)
            x = n.args[0]
            continue
        rowmax = _rowmax_of(n.args[1], n.args[0]) if is_op(n, "sub") and len(n.args) == 2 else None
        if rowmax is not None:  # scores − their row max (MiMo-V2-Flash): softmax does not see it
            nodes.extend([n] + rowmax)
            x = n.args[0]
            continue
        select = _arith_select(n)
        if select is not None:
            x, m, c, more = select
            nodes.extend([n] + more)
            terms.append(_Term("allow", m, c, n))
            continue
        if is_op(n, "add") and len(n.args) == 2 and n.kwargs.get("alpha", 1) == 1 \
                and all(isinstance(a, fx.Node) for a in n.args):
            a, b = n.args
            sides = [_try_walk(a, depth + 1), _try_walk(b, depth + 1)] if depth < 4 else [None, None]
            if (sides[0] is None) == (sides[1] is None):
                raise _Miss("softmax input is a sum, but neither side leads to matmul(q, kᵀ)" if sides[0] is None
                            else "softmax input is a sum of two matmul(q, kᵀ) scores")
            x, m = (a, b) if sides[0] is not None else (b, a)
            nodes.append(n)
            terms.append(_Term("add", m, 1.0, n))
            continue
        # masked_fill_ in place: its scores are read by nothing else (`_check_contained`), so it is masked_fill
        if is_op(n, "masked_fill", "masked_fill_") and len(n.args) == 3 and isinstance(n.args[0], fx.Node) \
                and isinstance(n.args[1], fx.Node) and _blocking(n.args[2]):
            nodes.append(n)
            cond = n.args[1]
            if is_op(cond, "expand_as") and cond.args[1] is n.args[0]:  # XLM: the mask expanded to the scores' shape
                nodes.append(cond)  # (masked_fill broadcasts it anyway; the site's mask must not read its scores)
                cond = cond.args[0]
            terms.append(_Term("block", cond, const_value(n.args[2]), n))
            x = n.args[0]
            continue
        if is_op(n, "where") and len(n.args) == 3 and isinstance(n.args[0], fx.Node):
            cond, a, b = n.args
            if isinstance(a, fx.Node) and _blocking(b) and _try_walk(a, depth + 1) is not None:
                terms.append(_Term("allow", cond, const_value(b), n))
                x = a
            elif isinstance(b, fx.Node) and _blocking(a) and _try_walk(b, depth + 1) is not None:
                terms.append(_Term("block", cond, const_value(a), n))
                x = b
            else:
                break
            nodes.append(n)
            continue
        break
    x, scale, softcap, scale_node, more = _scores_chain(x)
    nodes.extend(more)
    if not is_op(x, *MATMULS):
        raise _Miss(f"no matmul(q, kᵀ) before softmax (found {short_op(x) if isinstance(x, fx.Node) else x})")
    return _Scores(x, scale, softcap, scale_node, nodes, terms[::-1])


def _arith_select(n):
    """scores · m + c · (1 − m) with c blocking (GPT-1): `where(m, scores, c)` for a 0/1 mask m, written in
    arithmetic. Returns (scores, m, c, [the nodes of the arithmetic]) or None. m is taken for a 0/1 mask, the
    idiom's one use; with other values the identity spec's logits would differ from the original's, and verify
    refuses that."""
    if not (is_op(n, "add") and len(n.args) == 2 and n.kwargs.get("alpha", 1) == 1):
        return None
    for kept, blocked in (n.args, n.args[::-1]):
        if not (is_op(kept, "mul") and is_op(blocked, "mul") and len(kept.args) == 2 and len(blocked.args) == 2):
            continue
        for inv, c in (blocked.args, blocked.args[::-1]):
            if not _blocking(c):
                continue
            m = (inv.args[0] if is_op(inv, "rsub") and len(inv.args) == 2 and const_value(inv.args[1]) == 1.0 else
                 inv.args[1] if is_op(inv, "sub") and len(inv.args) == 2 and const_value(inv.args[0]) == 1.0 else None)
            if isinstance(m, fx.Node) and m in kept.args:
                scores = kept.args[1] if kept.args[0] is m else kept.args[0]
                if isinstance(scores, fx.Node) and scores is not m:
                    return scores, m, const_value(c), [kept, blocked, inv]
    return None


def _try_walk(x, depth: int):
    try:
        return _walk_scores(x, depth) if isinstance(x, fx.Node) else None
    except _Miss:
        return None


def _heads_plan(t: _Term, num_heads: int | None) -> str:
    """How a mask value applied on [B·H, T, S] scores broadcasts against [B, H, T, S] the same way: as it is
    (4-D scores, or broadcast over the leading axes anyway), unsqueezed, or unflattened; else a miss."""
    s, at = shape(t.value), shape(t.at)
    if at is None or len(at) != 3 or s is None or len(s) < 3:
        return "same"
    if len(s) == 3 and sym_eq(s[0], 1):
        return "unsqueeze"
    if len(s) == 3 and num_heads is not None:
        return "unflatten"
    raise _Miss(f"mask {t.value.name} on [batch·heads, T, S] scores has shape {fmt_shape(t.value)}")


def _as_heads(t: _Term, num_heads: int | None, anchor: fx.Node) -> fx.Node:
    plan = _heads_plan(t, num_heads)
    if plan == "unsqueeze":
        return emit(anchor, torch.ops.aten.unsqueeze.default, (t.value, 0))
    if plan == "unflatten":
        return emit(anchor, torch.ops.aten.unflatten.int, (t.value, 0, [-1, num_heads]))
    return t.value


def _build_mask(graph, softmax, terms, num_heads):
    """The site's mask from its mask applications (innermost first): one additive or boolean (True = attend)
    tensor such that softmax(scores + mask) is the original's. A single `+ mask` on [B, H, T, S] scores binds
    that mask as it is; anything else gets nodes right before the softmax."""
    if not terms:
        return None
    if len(terms) == 1 and terms[0].kind == "add" and terms[0].factor == 1.0 and len(shape(terms[0].at) or ()) == 4:
        return terms[0].value
    kind, mask = None, None
    aten = torch.ops.aten
    for t in terms:
        value = _as_heads(t, num_heads, softmax)
        if t.kind == "add":
            if t.factor != 1.0:
                value = emit(softmax, aten.mul.Tensor, (value, t.factor))
            if kind is None:
                kind, mask = "add", value
            elif kind == "add":
                mask = emit(softmax, aten.add.Tensor, (mask, value))
            else:  # a boolean pattern, then a bias: blocked positions get the dtype's minimum
                low = torch.finfo(val(value).dtype).min
                kind, mask = "add", emit(softmax, aten.where.ScalarOther, (mask, value, low))
            continue
        # block / allow: a boolean condition (GPT-1's 0/1 float mask is one where it is not 0)
        if val(value) is not None and val(value).dtype != torch.bool:
            value = emit(softmax, aten.ne.Scalar, (value, 0))
        if kind == "add":
            if t.kind == "block":
                mask = emit(softmax, aten.where.ScalarSelf, (value, t.factor, mask))
            else:
                mask = emit(softmax, aten.where.ScalarOther, (value, mask, t.factor))
            continue
        allow = value if t.kind == "allow" else emit(softmax, aten.logical_not.default, (value,))
        kind, mask = "bool", allow if mask is None else emit(softmax, aten.logical_and.default, (mask, allow))
    return mask


def _drops_last_key(n: fx.Node, rank: int) -> bool:
    """`probs[..., :-1]`: a slice of the key axis that drops its last column."""
    if not is_op(n, "slice") or len(n.args) < 4:
        return False
    dim, start, end = n.args[1], n.args[2], n.args[3]
    step = n.args[4] if len(n.args) > 4 else 1
    return isinstance(dim, int) and dim % rank == rank - 1 and start == 0 and end == -1 and step == 1


def _sink_logits(x):
    """(scores, per-head sink logits, nodes) when x = [cast] [x − rowmax(x)] cat([scores, sinks], key axis) and
    sinks broadcasts one logit per head (GPT-OSS: a [heads] parameter reshaped and expanded); else None. The max
    subtraction only keeps softmax in range: softmax is the same without it."""
    nodes = []
    for _ in range(4):
        if is_op(x, *CASTS):
            nodes.append(x)
            x = x.args[0]
            continue
        rowmax = _rowmax_of(x.args[1], x.args[0]) if is_op(x, "sub") and isinstance(x.args[0], fx.Node) else None
        if rowmax is not None:
            nodes += [x, *rowmax]
            x = x.args[0]
            continue
        break
    rank = len(shape(x) or ())
    if not is_op(x, "cat") or len(x.args) < 2 or not isinstance(x.args[1], int) or rank != 4 \
            or x.args[1] % rank != rank - 1 or len(x.args[0]) != 2:
        return None
    scores, column = x.args[0]
    if shape(column) is None or _int(shape(column)[-1]) != 1:  # one column: the one the slice drops
        return None
    nodes.append(x)
    sinks = _per_head_logits(column, _int(shape(scores)[1]), nodes)
    return None if sinks is None else (scores, sinks, nodes)


def _per_head_logits(x, heads_, nodes):
    """The [heads] value that x broadcasts (through expand / reshape / casts, appended to `nodes`), if it is
    learned: computed from no input (a value from the tokens would not be the same at every decode step)."""
    for _ in range(6):
        got = shape(x)
        if got is not None and heads_ is not None and len(got) == 1 and _int(got[0]) == heads_:
            return None if any(a.op == "placeholder" for a in ancestors(x)) else x
        if not (is_op(x, *CASTS, "expand", "reshape", "view", "unsqueeze", "_unsafe_view")
                and isinstance(x.args[0], fx.Node)):
            return None
        nodes.append(x)
        x = x.args[0]
    return None


def _lse_sinks(scores, output):
    """(per-head sink logits, nodes, new output) when `output` is scaled as out · sigmoid(logsumexp(scores) − s)
    with s one learned logit per head (through casts and views): softmax over [scores, s] times v, with the sink
    column dropped, is exactly that. Else None."""
    lse = next((u for u in users(scores) if is_op(u, "logsumexp")), None)
    if lse is None or len(users(lse)) != 1:
        return None
    dims = lse.args[1] if len(lse.args) > 1 else lse.kwargs.get("dim")
    rank = len(shape(scores) or ())
    keepdim = lse.args[2] if len(lse.args) > 2 else lse.kwargs.get("keepdim", False)
    if list(dims if isinstance(dims, (list, tuple)) else [dims]) not in ([-1], [rank - 1]) or keepdim:
        return None
    sub = users(lse)[0]
    if not (is_op(sub, "sub") and sub.args[0] is lse and isinstance(sub.args[1], fx.Node)):
        return None
    nodes = [lse, sub]
    sinks = _per_head_logits(sub.args[1], _int((shape(scores) or (None, None))[1]), nodes)
    if sinks is None:
        return None
    x = sub
    for _ in range(8):  # forward: casts → sigmoid → unsqueeze(-1) → casts → mul with the output
        nxt = users(x)
        if len(nxt) != 1:
            return None
        x = nxt[0]
        nodes.append(x)
        if is_op(x, "mul"):
            break
        if not is_op(x, *CASTS, "sigmoid", "unsqueeze"):
            return None
    else:
        return None
    prev = nodes[-2]  # the scale's last node, one of mul's two operands
    unsqueezes = [n for n in nodes if is_op(n, "unsqueeze")]
    if sum(is_op(n, "sigmoid") for n in nodes) != 1 or len(unsqueezes) != 1 or \
            unsqueezes[0].args[1] not in (-1, rank - 1) or len(x.args) != 2 or prev not in x.args:
        return None  # one sigmoid, and the scale is per query row: [B, H, T] → [B, H, T, 1]
    out = x.args[1] if x.args[0] is prev else x.args[0]
    while out is not output and is_op(out, *CASTS) and isinstance(out.args[0], fx.Node):
        nodes.append(out)
        out = out.args[0]
    return (sinks, nodes, x) if out is output else None


def _check_contained(nodes, output, kt) -> None:
    """No value the site computes may be read outside it (the output aside): a replaced site no longer computes
    them, and those made from the scores would see one key in the runtime's decode. The keys' transpose may be
    shared."""
    inside = set(nodes) | {output}
    for n in nodes:
        if n is output or n is kt:
            continue
        for u in n.users:
            if u in inside or short_op(u) == "_assert_tensor_metadata" or (is_op(u, "getitem") and not u.users):
                continue
            raise _Miss(f"{short_op(n)} {n.name} inside the attention is also read by {short_op(u)} {u.name} "
                        "outside it: not softmax(q kᵀ)·v alone")


def _key_axis_cat(x) -> bool:
    """x is (through casts and a subtraction) a concatenation along the last axis."""
    for _ in range(4):
        if (is_op(x, *CASTS) or is_op(x, "sub")) and isinstance(x.args[0], fx.Node):
            x = x.args[0]
    rank = len(shape(x) or ()) or 4
    return is_op(x, "cat") and len(x.args) > 1 and isinstance(x.args[1], int) and x.args[1] % rank == rank - 1


def _rowmax_of(m, x) -> list[fx.Node] | None:
    """The nodes of m when m = max(x, key axis, keepdim) (its values), amax likewise, or that detached: one value
    per row, which softmax does not see."""
    chain = []
    for _ in range(3):
        if is_op(m, "detach", "getitem") and isinstance(m.args[0], fx.Node):
            chain.append(m)
            m = m.args[0]
            continue
        break
    if not (is_op(m, "max", "amax") and m.args[0] is x and len(m.args) > 1):
        return None
    rank, dims = len(shape(x) or ()), m.args[1]
    dims = list(dims) if isinstance(dims, (list, tuple)) else [dims]
    keepdim = m.args[2] if len(m.args) > 2 else m.kwargs.get("keepdim", False)
    if rank and keepdim is True and len(dims) == 1 and isinstance(dims[0], int) and dims[0] % rank == rank - 1:
        return chain + [m]
    return None


def _scores_chain(x):
    """Walk back through [scale] and [softcap]: returns (matmul?, scale, softcap, scale_node, nodes)."""
    scale, softcap, scale_node, nodes = 1.0, None, None, []
    for _ in range(8):
        x = strip(x)
        if _is_head_view(x):
            nodes.append(x)
            x = x.args[0]
            continue
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
    r = len(shape(kt) or ()) or 4
    if is_op(kt, "transpose"):
        d = sorted(int(d) % r for d in kt.args[1:3])
        if d == [r - 2, r - 1]:
            return kt.args[0]
    if is_op(kt, "permute"):
        perm = [int(p) % r for p in kt.args[1]]
        if perm[-2:] == [r - 1, r - 2]:
            return kt.args[0]
    if is_op(kt, "t"):
        return kt.args[0]
    return None


def _key_permute(kt):
    """(source, permutation) that gives the keys [B, H, S, D] where kt is one permute of another layout, or None."""
    kt = strip(kt)
    if not is_op(kt, "permute") or len(kt.args[1]) != 4:
        return None
    perm = [int(p) % 4 for p in kt.args[1]]
    return kt.args[0], perm[:2] + [perm[3], perm[2]]
