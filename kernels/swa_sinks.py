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
buffer and the blocked window scores. kernels/swa.py returns normalised outputs only; the hybrids need the
raw scores to add sink logits or a linear-attention term to the same normaliser.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Operator, repeat_heads
from .registry import register
from .swa import window_mask


# Ring buffer: the last w keys/values as fed (after RoPE), oldest first, and how many positions were seen.
# Slot i holds absolute position len − w + i; slots with a negative position are zeros that never existed.


def ring_init(batch, heads, window, head_dim, v_head_dim, dtype=torch.float32, device=None) -> dict:
    return {"k": torch.zeros(batch, heads, window, head_dim, dtype=dtype, device=device),
            "v": torch.zeros(batch, heads, window, v_head_dim, dtype=dtype, device=device),
            "len": torch.zeros((), dtype=torch.int64, device=device)}


def ring_push(state: dict, k: torch.Tensor, v: torch.Tensor) -> dict:
    """The ring after appending k, v `[B, H, T, ·]` (a new dict; the old one is left as it was)."""
    W, T = state["k"].shape[2], k.shape[2]
    if T >= W:
        keys, vals = k[:, :, -W:], v[:, :, -W:]
    else:
        keys = torch.cat([state["k"].to(k.dtype), k], dim=2)[:, :, -W:]
        vals = torch.cat([state["v"].to(v.dtype), v], dim=2)[:, :, -W:]
    return {"k": keys, "v": vals, "len": state["len"] + T}


def ring_exists(state: dict) -> torch.Tensor:
    """bool [w]: which slots hold a position that was seen."""
    W = state["k"].shape[2]
    return torch.arange(W, device=state["k"].device) + state["len"] - W >= 0


def window_scores(q, k, v, ring: dict, scale: float):
    """Sliding-window scores, linear in T: queries in blocks of w, each against its own block and the one before.

    q `[B, Hq, T, D]`; k, v `[B, Hkv, T, ·]` this call's keys/values; `ring` holds the w before them.
    Returns (scores `[B, Hq, N, w, 2w]` fp32 with −inf outside each query's window (the current token and
    the w − 1 before it), values `[B, Hq, N, 2w, V]` fp32); block n row a is query n·w + a of this call
    (rows ≥ T are padding: they see their own key, so no row is empty).
    """
    B, Hq, T, D = q.shape
    W = ring["k"].shape[2]
    pad = (-T) % W
    N = (T + pad) // W
    # All keys in call order: the ring's w, this call's T, padding. Block n of queries sees blocks n, n+1 of this.
    keys = F.pad(torch.cat([ring["k"].to(k.dtype), k], dim=2), (0, 0, 0, pad))
    vals = F.pad(torch.cat([ring["v"].to(v.dtype), v], dim=2), (0, 0, 0, pad))
    keys, vals = repeat_heads(keys, Hq).float(), repeat_heads(vals, Hq).float()
    keys = keys.reshape(B, Hq, N + 1, W, D)
    vals = vals.reshape(B, Hq, N + 1, W, vals.shape[-1])
    keys = torch.cat([keys[:, :, :-1], keys[:, :, 1:]], dim=3)  # [B,Hq,N,2W,D]
    vals = torch.cat([vals[:, :, :-1], vals[:, :, 1:]], dim=3)
    qb = F.pad(q, (0, 0, 0, pad)).float().reshape(B, Hq, N, W, D)
    scores = (qb @ keys.transpose(-1, -2)) * scale
    a = torch.arange(W, device=q.device)
    j = torch.arange(2 * W, device=q.device)
    dist = a[:, None] + W - j[None, :]  # query position minus key position
    key_pos = torch.arange(N, device=q.device)[:, None] * W + j[None, :] - W + ring["len"]  # absolute
    mask = ((dist >= 0) & (dist < W))[None] & (key_pos >= 0)[:, None, :]  # [N, W, 2W]
    return scores.masked_fill(~mask, float("-inf")), vals


