"""Sliding-window softmax attention (SWA): naive, chunked and step (ring buffer) forms.

    o_t = Σ_{s = t-w+1..t} softmax_s(scale · q_t·k_s) v_s        (the window includes the current token)

Shapes: q `[B, H, T, D]`, k `[B, Hkv, T, D]`, v `[B, Hkv, T, V]` with H a multiple of Hkv (GQA: query head h
reads kv head h // (H / Hkv); Hkv = H works too). The chunked form works in blocks of w queries that see their
own block and the previous one: O(T·w) time and memory; the query heads of a group share one key block.
The decode state is a ring buffer of the last w keys/values per kv head, so it never grows with T.
Used by liger_attention (Liger Attention's SWA branch) and the hybrid operators of the library.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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


def swa_chunked(q, k, v, window: int, scale: float, state=None):
    """Blocked form, linear in T. `state` (from `swa_init_state`/earlier calls) holds the previous keys.

    Returns (o, state) where state = {"k": [B,H,w,D], "v": [B,H,w,V], "len": [] int64}: the last w keys and
    values (zeros where fewer than w were seen) and how many positions were seen in all.
    """
    B, H, T, D = q.shape
    Hk, V, W = k.shape[1], v.shape[-1], window
    G = _group(q, k)
    if state is None:
        state = swa_init_state(B, Hk, D, V, W, q.dtype, q.device)
    if T == 0:
        return q.new_zeros(B, H, 0, V), state
    prev_k, prev_v, seen = state["k"].to(k.dtype), state["v"].to(v.dtype), state["len"]
    pad = (-T) % W
    qp, kp, vp = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    N = (T + pad) // W
    # Keys a block can see: the previous block (for block 0: the cached last w keys) and its own.
    kb = kp.reshape(B, Hk, N, W, D)
    vb = vp.reshape(B, Hk, N, W, V)
    k_prev = torch.cat([prev_k.unsqueeze(2), kb[:, :, :-1]], dim=2)
    v_prev = torch.cat([prev_v.unsqueeze(2), vb[:, :, :-1]], dim=2)
    keys = torch.cat([k_prev, kb], dim=3).float()  # [B,Hk,N,2W,D]
    vals = torch.cat([v_prev, vb], dim=3).float()
    # The G query heads of a kv head become extra rows of one matmul against the shared key block.
    qg = qp.reshape(B, Hk, G, N, W, D).transpose(2, 3).reshape(B, Hk, N, G * W, D).float()
    scores = ((qg @ keys.transpose(-1, -2)) * scale).view(B, Hk, N, G, W, 2 * W)
    a = torch.arange(W, device=q.device)
    j = torch.arange(2 * W, device=q.device)
    dist = a[:, None] + W - j[None, :]  # query offset minus key offset, within a block pair
    allowed = (dist >= 0) & (dist < W)  # [W, 2W]
    # Cached keys before the start of the sequence (fewer than w seen) do not exist.
    key_pos = torch.arange(N, device=q.device)[:, None] * W + j[None, :] - W  # relative to this call's start
    exists = (key_pos + seen) >= 0  # [N, 2W]
    mask = (allowed[None] & exists[:, None, :])[:, None]  # [N, 1, W, 2W]
    scores = scores.masked_fill(~mask, float("-inf"))
    o = scores.softmax(-1).view(B, Hk, N, G * W, 2 * W) @ vals  # [B,Hk,N,G*W,V]
    o = o.view(B, Hk, N, G, W, V).transpose(2, 3).reshape(B, H, N * W, V)[:, :, :T].to(q.dtype)
    new_state = _swa_advance(state, k, v, W)
    return o, new_state


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
