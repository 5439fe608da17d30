"""`swa_sinks`: StreamingLLM attention, softmax over the first s tokens (sinks) plus the last w tokens.

    o_t = Σ_{s ∈ K(t)} softmax_s(scale · q_t·k_s) v_s,    K(t) = {s ≤ t : t − s < w  or  s < num_sinks}

q, k, v are the RoPE'd ones the model feeds to attention (positions are not re-encoded inside the cache,
unlike the paper's decoding scheme). For T ≤ num_sinks + w every K(t) is {0..t}: exactly causal softmax
attention. Training-free: no new parameters. Decode state: the sink keys/values (filled by the first
num_sinks tokens, then fixed) and a w-slot ring buffer of the last keys/values, so it never grows with T.
Shapes: q `[B, Hq, T, D]`, k_kv / v_kv `[B, Hkv, T, D]` (repeated to Hq inside for GQA).
Paper: Xiao et al., "Efficient Streaming Language Models with Attention Sinks", 2023.
Bindings: q, k_kv, v_kv.

This file also holds the sliding-window machinery the hybrid operators (lolcats, lizard) share: the ring
buffer and the window's unnormalised sums as one graph node (computed by kernels/swa.py's `window_sums`, whose
swa_chunked normalises them at once); the hybrids add sink logits or a linear-attention term to the same
normaliser.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Operator, repeat_heads
from .opaque import differentiable
from .registry import register
from .swa import check_window, window_mask
from .swa import window_sums as _window_sums  # blocked, O(T·min(w, T)): see there


# Ring buffer: the last w keys/values as fed (after RoPE), oldest first, and how many positions were seen.
# Slot i holds absolute position len − w + i; slots with a negative position are zeros that never existed.


def ring_init(batch, heads, window, head_dim, v_head_dim, dtype=torch.float32, device=None) -> dict:
    return {"k": torch.zeros(batch, heads, window, head_dim, dtype=dtype, device=device),
            "v": torch.zeros(batch, heads, window, v_head_dim, dtype=dtype, device=device),
            "len": torch.zeros((), dtype=torch.int64, device=device)}


def ring_push(state: dict, k: torch.Tensor, v: torch.Tensor) -> dict:
    """The ring after appending k, v `[B, H, T, ·]` (a new dict; the old one is left as it was)."""
    # No branch on T (cat even when T ≥ w): a converted graph must re-export with a symbolic length.
    W = state["k"].shape[2]
    keys = torch.cat([state["k"].to(k.dtype), k], dim=2)[:, :, -W:]
    vals = torch.cat([state["v"].to(v.dtype), v], dim=2)[:, :, -W:]
    return {"k": keys, "v": vals, "len": state["len"] + k.shape[2]}


def ring_exists(state: dict) -> torch.Tensor:
    """bool [w]: which slots hold a position that was seen."""
    W = state["k"].shape[2]
    return torch.arange(W, device=state["k"].device) + state["len"] - W >= 0


# Window sums. For each query t over its window W(t) = {t − w < s ≤ t} (the current token included), with
# s_ts = scale · q_t·k_s:
#     c_t = max_{s ∈ W(t)} s_ts,   num_t = Σ_W exp(s_ts − c_t) v_s,   den_t = Σ_W exp(s_ts − c_t).
# Operators add their own terms to these before normalising (lolcats: a linear-attention term, lizard: sink
# logits, swa_sinks: sink keys), so c_t is returned too. The sums themselves are kernels/swa.py's.


# One opaque graph node (like kernels/opaque.py's primitives): the blocking branches on T, which torch.export
# would otherwise specialise a converted graph to. Differentiated by recomputation.
@torch.library.custom_op("lincompile::window_sums", mutates_args=())
def window_sums_op(q: Tensor, k: Tensor, v: Tensor, prev_k: Tensor, prev_v: Tensor, seen: Tensor,
                   scale: float) -> tuple[Tensor, Tensor, Tensor]:
    return _window_sums(q, k, v, prev_k, prev_v, seen, scale)


@window_sums_op.register_fake
def _(q, k, v, prev_k, prev_v, seen, scale):
    B, H, T, _ = q.shape
    return (q.new_empty(B, H, T, v.shape[-1], dtype=torch.float32), q.new_empty(B, H, T, dtype=torch.float32),
            q.new_empty(B, H, T, dtype=torch.float32))


differentiable(window_sums_op, _window_sums, 5)


def window_sums(q, k, v, ring: dict, scale: float):
    """q `[B, Hq, T, D]`; k, v `[B, Hkv, T, ·]` this call's keys/values; `ring` the w before them."""
    return window_sums_op(q, k, v, ring["k"].to(k.dtype), ring["v"].to(v.dtype), ring["len"], float(scale))


def ring_sums(q, ring: dict, scale: float):
    """The window sums of one query `[B, Hq, D]` over the ring (after pushing its own key): (num, den, c)."""
    Hq = q.shape[1]
    keys, vals = repeat_heads(ring["k"], Hq).float(), repeat_heads(ring["v"], Hq).float()
    scores = torch.einsum("bhd,bhsd->bhs", q.float(), keys) * scale
    scores = scores.masked_fill(~ring_exists(ring), float("-inf"))
    c = scores.amax(-1, keepdim=True)
    p = (scores - c).exp()
    return torch.einsum("bhs,bhsv->bhv", p, vals), p.sum(-1), c[..., 0]


