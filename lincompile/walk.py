"""Graph walking for the match pass: from an attention site's q / k / v back through GQA repeats (also one
made before the rotary embedding), the rotary embedding and the projections, and forward from its output to
the output projection; plus the small pieces the patterns share (constants read off the graph, new nodes
placed next to an anchor, symbolic sizes compared).

Everything here reasons about op names and dataflow, never about an architecture's module names.
"""

from __future__ import annotations

import math

import torch
from torch import fx

from lincompile.graph import ancestors, layer_index, module_path, shape, short_op, users
from lincompile.site import Site


CASTS = ("to", "_to_copy", "type_as", "contiguous", "clone", "alias", "detach", "lift_fresh_copy")
PROJECTIONS = ("linear", "addmm", "mm", "matmul")
RESHAPES = ("view", "reshape", "_unsafe_view", "transpose", "permute", "contiguous", "clone", "unflatten",
            "flatten", "expand", "squeeze", "unsqueeze", "split", "split_with_sizes", "getitem", "chunk",
            "unbind", "select", "slice", "narrow") + CASTS
ROTATE = ("slice", "neg", "cat", "stack", "view", "reshape", "flatten", "unflatten", "select", "unsqueeze",
          "squeeze", "mul", "unbind", "getitem", "chunk", "split", "split_with_sizes", "narrow") + CASTS




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
    if is_op(x, "lift_fresh_copy", "detach", "detach_", "alias", "clone", "to", "_to_copy") and x.args:
        return const_value(x.args[0])
    if isinstance(x, fx.Node) and x.op == "get_attr":
        # A one-element tensor constant (torch.export lifts `torch.tensor(c)` into the module).
        obj = x.graph.owning_module
        try:
            for part in str(x.target).split("."):
                obj = getattr(obj, part)
        except AttributeError:
            return None
        if isinstance(obj, torch.Tensor) and not isinstance(obj, torch.nn.Parameter) and obj.numel() == 1 \
                and obj.dtype.is_floating_point:
            return float(obj.reshape(()).item())
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


# Ops that only lay a tensor out (no value changes): what may lie between a GQA expand and the k / v fed to attention.
LAYOUT = ("view", "reshape", "_unsafe_view", "flatten", "transpose", "permute") + CASTS


def _full_slice(n) -> bool:
    """slice(x, dim, 0, end) that keeps the whole axis (what `x[:, :]` exports to)."""
    if not is_op(n, "slice"):
        return False
    start = n.args[2] if len(n.args) > 2 else 0
    end = n.args[3] if len(n.args) > 3 else None
    step = n.args[4] if len(n.args) > 4 else 1
    return start in (0, None) and (end is None or (isinstance(end, int) and end >= 2 ** 62)) and step == 1


def _merge_at(a: tuple, b: tuple) -> int | None:
    """j when shape b is shape a with axes j, j+1 merged (row-major), else None."""
    if len(b) != len(a) - 1:
        return None
    for j in range(len(b)):
        if all(sym_eq(x, y) for x, y in zip(a[:j], b[:j])) and sym_eq(sym_expr(a[j]) * sym_expr(a[j + 1]), b[j]) \
                and all(sym_eq(x, y) for x, y in zip(a[j + 2:], b[j + 1:])):
            return j
    return None


def _track_heads(ops, first: int, second: int) -> int | None:
    """Follow two adjacent axes (`first` the major one) through layout ops, innermost first, until they are merged
    into one; the merged axis' position at the end, or None when they are split apart or merged with others."""
    merged = None
    for op in ops:
        if is_op(op, *CASTS) or _full_slice(op):
            continue
        src, dst = shape(op.args[0]), shape(op)
        if src is None or dst is None:
            return None
        r = len(src)
        if is_op(op, "transpose"):
            d0, d1 = (int(d) % r for d in op.args[1:3])
            swap = {d0: d1, d1: d0}
            if merged is None:
                first, second = swap.get(first, first), swap.get(second, second)
            else:
                merged = swap.get(merged, merged)
            continue
        if is_op(op, "permute"):
            perm = [int(p) % r for p in op.args[1]]
            if merged is None:
                first, second = perm.index(first), perm.index(second)
            else:
                merged = perm.index(merged)
            continue
        if len(src) == len(dst) and all(sym_eq(x, y) for x, y in zip(src, dst)):
            continue  # a view that changes nothing
        j = _merge_at(src, dst)
        if j is None:
            return None
        if merged is None:
            if (j, j + 1) == (first, second):
                merged = j
            elif j + 1 < first:
                first, second = first - 1, second - 1
            elif j > second:
                pass
            else:
                return None
        elif j + 1 < merged:
            merged -= 1
        elif j == merged or j + 1 == merged:
            return None
    return merged


