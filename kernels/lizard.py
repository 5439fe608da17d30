"""`lizard`: Lizard attention, gated Hedgehog linear attention plus a sliding window with learned sinks.

Gated branch (no RoPE: pre-rotary q, k), per query head h, with x_t the attention block's input:

    log γ_t = logsigmoid(W_γ[h] · x_t + b_γ[h])                 one scalar gate per head and token
    S_t = γ_t S_{t−1} + φ_k(k_t) v_tᵀ,   z_t = γ_t z_{t−1} + φ_k(k_t)
    g_t = φ_q(q_t)ᵀ S_t / max(φ_q(q_t)ᵀ z_t, 1e-6)

Window branch (RoPE'd q, k as fed, the model's scale), over the last w positions and m learned sink
logits τ_{h,1..m} that have no values (they only take attention mass away, like the attention sinks of
pretrained models):

    u_t = Σ_{s ∈ W(t)} exp(scale · q_t·k_s) v_s / [Σ_{s ∈ W(t)} exp(scale · q_t·k_s) + Σ_j exp(τ_j)],
    W(t) = {t−w < s ≤ t}

Output: o_t = g_t + α_h · u_t.

φ_q, φ_k: Hedgehog feature maps (kernels/hedgehog.py), one [D, F] matrix per query head, W = I at init.
The gate projection is d_model → num_heads (one gate per head rather than the paper's single d_model×1
column: heads can keep different memory lengths); W_γ starts at 0 and b_γ at logit(γ₀) with γ₀ spread
evenly over [0.95, 0.99] across heads, so at init every token decays the state by γ₀ (memories of
~20–100 tokens) and healing learns how the gate depends on the input. Log-gates are clamped at
kernels/gla.py's LOG_GATE_MIN in every form. Sinks start at τ = 0 (at the model's own sinks
where it has them, GPT-OSS), α at 1.
The gated branch runs through kernels/gla.py (its one-gate-per-head path, log-gate shaped [..., 1]) with v
augmented with a ones column, whose output is the normaliser φ_q(q_t)ᵀ z_t.
The window branch takes its sums from swa_sinks.window_sums (exponents relative to the window max c_t) and
adds the sinks against max(c_t, max_j τ_j), so every exponent is ≤ 0 whatever the sink logits learn. Both
chunked pieces are opaque graph nodes, so converted graphs re-export at any length.
Decode state: the [2F, Dv+1] GLA state per query head (fp32) and a w-slot ring of RoPE'd keys/values.
Shapes: q / q_pre_rope `[B, Hq, T, D]`, k_kv / k_pre_rope / v_kv `[B, Hkv, T, D]`, hidden `[B, T, d_model]`
-> `[B, Hq, T, Dv]`.
New parameters: 2 · Hq · D · F (φ) + Hq · d_model + Hq (gate) + Hq · m (sinks) + Hq (α).
Paper: Van Nguyen et al., "Lizard: An Efficient Linearization Framework for Large Language Models", 2025.
Bindings: q, k_kv, v_kv, q_pre_rope, k_pre_rope, hidden; sinks (read at init only).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lincompile.errors import MatchError
from lincompile.graph import shape

from .base import Operator
from .fused import gla_chunked, gla_step, window_attention
from .gla import gla_naive
from .hedgehog import HedgehogFeatureMap, resolve_feature_dim
from .registry import register
from .swa import check_window, window_mask
from .swa_sinks import normalise_with, ring_init, ring_push, ring_sums, window_sums

GATE_INIT = (0.95, 0.99)  # initial per-token decay, spread over the heads
DEN_MIN = 1e-6  # φ_q·z > 0 always, but can underflow when feature maps saturate on disjoint coordinates


@register
class Lizard(Operator):
    name = "lizard"
    summary = "Lizard: gated Hedgehog linear attention (learned per-token gate) + SWA-128 with 4 learned sinks"
    params = {"window": 128, "num_sinks": 4, "feature_dim": None, "chunk": 64}
    inputs = ("q", "k_kv", "v_kv", "q_pre_rope", "k_pre_rope", "hidden")
    init_bindings = ("sinks",)  # read once, at init_from_site
    fused_kernels = ("chunk_gla", "swa_attention")

    def __init__(self, *args, hidden_size: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        check_window(self.config["window"])
        if self.config["num_sinks"] < 0:
            raise ValueError("num_sinks must be at least 0")
        # Without a site (tests, direct use) d_model defaults to num_heads · head_dim, the usual layout.
        self.hidden_size = hidden_size or self.num_heads * self.head_dim
        H, F_ = self.num_heads, resolve_feature_dim(self.config["feature_dim"], self.head_dim)
        self.phi_q = HedgehogFeatureMap(H, self.head_dim, F_)
        self.phi_k = HedgehogFeatureMap(H, self.head_dim, F_)
        self.gate_weight = nn.Parameter(torch.empty(H, self.hidden_size))
        self.gate_bias = nn.Parameter(torch.empty(H))
        self.sink_logits = nn.Parameter(torch.empty(H, self.config["num_sinks"]))
        self.alpha = nn.Parameter(torch.empty(H))
        self.reset_parameters()

    def reset_parameters(self):
        self.phi_q.reset_parameters()
        self.phi_k.reset_parameters()
        with torch.no_grad():
            g0 = torch.linspace(*GATE_INIT, self.num_heads)  # one head: 0.95
            self.gate_weight.zero_()
            self.gate_bias.copy_(torch.log(g0 / (1 - g0)))
            self.sink_logits.zero_()
            self.alpha.fill_(1.0)

    @classmethod
    def from_site(cls, site, **params):
        hidden = site.bindings.get("hidden")
        if hidden is None or not shape(hidden):
            raise MatchError(f'op "{cls.name}" needs "hidden" (the attention input [batch, seq, d_model]) to size '
                             f"its gate, which was not found at site {site.module}")
        a = site.attrs
        op = cls(num_heads=a["num_heads"], num_kv_heads=a["num_kv_heads"], head_dim=a["head_dim"],
                 v_head_dim=a.get("v_head_dim"), scale=a.get("scale"), hidden_size=int(shape(hidden)[-1]), **params)
        op.init_from_site(site)
        return op

    def init_from_site(self, site):
        # W_γ = 0 and the rest are constants: nothing is read from the pretrained weights but their device, and
        # the model's own attention sinks where it has them (GPT-OSS: one logit σ_h per head), split over the m
        # sink logits so that they take the same mass: Σ_j exp(σ_h − log m) = exp(σ_h).
        weight = site.weight("q_proj")
        if weight is not None:
            self.to(device=weight.device)
        if "sinks" not in site.bindings:
            return
        sinks, m = site.constant("sinks"), self.config["num_sinks"]
        if sinks is not None and m > 0 and sinks.numel() == self.num_heads:
            with torch.no_grad():
                self.sink_logits.copy_(sinks.detach().float().reshape(-1, 1) - math.log(m))
            self.notes.append("the site's attention sinks (one learned logit per head) initialise lizard's sink logits")
        else:
            why = "num_sinks is 0" if m == 0 else "they are computed in the graph, not a model parameter"
            self.notes.append(f"the site's attention sinks (one learned logit per head) are dropped: {why}")

    def extra_repr(self) -> str:
        return super().extra_repr() + f", d_model={self.hidden_size}"

    # ----------------------------------------------------------------------------------------------
    def gla_inputs(self, q_pre_rope, k_pre_rope, v_kv, hidden):
        """(φ_q(q), φ_k(k), [v, 1], log γ `[..., 1]`: one gate per head), all `[B, Hq, T, ·]` fp32."""
        fq, fk = self.phi_q(q_pre_rope), self.phi_k(self.expand_kv(k_pre_rope))
        v = self.expand_kv(v_kv).float()
        v_aug = torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)
        logit = torch.einsum("b...d,hd->bh...", hidden.float(), self.gate_weight.float())
        logit = logit + self.gate_bias.float().reshape(1, -1, *([1] * (logit.dim() - 2)))
        return fq, fk, v_aug, F.logsigmoid(logit)[..., None]

    def _mix(self, lin, win):
        """g + α·u from the GLA output on [v, 1] (numerator, normaliser) and the window branch."""
        gated = lin[..., :-1] / lin[..., -1:].clamp_min(DEN_MIN)
        return gated + self.alpha.float().reshape(1, -1, *([1] * (gated.dim() - 2))) * win

    def _sinks(self, c):
        """The sink logits broadcast to the window maxima's shape `[B, H, ...]` (+ m)."""
        m = self.config["num_sinks"]
        return self.sink_logits.float().reshape(1, self.num_heads, *([1] * (c.dim() - 2)), m).expand(*c.shape, m)

    def naive(self, q, k_kv, v_kv, q_pre_rope, k_pre_rope, hidden):
        lin = gla_naive(*self.gla_inputs(q_pre_rope, k_pre_rope, v_kv, hidden))[0]
        k, v = self.expand_kv(k_kv).float(), self.expand_kv(v_kv).float()
        T = q.shape[2]
        scores = ((q.float() @ k.transpose(-1, -2)) * self.scale).masked_fill(
            ~window_mask(T, self.config["window"], q.device), float("-inf"))
        sinks = self.sink_logits.float()[None, :, None, :].expand(*scores.shape[:-1], -1)
        p = torch.cat([scores, sinks], dim=-1).softmax(-1)[..., :T]  # the sinks have no values
        return self._mix(lin, p @ v).to(q.dtype)

    def init_state(self, batch, dtype=torch.float32, device=None):
        state = ring_init(batch, self.num_kv_heads, self.config["window"], self.head_dim, self.v_head_dim, dtype,
                          device)
        state["gla"] = torch.zeros(batch, self.num_heads, 2 * self.phi_k.feature_dim, self.v_head_dim + 1,
                                   device=device)
        return state

    def chunked(self, q, k_kv, v_kv, q_pre_rope, k_pre_rope, hidden, state=None):
        B, H, T, _ = q.shape
        if state is None:
            state = self.init_state(B, k_kv.dtype, q.device)
        if T == 0:
            return q.new_zeros(B, H, 0, self.v_head_dim), state
        fq, fk, fv, g = self.gla_inputs(q_pre_rope, k_pre_rope, v_kv, hidden)
        lin, S = gla_chunked(fq, fk, fv, g, scale=1.0, chunk=self.config["chunk"], initial_state=state["gla"],
                             backend=self.backend)
        if self.backend == "triton":  # the sink logits join the kernel's softmax
            win = window_attention(q, k_kv, v_kv, state, self.scale, sinks=self.sink_logits)[0].float()
        else:
            num, den, c = window_sums(q, k_kv, v_kv, state, self.scale)
            win = normalise_with(num, den, c, self._sinks(c))
        return self._mix(lin, win).to(q.dtype), {**ring_push(state, k_kv, v_kv), "gla": S}

    def step(self, state, q, k_kv, v_kv, q_pre_rope, k_pre_rope, hidden):
        lin, S = gla_step(*self.gla_inputs(q_pre_rope, k_pre_rope, v_kv, hidden), state["gla"], backend=self.backend)
        ring = ring_push(state, k_kv[:, :, None], v_kv[:, :, None])
        num, den, c = ring_sums(q, ring, self.scale)
        win = normalise_with(num, den, c, self._sinks(c))
        return self._mix(lin, win).to(q.dtype), {**ring, "gla": S}