def normalise_with(num, den, c, logits, values=None):
    """Softmax over the window and m extra positions: logits `[..., m]` (−inf: not visible) with values
    `[B, H, m, V]`, or none (sinks that only take mass). Shapes: num `[..., V]`, den and c `[...]`."""
    if logits.shape[-1] == 0:
        return num / den[..., None]
    # Any common reference cancels; the larger of the two keeps every exponent ≤ 0.
    ref = torch.maximum(c, logits.amax(-1)).detach()
    scale_w = (c - ref).exp()
    e = (logits - ref[..., None]).exp()
    num = num * scale_w[..., None]
    if values is not None:
        num = num + torch.einsum("bh...j,bhjv->bh...v", e, values.float())
    return num / (den * scale_w + e.sum(-1))[..., None]


# --------------------------------------------------------------------------------------------------


@register
class SWASinks(Operator):
    name = "swa_sinks"
    summary = "StreamingLLM: softmax over 4 sink tokens + the last 64 (training-free, no new params)"
    params = {"window": 64, "num_sinks": 4}
    inputs = ("q", "k_kv", "v_kv")
    fused_kernels = ("swa_attention",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        check_window(self.config["window"])
        if self.config["num_sinks"] < 0:
            raise ValueError("num_sinks must be at least 0")

    def naive(self, q, k_kv, v_kv):
        k, v = self.expand_kv(k_kv).float(), self.expand_kv(v_kv).float()
        T = q.shape[2]
        keep = window_mask(T, self.config["window"], q.device)
        keep |= torch.ones(T, T, dtype=torch.bool, device=q.device).tril() & (torch.arange(T, device=q.device) <
                                                                               self.config["num_sinks"])
        scores = ((q.float() @ k.transpose(-1, -2)) * self.scale).masked_fill(~keep, float("-inf"))
        return (scores.softmax(-1) @ v).to(q.dtype)

    def init_state(self, batch, dtype=torch.float32, device=None):
        m = self.config["num_sinks"]
        state = ring_init(batch, self.num_kv_heads, self.config["window"], self.head_dim, self.v_head_dim, dtype,
                          device)
        state["sink_k"] = torch.zeros(batch, self.num_kv_heads, m, self.head_dim, dtype=dtype, device=device)
        state["sink_v"] = torch.zeros(batch, self.num_kv_heads, m, self.v_head_dim, dtype=dtype, device=device)
        return state

    def _sinks_after(self, state, k, v):
        """Sink slots after this call's tokens: slot j takes token j − len of the call while len ≤ j < len + T."""
        m, T = self.config["num_sinks"], k.shape[2]
        idx = torch.arange(m, device=k.device) - state["len"]
        new = ((idx >= 0) & (idx < T))[:, None]
        at = idx.clamp(0, T - 1)
        sink_k = torch.where(new, k.index_select(2, at), state["sink_k"].to(k.dtype))
        sink_v = torch.where(new, v.index_select(2, at), state["sink_v"].to(v.dtype))
        return sink_k, sink_v

    def _sink_logits(self, q, sink_k, t):
        """Scores of queries `[B, H, ..., D]` at absolute positions t `[...]` against the sink slots; sink j
        counts only once it has left the window (j ≤ t − w), so no position is counted twice."""
        m, w = self.config["num_sinks"], self.config["window"]
        scores = torch.einsum("bh...d,bhjd->bh...j", q.float(), self.expand_kv(sink_k).float()) * self.scale
        visible = torch.arange(m, device=q.device) <= t[..., None] - w
        return scores.masked_fill(~visible, float("-inf"))

    def chunked(self, q, k_kv, v_kv, state=None):
        B, H, T, _ = q.shape
        if state is None:
            state = self.init_state(B, k_kv.dtype, q.device)
        if T == 0:
            return q.new_zeros(B, H, 0, self.v_head_dim), state
        sink_k, sink_v = self._sinks_after(state, k_kv, v_kv)
        if self.backend == "triton":
            # (o, lse) is the same sum as (num, den, c) with c = lse, den = 1: normalise_with only needs that.
            from .fused import window_attention

            o, c = window_attention(q, k_kv, v_kv, state, self.scale)
            num, den = o.float(), torch.ones_like(c)
        else:
            num, den, c = window_sums(q, k_kv, v_kv, state, self.scale)
        logits = self._sink_logits(q, sink_k, torch.arange(T, device=q.device) + state["len"])
        o = normalise_with(num, den, c, logits, self.expand_kv(sink_v))
        return o.to(q.dtype), {**ring_push(state, k_kv, v_kv), "sink_k": sink_k, "sink_v": sink_v}

    def step(self, state, q, k_kv, v_kv):
        k1, v1 = k_kv[:, :, None], v_kv[:, :, None]
        sink_k, sink_v = self._sinks_after(state, k1, v1)
        ring = ring_push(state, k1, v1)
        num, den, c = ring_sums(q, ring, self.scale)
        o = normalise_with(num, den, c, self._sink_logits(q, sink_k, state["len"]), self.expand_kv(sink_v))
        return o.to(q.dtype), {**ring, "sink_k": sink_k, "sink_v": sink_v}
