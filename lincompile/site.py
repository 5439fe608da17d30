"""A site: one matched softmax-attention computation in the captured graph, and what it binds."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import fx

from .graph import fmt_shape, short_op

# Bindings operators can ask for (see kernels/base.py for their meaning and shapes).
BINDINGS = ("q", "k", "v", "mask", "q_pre_rope", "k_pre_rope", "k_kv", "v_kv", "hidden", "sinks")


@dataclass
class Site:
    module: str  # path of the module that owns the attention (model.layers.3.self_attn)
    layer: int | None  # first integer in that path
    pattern: str  # the pattern that matched (sdpa, eager_softmax_attention, or a spec's own)
    output: fx.Node  # the node whose value is the attention output [B, heads, T, v_head_dim]
    nodes: list[fx.Node]  # the matched nodes, candidates for removal after substitution
    bindings: dict[str, fx.Node] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)  # scale, softcap, heads, dims, projections, mask kind...
    notes: list[str] = field(default_factory=list)
    op: str | None = None  # filled by substitute: the operator that replaced it
    gm: object = field(default=None, repr=False)  # the graph module, for operators that read weights

    def constant(self, binding: str):
        """The tensor a binding holds when it is a model parameter or buffer, read as it is or through dtype casts
        (GPT-OSS's sinks), else None."""
        node = self.bindings.get(binding)
        while isinstance(node, fx.Node) and node.op == "call_function" and node.args \
                and short_op(node) in ("to", "_to_copy", "clone"):
            node = node.args[0]
        if not isinstance(node, fx.Node) or node.op != "get_attr" or self.gm is None:
            return None
        obj = self.gm
        for part in str(node.target).split("."):
            obj = getattr(obj, part, None)
        return obj if hasattr(obj, "shape") else None

    def weight(self, projection: str, name: str = "weight"):
        """A projection's parameter, e.g. `site.weight("q_proj")`, or None when the site has no such projection.

        Linear weights are `[out, in]`; 2-D Conv1D-style projections (GPT-2) store `[in, out]`.
        """
        from .graph import ROOT

        path = self.attrs.get(projection)
        if path is None or self.gm is None:
            return None
        try:
            return self.gm.get_parameter(f"{ROOT}.{path}.{name}")
        except AttributeError:
            return None

    @property
    def mask_kind(self) -> str:
        return self.attrs.get("mask_kind", "none")

    def describe_bindings(self) -> dict[str, str]:
        """binding -> shape (or 'absent'), for the match table and report."""
        return {name: (fmt_shape(self.bindings[name]) if name in self.bindings else "absent") for name in BINDINGS}

    def to_json(self) -> dict:
        keep = ("num_heads", "num_kv_heads", "head_dim", "v_head_dim", "scale", "softcap", "mask_kind", "window",
                "alibi_slopes", "q_proj", "k_proj", "v_proj", "o_proj", "rope")
        return {"module": self.module, "layer": self.layer, "pattern": self.pattern, "op": self.op,
                **{k: self.attrs[k] for k in keep if k in self.attrs},
                "bindings": self.describe_bindings(), "notes": list(self.notes)}


@dataclass
class NearMiss:
    node: str
    module: str | None
    reason: str
