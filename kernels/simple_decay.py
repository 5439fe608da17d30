"""`simple_decay`: RetNet-style retention — linear attention with a fixed exponential decay per head.

    γ_h = 1 - 2^(-e_h),  e_h = decay_base + h                      (decay_range: null, RetNet's spacing)
                         e_h = decay_base + decay_range · h/(H-1)  (decay_range: a number, spread over heads)
    γ_h = exp(-s_h)      on a site whose mask is ALiBi with slopes s_h (alibi: true, the default)
    S_t = γ_h S_{t-1} + k_t v_tᵀ,   o_t = scale · S_tᵀ q_t         (scale = the site's, 1/sqrt(d) by default)

i.e. o_t = Σ_{s≤t} γ_h^(t-s) · scale · (q_t·k_s) v_s: the original attention logits, un-normalised, with an
exponential recency weight instead of the softmax. q and k are taken *after* RoPE — RetNet's xPos rotation
plays the same role, and the rotated dot product is exactly the model's own attention logit, so relative
positions stay as the model learned them. An ALiBi model (BLOOM, MPT, Falcon with alibi) has no RoPE but the bias
−s_h·(i − j), i.e. softmax weights exp(scores)·exp(−s_h)^(i−j): the same recency weight, so its slopes give the
decay factors (match.alibi_slopes reads them off the site's mask; the exp() of the scores and softmax's
normaliser are dropped as for any model). Otherwise, defaults give RetNet's decays (Sun et al., "Retentive Network: A
Successor to Transformer for Large Language Models", 2023): head 0 remembers ~32 tokens (γ = 1 - 1/32),
each further head twice as long. No normaliser and no new parameters: a baseline that needs healing.

Shapes: q `[B, Hq, T, D]`, k_kv / v_kv `[B, Hkv, T, D]`; the decay differs per query head, so k/v are repeated
to the query heads and the decode state is `[B, Hq, D, V]` fp32. The gate goes to gla as a per-head scalar
(log γ_h broadcast over the key channels). Bindings: q, k_kv, v_kv.
"""

from __future__ import annotations

import math

import torch

from .base import Operator
from .fused import gla_chunked, gla_step
from .gla import gla_naive
from .registry import register


@register
class SimpleDecay(Operator):
    name = "simple_decay"
    summary = ("RetNet-style retention: linear attention on RoPE'd q/k, fixed decay γ_h = 1 - 2^-(5+h) per head "
               "(ALiBi models: γ_h = exp(-s_h) from their slopes)")
    params = {"decay_base": 5.0, "decay_range": None, "alibi": True, "chunk": 64}
    legacy_params = {"alibi": False}  # outputs written before it kept RetNet's decays on ALiBi models
    inputs = ("q", "k_kv", "v_kv")
    fused_kernels = ("chunk_gla",)

    @classmethod
    def reads_alibi(cls, params: dict) -> bool:
        return bool({**cls.params, **params}["alibi"])  # its decays

    @classmethod
    def from_site(cls, site, **params):
        a = site.attrs
        slopes = a.get("alibi_slopes") if a.get("mask_kind") == "custom" else None
        op = cls(num_heads=a["num_heads"], num_kv_heads=a["num_kv_heads"], head_dim=a["head_dim"],
                 v_head_dim=a.get("v_head_dim"), scale=a.get("scale"), alibi_slopes=slopes, **params)
        if op.alibi_slopes is not None:
            op.notes.append("the site's ALiBi slopes s_h are the decays: γ_h = exp(−s_h) (decay_base and "
                            "decay_range are not used)")
        op.init_from_site(site)
        return op

    def __init__(self, *args, alibi_slopes: list[float] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        # (a constructor argument, so that an exported program rebuilds the operator with the same decays)
        self.alibi_slopes = alibi_slopes if self.config["alibi"] else None
        if self.alibi_slopes is not None:
            if len(self.alibi_slopes) != self.num_heads or min(self.alibi_slopes) < 0:
                raise ValueError(f"alibi_slopes: {self.num_heads} slopes ≥ 0 expected, got {self.alibi_slopes}")
            self.register_buffer("log_decay", -torch.tensor(self.alibi_slopes, dtype=torch.float32), persistent=False)
            return
        base, spread, H = self.config["decay_base"], self.config["decay_range"], self.num_heads
        if spread is not None and not isinstance(spread, (int, float)):
            raise ValueError("decay_range must be a number or null")
        step = 1.0 if spread is None else (float(spread) / (H - 1) if H > 1 else 0.0)
        exponents = [base + step * h for h in range(H)]
        if min(exponents) <= 0:
            raise ValueError("decay exponents must be positive (γ = 1 - 2^-e must lie in (0, 1))")
        # log γ computed in float64 (γ is within 2^-5 of 1), stored as a non-persistent buffer: it is
        # derived from the config, so checkpoints need not carry it.
        log_decay = torch.tensor([math.log1p(-(2.0 ** -e)) for e in exponents], dtype=torch.float64)
        self.register_buffer("log_decay", log_decay.float(), persistent=False)

    def gates(self, batch, T):
        return self.log_decay.view(1, -1, 1, 1).expand(batch, -1, T, 1)

    def _qkvg(self, q, k_kv, v_kv):
        return q, self.expand_kv(k_kv), self.expand_kv(v_kv), self.gates(q.shape[0], q.shape[2])

    def naive(self, q, k_kv, v_kv):
        return gla_naive(*self._qkvg(q, k_kv, v_kv), scale=self.scale)[0]

    def chunked(self, q, k_kv, v_kv, state=None):
        o, S = gla_chunked(*self._qkvg(q, k_kv, v_kv), scale=self.scale, chunk=self.config["chunk"],
                           initial_state=None if state is None else state["rec"], backend=self.backend)
        return o, {"rec": S}

    def init_state(self, batch, dtype=torch.float32, device=None):
        return {"rec": torch.zeros(batch, self.num_heads, self.head_dim, self.v_head_dim, device=device)}

    def step(self, state, q, k_kv, v_kv):
        q, k, v, g = self._qkvg(q[:, :, None], k_kv[:, :, None], v_kv[:, :, None])
        o, S = gla_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], g[:, :, 0], state["rec"], scale=self.scale,
                        backend=self.backend)
        return o, {"rec": S}
