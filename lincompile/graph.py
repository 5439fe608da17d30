"""Small helpers over captured torch.fx graphs: op names, module paths, shapes, walking, evaluating."""

from __future__ import annotations

import re
from collections import Counter
from typing import Iterable

import torch
from torch import fx

# The capture wrapper holds the model under this attribute; module paths are reported without it.
ROOT = "lm"


def op_name(node: fx.Node) -> str:
    """'aten.scaled_dot_product_attention' for ATen calls (overload dropped), the callable's name for
    other calls, `module:<target>` for call_module, else the node kind (placeholder, get_attr, output)."""
    if node.op == "call_function":
        packet = getattr(node.target, "_overloadpacket", None)
        if packet is not None:
            return str(packet)
        if isinstance(node.target, torch._ops.OpOverloadPacket):
            return str(node.target)
        return getattr(node.target, "__name__", str(node.target))
    if node.op == "call_module":
        return f"module:{node.target}"
    return node.op


def short_op(node: fx.Node) -> str:
    """'scaled_dot_product_attention' (no namespace): what users write in patterns."""
    return op_name(node).split(".")[-1] if node.op == "call_function" else op_name(node)


def module_path(node: fx.Node) -> str | None:
    """The innermost module that produced the node, without the capture wrapper prefix."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return strip_root(path)


def strip_root(path: str) -> str | None:
    if path.startswith("_empty_nn_module_stack"):
        return None
    path = re.sub(r"\[(\d+)\]", r".\1", path)  # some torch versions write layers[0]
    path = re.sub(r"^L\['self'\]\.", "", path)
    if path == ROOT:
        return ""
    return path[len(ROOT) + 1:] if path.startswith(ROOT + ".") else path


def layer_index(path: str | None) -> int | None:
    """The first integer component of a module path (model.layers.3.self_attn -> 3): no names assumed."""
    if not path:
        return None
    for part in path.split("."):
        if part.isdigit():
            return int(part)
    return None


def val(node) -> torch.Tensor | None:
    """The fake tensor recorded at capture (shapes may be symbolic)."""
    if isinstance(node, fx.Node):
        v = node.meta.get("val")
        return v if isinstance(v, torch.Tensor) else None
    return None


def shape(node) -> tuple | None:
    v = val(node)
    return tuple(v.shape) if v is not None else None


def fmt_shape(node) -> str:
    s = shape(node)
    return "?" if s is None else "[" + ", ".join(str(d) for d in s) + "]"


def same_int(a, b) -> bool:
    try:
        return int(a) == int(b)
    except (TypeError, ValueError):
        return str(a) == str(b)


def tensor_args(node: fx.Node) -> list[fx.Node]:
    """Node inputs that are tensors, flattening lists (as in cat)."""
    out = []
    for a in list(node.args) + list(node.kwargs.values()):
        items = a if isinstance(a, (list, tuple)) else [a]
        out.extend(x for x in items if isinstance(x, fx.Node) and val(x) is not None)
    return out


def users(node: fx.Node, ignore: Iterable[str] = ("_assert_tensor_metadata",)) -> list[fx.Node]:
    return [u for u in node.users if short_op(u) not in ignore]


def ancestors(node: fx.Node, limit: int | None = None) -> set[fx.Node]:
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        for a in n.all_input_nodes:
            if a not in seen:
                seen.add(a)
                todo.append(a)
                if limit and len(seen) >= limit:
                    return seen
    return seen


def op_counts(graph: fx.Graph) -> Counter:
    """How many call_function / call_module nodes of each kind: what tests and diffs compare."""
    return Counter(op_name(n) if n.op == "call_function" else n.op for n in graph.nodes
                   if n.op in ("call_function", "call_module"))


class Recorder(fx.Interpreter):
    """Run a GraphModule and keep the values of chosen nodes (only what they need is computed)."""

    def __init__(self, gm: fx.GraphModule, nodes: Iterable[fx.Node], only_needed: bool = False):
        super().__init__(gm, garbage_collect_values=True)
        self.wanted = set(nodes)
        self.values: dict[fx.Node, object] = {}
        self.needed = None
        if only_needed:
            self.needed = set(self.wanted)
            for n in self.wanted:
                self.needed |= ancestors(n)

    def run_node(self, n: fx.Node):
        # placeholders always run: each takes the next argument, so skipping one would shift the rest
        if self.needed is not None and n not in self.needed and n.op not in ("output", "placeholder"):
            return None
        if n.op == "output" and self.needed is not None:
            return None
        result = super().run_node(n)
        if n in self.wanted:
            self.values[n] = result
        return result


def record(gm: fx.GraphModule, nodes: Iterable[fx.Node], *args, only_needed: bool = False) -> dict:
    rec = Recorder(gm, nodes, only_needed)
    with torch.no_grad():
        rec.run(*args)
    return rec.values
