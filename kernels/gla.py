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
So nothing overflows for any gates ≥ LOG_GATE_MIN provided |k|·e^80 is finite, i.e. |k| < 6e3 (the
value-gated form references the sub-chunk end instead and has no such bound). Cumulative sums restart at every sub-chunk so the exponents that matter
most (same sub-chunk) are sums of ≤ 16 gates, not differences of long sums. Across chunks a short
sequential scan carries the state, and the sequence is processed a segment of chunks at a time so that
the temporaries stay cache-sized (SEGMENT_ELEMENTS). Scalar gates (`g` of size 1 on the last axis, or None)
take a cheaper path: the C×C decay matrix is formed directly with exponents ≤ 0.

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
    value_gated = value_gated and not scalar  # one gate per head: both forms are the same
    C = max(1, min(chunk, T))
    if not scalar and C > sub_chunk:
        C -= C % sub_chunk  # sub-chunks must tile the chunk (and stay ≤ 16 long for the factorisation)
    c = C if scalar else min(sub_chunk, C)
    # Work through the sequence a segment of chunks at a time, carrying the state: the temporaries stay
    # small enough to live in cache (and to be reused by the allocator instead of page-faulted in afresh).
    per_chunk = B * H * C * max(K, V)
    seg = C * max(1, SEGMENT_ELEMENTS // per_chunk)
    outs = []
    for t0 in range(0, T, seg):
        part = slice(t0, t0 + seg)
        o, S = _segment(q[:, :, part], k[:, :, part], v[:, :, part], None if g is None else g[:, :, part], S,
                        C, c, scale, value_gated, scalar)
        outs.append(o)
    return (torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]), S


# Elements of a q-sized temporary per segment (2 MB of fp32, cache-sized): the best of 2^16..2^26 measured with
# liger_gla at 16k tokens on one CPU thread (benchmarks/ops.py); whole-sequence temporaries were ~1.4× slower.
SEGMENT_ELEMENTS = 1 << 19


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
        parts = _intra_scalar(qf, k, v, g.reshape(B, Hk, N, C, 1), scale)
    else:
        parts = _intra_channel(qf, k, v, g.reshape(B, Hk, N, n, c, -1), scale, value_gated)
    intra, q_in, x_out, decay, post = parts  # [B,Hk,N,R,V], [B,Hk,N,R,K], [B,Hk,N,C,X], [B,Hk,N,X]

    # Across chunks: a sequential scan that reads the state each chunk starts from, then updates it with
    # what the chunk adds (all keys decayed to the chunk end). Per chunk these are a few [K, V]-sized ops.
    outs = []
    for j in range(N):
        if value_gated:  # S [K, V] gated on V: S ← S Diag(decay) + kᵀ x_out
            outs.append(q_in[:, :, j] @ S)
            S = _bmm_add(S * decay[:, :, j, None, :], k[:, :, j].transpose(-1, -2), x_out[:, :, j])
        else:  # S [K, V] gated on K: S ← Diag(decay) S + x_outᵀ v
            outs.append(_bmm_add(intra[:, :, j], q_in[:, :, j], S))
            S = _bmm_add(S * decay[:, :, j, :, None], x_out[:, :, j].transpose(-1, -2), v[:, :, j])
    if value_gated:
        o = post(intra, torch.stack(outs, dim=2))
        o = o.reshape(B, Hk, N, n, G, c, V).permute(0, 1, 4, 2, 3, 5, 6)
    else:
        # Stacked straight into [B, Hk, G, N, n, c, V]: the output layout, one copy.
        o = torch.stack([x.view(B, Hk, n, G, c, V).transpose(2, 3) for x in outs], dim=3)
    o = o.reshape(B, H, N * C, V)[:, :, :T]
    return o.to(dtype), S


def _bmm_add(base, a, b):
    """base + a @ b over `[B, Hk, ·, ·]` tensors, as one baddbmm (the sum is written once)."""
    return torch.baddbmm(base.flatten(0, 1), a.flatten(0, 1), b.flatten(0, 1)).view(base.shape)


def _intra_scalar(qf, k, v, g, scale):
    """One gate per head and position: the decay matrix is formed directly, no sub-chunks needed."""
    B, Hk, N, _, G, C, K = qf.shape
    b = g.cumsum(-2)  # [B, Hk, N, C, 1], log-decay from the chunk start, ≤ 0
    b_last = b[:, :, :, -1:]  # [B, Hk, N, 1, 1]
    tri = torch.ones(C, C, dtype=torch.bool, device=qf.device).tril()
    decay = (b - b.transpose(-1, -2)).masked_fill(~tri, float("-inf")).exp()  # exp(b_t - b_s), t ≥ s
    q_rows = qf.reshape(B, Hk, N, G * C, K)
    A = (q_rows @ k.transpose(-1, -2)) * (decay * scale).repeat(1, 1, 1, G, 1)  # [B, Hk, N, G·C, C]
    q_in = q_rows * (b.exp() * scale).repeat(1, 1, 1, G, 1)  # q_t · exp(b_t)
    x_out = k * (b_last - b).exp()  # keys decayed to the chunk end
    return A @ v, q_in, x_out, b_last[:, :, :, 0].exp(), None


