"""Intra-layer hybrid helper: o = a · SWA_w(q, k, v) + b · (linear branch), as Liger Attention mixes them.

SWA_w is sliding-window softmax attention (`swa.py`) on the site's RoPE'd q / k and its scale; the linear
branch is whatever the operator computes. `window: 0` turns the SWA branch off (o = linear branch alone,
`a` and `b` unused). Operators that mix in SWA list `q` and `k_kv` among their inputs and keep the ring
buffer under `state["swa"]`. Used by liger_hgrn2 and liger_gsa (Lan et al., "Liger", 2025, mix both
branches with a = b = 0.5 and w = 64).
"""

from __future__ import annotations

import torch

from .fused import swa_chunked
from .swa import check_window, swa_init_state, swa_naive, swa_step

SWA_PARAMS = {"window": 64, "a": 0.5, "b": 0.5}


class SWAMix:
    """Mixin for Operator subclasses whose `config` has window / a / b (see SWA_PARAMS)."""

    def check_window(self):
        check_window(self.config["window"], 0, " (0 turns the sliding-window branch off)")

    def mix(self, swa, linear, dtype):
        if swa is None:
            return linear.to(dtype)
        return (self.config["a"] * swa.float() + self.config["b"] * linear.float()).to(dtype)

    def swa_naive(self, q, k_kv, v_kv):
        if not self.config["window"]:
            return None
        return swa_naive(q, self.expand_kv(k_kv), self.expand_kv(v_kv), self.config["window"], self.scale)

    def swa_chunked(self, q, k_kv, v_kv, state):
        if not self.config["window"]:
            return None, None
        # The ring keeps all query heads (as the step form does), so keys/values are repeated here.
        return swa_chunked(q, self.expand_kv(k_kv), self.expand_kv(v_kv), self.config["window"], self.scale,
                           state=state, backend=self.backend)

    def swa_step(self, q, k_kv, v_kv, state):
        if not self.config["window"]:
            return None, None
        k, v = self.expand_kv(k_kv[:, :, None])[:, :, 0], self.expand_kv(v_kv[:, :, None])[:, :, 0]
        return swa_step(q, k, v, state, self.config["window"], self.scale)

    def swa_init_state(self, batch, dtype=torch.float32, device=None) -> dict:
        if not self.config["window"]:
            return {}
        return {"swa": swa_init_state(batch, self.num_heads, self.head_dim, self.v_head_dim, self.config["window"],
                                      dtype, device)}
