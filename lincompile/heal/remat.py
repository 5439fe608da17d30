"""Gradient checkpointing of a captured graph: each layer's activations are recomputed in backward instead of
kept (`heal.<stage>.gradient_checkpointing`, `lincompile heal --gradient-checkpointing`).

transformers' `gradient_checkpointing_enable` works on modeling code; what heal trains is an exported graph,
so the layers are found the way match finds a site's layer: by the first integer of each node's module path
(model.layers.3.mlp -> 3; no names assumed). Each layer's nodes are outlined into a sub-graph that runs through
`torch.utils.checkpoint` (non-reentrant, RNG state preserved, so LoRA dropout draws the same mask twice).
Nodes without a layer (masks, rotary tables, the final norm, the LM head) stay in the main graph, except those
that sit between two nodes of one layer: they join it, so each layer is one call.

What backward keeps drops from every layer's intermediates to each layer's inputs; the price is a second
forward of every layer during backward. Gradients are those of the graph as it was.
"""

from __future__ import annotations

import heapq
import operator

import torch
from torch import fx, nn
from torch.utils.checkpoint import checkpoint

from ..graph import layer_index, module_path


class Recompute(nn.Module):
    """One layer's sub-graph, checkpointed when it is part of a backward pass."""

    def __init__(self, body: fx.GraphModule, layer: int):
        super().__init__()
        # Not registered: every module the body calls is the graph's own, so the graph's state_dict, parameters
        # and train()/to() stay as they were, with nothing listed twice.
        self.__dict__["body"] = body
        self.layer = layer

    def forward(self, *args):
        if torch.is_grad_enabled():
            return checkpoint(self.body, *args, use_reentrant=False, preserve_rng_state=True)
        return self.body(*args)  # evaluation: nothing is kept anyway


def layer_regions(graph: fx.Graph) -> dict[int, list[fx.Node]]:
    """The nodes of each layer, in graph order. A node without a layer of its own joins the latest layer among
    its inputs when one of its users is in that layer (a reshape between two of the layer's ops); other nodes
    without a layer stay out. A layer whose nodes cannot run as one call (a value leaves it and comes back
    through a node of another layer) is left out."""
    nodes = list(graph.nodes)
    region: dict[fx.Node, int | None] = {}
    own: dict[fx.Node, int | None] = {}
    for n in nodes:
        if n.op in ("placeholder", "get_attr", "output"):
            region[n] = own[n] = None
            continue
        own[n] = layer_index(module_path(n))
        inherited = [region[a] for a in n.all_input_nodes if region.get(a) is not None]
        region[n] = own[n] if own[n] is not None else max(inherited, default=None)
    for n in reversed(nodes):  # users are final before their inputs are looked at
        if own[n] is None and region[n] is not None and not any(region.get(u) == region[n] for u in n.users):
            region[n] = None
    by_layer: dict[int, list[fx.Node]] = {}
    for n in nodes:
        if region[n] is not None:
            by_layer.setdefault(region[n], []).append(n)
    return {layer: members for layer, members in by_layer.items() if _convex(set(members))}


def _convex(members: set[fx.Node]) -> bool:
    """No path from the region back into it through a node outside (the region can be one call)."""
    frontier = [u for n in members for u in n.users if u not in members]
    seen = set()
    while frontier:
        n = frontier.pop()
        if n in seen:
            continue
        seen.add(n)
        for u in n.users:
            if u in members:
                return False
            frontier.append(u)
    return True