def _intra_channel(qf, k, v, g, scale, value_gated):
    """Per-channel gates (on K, or on V when value_gated) with sub-chunk reference points.

    Key-gated rows of sub-chunk i: o_t = Σ_{s ≤ t, same chunk} (q_t e^{b_t - start_i}) · (k_s e^{start_i - b_s}) v_s
    (+ the state read q_t e^{b_t} S_in in the scan). Keys of earlier sub-chunks j reach start_i as
    k_s e^{r_j - b_s} (to the end of j, ≤ 1) times e^{start_i - r_j} (≤ 1); keys of sub-chunk i itself as
    k_s e^{-bl_s} (≤ e^80 |k|). Value-gated rows use the end r_i of their sub-chunk instead, so every value
    factor is ≤ 1 and only the output factor e^{b_t - r_i} = e^{bl_t - tot_i} is ≥ 1 (≤ e^80): it multiplies
    a sum whose product with it is the (finite) result, so no intermediate can overflow whatever q·k is.
    """
    B, Hk, N, n, G, c, K = qf.shape
    C, rows = n * c, G * c
    bl = g.cumsum(-2)  # [B, Hk, N, n, c, X]: log-decay from the start of each sub-chunk, in [-80, 0]
    tot = bl[:, :, :, :, -1:]  # [B, Hk, N, n, 1, X]: log-decay over each whole sub-chunk
    r = tot.cumsum(3)  # r_j: log-decay from the chunk start to the end of sub-chunk j
    x = (v if value_gated else k).reshape(B, Hk, N, n, c, -1)  # the operand whose channels carry the gates
    to_end = (tot - bl).exp()  # e^{r_j - b_s}: from position s to the end of its sub-chunk j, ≤ 1
    x_end = x * to_end
    # Reference of row block i: its start (key-gated) or its end (value-gated); carry[i, j] = e^{ref_i - r_j}.
    refs = torch.cat([torch.zeros_like(r[:, :, :, :1]), r[:, :, :, :-1]], dim=3) if not value_gated else r
    carry = (refs.unsqueeze(4) - r.unsqueeze(3)).clamp(max=0.0).exp()  # [B,Hk,N,n(i),n(j),1,X], j < i used
    e_ref = refs.exp()  # e^{ref_i}: the rest of the way from the chunk start
    if value_gated:
        q_hat = qf * scale if scale != 1.0 else qf
    else:
        e_bl = bl.exp()  # e^{b_t - start_i} ≤ 1
        x_diag = x / e_bl  # decayed back to the start of its sub-chunk (≤ e^80 · |x|)
        q_hat = qf * (e_bl * scale if scale != 1.0 else e_bl).unsqueeze(4)

    hide = torch.ones(c, c, dtype=torch.bool, device=qf.device).triu(1).repeat(G, 1)  # [G·c, c], s > t
    intra = []
    for i in range(n):
        qi = q_hat[:, :, :, i].reshape(B, Hk, N, rows, K)
        # Earlier sub-chunks, carried to the reference of sub-chunk i.
        y = (x_end[:, :, :, :i] * carry[:, :, :, i, :i]).reshape(B, Hk, N, i * c, -1) if i else None
        if not value_gated:
            A = (qi @ x_diag[:, :, :, i].transpose(-1, -2)).masked_fill_(hide, 0.0)
            if i:
                A = torch.cat([qi @ y.transpose(-1, -2), A], dim=-1)
            intra.append(A @ v[:, :, :, :(i + 1) * c])
        else:
            A = qi @ k[:, :, :, :(i + 1) * c].transpose(-1, -2)
            o = A[..., i * c:].masked_fill_(hide, 0.0) @ x_end[:, :, :, i]
            intra.append(o if not i else o + A[..., :i * c] @ y)
    intra = torch.stack(intra, dim=3).reshape(B, Hk, N, n * rows, -1)
    ends = (x_end * (r[:, :, :, -1:] - r).exp()).reshape(B, Hk, N, C, -1)  # decayed to the chunk end
    decay_chunk = r[:, :, :, -1, 0].exp()  # [B, Hk, N, X]
    if not value_gated:  # the state read q_t e^{b_t} S_in
        q_in = (q_hat * e_ref.unsqueeze(4)).reshape(B, Hk, N, n * rows, K)
        return intra, q_in, ends, decay_chunk, None

    def post(o_intra, o_state):
        """o_t = e^{bl_t - tot_i} ⊙ (intra + e^{r_i} ⊙ q_t S_in), rows [n, G, c]."""
        shape = (B, Hk, N, n, G, c, -1)
        o = o_intra.view(shape) + o_state.view(shape) * e_ref.unsqueeze(4)
        return o / to_end.unsqueeze(4)

    return intra, q_hat.reshape(B, Hk, N, n * rows, K), ends, decay_chunk, post