def unblock(x: torch.Tensor, T: int) -> torch.Tensor:
    """`[B, H, N, w, ·]` -> `[B, H, T, ·]` (drops the padding rows)."""
    B, H, N, W = x.shape[:4]
    return x.reshape(B, H, N * W, *x.shape[4:])[:, :, :T]


def ring_scores(q, ring: dict, scale: float):
    """One query `[B, Hq, D]` against the ring (after pushing its own key): (scores [B,Hq,w] −inf where no key, values)."""
    Hq = q.shape[1]
    keys, vals = repeat_heads(ring["k"], Hq).float(), repeat_heads(ring["v"], Hq).float()
    scores = torch.einsum("bhd,bhsd->bhs", q.float(), keys) * scale
    return scores.masked_fill(~ring_exists(ring), float("-inf")), vals


# --------------------------------------------------------------------------------------------------


@register
class SWASinks(Operator):
    name = "swa_sinks"
    summary = "StreamingLLM: softmax over 4 sink tokens + the last 64 (training-free, no new params)"
    params = {"window": 64, "num_sinks": 4}
    inputs = ("q", "k_kv", "v_kv")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.config["window"] < 1:
            raise ValueError("window must be at least 1")
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
        state = ring_init(batch, self.num_kv_heads, self.config["window"], self.head_dim, self.v_head_dim, dtype, device)
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

    def chunked(self, q, k_kv, v_kv, state=None):
        B, H, T, _ = q.shape
        if state is None:
            state = self.init_state(B, k_kv.dtype, q.device)
        if T == 0:
            return q.new_zeros(B, H, 0, self.v_head_dim), state
        w, m = self.config["window"], self.config["num_sinks"]
        sink_k, sink_v = self._sinks_after(state, k_kv, v_kv)
        scores, vals = window_scores(q, k_kv, v_kv, state, self.scale)
        N = scores.shape[2]
        # Sink j is read from the sink slots only once it has left the window (j ≤ t − w): never twice.
        t = torch.arange(N * w, device=q.device).reshape(N, w) + state["len"]  # absolute query positions
        sink_seen = torch.arange(m, device=q.device) <= t[..., None] - w  # [N, w, m]
        qb = F.pad(q, (0, 0, 0, N * w - T)).float().reshape(B, H, N, w, -1)
        s_sink = torch.einsum("bhnad,bhjd->bhnaj", qb, self.expand_kv(sink_k).float()) * self.scale
        s_sink = s_sink.masked_fill(~sink_seen, float("-inf"))
        p = torch.cat([scores, s_sink], dim=-1).softmax(-1)
        o = p[..., :2 * w] @ vals + torch.einsum("bhnaj,bhjv->bhnav", p[..., 2 * w:], self.expand_kv(sink_v).float())
        new_state = {**ring_push(state, k_kv, v_kv), "sink_k": sink_k, "sink_v": sink_v}
        return unblock(o, T).to(q.dtype), new_state

    def step(self, state, q, k_kv, v_kv):
        w, m = self.config["window"], self.config["num_sinks"]
        k1, v1 = k_kv[:, :, None], v_kv[:, :, None]
        sink_k, sink_v = self._sinks_after(state, k1, v1)
        t = state["len"]  # this query's absolute position
        ring = ring_push(state, k1, v1)
        scores, vals = ring_scores(q, ring, self.scale)
        s_sink = torch.einsum("bhd,bhjd->bhj", q.float(), self.expand_kv(sink_k).float()) * self.scale
        s_sink = s_sink.masked_fill(~(torch.arange(m, device=q.device) <= t - w), float("-inf"))
        p = torch.cat([scores, s_sink], dim=-1).softmax(-1)
        o = torch.einsum("bhs,bhsv->bhv", p[..., :w], vals) + \
            torch.einsum("bhj,bhjv->bhv", p[..., w:], self.expand_kv(sink_v).float())
        return o.to(q.dtype), {**ring, "sink_k": sink_k, "sink_v": sink_v}
