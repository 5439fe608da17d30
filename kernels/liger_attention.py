"""`liger_attention`: Liger Attention, a hybrid of sliding-window softmax and Liger GLA.

    o = a · SWA_w(q, k, v) + b · liger_gla(q_pre_rope, k_pre_rope, v)

SWA_w is softmax attention over the last w positions (the current one included) with the model's RoPE'd
q/k and scale; liger_gla is `liger_gla.py` (gates from the pre-RoPE key, softmax feature maps). Defaults
a = b = 0.5, w = 64. No new parameters. Decode state per kv head: the GLA state plus a w-slot ring buffer of keys/values.
Shapes: q / q_pre_rope `[B, Hq, T, D]`, k_kv / k_pre_rope / v_kv `[B, Hkv, T, D]`.
Paper: Lan et al., "Liger: Linearizing Large Language Models to Gated Recurrent Structures", 2025.
Bindings: q, k_kv, v_kv, q_pre_rope, k_pre_rope.
"""

from __future__ import annotations

import torch

from .fused import gla_chunked, gla_step, liger_attention_chunked, swa_chunked
from .gla import gla_naive
from .liger_gla import LigerGLA
from .registry import register
from .swa import check_window, swa_init_state, swa_naive, swa_step


@register
class LigerAttention(LigerGLA):
    name = "liger_attention"
    summary = "Liger Attention: a·sliding-window softmax (w=64) + b·Liger GLA (no new params)"
    params = {"window": 64, "a": 0.5, "b": 0.5, "gate_normalizer": 16.0, "feature_map": "softmax", "chunk": 64}
    inputs = ("q", "k_kv", "v_kv", "q_pre_rope", "k_pre_rope")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        check_window(self.config["window"])

    def _mix(self, swa, gla):
        return (self.config["a"] * swa.float() + self.config["b"] * gla.float()).to(swa.dtype)

    def naive(self, q, k_kv, v_kv, q_pre_rope, k_pre_rope):
        swa = swa_naive(q, k_kv, v_kv, self.config["window"], self.scale)
        gla = gla_naive(*self.gla_inputs(q_pre_rope, k_pre_rope, v_kv))[0]
        return self._mix(swa, gla)

    def kernel_names(self):
        # One kernel op: the softmax feature map and the gates come from its prologue kernels (kernels/fused.py).
        if self.config["feature_map"] == "softmax":
            return ("liger_attention",)
        return ("chunk_gla", "swa_attention")

    def chunked(self, q, k_kv, v_kv, q_pre_rope, k_pre_rope, state=None):
        state = state or {}
        cfg = self.config
        if self.backend == "triton" and cfg["feature_map"] == "softmax":
            o, new = liger_attention_chunked(q, k_kv, v_kv, q_pre_rope, k_pre_rope, window=cfg["window"], a=cfg["a"],
                                             b=cfg["b"], scale=self.scale, gate_normalizer=cfg["gate_normalizer"],
                                             state=state)
            return o, new
        swa, swa_state = swa_chunked(q, k_kv, v_kv, self.config["window"],
                                     self.scale, state=state.get("swa"), backend=self.backend)
        gq, gk, gv, g = self.gla_inputs(q_pre_rope, k_pre_rope, v_kv)
        gla, S = gla_chunked(gq, gk, gv, g, chunk=self.config["chunk"], initial_state=state.get("gla"),
                             backend=self.backend)
        return self._mix(swa, gla), {"gla": S, "swa": swa_state}

    def init_state(self, batch, dtype=torch.float32, device=None):
        state = super().init_state(batch, dtype, device)
        state["swa"] = swa_init_state(batch, self.num_kv_heads, self.head_dim, self.v_head_dim, self.config["window"],
                                      dtype, device)
        return state

    def step(self, state, q, k_kv, v_kv, q_pre_rope, k_pre_rope):
        swa, swa_state = swa_step(q, k_kv, v_kv, state["swa"], self.config["window"], self.scale)
        gq, gk, gv, g = self.gla_inputs(q_pre_rope[:, :, None], k_pre_rope[:, :, None], v_kv[:, :, None])
        gla, S = gla_step(gq[:, :, 0], gk[:, :, 0], gv[:, :, 0], g[:, :, 0], state["gla"], backend=self.backend)
        return self._mix(swa, gla), {"gla": S, "swa": swa_state}