def kv_repeat(node) -> tuple[int, str] | None:
    """(group, layout) when `node` ([B, H, T, D]) is, through layout-only ops, kv heads expanded `group` times
    (expand / broadcast_to of a size-1 axis next to the kv-head axis, then the two merged into the head axis):
    layout `interleave` when head h is kv head h // group (the expanded axis after the kv axis), `tile` when it
    is kv head h % (H / group)."""
    H = heads(node)
    if not isinstance(H, int):
        return None
    ops, n = [], node
    for _ in range(12):
        if not isinstance(n, fx.Node):
            return None
        if is_op(n, "expand", "broadcast_to", "expand_copy"):
            break
        if not ((is_op(n, *LAYOUT) or _full_slice(n)) and n.args and isinstance(n.args[0], fx.Node)):
            return None
        ops.append(n)
        n = n.args[0]
    else:
        return None
    src, dst = shape(n.args[0]), shape(n)
    if src is None or dst is None or len(src) != len(dst):
        return None
    grown = [i for i, (a, b) in enumerate(zip(src, dst)) if isinstance(a, int) and a == 1 and isinstance(b, int) and b > 1]
    if len(grown) != 1:
        return None
    i, g = grown[0], dst[grown[0]]
    if H % g or H == g:
        return None
    for layout, (first, second), kv in (("interleave", (i - 1, i), i - 1), ("tile", (i, i + 1), i + 1)):
        if 0 <= kv < len(dst) and sym_eq(dst[kv], H // g) and _track_heads(ops[::-1], first, second) == 1:
            return g, layout
    return None


def kv_heads_slice(x: fx.Node, group: int, layout: str) -> fx.Node:
    """One head per kv head of x ([B, H, T, D], heads repeated as kv_repeat found them), right after x."""
    H = heads(x)
    args = (x, 1, 0, 2 ** 63 - 1, group) if layout == "interleave" else (x, 1, 0, H // group, 1)
    return emit(x, torch.ops.aten.slice.Tensor, args, "after")


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


def _rope_halves(n):
    """x for n = cat([x1·cos − x2·sin, x2·cos + x1·sin], last axis), x1 and x2 the two halves of x (chunk /
    split / slices: GPT-OSS's form), else None."""
    n = strip(n)
    want = shape(n)
    if not (is_op(n, "cat") and isinstance(n.args[0], (list, tuple)) and len(n.args[0]) == 2 and want
            and len(n.args) > 1 and isinstance(n.args[1], int) and n.args[1] % len(want) == len(want) - 1):
        return None
    sources = set()
    for part in n.args[0]:
        part = strip(part)
        if not is_op(part, "add", "sub") or len(part.args) < 2:
            return None
        pieces = []
        for m in part.args[:2]:
            m = strip(m)
            if not is_op(m, "mul"):
                return None
            # of the two factors, the one that is half of a tensor shaped like the output (cos / sin are not)
            halves = [(a, h) for a in m.args if isinstance(a, fx.Node) for h in [_half_of(a)]
                      if h is not None and _same_shape(shape(h), want)]
            if len(halves) != 1:
                return None
            pieces.append(strip(halves[0][0]))
            sources.add(halves[0][1])
        if pieces[0] is pieces[1]:  # x1·cos ± x2·sin: the two halves, not one of them twice
            return None
    return sources.pop() if len(sources) == 1 else None


VIEWS = ("view", "_unsafe_view", "reshape", "slice", "select", "narrow", "transpose", "permute", "t", "expand",
         "unsqueeze", "squeeze", "unflatten", "flatten", "as_strided", "alias", "diagonal", "split", "split_with_sizes",
         "chunk", "unbind", "getitem")


def _writes_into(node: fx.Node) -> bool:
    """Is `node` an in-place op, or a view of its input that one writes through?"""
    todo, seen = [node], set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "call_function" and short_op(n).endswith("_"):  # copy_, fill_, index_put_, add_, …
            return True
        if n.op == "call_function" and short_op(n) in VIEWS:
            todo.extend(n.users)
    return False


def _rope_complex(n):
    """x for n = view_as_real(view_as_complex(x as pairs) · freqs) flattened back (RoPE as a complex product:
    Llama 4, DeepSeek-V2), else None."""
    n = strip(n)
    if not is_op(n, "flatten", "view", "reshape", "_unsafe_view"):
        return None
    real = strip(n.args[0])
    if not (is_op(real, "view_as_real") and is_op(strip(real.args[0]), "mul")):
        return None
    factors = [strip(a) for a in strip(real.args[0]).args if isinstance(a, fx.Node)]
    pairs = [a for a in factors if is_op(a, "view_as_complex")]
    if len(pairs) != 1:
        return None
    x = strip(pairs[0].args[0])
    if is_op(x, "view", "reshape", "_unsafe_view", "unflatten"):
        x = strip(x.args[0])
    others = [a for a in factors if a is not pairs[0]]
    if not _same_shape(shape(x), shape(n)) or any(_reachable(o, {x}, RESHAPES, depth=8) for o in others):
        return None
    return x


NORM_OPS = ("pow", "mean", "add", "rsqrt", "sqrt", "mul", "div") + CASTS


def _rope_under_norm(n):
    """For n = y · rsqrt(mean(y², last axis) + ε) (or y / sqrt(…)) with y RoPE'd, a norm without a weight (Llama 4's
    q/k L2 norm after RoPE): the same norm of y's pre-RoPE value, added to the graph; else None. A rotation keeps
    each pair's length, so it commutes with such a norm; a norm with a per-channel weight would not."""
    if not is_op(n, "mul", "div") or len(n.args) < 2:
        return None
    orders = [n.args[:2], n.args[1::-1]] if is_op(n, "mul") else [n.args[:2]]  # y / scale, not scale / y
    for y, scale in orders:
        if isinstance(y, fx.Node) and isinstance(scale, fx.Node) and _is_rms_of(strip(scale), strip(y), n):
            x = find_pre_rope(strip(y))
            return None if x is None else _rebase(n, strip(y), x)
    return None


def _is_rms_of(r, y, n) -> bool:
    """r = rsqrt(mean(y², last axis, keepdim) + ε) (sqrt when n divides), through casts; nothing else read."""
    if not is_op(r, "rsqrt" if is_op(n, "mul") else "sqrt"):
        return False
    inner = strip(r.args[0])
    if is_op(inner, "add"):
        if not any(const_value(a) is not None for a in inner.args[:2]):
            return False
        inner = strip(next(a for a in inner.args[:2] if isinstance(a, fx.Node) and const_value(a) is None))
    if not (is_op(inner, "mean") and len(inner.args) >= 3 and inner.args[2] is True
            and isinstance(inner.args[1], (list, tuple)) and list(inner.args[1]) in ([-1], [len(shape(y) or ()) - 1])):
        return False
    sq = strip(inner.args[0])
    return is_op(sq, "pow") and strip(sq.args[0]) is y and sq.args[1] == 2


def _rebase(out: fx.Node, old: fx.Node, new: fx.Node) -> fx.Node:
    """The ops from `old` to `out` applied to `new` instead: copies added after new."""
    graph, on_path = out.graph, ancestors(out) | {out}
    env, at = {old: new}, new
    for node in graph.nodes:
        if node in on_path and node is not old and any(a in env for a in node.all_input_nodes):
            with graph.inserting_after(_latest([at, *(env.get(a, a) for a in node.all_input_nodes)])):
                env[node] = graph.node_copy(node, lambda a: env.get(a, a))
            _copy_meta(node, env[node])
            at = env[node]
        if node is out:
            break
    return env[out]


def _half_of(a):
    """The tensor `a` is a piece of along its last axis (getitem of chunk / split, or slices), else None."""
    a = strip(a)
    rank = len(shape(a) or ()) or 4
    if is_op(a, "getitem") and isinstance(a.args[0], fx.Node) and is_op(a.args[0], "chunk", "split",
                                                                         "split_with_sizes"):
        split = a.args[0]
        dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
        return strip(split.args[0]) if isinstance(dim, int) and dim % rank == rank - 1 else None
    if is_op(a, "slice", "narrow") and len(a.args) > 1 and isinstance(a.args[1], int) and a.args[1] % rank == rank - 1:
        return _slice_source(a)
    return None


def _same_shape(a, b) -> bool:
    return a is not None and b is not None and len(a) == len(b) and all(sym_eq(x, y) for x, y in zip(a, b))


def find_pre_rope(node):
    """The tensor before the rotary embedding that produced `node`, or None when there is none."""
    n = strip(node)
    x = _rope_full(n) or _rope_halves(n) or _rope_complex(n) or _rope_under_norm(n)
    if x is not None:
        # Partial rotary applied to a slice: the source is what the slice came from (handled below).
        return x
    if is_op(n, "cat") and isinstance(n.args[0], (list, tuple)) and len(n.args[0]) == 2:
        rot, passthrough = n.args[0]
        x = _rope_full(rot) or _rope_halves(rot) or _rope_complex(rot)
        if x is not None:
            src, src2 = _slice_source(x), _slice_source(passthrough)
            if src is src2:
                return src
    want = shape(n)
    if (is_op(n, "cat") and isinstance(n.args[0], (list, tuple)) and len(n.args[0]) >= 2 and want
            and len(n.args) > 1 and isinstance(n.args[1], int) and n.args[1] % len(want) == len(want) - 1):
        return _pre_rope_parts(n, [(p, None) for p in n.args[0]])
    pieces = _assembled(n)
    return _pre_rope_parts(n, pieces) if pieces else None


def _pre_rope_parts(like: fx.Node, pieces: list) -> fx.Node | None:
    """For a tensor made of parts along its last axis, RoPE on some of them (multi-head latent attention: q and k
    are [no-RoPE part, RoPE part], k's RoPE part one head broadcast to all): the cat of each part before its RoPE,
    added to the graph; None when no part has one. `pieces`: (part, None) for cat's parts, or (part, the slice
    of `like` it is copied into) when `like` is filled by copies (`part` broadcast to the slice's shape)."""
    pres = [find_pre_rope_through_layout(p) if isinstance(p, fx.Node) else None for p, _ in pieces]
    if all(p is None for p in pres):
        return None
    graph = like.graph
    parts = []
    for (part, into), pre in zip(pieces, pres):
        part = part if pre is None else pre
        if into is not None and not _same_shape(shape(part), shape(into)):
            with graph.inserting_after(_latest([part, into])):
                part = graph.call_function(torch.ops.aten.expand_as.default, (part, into))
            _copy_meta(into, part)
        parts.append(part)
    with graph.inserting_after(_latest(parts)):
        new = graph.call_function(torch.ops.aten.cat.default, (parts, -1))
    _copy_meta(like, new)
    return new


def _assembled(n) -> list | None:
    """[(source, slice)] for a tensor made empty and filled along its last axis by `slice(n).copy_(source)`
    (DeepSeek-V2/V3's keys), the slices in order and covering the axis; else None."""
    want = shape(n)
    if not (is_op(n, "new_empty", "empty", "new_zeros", "zeros", "empty_like", "zeros_like") and want):
        return None
    last, pieces = len(want) - 1, []
    for u in n.users:
        if is_op(u, "slice") and len(u.args) > 1 and isinstance(u.args[1], int) and u.args[1] % len(want) == last:
            copies = [c for c in u.users if is_op(c, "copy_") and c.args[0] is u]
            step = u.args[4] if len(u.args) > 4 else 1
            if len(copies) != 1 or len(u.users) != 1 or step != 1:
                return None
            start = u.args[2] if len(u.args) > 2 else 0
            end = u.args[3] if len(u.args) > 3 else None
            pieces.append((start, end, copies[0].args[1], u))
        elif _writes_into(u):
            return None  # written some other way too
    pieces.sort(key=lambda p: p[0] if isinstance(p[0], int) else -1)
    at = 0
    for start, end, _, _ in pieces:
        if start != at or not (end is None or isinstance(end, int)):
            return None
        at = end if end is not None and end < int(want[-1]) else int(want[-1])
    if not pieces or at != int(want[-1]):
        return None
    return [(src, u) for _, _, src, u in pieces]


def _keeps_last_dim(n) -> bool:
    """A transpose / permute that leaves the last (head_dim) axis where it is."""
    s = shape(n)
    if s is None:
        return False
    last = len(s) - 1
    if is_op(n, "transpose") and len(n.args) >= 3:
        return all(isinstance(d, int) and d % len(s) != last for d in n.args[1:3])
    if is_op(n, "permute") and len(n.args) >= 2 and isinstance(n.args[1], (list, tuple)) and n.args[1]:
        return isinstance(n.args[1][-1], int) and n.args[1][-1] % len(s) == last
    if is_op(n, "expand") and len(n.args) >= 2 and isinstance(n.args[1], (list, tuple)) and n.args[1]:
        # one head broadcast to all (multi-head latent attention's shared RoPE key): RoPE commutes with it
        src, size = shape(n.args[0]), n.args[1][-1]
        return src is not None and len(src) == len(s) and (size == -1 or (not isinstance(size, fx.Node)
                                                                            and sym_eq(size, src[-1])))
    return False


def find_pre_rope_through_layout(node, max_ops: int = 3):
    """find_pre_rope, also when RoPE was applied in another layout ([B, T, H, D]) and moved to q/k's afterwards.

    RoPE acts along the last axis, position by position: moving the other axes after it or before it is the
    same. So when q/k is a transpose / permute (last axis kept) of a RoPE output, the pre-RoPE value is the
    same transposes of that RoPE's input; they are added to the graph right after it (unused ones are removed
    with the dead code after substitution)."""
    x = find_pre_rope(node)
    if x is not None:
        return x
    layout, n = [], strip(node)
    while len(layout) < max_ops and _keeps_last_dim(n):
        layout.append(n)
        n = strip(n.args[0])
        x = find_pre_rope(n)
        if x is not None:
            return _replay(x, layout[::-1])
    return None


def _replay(x: fx.Node, ops: list) -> fx.Node:
    """`ops` (layout nodes, innermost first) applied to `x`: new nodes right after x (after any size an op reads)."""
    graph = x.graph
    for op in ops:
        with graph.inserting_after(_latest([x, *op.all_input_nodes[1:]])):
            new = graph.call_function(op.target, (x, *op.args[1:]), dict(op.kwargs))
        _copy_meta(op, new)
        x = new
    return x


def _copy_meta(like: fx.Node, new: fx.Node) -> None:
    """`new` (like's op, on other inputs) gets like's module path, and its value computed on the recorded example
    values of its inputs."""
    for key in ("nn_module_stack", "stack_trace", "lincompile_module", "lincompile_layer"):
        if key in like.meta:
            new.meta[key] = like.meta[key]
    args = fx.node.map_arg(new.args, lambda a: a.meta.get("val"))
    kwargs = fx.node.map_arg(new.kwargs, lambda a: a.meta.get("val"))
    try:
        new.meta["val"] = new.target(*args, **kwargs)
    except Exception:  # an input without a recorded value: the new node has none either
        pass


def _latest(nodes: list[fx.Node]) -> fx.Node:
    """The one of `nodes` that comes last in their graph."""
    left = set(nodes)
    for n in nodes[0].graph.nodes:
        left.discard(n)
        if not left:
            return n
    return nodes[0]


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


# Ops that only re-lay a parameter out (`x @ self.weight.T`, a transposed or reshaped weight, a dtype cast): a
# matmul with such a value is a projection by that parameter. Not unsqueeze / expand / slice: a buffer broadcast
# into a matmul (RoPE's inv_freq ⊗ positions) is no projection.
WEIGHT_LAYOUT = ("t", "numpy_T", "transpose", "permute", "view", "reshape", "_unsafe_view", "contiguous", "clone",
                 "alias", "detach", "to", "_to_copy", "lift_fresh_copy")


def _weight_source(a, depth: int = 4):
    """The get_attr (parameter) that `a` is, through layout-only ops; None when `a` is computed from activations."""
    for _ in range(depth + 1):
        if not isinstance(a, fx.Node):
            return None
        if a.op == "get_attr":
            return a
        if not (is_op(a, *WEIGHT_LAYOUT) and a.args and isinstance(a.args[0], fx.Node)):
            return None
        if any(isinstance(x, fx.Node) for x in list(a.args[1:]) + list(a.kwargs.values())):
            return None  # its layout depends on another tensor
        a = a.args[0]
    return None


def _has_weight(n) -> bool:
    return any(_weight_source(a) is not None for a in n.all_input_nodes)


def _proj_input(n):
    args = [a for a in n.args if isinstance(a, fx.Node) and _weight_source(a) is None]
    if short_op(n) == "addmm":
        args = [a for a in n.args[1:] if isinstance(a, fx.Node) and _weight_source(a) is None]
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


def sym_expr(d):
    import sympy

    if isinstance(d, torch.SymInt):
        return d.node.expr
    if isinstance(d, sympy.Basic):
        return d
    return sympy.Integer(int(d))


def sym_eq(a, b) -> bool:
    """Equal sizes, symbolic ones compared as expressions (never by their example values)."""
    try:
        import sympy

        return sympy.expand(sym_expr(a) - sym_expr(b)) == 0
    except Exception:
        return False


def emit(anchor: fx.Node, target, args, where: str = "before", kwargs=None) -> fx.Node:
    """A new node next to `anchor` (same module metadata), its fake value computed from its inputs'."""
    graph, kwargs = anchor.graph, dict(kwargs or {})
    with (graph.inserting_before(anchor) if where == "before" else graph.inserting_after(anchor)):
        node = graph.call_function(target, tuple(args), kwargs)
    for key in ("nn_module_stack", "stack_trace", "lincompile_module", "lincompile_layer"):
        if key in anchor.meta:
            node.meta[key] = anchor.meta[key]

    def fake(a):
        if isinstance(a, (list, tuple)):
            return type(a)(fake(x) for x in a)
        return a.meta.get("val") if isinstance(a, fx.Node) else a  # fake tensors, SymInts of size nodes

    if all(a.meta.get("val") is not None for a in node.all_input_nodes):
        try:
            node.meta["val"] = target(*fake(tuple(args)), **{k: fake(v) for k, v in kwargs.items()})
        except Exception:  # no fake value: shape() reports it unknown
            pass
    return node


def fold_q_scale(q: fx.Node):
    """(q before a constant factor, factor) when q is, through layout-only ops, `x · c` or `x / c` (queries
    scaled in the projection, as in OPT / XGLM): the factor belongs to the softmax scale. None otherwise."""
    ops, n = [], q
    for _ in range(8):
        if is_op(n, "mul", "div") and len(n.args) == 2 and isinstance(n.args[0], fx.Node) \
                and isinstance(n.args[1], (int, float)) and not isinstance(n.args[1], bool) and n.args[1] != 0:
            c = float(n.args[1]) if short_op(n) == "mul" else 1.0 / float(n.args[1])
            break
        if not (is_op(n, *LAYOUT) and n.args and isinstance(n.args[0], fx.Node)):
            return None
        ops.append(n)
        n = n.args[0]
    else:
        return None
    x = n.args[0]
    for op in reversed(ops):  # the same layout, applied to the unscaled value (new nodes before each original)
        x = emit(op, op.target, (x, *op.args[1:]), kwargs=op.kwargs)
    return x, c


def new_site(anchor: fx.Node, pattern: str, nodes) -> Site:
    path = module_path(anchor) or ""
    return Site(module=path, layer=layer_index(path), pattern=pattern, output=anchor, nodes=list(nodes))


# A constant fill at or below this blocks attention (transformers uses the dtype's minimum, older code -1e4 or -1e9;
# in bfloat16 -1e4 is -9984). In an additive mask a value this far below its row's largest is blocked: exp of
# it is 0 in float32, so softmax gives it nothing. Attended values that differ within a row are a bias (ALiBi).
BLOCKED = -1e3
