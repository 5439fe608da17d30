"""Sliding-window softmax attention (SWA): naive, chunked and step (ring buffer) forms.

    o_t = Σ_{s = t-w+1..t} softmax_s(scale · q_t·k_s) v_s        (the window includes the current token)

Shapes: q `[B, H, T, D]`, k `[B, Hkv, T, D]`, v `[B, Hkv, T, V]` with H a multiple of Hkv (GQA: query head h
reads kv head h // (H / Hkv); Hkv = H works too). The chunked form works in blocks of min(w, T) queries that
see the keys that can reach them: O(T·min(w, T)) time and memory (a window longer than the input costs what
causal attention over the input does); the query heads of a group share one key block.
The decode state is a ring buffer of the last w keys/values per kv head, so it never grows with T.
Used by liger_attention (Liger Attention's SWA branch) and the hybrid operators of the library.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


# A sliding window's decode state holds this many tokens per layer and sequence (a ring buffer allocated whole):
# beyond it a "window" costs gigabytes and is no longer a sliding-window hybrid.
MAX_WINDOW = 1 << 16


def check_window(window: int, minimum: int = 1, note: str = "") -> None:
    """The operators' `window` param check (ValueError: the spec loader reports it at the value's line)."""
    if window < minimum:
        raise ValueError(f"window must be at least {minimum}{note}")
    if window > MAX_WINDOW:
        raise ValueError(f"window must be at most {MAX_WINDOW} (its decode state holds that many tokens per "
                         "layer and sequence); for full softmax attention keep the layer with op: keep")


def window_mask(T: int, window: int, device=None, S: int | None = None, offset: int = 0) -> torch.Tensor:
    """bool [T, S]: query t (at absolute position offset + t) may see key s when 0 ≤ t' - s < window."""
    S = T + offset if S is None else S
    t = torch.arange(T, device=device)[:, None] + offset
    s = torch.arange(S, device=device)[None, :]
    return (s <= t) & (t - s < window)


def _group(q, k) -> int:
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads cannot share {k.shape[1]} kv heads")
    return q.shape[1] // k.shape[1]


def swa_naive(q, k, v, window: int, scale: float):
    """Masked quadratic softmax attention: the oracle."""
    T = q.shape[2]
    G = _group(q, k)
    k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    scores = scores.masked_fill(~window_mask(T, window, q.device), float("-inf"))
    return (scores.softmax(-1) @ v.float()).to(q.dtype)


