"""Gated linear attention (GLA) with log-space gates: naive, chunked and step forms, key- or value-gated.

Key-gated (GLA, the default everywhere):
    S_t = Diag(exp(g_t)) S_{t-1} + k_t v_tᵀ          S: [K, V] per head, fp32
    o_t = scale · S_tᵀ q_t                            g: [..., K] per channel, or [..., 1] one gate per head
Value-gated (`vgla_*`, the slot-addressing pass of gated slot attention):
    S_t = S_{t-1} Diag(exp(g_t)) + k_t v_tᵀ          g: [..., V]
    o_t = scale · S_tᵀ q_t,  i.e. o_t[m] = scale · Σ_{s≤t} (q_t·k_s) · exp(b_t[m] - b_s[m]) · v_s[m]

Shapes: q `[B, H, T, K]`; k, g `[B, Hk, T, ·]` and v `[B, Hk, T, V]` with H a multiple of Hk (GQA: query
head h reads kv head h // (H/Hk)); state `[B, Hk, K, V]` fp32: one per kv head, never repeated. `g` is the
log of the forget gate (≤ 0), clamped at LOG_GATE_MIN in every form; `g=None` means no decay (plain linear
attention). Gates are accumulated as cumulative sums of `g` in fp32.

Chunked form (per-channel gates): the secondary-chunking scheme of Yang et al., "Gated Linear Attention
Transformers with Hardware-Efficient Training", 2023. Within a chunk of C positions split into sub-chunks of
c ≤ 16, every decay exp(b_t - b_s) is factorised through a reference point r_i at the start of the query's
sub-chunk i: exp(b_t - r_i) ≤ 1 on the query side, exp(r_i - b_s) on the key side — ≤ 1 for keys of earlier
sub-chunks and ≤ exp(c·|LOG_GATE_MIN|) = e^80 < fp32 max for keys of the same sub-chunk (masked afterwards).
So nothing overflows for any gates ≥ LOG_GATE_MIN provided |k|·e^80 (key-gated) or |v|·e^80 (value-gated)
is finite, i.e. |k|, |v| < 6e3. Cumulative sums restart at every sub-chunk so the exponents that matter
most (same sub-chunk) are sums of ≤ 16 gates, not differences of long sums. Across chunks a short
sequential scan carries the state. Scalar gates (`g` of size 1 on the last axis, or None) take a cheaper
path: the C×C decay matrix is formed directly with exponents ≤ 0.

GQA: the query heads of a group are folded into the rows of every matmul ([G·c, K] @ [K, ·]), so keys,
values, gates and states are handled once per kv head — G times less work and memory on that side.

Used by liger_gla / liger_attention / liger_hgrn2 / liger_gsa / simple_decay / elu_linear and others.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Per-step log-gates are clamped at this floor (a decay of at least e^-5 ≈ 0.0067 per step) in every form,
# so that the chunked form can factorise 16-step blocks without overflow: 16 · 5 = 80 < log(fp32 max) ≈ 88.
LOG_GATE_MIN = -5.0


def clamp_log_gate(g: torch.Tensor) -> torch.Tensor:
    return g.float().clamp(min=LOG_GATE_MIN)


def _groups(q, k) -> int:
    H, Hk = q.shape[1], k.shape[1]
    if H % Hk:
        raise ValueError(f"{H} query heads cannot share {Hk} kv heads")
    return H // Hk


def _zero_state(q, k, v, initial_state):
    if initial_state is not None:
        return initial_state.float()
    return q.new_zeros(k.shape[0], k.shape[1], k.shape[-1], v.shape[-1], dtype=torch.float32)


# --------------------------------------------------------------------------------------------------
# Token-by-token forms: the oracles and the decode step.


def _naive(q, k, v, g, scale, initial_state, value_gated):
    B, H, T, K = q.shape
    G = _groups(q, k)
    S = _zero_state(q, k, v, initial_state)
    qg = q.float().reshape(B, k.shape[1], G, T, K)
    out = []
    for t in range(T):
        o, S = _step(qg[:, :, :, t], k[:, :, t], v[:, :, t], None if g is None else g[:, :, t], S, scale, value_gated)
        out.append(o)
    o = torch.stack(out, dim=3) if out else qg.new_zeros(B, k.shape[1], G, 0, v.shape[-1])
    return o.reshape(B, H, T, v.shape[-1]).to(q.dtype), S


def _step(qg, k, v, g, S, scale, value_gated):
    """qg `[B, Hk, G, K]` (query heads grouped by kv head) -> (o [B,Hk,G,V] fp32, S)."""
    if g is not None:
        a = torch.exp(clamp_log_gate(g))
        S = S * (a[..., None, :] if value_gated else a[..., None])
    S = S + k.float()[..., None] * v.float()[..., None, :]
    return torch.einsum("bhgk,bhkv->bhgv", qg, S) * scale, S


def gla_naive(q, k, v, g, scale: float = 1.0, initial_state=None):
    """Token-by-token recurrence: the oracle. Returns (o [B,H,T,V] in q.dtype, final state fp32)."""
    return _naive(q, k, v, g, scale, initial_state, value_gated=False)


def vgla_naive(q, k, v, g, scale: float = 1.0, initial_state=None):
    """Value-gated recurrence (gates on the V axis of the state): the oracle."""
    return _naive(q, k, v, g, scale, initial_state, value_gated=True)


def gla_step(q, k, v, g, state, scale: float = 1.0):
    """One position: q `[B, H, K]`, k, g `[B, Hk, K|1]`, v `[B, Hk, V]`, state `[B, Hk, K, V]` fp32."""
    B, H, K = q.shape
    o, S = _step(q.float().reshape(B, k.shape[1], -1, K), k, v, g, state.float(), scale, False)
    return o.reshape(B, H, -1).to(q.dtype), S


def vgla_step(q, k, v, g, state, scale: float = 1.0):
    """One position of the value-gated form: g `[B, Hk, V]`."""
    B, H, K = q.shape
    o, S = _step(q.float().reshape(B, k.shape[1], -1, K), k, v, g, state.float(), scale, True)
    return o.reshape(B, H, -1).to(q.dtype), S


# --------------------------------------------------------------------------------------------------
# Chunked forms.


def gla_chunked(q, k, v, g, scale: float = 1.0, chunk: int = 64, initial_state=None, sub_chunk: int = 16):
    """Chunk-parallel form, linear in T. Returns (o [B,H,T,V] in q.dtype, final state [B,Hk,K,V] fp32)."""
    return _chunked(q, k, v, g, scale, chunk, initial_state, sub_chunk, value_gated=False)


def vgla_chunked(q, k, v, g, scale: float = 1.0, chunk: int = 64, initial_state=None, sub_chunk: int = 16):
    """Chunk-parallel value-gated form. Returns (o [B,H,T,V] in q.dtype, final state [B,Hk,K,V] fp32)."""
    return _chunked(q, k, v, g, scale, chunk, initial_state, sub_chunk, value_gated=True)


def _chunked(q, k, v, g, scale, chunk, initial_state, sub_chunk, value_gated):
    B, H, T, K = q.shape
    Hk, V = k.shape[1], v.shape[-1]
    G, dtype = _groups(q, k), q.dtype
    S = _zero_state(q, k, v, initial_state)
    if T == 0:
        return q.new_zeros(B, H, 0, V), S
    scalar = g is None or g.shape[-1] == 1
    C = max(1, min(chunk, T))
    if not scalar and C > sub_chunk:
        C -= C % sub_chunk  # sub-chunks must tile the chunk (and stay ≤ 16 long for the factorisation)
    c = C if scalar else min(sub_chunk, C)
    n, pad = C // c, (-T) % C
    N = (T + pad) // C
    g = q.new_zeros(B, Hk, T, 1) if g is None else clamp_log_gate(g)
    # Padding at the end: zero keys add nothing to the state and zero log-gates do not decay it.
    q, k, v, g = (F.pad(x.float(), (0, 0, 0, pad)) for x in (q, k, v, g))
    # Queries as [B, Hk, N, n, G, c, K]: the G heads of a kv group become rows of the same matmuls.
    qf = q.reshape(B, Hk, G, N, n, c, K).permute(0, 1, 3, 4, 2, 5, 6).contiguous()
    k, v = k.reshape(B, Hk, N, C, K), v.reshape(B, Hk, N, C, V)
    if scalar:
        o, local, decay = _intra_scalar(qf, k, v, g.reshape(B, Hk, N, C, 1), scale)
    else:
        o, local, decay = _intra_channel(qf, k, v, g.reshape(B, Hk, N, n, c, -1), scale, value_gated)

    # Across chunks: a sequential scan of the [K, V] state, then each chunk reads the state it started from.
    states = []
    for i in range(N):
        states.append(S)
        S = (S * decay[:, :, i, None, :] if value_gated else S * decay[:, :, i, :, None]) + local[:, :, i]
    o = o(torch.stack(states, dim=2))  # [B, Hk, N, n, G, c, V]
    o = o.permute(0, 1, 4, 2, 3, 5, 6).reshape(B, H, N * C, V)[:, :, :T]
    return o.to(dtype), S


def _intra_scalar(qf, k, v, g, scale):
    """One gate per head and position: the decay matrix is formed directly, no sub-chunks needed."""
    B, Hk, N, _, G, C, K = qf.shape
    b = g.cumsum(-2)  # [B, Hk, N, C, 1], log-decay from the chunk start, ≤ 0
    b_last = b[:, :, :, -1:]  # [B, Hk, N, 1, 1]
    tri = torch.ones(C, C, dtype=torch.bool, device=qf.device).tril()
    decay = (b - b.transpose(-1, -2)).masked_fill(~tri, float("-inf")).exp()  # exp(b_t - b_s), t ≥ s
    q_rows = qf.reshape(B, Hk, N, G * C, K)
    A = (q_rows @ k.transpose(-1, -2)) * (decay * scale).repeat(1, 1, 1, G, 1)  # [B, Hk, N, G·C, C]
    o_intra = A @ v
    q_in = q_rows * (b.exp() * scale).repeat(1, 1, 1, G, 1)  # q_t · exp(b_t)
    local = (k * (b_last - b).exp()).transpose(-1, -2) @ v  # what each chunk adds to the state
    decay_chunk = b_last[:, :, :, 0].exp()  # [B, Hk, N, 1], broadcast over the state

    def finish(S_in):
        return (o_intra + q_in @ S_in).reshape(B, Hk, N, 1, G, C, -1)

    return finish, local, decay_chunk


def _intra_channel(qf, k, v, g, scale, value_gated):
    """Per-channel gates (on K, or on V when value_gated) with sub-chunk reference points."""
    B, Hk, N, n, G, c, K = qf.shape
    C, V = n * c, v.shape[-1]
    bl = g.cumsum(-2)  # [B, Hk, N, n, c, X]: log-decay from the start of each sub-chunk (≤ 0, ≥ -80)
    tot = bl[:, :, :, :, -1]  # [B, Hk, N, n, X]: log-decay over each whole sub-chunk
    r = tot.cumsum(-2)  # r[j] = log-decay from the chunk start to the end of sub-chunk j
    # Reference points: the start of each sub-chunk (r_i = r[i-1], r_0 = 0), then the chunk end.
    refs = torch.cat([torch.zeros_like(r[:, :, :, :1]), r], dim=3)  # [B, Hk, N, n+1, X]
    starts = refs[:, :, :, :n]
    e_bl = bl.exp()
    gated = k if not value_gated else v  # the operand whose channels carry the gates
    items = gated.reshape(B, Hk, N, n, c, -1)

    def to_ref(i, upto):
        """Sub-chunks [0, upto) decayed to reference i: x_s · exp(refs_i - starts_j - bl_s)."""
        e = (refs[:, :, :, i, None, None] - starts[:, :, :, :upto, None]) - bl[:, :, :, :upto]
        return (items[:, :, :, :upto] * e.exp()).reshape(B, Hk, N, upto * c, -1)

    rows = G * c
    o_parts = []
    for i in range(n):
        end = (i + 1) * c
        qi = qf[:, :, :, i].reshape(B, Hk, N, rows, K)
        # Causal mask of the diagonal sub-block (columns of earlier sub-chunks are all visible).
        col = torch.arange(end, device=qf.device)
        row = torch.arange(c, device=qf.device).repeat(G)
        hide = (col[None, :] - i * c) > row[:, None]  # [G·c, end]
        if not value_gated:
            eq = (e_bl[:, :, :, i] * scale).repeat(1, 1, 1, G, 1)  # q_t exp(b_t - r_i), ≤ 1
            A = ((qi * eq) @ to_ref(i, i + 1).transpose(-1, -2)).masked_fill(hide, 0.0)
            o_parts.append((A @ v[:, :, :, :end], qi * eq * starts[:, :, :, i, None].exp(), None))
        else:
            A = ((qi * scale) @ k[:, :, :, :end].transpose(-1, -2)).masked_fill(hide, 0.0)
            eo = e_bl[:, :, :, i].repeat(1, 1, 1, G, 1)  # exp(b_t - r_i) on the output channels
            o_parts.append((A @ to_ref(i, i + 1), qi * scale, eo))
    # State update: everything decayed to the chunk end (reference n).
    ends = to_ref(n, n)  # [B, Hk, N, C, X]
    local = k.transpose(-1, -2) @ ends if value_gated else ends.transpose(-1, -2) @ v
    decay_chunk = refs[:, :, :, n].exp()  # [B, Hk, N, X]

    def finish(S_in):
        outs = []
        for i, (intra, q_in, eo) in enumerate(o_parts):
            if eo is None:  # key-gated: q_t exp(b_t) S_in
                outs.append(intra + q_in @ S_in)
            else:  # value-gated: exp(b_t) ⊙ (q_t S_in), with exp(b_t) = exp(bl_t) exp(r_i)
                outs.append(eo * (intra + (q_in @ S_in) * starts[:, :, :, i, None].exp()))
        return torch.stack(outs, dim=3).reshape(B, Hk, N, n, G, c, -1)

    return finish, local, decay_chunk
