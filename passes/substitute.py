"""Pass `substitute`: replace each selected site's softmax attention by an operator module.

Each operator is built with `Op.from_site(site, **params)` (initialised from the site's own weights) and
added to the graph module under `ops.<site module path>`; a `call_module` node takes the site's bound values
as keyword arguments and replaces every use of the attention output. The matched nodes left without users
are removed (dropout counts as impure for dead-code elimination, so it is removed explicitly), then the graph
is linted and recompiled. Layers whose rule says `op: keep` stay softmax (the inter-layer hybrid).
"""

from __future__ import annotations

import torch
from torch import fx

from lincompile.graph import short_op
from lincompile.kernels import registry

OPS_ROOT = "ops"


def op_class(op_name: str, allow_code: bool = False):
    if ":" in op_name:
        return registry.load_user_op(op_name, allow_code)
    return registry.get(op_name)


def submodule_name(site, taken=()) -> str:
    """`ops.<module path>`; a module with several attention sites (differential attention computes two softmaxes
    per layer) numbers the later ones `ops.<module path>_1`, … in graph order, so that each site has its own
    operator and its own decode state."""
    base = f"{OPS_ROOT}.{site.module}" if site.module else f"{OPS_ROOT}.site_{site.output.name}"
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    return name


def site_key(site) -> str:
    """A converted site's name in reports, verify and healing: its operator's path below `ops.` (the module
    path, numbered for a module's later sites); a site that was not converted goes by its module path."""
    target = getattr(getattr(site, "replacement", None), "target", None)
    return target[len(OPS_ROOT) + 1:] if isinstance(target, str) and target.startswith(OPS_ROOT + ".") else site.module


def substitute(gm: fx.GraphModule, assignments, allow_code: bool = False) -> dict[str, object]:
    """Replace sites in place. `assignments`: [(site, rule)]. Returns {submodule name: operator}."""
    graph = gm.graph
    added = {}
    for site, rule in assignments:
        if rule.op == "keep":
            site.op = "keep"
            continue
        cls = op_class(rule.op, allow_code)
        mapping, notes = cls.bind(site)
        op = cls.from_site(site, **rule.params)
        op.notes.extend(notes)
        site.notes.extend(n for n in op.notes if n not in site.notes)  # from_site's own notes too
        name = submodule_name(site, added)
        gm.add_submodule(name, op)
        with graph.inserting_before(site.output):
            node = graph.call_module(name, kwargs={arg: site.bindings[src] for arg, src in mapping.items()})
        node.meta.update({k: v for k, v in site.output.meta.items() if k in ("val", "nn_module_stack", "stack_trace")})
        node.meta["lincompile_module"] = site.module
        node.meta["lincompile_layer"] = site.layer
        node.meta["lincompile_op"] = cls.name
        site.output.replace_all_uses_with(_in_layout_of(graph, node, site.output))
        _remove_dead(graph, site.nodes + [site.output])
        site.op = cls.name
        site.replacement = node
        added[name] = op
    clean_graph(gm)
    return added


def _in_layout_of(graph: fx.Graph, node: fx.Node, original: fx.Node) -> fx.Node:
    """`node`'s value laid out in memory as the attention output it replaces (`original`) was, where that was not
    contiguous and the model's code depends on it. sdpa's output is [B, H, T, D] stored as [B, T, H, D]; JetMoE
    and AFMoE transpose it and `view` it as [B, T, ...], which only that layout allows. The copy costs what the
    model's own reshape of a contiguous [B, H, T, D] output would, which then has nothing left to copy."""
    val = original.meta.get("val")
    order = list(val.dim_order()) if isinstance(val, torch.Tensor) and not val.is_contiguous() else None
    if not order or order == sorted(order) or not _views_by_layout(list(original.users)):
        return node
    back = [order.index(d) for d in range(len(order))]
    with graph.inserting_after(node):
        ahead = graph.call_function(torch.ops.aten.permute.default, (node, order))
    with graph.inserting_after(ahead):
        packed = graph.call_function(torch.ops.aten.clone.default, (ahead,),
                                     {"memory_format": torch.contiguous_format})
    with graph.inserting_after(packed):
        laid = graph.call_function(torch.ops.aten.permute.default, (packed, back))
    ahead.meta["val"] = val.permute(order)
    packed.meta["val"] = ahead.meta["val"].clone(memory_format=torch.contiguous_format)
    laid.meta["val"] = packed.meta["val"].permute(back)  # val's own strides
    for n in (ahead, packed, laid):
        n.meta.update({k: v for k, v in node.meta.items()
                       if k in ("nn_module_stack", "lincompile_module", "lincompile_layer")})
    return laid


# Ops that only reshape or reindex: a `view` or `as_strided` past them still sees the output's layout.
_SHAPE_OPS = {"reshape", "transpose", "permute", "unsqueeze", "squeeze", "expand", "slice", "select", "split",
              "split_with_sizes", "unbind", "alias", "t", "flatten", "getitem"}
_LAYOUT_OPS = {"view", "_unsafe_view", "as_strided"}


def _views_by_layout(users) -> bool:
    """Whether a `view` (or `as_strided`) reads the value through shape ops only, so depends on its strides."""
    seen, todo = set(), list(users)
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        op = short_op(n) if n.op == "call_function" else ""
        if op in _LAYOUT_OPS:
            return True
        if op in _SHAPE_OPS:
            todo.extend(n.users)
    return False


def _remove_dead(graph: fx.Graph, nodes) -> None:
    """Erase matched nodes that no longer have users, consumers first (asserts on them go too)."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    for n in sorted(set(nodes), key=lambda n: order.get(n, -1), reverse=True):
        if n not in order:
            continue
        for u in list(n.users):
            if short_op(u) == "_assert_tensor_metadata":
                graph.erase_node(u)
        if not n.users:
            graph.erase_node(n)


def clean_graph(gm: fx.GraphModule) -> None:
    """Dead-code elimination that also drops metadata asserts and dropouts whose values nobody uses."""
    graph = gm.graph
    while True:
        removed = False
        for n in reversed(list(graph.nodes)):
            if n.op != "call_function":
                continue
            if short_op(n) == "_assert_tensor_metadata":
                src = n.args[0] if n.args else None
                if isinstance(src, fx.Node) and all(short_op(u) == "_assert_tensor_metadata" for u in src.users):
                    graph.erase_node(n)
                    removed = True
            elif short_op(n) in ("dropout", "native_dropout") and not n.users:
                graph.erase_node(n)
                removed = True
        removed |= graph.eliminate_dead_code()
        if not removed:
            break
    graph.lint()
    gm.recompile()
