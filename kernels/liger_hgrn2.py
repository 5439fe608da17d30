"""`liger_hgrn2`: Liger's HGRN2 variant — a GLA whose key is tied to its forget gate, from the model's key.

    log α_t = logsigmoid(k_t)                       per key channel, from the pre-RoPE key (no /16)
    k̃_t = 1 - α_t = σ(-k_t)                         the input gate is the complement of the forget gate
    S_t = Diag(α_t) S_{t-1} + k̃_t v_tᵀ,   r_t = S_tᵀ softmax(q_t)        (softmax over the head dim, scale 1)
    o_t = a · SWA_w(q, k, v)_t + b · r_t            (window w = 64, a = b = 0.5; `window: 0` gives o = r)

HGRN2's outer-product state expansion with the forget gate α and input gate 1 - α (Qin et al., "HGRN2: Gated
Linear RNNs with State Expansion", 2024), linearised as in Lan et al., "Liger: Linearizing Large Language
Models to Gated Recurrent Structures", 2025: gates and keys come from the pretrained key projection, queries
from the pretrained query projection, no new parameters. The key uses the unclamped gate; the decay is
clamped at gla.LOG_GATE_MIN (α ≥ e^-5) like every GLA form.

Shapes: q / q_pre_rope `[B, Hq, T, D]`, k_kv / k_pre_rope / v_kv `[B, Hkv, T, D]`. The recurrent state is kept
per kv head, `[B, Hkv, D, V]` fp32 (query heads of a group read the same state); the SWA ring buffer holds the
last w keys/values per query head. Output in the input dtype.
Bindings: q, k_kv, v_kv (SWA branch), q_pre_rope, k_pre_rope (recurrent branch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Operator
from .fused import gla_chunked, gla_step
from .gla import gla_naive
from .registry import register
from .swa_mix import SWA_PARAMS, SWAMix


@register
class LigerHGRN2(SWAMix, Operator):
    name = "liger_hgrn2"
    summary = "Liger HGRN2: GLA with key = 1 - forget gate, gates from the key, softmax queries, + SWA (no new params)"
    params = {**SWA_PARAMS, "chunk": 64}
    inputs = ("q", "k_kv", "v_kv", "q_pre_rope", "k_pre_rope")
    fused_kernels = ("chunk_gla", "swa_attention")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.check_window()

    @staticmethod
    def recurrent_inputs(q_pre_rope, k_pre_rope, v_kv):
        """(softmax(q), 1 - α, v, log α), all fp32; k-side tensors keep the kv heads."""
        k = k_pre_rope.float()
        return q_pre_rope.float().softmax(-1), torch.sigmoid(-k), v_kv, F.logsigmoid(k)

    def naive(self, q, k_kv, v_kv, q_pre_rope, k_pre_rope):
        r = gla_naive(*self.recurrent_inputs(q_pre_rope, k_pre_rope, v_kv))[0]
        return self.mix(self.swa_naive(q, k_kv, v_kv), r, q.dtype)

    def chunked(self, q, k_kv, v_kv, q_pre_rope, k_pre_rope, state=None):
        state = state or {}
        swa, swa_state = self.swa_chunked(q, k_kv, v_kv, state.get("swa"))
        r, S = gla_chunked(*self.recurrent_inputs(q_pre_rope, k_pre_rope, v_kv), chunk=self.config["chunk"],
                           initial_state=state.get("rec"), backend=self.backend)
        return self.mix(swa, r, q.dtype), {"rec": S, **({"swa": swa_state} if swa_state else {})}

    def init_state(self, batch, dtype=torch.float32, device=None):
        rec = torch.zeros(batch, self.num_kv_heads, self.head_dim, self.v_head_dim, device=device)
        return {"rec": rec, **self.swa_init_state(batch, dtype, device)}

    def step(self, state, q, k_kv, v_kv, q_pre_rope, k_pre_rope):
        swa, swa_state = self.swa_step(q, k_kv, v_kv, state.get("swa"))
        r, S = gla_step(*self.recurrent_inputs(q_pre_rope, k_pre_rope, v_kv), state["rec"], backend=self.backend)
        return self.mix(swa, r, q.dtype), {"rec": S, **({"swa": swa_state} if swa_state else {})}
