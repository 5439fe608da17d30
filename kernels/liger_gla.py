"""`liger_gla`: Liger's gated linear attention, gates taken from the model's own key projection.

    φ(x) = softmax(x) over the head dimension (configurable)
    log α_t = logsigmoid(k_t) / gate_normalizer      per key channel, from the pre-RoPE key
    S_t = Diag(α_t) S_{t-1} + φ(k_t) v_tᵀ,   o_t = S_tᵀ φ(q_t)      (no RoPE, no normaliser, scale 1)

Shapes: q_pre_rope `[B, Hq, T, D]`, k_pre_rope / v_kv `[B, Hkv, T, D]`. Under GQA the state is kept per kv head
`[B, Hkv, D, D]` (keys, values and gates are kv-head quantities); the query heads of a group share it.
No new parameters: the pretrained q/k/v projections are reused as they are.
Paper: Lan et al., "Liger: Linearizing Large Language Models to Gated Recurrent Structures", 2025.
Bindings: q_pre_rope, k_pre_rope, v_kv (without RoPE in the model, q / k are used as they are).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Operator
from .fused import gla_chunked, gla_step
from .gla import gla_naive
from .registry import register

FEATURE_MAPS = {
    "softmax": lambda x: x.float().softmax(-1).to(x.dtype),
    "identity": lambda x: x,
    "elu1": lambda x: F.elu(x) + 1,
    "relu": F.relu,
}


@register
class LigerGLA(Operator):
    name = "liger_gla"
    summary = "Liger gated linear attention: softmax feature maps, per-channel gates from the key (no new params)"
    params = {"gate_normalizer": 16.0, "feature_map": "softmax", "chunk": 64}
    inputs = ("q_pre_rope", "k_pre_rope", "v_kv")
    fused_kernels = ("chunk_gla",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.config["feature_map"] not in FEATURE_MAPS:
            raise ValueError(f'feature_map must be one of {sorted(FEATURE_MAPS)}, got "{self.config["feature_map"]}"')
        if self.config["gate_normalizer"] <= 0:
            raise ValueError("gate_normalizer must be positive")

    def gla_inputs(self, q_pre_rope, k_pre_rope, v_kv):
        """(φ(q), φ(k), v, log-gate); k, v and the gate keep the kv heads (the GLA primitives group queries)."""
        phi = FEATURE_MAPS[self.config["feature_map"]]
        g = F.logsigmoid(k_pre_rope.float()) / self.config["gate_normalizer"]
        return phi(q_pre_rope), phi(k_pre_rope), v_kv, g

    def naive(self, q_pre_rope, k_pre_rope, v_kv):
        return gla_naive(*self.gla_inputs(q_pre_rope, k_pre_rope, v_kv))[0]

    def chunked(self, q_pre_rope, k_pre_rope, v_kv, state=None):
        q, k, v, g = self.gla_inputs(q_pre_rope, k_pre_rope, v_kv)
        o, S = gla_chunked(q, k, v, g, chunk=self.config["chunk"], initial_state=None if state is None else state["gla"],
                           backend=self.backend)
        return o, {"gla": S}

    def init_state(self, batch, dtype=torch.float32, device=None):
        return {"gla": torch.zeros(batch, self.num_kv_heads, self.head_dim, self.v_head_dim, device=device)}

    def step(self, state, q_pre_rope, k_pre_rope, v_kv):
        q, k, v, g = self.gla_inputs(q_pre_rope[:, :, None], k_pre_rope[:, :, None], v_kv[:, :, None])
        o, S = gla_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], g[:, :, 0], state["gla"], backend=self.backend)
        return o, {"gla": S}
