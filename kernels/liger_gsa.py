"""`liger_gsa`: Liger's gated slot attention — a two-pass GLA over m memory slots, gates from the model's key.

Per kv head, with m = num_slots slots (Zhang et al., "Gated Slot Attention for Efficient Linear-Time Sequence
Modeling", 2024; linearised as in Lan et al., "Liger: Linearizing Large Language Models to Gated Recurrent
Structures", 2025):

    f_t = AvgPool_m(k_t)                     slot-gate logits: the D pre-RoPE key channels averaged into m bins
    log α_t = logsigmoid(f_t) / 16           per-slot forget gate (gate_normalizer = 16), α_t ∈ (0, 1)^m
    s_t = 1 - α_t                            how much each slot is overwritten by token t
    K̃_t = K̃_{t-1} Diag(α_t) + k_t s_tᵀ       [D, m]: slot keys (pass 1, gates on the slot axis)
    p_t = softmax_m(K̃_tᵀ q_t)                which slots the query reads (softmax over the m slots)
    Ṽ_t = Diag(α_t) Ṽ_{t-1} + s_t v_tᵀ       [m, V]: slot values (pass 2, a GLA with key s_t)
    r_t = Ṽ_tᵀ p_t
    o_t = a · SWA_w(q, k, v)_t + b · r_t     (window w = 64, a = b = 0.5; `window: 0` gives o = r)

q and k are the pre-RoPE projections with no feature map and scale 1 (as Liger's GSA). Pass 1 is
`gla.vgla_*` (value-gated: keys k_t, "values" s_t, gates on the m-axis, read by q_t); pass 2 is
`gla.gla_*` (key-gated: queries p_t, keys s_t, values v_t, the same gates).

Slot gates without new parameters: GSA learns a projection x → m gate logits; here they are the pre-RoPE key
averaged over contiguous channel bins (`adaptive_avg_pool1d` over the head dim, per kv head), which is Liger's
choice (it pools its key projection to m bins per kv head). With the default m = 64 = head_dim of most models
the pooling is the identity (one slot per key channel); m < head_dim averages D/m channels per slot; m > D
repeats channels (slots that share a gate differ only through their keys). Everything the operator
uses is a pretrained projection, so it starts close to the original model and is healed by fine-tuning.

Shapes: q / q_pre_rope `[B, Hq, T, D]`, k_kv / k_pre_rope / v_kv `[B, Hkv, T, D]`. Decode state per kv head:
slot keys `[B, Hkv, D, m]` and slot values `[B, Hkv, m, V]` fp32, plus the SWA ring buffer. Output in the
input dtype. Bindings: q, k_kv, v_kv (SWA branch), q_pre_rope, k_pre_rope (slot branch).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .base import Operator
from .gla import gla_naive, gla_step, vgla_naive, vgla_step
from . import fused
from .opaque import vgla_chunked
from .registry import register
from .swa_mix import SWA_PARAMS, SWAMix


@register
class LigerGSA(SWAMix, Operator):
    name = "liger_gsa"
    summary = "Liger gated slot attention: 64 slots, per-slot gates pooled from the key, + SWA (no new params)"
    params = {"num_slots": 64, "gate_normalizer": 16.0, **SWA_PARAMS, "chunk": 64}
    inputs = ("q", "k_kv", "v_kv", "q_pre_rope", "k_pre_rope")
    # The slot-addressing pass (value-gated GLA) keeps its PyTorch form; the read-out pass runs chunk_gla.
    fused_kernels = ("swa_attention", "chunk_gla")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.check_window()
        if self.config["num_slots"] < 1:
            raise ValueError("num_slots must be at least 1")
        if self.config["gate_normalizer"] <= 0:
            raise ValueError("gate_normalizer must be positive")

    def slot_gates(self, k_pre_rope):
        """(log α, s = 1 - α), fp32 `[..., m]` from the key `[..., D]` (any leading shape)."""
        f, m = k_pre_rope.float(), self.config["num_slots"]
        if f.shape[-1] != m:
            f = F.adaptive_avg_pool1d(f.reshape(-1, 1, f.shape[-1]), m).reshape(*f.shape[:-1], m)
        g = F.logsigmoid(f) / self.config["gate_normalizer"]
        return g, -torch.expm1(g)  # 1 - exp(g) without cancellation for α near 1

    def _forms(self, mode):
        return {"naive": (vgla_naive, gla_naive), "step": (vgla_step, gla_step),
                "chunked": (vgla_chunked, functools.partial(fused.gla_chunked, backend=self.backend))}[mode]

    def slots(self, q_pre_rope, k_pre_rope, v_kv, mode, state=None):
        """The two passes; `state` holds (slot keys, slot values) or None. Returns (r fp32, state)."""
        first, second = self._forms(mode)
        g, s = self.slot_gates(k_pre_rope)
        q, k = q_pre_rope.float(), k_pre_rope.float()
        extra = {"chunk": self.config["chunk"]} if mode == "chunked" else {}
        if mode == "step":
            scores, Sk = first(q, k, s, g, state["slots_k"])
            r, Sv = second(scores.softmax(-1), s, v_kv, g, state["slots_v"])
        else:
            init = (None, None) if state is None else (state["slots_k"], state["slots_v"])
            scores, Sk = first(q, k, s, g, initial_state=init[0], **extra)
            r, Sv = second(scores.softmax(-1), s, v_kv, g, initial_state=init[1], **extra)
        return r, {"slots_k": Sk, "slots_v": Sv}

    def naive(self, q, k_kv, v_kv, q_pre_rope, k_pre_rope):
        r, _ = self.slots(q_pre_rope, k_pre_rope, v_kv, "naive")
        return self.mix(self.swa_naive(q, k_kv, v_kv), r, q.dtype)

    def chunked(self, q, k_kv, v_kv, q_pre_rope, k_pre_rope, state=None):
        state = state or {}
        swa, swa_state = self.swa_chunked(q, k_kv, v_kv, state.get("swa"))
        r, slots = self.slots(q_pre_rope, k_pre_rope, v_kv, "chunked", state if "slots_k" in state else None)
        return self.mix(swa, r, q.dtype), {**slots, **({"swa": swa_state} if swa_state else {})}

    def init_state(self, batch, dtype=torch.float32, device=None):
        m, Hk = self.config["num_slots"], self.num_kv_heads
        return {"slots_k": torch.zeros(batch, Hk, self.head_dim, m, device=device),
                "slots_v": torch.zeros(batch, Hk, m, self.v_head_dim, device=device),
                **self.swa_init_state(batch, dtype, device)}

    def step(self, state, q, k_kv, v_kv, q_pre_rope, k_pre_rope):
        swa, swa_state = self.swa_step(q, k_kv, v_kv, state.get("swa"))
        r, slots = self.slots(q_pre_rope, k_pre_rope, v_kv, "step", state)
        return self.mix(swa, r, q.dtype), {**slots, **({"swa": swa_state} if swa_state else {})}