def checkpoint_layers(gm: fx.GraphModule) -> list[int]:
    """Outline every layer of `gm` into a checkpointed call, in place; the layers done (empty: no layers found,
    and `gm` is unchanged)."""
    regions = layer_regions(gm.graph)
    order = _contracted_order(gm.graph, regions)
    while order is None:  # two layers that feed each other (each one a call would be a cycle): the later runs inline
        regions.pop(max(regions))
        order = _contracted_order(gm.graph, regions)
    if not regions:
        return []
    owner = {n: layer for layer, members in regions.items() for n in members}
    bodies = {}
    for layer, members in regions.items():
        name = _free_name(gm, f"remat_layer_{layer}")
        inputs, outputs = _boundary(members, owner, layer)
        gm.add_module(name, Recompute(_body(gm, members, inputs, outputs), layer))
        bodies[layer] = (name, inputs, outputs)

    new = fx.Graph(owning_module=gm)
    new.set_codegen(gm.graph._codegen)
    env: dict[fx.Node, fx.Node] = {}
    for item in order:
        if isinstance(item, fx.Node):
            env[item] = new.node_copy(item, lambda a: env[a])
            continue
        name, inputs, outputs = bodies[item]
        call = new.call_module(name, tuple(env[a] for a in inputs))
        call.meta["remat_layer"] = item
        for k, out in enumerate(outputs):
            got = new.call_function(operator.getitem, (call, k))
            got.meta.update(out.meta)
            env[out] = got
    new.lint()
    gm.graph = new
    gm.recompile()
    return sorted(regions)


def found_layers(graph: fx.Graph) -> list[int]:
    """Every layer number of the graph's module paths."""
    return sorted({i for n in graph.nodes if n.op not in ("placeholder", "get_attr", "output")
                   for i in [layer_index(module_path(n))] if i is not None})


def _contracted_order(graph: fx.Graph, regions: dict[int, list[fx.Node]]) -> list | None:
    """The graph's nodes outside the regions and the regions (by layer number), in a topological order that keeps
    the graph's own otherwise; None when the regions as single nodes would make a cycle."""
    index = {n: i for i, n in enumerate(graph.nodes)}
    owner = {n: layer for layer, members in regions.items() for n in members}
    items = [n for n in graph.nodes if n not in owner] + list(regions)
    deps = {item: _deps(item, regions, owner) for item in items}
    key = {item: (index[item] if isinstance(item, fx.Node) else index[regions[item][0]], k)
           for k, item in enumerate(items)}  # (position, tie-break): items themselves are never compared
    waiting = {item: len(d) for item, d in deps.items()}
    users: dict = {}
    for item, d in deps.items():
        for dep in d:
            users.setdefault(dep, []).append(item)
    ready = [(key[i], i) for i in items if waiting[i] == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        _, item = heapq.heappop(ready)
        order.append(item)
        for user in users.get(item, ()):
            waiting[user] -= 1
            if waiting[user] == 0:
                heapq.heappush(ready, (key[user], user))
    return order if len(order) == len(items) else None


def _deps(item, regions, owner) -> set:
    """What an item (a node outside the layers, or a layer) waits for: nodes, or layers."""
    members = regions[item] if not isinstance(item, fx.Node) else [item]
    deps = set()
    for n in members:
        for a in n.all_input_nodes:
            dep = owner.get(a, a)
            if dep != item:
                deps.add(dep)
    return deps


def _boundary(members: list[fx.Node], owner: dict, layer: int) -> tuple[list[fx.Node], list[fx.Node]]:
    """A layer's inputs (values from outside it, in order of first use) and outputs (values used outside)."""
    inputs, seen = [], set()
    for n in members:
        for a in n.all_input_nodes:
            if owner.get(a) != layer and a not in seen:
                seen.add(a)
                inputs.append(a)
    outputs = [n for n in members if any(owner.get(u) != layer for u in n.users)]
    return inputs, outputs


def _body(gm: fx.GraphModule, members: list[fx.Node], inputs: list[fx.Node], outputs: list[fx.Node]) -> fx.GraphModule:
    graph, env = fx.Graph(), {}
    for a in inputs:
        env[a] = graph.placeholder(a.name)
        env[a].meta.update(a.meta)
    for n in members:
        env[n] = graph.node_copy(n, lambda a: env[a])
    graph.output(tuple(env[n] for n in outputs))
    # The root's submodules (operators, LoRA dropout) are shared, not copied: they stay the trained objects.
    return fx.GraphModule(gm, graph, class_name="LayerBody")


def _free_name(gm: nn.Module, name: str) -> str:
    taken, k, base = dict(gm.named_children()), 1, name
    while name in taken or hasattr(gm, name):
        name, k = f"{base}_{k}", k + 1
    return name
