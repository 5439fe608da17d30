"""The operator interface: what the substitute pass puts where softmax attention was.

An operator is an `nn.Module` built from a matched site with `Op.from_site(site, **params)`. The converted
graph calls it as `op(**inputs)` with the site's bound values (see `Operator.inputs`) and gets back a
tensor shaped like the attention output it replaces, `[batch, num_heads, seq, v_head_dim]`.

Every operator has three forms over the same math:
- `naive(**inputs)`: the plainest correct form (quadratic or token-by-token); the test oracle.
- `chunked(**inputs, state=None) -> (out, state)`: linear in T, for training and prefill.
- `step(state, **inputs_at_one_position) -> (out, state)` with `init_state(batch, dtype, device)`: decode.
`forward` is `chunked` without the state. `generate` and `export` (lincompile/runtime.py) need `init_state`
and `step`; conversion, verification and healing need only `chunked`.

Inputs an operator can ask for (names of site bindings; shapes `[B, heads, T, dim]` unless said):
    q, k, v          as fed to softmax attention (after RoPE; k/v may already be repeated for GQA)
    k_kv, v_kv       k and v before the GQA repeat (num_kv_heads heads)
    q_pre_rope       q before rotary embedding
    k_pre_rope       k before rotary embedding (num_kv_heads heads)
    mask             the attention mask the site received (bool or additive)
    hidden           the attention block's input hidden states `[B, T, d_model]`
    sinks            attention sinks (GPT-OSS): one learned logit per query head `[num_heads]`, softmax taken
                     over the scores and it, its column then dropped (only where the site has them)
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn

from lincompile.errors import MatchError

# When a site lacks a binding, the operator may use another one instead; the report notes it.
FALLBACKS = {
    "q_pre_rope": ("q", "no rotary embedding found at this site: using q as is"),
    "k_pre_rope": ("k_kv", "no rotary embedding found at this site: using k as is"),
    "k_kv": ("k", None),
    "v_kv": ("v", None),
}
# Why generate and export fail on an operator without the decode forms.
DECODE_NEEDS = "generate and export decode token by token, with init_state() and step() (see kernels/base.py)"


class Operator(nn.Module):
    """Base class: subclasses set `name`, `params` (defaults), `inputs` and implement the three forms."""

    name: ClassVar[str] = ""
    params: ClassVar[dict[str, Any]] = {}  # spec `params:` are checked against these defaults
    # Params added later, with the value that was in effect before they existed: an output written then records
    # every default of its time in spec.yaml but not these, and must load as it was (Spec.from_output).
    legacy_params: ClassVar[dict[str, Any]] = {}
    inputs: ClassVar[tuple[str, ...]] = ("q", "k", "v")
    optional_inputs: ClassVar[tuple[str, ...]] = ()
    init_bindings: ClassVar[tuple[str, ...]] = ()  # bindings read only to initialise (Site.constant), not run on
    summary: ClassVar[str] = ""
    # Kernel ops (kernels/fused.py) this operator calls when the fuse pass selects the Triton backend.
    fused_kernels: ClassVar[tuple[str, ...]] = ()

    def __new__(cls, *args, **kwargs):
        op = super().__new__(cls)
        # The arguments it was built with: an exported program rebuilds the operator from them (on the meta
        # device, passes/lift_state.py), since a module is not serialised into a program.
        op.__dict__["_init_args"] = (args, kwargs)
        return op

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, v_head_dim: int | None = None,
                 scale: float | None = None, **params):
        super().__init__()
        unknown = set(params) - set(self.params)
        if unknown:
            raise TypeError(f"{self.name}: unknown params {sorted(unknown)}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.v_head_dim = v_head_dim or head_dim
        self.scale = float(scale) if scale is not None else 1.0 / math.sqrt(head_dim)
        self.config = {**self.params, **params}
        self.notes: list[str] = []
        # "torch": the PyTorch forms; "triton": the kernel ops of kernels/fused.py (set by the fuse pass).
        self.backend = "torch"

    # ----------------------------------------------------------------------------------------------
    @classmethod
    def bind(cls, site) -> tuple[dict[str, str], list[str]]:
        """Map each input this operator needs to a binding the site has (with fallbacks and notes)."""
        mapping, notes = {}, []
        for name in cls.inputs + cls.optional_inputs:
            source, note = name, None
            while source not in site.bindings and source in FALLBACKS:
                source, fallback_note = FALLBACKS[source]
                note = note or fallback_note
            if source in site.bindings:
                mapping[name] = source
                if note:
                    notes.append(note)
            elif name in cls.inputs:
                raise MatchError(f'op "{cls.name}" needs "{name}", which was not found at site {site.module} '
                                 f"(found: {', '.join(sorted(site.bindings))})")
        return mapping, notes

    @classmethod
    def from_site(cls, site, **params) -> "Operator":
        """Build the operator for a matched site, initialised from what the site knows."""
        a = site.attrs
        op = cls(num_heads=a["num_heads"], num_kv_heads=a["num_kv_heads"], head_dim=a["head_dim"],
                 v_head_dim=a.get("v_head_dim"), scale=a.get("scale"), **params)
        op.init_from_site(site)
        return op

    @classmethod
    def reads_alibi(cls, params: dict) -> bool:
        """Does the operator, with these spec params, turn a site's ALiBi bias (a `custom` mask with
        `alibi_slopes`) into something of its own, so that converting the site drops nothing?"""
        return False

    def init_from_site(self, site) -> None:
        """Hook for operators that initialise new parameters from the site's weights."""

    def kernel_names(self) -> tuple[str, ...]:
        """The kernel ops this operator runs with the Triton backend (empty: it has none, stays PyTorch)."""
        return self.fused_kernels

    def extra_repr(self) -> str:
        cfg = ", ".join(f"{k}={v}" for k, v in self.config.items())
        return f"heads={self.num_heads}/{self.num_kv_heads}, head_dim={self.head_dim}" + (f", {cfg}" if cfg else "")

    # ----------------------------------------------------------------------------------------------
    def forward(self, **inputs) -> torch.Tensor:
        return self.chunked(**inputs)[0]

    def naive(self, **inputs) -> torch.Tensor:
        raise NotImplementedError(self.missing_form("naive", "the operator tests compare the other forms with it"))

    def chunked(self, state=None, **inputs):
        raise NotImplementedError(self.missing_form("chunked", "the converted model runs it"))

    def init_state(self, batch: int, dtype=torch.float32, device=None) -> dict[str, torch.Tensor]:
        raise NotImplementedError(self.missing_form("init_state"))

    def step(self, state, **inputs):
        raise NotImplementedError(self.missing_form("step"))

    def missing_form(self, method: str, why: str = DECODE_NEEDS) -> str:
        """The one-line message for a form this operator does not implement."""
        return f'operator {type(self).__name__} (op "{self.name}") does not implement {method}(): {why}'

    # ----------------------------------------------------------------------------------------------
    def expand_kv(self, x: torch.Tensor) -> torch.Tensor:
        """Repeat kv heads up to the query heads (head h reads kv head h // group), as GQA does."""
        return repeat_heads(x, self.num_heads)


def repeat_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    h = x.shape[1]
    if h == num_heads:
        return x
    if num_heads % h:
        raise ValueError(f"cannot repeat {h} kv heads to {num_heads} query heads")
    return x.repeat_interleave(num_heads // h, dim=1)
