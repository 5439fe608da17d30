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
    G = _groups(q, k)
    S = _zero_state(q, k, v, initial_state)
    if T == 0:
        return q.new_zeros(B, H, 0, V), S
    scalar = g is None or g.shape[-1] == 1
    C = max(1, min(chunk, T))
    if not scalar and C > sub_chunk:
        C -= C % sub_chunk  # sub-chunks must tile the chunk (and stay ≤ 16 long for the factorisation)
    c = C if scalar else min(sub_chunk, C)
    # Work through the sequence a segment of chunks at a time, carrying the state: the temporaries stay
    # small enough to live in cache (and to be reused by the allocator instead of page-faulted in afresh).
    per_chunk = B * H * C * max(K, V, 4 * C)
    seg = C * max(1, SEGMENT_ELEMENTS // per_chunk)
    outs = []
    for t0 in range(0, T, seg):
        piece = (x[:, :, t0:t0 + seg] for x in (q, k, v, g) if x is not None)
        o, S = _segment(*piece, *((None,) if g is None else ()), S, C, c, scale, value_gated, scalar)
        outs.append(o)
    return (torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]), S


# Elements per segment: about 4 MB of fp32 per temporary, chosen by measurement on CPU (see benchmarks/ops.py).
SEGMENT_ELEMENTS = 1 << 20


def _segment(q, k, v, g, S, C, c, scale, value_gated, scalar):
    """Chunked GLA over one segment (any length) starting from state S: (o in q.dtype, S)."""
    B, H, T, K = q.shape
    Hk, V = k.shape[1], v.shape[-1]
    G, n, pad = H // Hk, C // c, (-T) % C
    N = (T + pad) // C
    g = q.new_zeros(B, Hk, T, 1, dtype=torch.float32) if g is None else clamp_log_gate(g)
    # Padding at the end: zero keys add nothing to the state and zero log-gates do not decay it.
    dtype = q.dtype
    q, k, v, g = (F.pad(x.float(), (0, 0, 0, pad)) if pad else x.float() for x in (q, k, v, g))
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
    C = n * c
    bl = g.cumsum(-2)  # [B, Hk, N, n, c, X]: log-decay from the start of each sub-chunk, in [-80, 0]
    tot = bl[:, :, :, :, -1:]  # [B, Hk, N, n, 1, X]: log-decay over each whole sub-chunk
    r = tot.cumsum(3)  # r_j: log-decay from the chunk start to the end of sub-chunk j
    e_bl = bl.exp()
    # The gated operand (k, or v when value-gated), decayed to the start of its own sub-chunk (diagonal
    # blocks: factor exp(-bl) ≤ e^80) and to the end of its sub-chunk (everything else: factor ≤ 1).
    x = (k if not value_gated else v).reshape(B, Hk, N, n, c, -1)
    x_diag = x / e_bl
    x_end = x_diag * tot.exp()
    # exp(start_i - r_j) for j < i, start_i = r_{i-1}: carries sub-chunk j's end to sub-chunk i's start.
    starts = torch.cat([torch.zeros_like(r[:, :, :, :1]), r[:, :, :, :-1]], dim=3)  # [B, Hk, N, n, 1, X]
    carry = (starts.unsqueeze(4) - r.unsqueeze(3)).clamp(max=0.0).exp()  # [B, Hk, N, n(i), n(j), 1, X]
    e_start = starts.exp()
    rows = G * c

    intra = []
    for i in range(n):
        end = (i + 1) * c
        # Keys (or values) of sub-chunks 0..i as seen from the start of sub-chunk i.
        xi = x_diag[:, :, :, i] if i == 0 else torch.cat(
            [(x_end[:, :, :, :i] * carry[:, :, :, i, :i]).reshape(B, Hk, N, i * c, -1), x_diag[:, :, :, i]], dim=3)
        qi = qf[:, :, :, i].reshape(B, Hk, N, rows, K)
        col = torch.arange(end, device=qf.device)
        row = torch.arange(c, device=qf.device).repeat(G)
        hide = (col[None, :] - i * c) > row[:, None]  # causal mask of the diagonal block, [G·c, end]
        if not value_gated:
            q_hat = qi * e_bl[:, :, :, i].repeat(1, 1, 1, G, 1)  # q_t exp(b_t - start_i), ≤ 1
            A = (q_hat @ xi.transpose(-1, -2)).masked_fill(hide, 0.0)
            intra.append((A @ v[:, :, :, :end], q_hat * e_start[:, :, :, i]))
        else:
            A = (qi @ k[:, :, :, :end].transpose(-1, -2)).masked_fill(hide, 0.0)
            intra.append((A @ xi, qi))
    # State update: everything decayed to the chunk end.
    to_end = (r[:, :, :, -1:] - r).exp()  # [B, Hk, N, n, 1, X]
    ends = (x_end * to_end).reshape(B, Hk, N, C, -1)
    local = k.transpose(-1, -2) @ ends if value_gated else ends.transpose(-1, -2) @ v
    decay_chunk = r[:, :, :, -1, 0].exp()  # [B, Hk, N, X]

    def finish(S_in):
        outs = []
        for i, (o_intra, q_in) in enumerate(intra):
            if not value_gated:  # o_t += q_t exp(b_t) S_in
                outs.append(o_intra + q_in @ S_in)
            else:  # o_t = exp(b_t - start_i) ⊙ (intra + exp(start_i) ⊙ (q_t S_in))
                o = o_intra + (q_in @ S_in) * e_start[:, :, :, i]
                outs.append(o * e_bl[:, :, :, i].repeat(1, 1, 1, G, 1))
        o = torch.stack(outs, dim=3).reshape(B, Hk, N, n, G, c, -1)
        return o * scale if scale != 1.0 else o

    return finish, local, decay_chunk