def window_sums(q, k, v, prev_k, prev_v, seen, scale: float):
    """The window's unnormalised sums, fp32 (num, den, c): for query t, c_t = max of its window's scores,
    num_t = Σ exp(s − c_t) v_s, den_t = Σ exp(s − c_t). Keys are the w cached ones `prev_k`, `prev_v` (of which
    the last `seen` exist) followed by this call's k, v.

    Blocks of b = min(w, T) queries, each against the w + b − 1 keys that can reach it, trimmed to the keys that
    exist: memory O(T · min(w, T + seen)), not O(w²), so a window far longer than the input costs what plain
    causal attention over the input does.
    """
    B, H, T, D = q.shape
    Hk, V, W = k.shape[1], v.shape[-1], prev_k.shape[2]
    G = _group(q, k)
    if T == 0:
        empty = q.new_zeros(B, H, 0, dtype=torch.float32)
        return empty.new_zeros(B, H, 0, V), empty, empty
    # Cached keys any query can see: the last w − 1, and only positions that were seen (a host sync, once).
    r = min(int(seen), W - 1)
    b = min(W, T)
    N = -(-T // b)
    S = min(W + b - 1, r + N * b)  # keys per block of queries
    lead, pad = max(0, S - b - r), N * b - T  # zeros so that every block has S keys / b queries
    keys = F.pad(torch.cat([prev_k[:, :, W - r:].to(k.dtype), k], dim=2), (0, 0, lead, pad))
    vals = F.pad(torch.cat([prev_v[:, :, W - r:].to(v.dtype), v], dim=2), (0, 0, lead, pad))
    # Block n holds queries n·b .. n·b + b − 1 (positions in this call) and keys n·b + b − S .. n·b + b − 1.
    start = max(0, r + b - S)
    kb = keys[:, :, start:].unfold(2, S, b).float()  # [B,Hk,N,D,S]
    vb = vals[:, :, start:].unfold(2, S, b).transpose(-1, -2).float()  # [B,Hk,N,S,V]
    # The G query heads of a kv head become extra rows of one matmul against the shared key block.
    qg = F.pad(q, (0, 0, 0, pad)).reshape(B, Hk, G, N, b, D).transpose(2, 3).reshape(B, Hk, N, G * b, D).float()
    scores = ((qg @ kb) * scale).view(B, Hk, N, G, b, S)
    a = torch.arange(b, device=q.device)
    j = torch.arange(S, device=q.device)
    dist = a[:, None] + S - b - j[None, :]  # query position minus key position
    key_pos = torch.arange(N, device=q.device)[:, None] * b + b - S + j[None, :]  # relative to this call's start
    # Padding queries see at least their own (zero) key: no row is all −inf.
    mask = ((dist >= 0) & (dist < W))[None] & (key_pos >= -r)[:, None, :]  # [N, b, S]
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    c = scores.amax(-1, keepdim=True)
    p = (scores - c).exp()
    num = p.view(B, Hk, N, G * b, S) @ vb

    def heads(x):  # [B, Hk, N, G, b, ...] -> [B, H, T, ...]
        return x.transpose(2, 3).reshape(B, H, N * b, *x.shape[5:])[:, :, :T]

    return heads(num.view(B, Hk, N, G, b, V)), heads(p.sum(-1)), heads(c[..., 0])


def swa_chunked(q, k, v, window: int, scale: float, state=None):
    """Blocked form, linear in T (`window_sums`). `state` (from `swa_init_state`/earlier calls) holds the
    previous keys.

    Returns (o, state) where state = {"k": [B,H,w,D], "v": [B,H,w,V], "len": [] int64}: the last w keys and
    values (zeros where fewer than w were seen) and how many positions were seen in all.
    """
    B, H, T, D = q.shape
    Hk, V, W = k.shape[1], v.shape[-1], window
    if state is None:
        state = swa_init_state(B, Hk, D, V, W, q.dtype, q.device)
    if T == 0:
        return q.new_zeros(B, H, 0, V), state
    num, den, _ = window_sums(q, k, v, state["k"], state["v"], state["len"], scale)
    return (num / den[..., None]).to(q.dtype), _swa_advance(state, k, v, W)


def swa_init_state(batch, heads, head_dim, v_head_dim, window, dtype=torch.float32, device=None):
    return {"k": torch.zeros(batch, heads, window, head_dim, dtype=dtype, device=device),
            "v": torch.zeros(batch, heads, window, v_head_dim, dtype=dtype, device=device),
            "len": torch.zeros((), dtype=torch.int64, device=device)}


def _swa_advance(state, k, v, W):
    """The last W keys/values after appending k, v (ring buffer kept in order: oldest first)."""
    T = k.shape[2]
    keys = torch.cat([state["k"].to(k.dtype), k], dim=2)[:, :, -W:] if T < W else k[:, :, -W:]
    vals = torch.cat([state["v"].to(v.dtype), v], dim=2)[:, :, -W:] if T < W else v[:, :, -W:]
    return {"k": keys, "v": vals, "len": state["len"] + T}


def swa_step(q, k, v, state, window: int, scale: float):
    """One position: q `[B, H, D]`, k `[B, Hkv, D]`, v `[B, Hkv, V]`. Returns (o [B,H,V], state)."""
    state = _swa_advance(state, k[:, :, None], v[:, :, None], window)
    keys, vals = state["k"].float(), state["v"].float()
    B, H, D = q.shape
    Hk = keys.shape[1]
    scores = torch.einsum("bkgd,bksd->bkgs", q.float().view(B, Hk, H // Hk, D), keys) * scale
    # Slot s holds the position len - W + s; positions < 0 never existed.
    exists = torch.arange(window, device=q.device) + state["len"] - window >= 0
    scores = scores.masked_fill(~exists, float("-inf"))
    o = torch.einsum("bkgs,bksv->bkgv", scores.softmax(-1), vals).reshape(B, H, -1)
    return o.to(q.dtype), state
