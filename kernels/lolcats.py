"""`lolcats`: LoLCATs attention, sliding-window softmax and Hedgehog linear attention under one normaliser.

With s_ts = scale · q_t·k_s (RoPE'd q, k as fed), the window W(t) = {t−w < s ≤ t} and the older positions
O(t) = {s ≤ t−w}:

    c_t = max_{s ∈ W(t)} s_ts                                   (the window's row max, not detached)
    A_t = γ Σ_{s ∈ W(t)} exp(s_ts − c_t) v_s  +  φ_q(q_t)ᵀ Σ_{s ∈ O(t)} φ_k(k_s) v_sᵀ
    Z_t = γ Σ_{s ∈ W(t)} exp(s_ts − c_t)      +  φ_q(q_t)ᵀ Σ_{s ∈ O(t)} φ_k(k_s)
    y_t = A_t / Z_t

φ_q, φ_k: Hedgehog feature maps (kernels/hedgehog.py), W untied for q and k, one [D, F] matrix per query
head (k is repeated to the query heads first, as LoLCATs maps after the GQA repeat). γ = σ(per-head logit).
This is LoLCATs' own combination: the window term is stabilised by exp(−c_t) and the linear term is *not*,
so c_t is part of the function (not a free stabiliser), and every form computes it as the max over the
same w scores. Z_t ≥ γ (the max term is exp(0)), so the division is safe. For t < w, O(t) is empty and y_t
is exactly softmax attention; every form evaluates the quotient divided through by γ (window sums + linear
sums / γ), so γ then drops out exactly, gradient included. Unlike LoLCATs' "terraced" blocks, the window is
the exact last w positions (the current one included), as in kernels/swa.py.

Forms: `naive` is the masked quadratic form above. `chunked`: the window's sums relative to c_t, blocked in
O(T·w) (swa_sinks.window_sums), plus the linear term as causal linear attention whose keys/values are
delayed by w positions (position t adds key t−w), through kernels/gla.py with zero log-gates and v
augmented with a ones column (which yields Z's linear part). Both are opaque graph nodes, so converted
graphs re-export at any length. Decode state: the [2F, Dv+1] linear state per query head (fp32) and a
w-slot ring buffer of RoPE'd keys/values; a key enters the linear state when it leaves the ring.
Shapes: q `[B, Hq, T, D]`, k_kv / v_kv `[B, Hkv, T, D]` -> `[B, Hq, T, Dv]`.
New parameters: φ_q and φ_k weights (2 · Hq · D · F), γ logits (Hq), init W = I, γ = 0.1.
Paper: Zhang et al., "LoLCATs: On Low-Rank Linearizing of Large Language Models", 2024.
Bindings: q, k_kv, v_kv.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import Operator
from .fused import gla_chunked, gla_step
from .hedgehog import HedgehogFeatureMap, resolve_feature_dim
from .registry import register
from .swa import check_window, window_mask
from .swa_sinks import ring_init, ring_push, ring_sums, window_sums

GAMMA_INIT = 0.1  # LoLCATs' window factor starts small: the linear term carries weight from the first step


@register
class LoLCATs(Operator):
    name = "lolcats"
    summary = "LoLCATs: sliding-window softmax (w=64) + Hedgehog linear attention, one shared normaliser"
    params = {"window": 64, "feature_dim": None, "chunk": 64}
    inputs = ("q", "k_kv", "v_kv")
    # The window part needs its sums relative to the window maximum (not what the kernel returns): PyTorch.
    fused_kernels = ("chunk_gla",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        check_window(self.config["window"])
        F = resolve_feature_dim(self.config["feature_dim"], self.head_dim)
        self.phi_q = HedgehogFeatureMap(self.num_heads, self.head_dim, F)
        self.phi_k = HedgehogFeatureMap(self.num_heads, self.head_dim, F)
        self.window_logit = nn.Parameter(torch.empty(self.num_heads))
        self.reset_parameters()

    def reset_parameters(self):
        self.phi_q.reset_parameters()
        self.phi_k.reset_parameters()
        with torch.no_grad():
            self.window_logit.fill_(math.log(GAMMA_INIT / (1 - GAMMA_INIT)))

    def init_from_site(self, site):
        # Nothing is read from the pretrained weights (W = I, γ = 0.1); the new parameters go where they are.
        weight = site.weight("q_proj")
        if weight is not None:
            self.to(device=weight.device)

    def inv_gamma(self, dims: int = 4) -> torch.Tensor:
        """1/γ = 1 + exp(−logit) per head, shaped to broadcast over `[B, H, ...]` tensors of `dims` dimensions.

        Every form computes y = (num_w + lin/γ) / (den_w + lin_z/γ): the formula divided through by γ, so that
        while no token is older than the window (lin = 0) γ drops out exactly, gradient included."""
        return (1 + torch.exp(-self.window_logit.float())).reshape(1, -1, *([1] * (dims - 2)))

    # ----------------------------------------------------------------------------------------------
    def naive(self, q, k_kv, v_kv):
        k, v = self.expand_kv(k_kv).float(), self.expand_kv(v_kv).float()
        T, w = q.shape[2], self.config["window"]
        scores = ((q.float() @ k.transpose(-1, -2)) * self.scale).masked_fill(~window_mask(T, w, q.device),
                                                                              float("-inf"))
        c = scores.amax(-1, keepdim=True)
        older = torch.ones(T, T, dtype=torch.bool, device=q.device).tril(-w)
        a_lin = (self.phi_q(q) @ self.phi_k(k).transpose(-1, -2)) * older
        a = (scores - c).exp() + self.inv_gamma() * a_lin
        return ((a @ v) / a.sum(-1, keepdim=True)).to(q.dtype)

    def init_state(self, batch, dtype=torch.float32, device=None):
        state = ring_init(batch, self.num_kv_heads, self.config["window"], self.head_dim, self.v_head_dim, dtype,
                          device)
        state["lin"] = torch.zeros(batch, self.num_heads, 2 * self.phi_k.feature_dim, self.v_head_dim + 1,
                                   device=device)
        return state

    def _delayed(self, k, v, exists):
        """φ_k(k), [v, 1] (zeroed where the position never existed: φ_k(0) is not 0)."""
        v_aug = torch.cat([v.float(), v.new_ones(*v.shape[:-1], 1, dtype=torch.float32)], dim=-1)
        return self.phi_k(self.expand_kv(k)), self.expand_kv(v_aug * exists[..., None])

    def _combine(self, num_w, den_w, lin):
        """(num_w + φ_qᵀH / γ) / (den_w + φ_qᵀz / γ), the linear parts being the GLA output on [v, 1]."""
        r = self.inv_gamma(num_w.dim())
        return (num_w + r * lin[..., :-1]) / (den_w + r[..., 0] * lin[..., -1])[..., None]

    def chunked(self, q, k_kv, v_kv, state=None):
        B, H, T, _ = q.shape
        if state is None:
            state = self.init_state(B, k_kv.dtype, q.device)
        if T == 0:
            return q.new_zeros(B, H, 0, self.v_head_dim), state
        w = self.config["window"]
        num_w, den_w, _ = window_sums(q, k_kv, v_kv, state, self.scale)  # relative to c_t, the window max
        # Query t (absolute len + u) adds key t − w to the linear state: index u of [ring, this call].
        old_k = torch.cat([state["k"].to(k_kv.dtype), k_kv], dim=2)[:, :, :T]
        old_v = torch.cat([state["v"].to(v_kv.dtype), v_kv], dim=2)[:, :, :T]
        exists = torch.arange(T, device=q.device) + state["len"] - w >= 0
        fk, fv = self._delayed(old_k, old_v, exists)
        fq = self.phi_q(q)
        no_decay = fk.new_zeros(*fk.shape[:-1], 1)  # one log-gate per head, 0: plain linear attention
        lin, S = gla_chunked(fq, fk, fv, no_decay, scale=1.0, chunk=self.config["chunk"], initial_state=state["lin"],
                             backend=self.backend)
        y = self._combine(num_w, den_w, lin)
        return y.to(q.dtype), {**ring_push(state, k_kv, v_kv), "lin": S}

    def step(self, state, q, k_kv, v_kv):
        # The ring's oldest slot (position t − w) leaves the window now: it joins the linear state.
        exists = (state["len"] >= self.config["window"]).reshape(1)
        fk, fv = self._delayed(state["k"][:, :, :1], state["v"][:, :, :1], exists)
        fq = self.phi_q(q)
        lin, S = gla_step(fq, fk[:, :, 0], fv[:, :, 0], None, state["lin"], backend=self.backend)
        ring = ring_push(state, k_kv[:, :, None], v_kv[:, :, None])
        num_w, den_w, _ = ring_sums(q, ring, self.scale)
        y = self._combine(num_w, den_w, lin)
        return y.to(q.dtype), {**ring, "lin": S}
