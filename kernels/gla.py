"""Gated linear attention (GLA) with per-channel log-space gates: naive, chunked and step forms.

    S_t = Diag(exp(g_t)) S_{t-1} + k_t v_tᵀ          S: [K, V] per head, fp32
    o_t = scale · S_tᵀ q_t

Shapes: q, k, g `[B, H, T, K]`, v `[B, H, T, V]`, state `[B, H, K, V]`. `g` is the log of the forget gate
(≤ 0), clamped at LOG_GATE_MIN in every form. Gates are accumulated as cumulative sums of `g` in fp32;
every exponent in the chunked form is ≤ 0 except inside the 16-step diagonal blocks, where it is bounded by
16·|LOG_GATE_MIN| — so no overflow for any gate values ≥ LOG_GATE_MIN (the secondary-chunking scheme of Yang et al., "Gated Linear Attention Transformers with
Hardware-Efficient Training", 2023). A scalar gate per head is `g` broadcast over K.

Used by liger_gla / liger_attention / liger_hgrn2 and the gated operators of the library.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Per-step log-gates are clamped at this floor (a decay of at least e^-5 ≈ 0.0067 per step) in every form,
# so that the chunked form can factorise 16-step blocks without overflow: 16 · 5 = 80 < log(fp32 max) ≈ 88.
LOG_GATE_MIN = -5.0


def clamp_log_gate(g: torch.Tensor) -> torch.Tensor:
    return g.float().clamp(min=LOG_GATE_MIN)


def gla_naive(q, k, v, g, scale: float = 1.0, initial_state=None):
    """Token-by-token recurrence: the oracle. Returns (o [B,H,T,V] in q.dtype, final state fp32)."""
    B, H, T, K = q.shape
    V = v.shape[-1]
    S = q.new_zeros(B, H, K, V, dtype=torch.float32) if initial_state is None else initial_state.float()
    out = []
    for t in range(T):
        S = torch.exp(clamp_log_gate(g[:, :, t]))[..., None] * S + k[:, :, t].float()[..., None] * v[:, :, t].float()[..., None, :]
        out.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t].float(), S) * scale)
    o = torch.stack(out, dim=2) if out else q.new_zeros(B, H, 0, V, dtype=torch.float32)
    return o.to(q.dtype), S


def gla_step(q, k, v, g, state, scale: float = 1.0):
    """One position: q, k, g `[B, H, K]`, v `[B, H, V]`, state `[B, H, K, V]` fp32 -> (o [B,H,V], state)."""
    S = torch.exp(clamp_log_gate(g))[..., None] * state + k.float()[..., None] * v.float()[..., None, :]
    o = torch.einsum("bhk,bhkv->bhv", q.float(), S) * scale
    return o.to(q.dtype), S


def gla_chunked(q, k, v, g, scale: float = 1.0, chunk: int = 64, initial_state=None, sub_chunk: int = 16):
    """Chunk-parallel form, linear in T. Returns (o [B,H,T,V] in q.dtype, final state [B,H,K,V] fp32).

    Within a chunk of C positions (split into sub-chunks of c ≤ 16): diagonal c×c blocks factorised at
    the sub-chunk start, off-diagonal blocks through sub-chunk boundary references (exponents ≤ 0). Across chunks a
    short sequential scan carries the [K, V] state.
    """
    B, H, T, K = q.shape
    V = v.shape[-1]
    dtype = q.dtype
    if T == 0:
        S = q.new_zeros(B, H, K, V, dtype=torch.float32) if initial_state is None else initial_state.float()
        return q.new_zeros(B, H, 0, V), S
    C = max(1, min(chunk, T))
    if C > sub_chunk:
        C -= C % sub_chunk  # sub-chunks must tile the chunk (and stay ≤ 16 long for the factorisation)
    c = min(sub_chunk, C)
    n = C // c
    pad = (-T) % C
    q, k, v = (x.float() for x in (q, k, v))
    g = clamp_log_gate(g)
    if pad:
        # Padding at the end: zero keys add nothing to the state and zero log-gates do not decay it.
        q, k, v, g = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v, g))
    N = (T + pad) // C
    q, k, g = (x.reshape(B, H, N, n, c, K) for x in (q, k, g))
    v = v.reshape(B, H, N, C, V)

    b = g.reshape(B, H, N, C, K).cumsum(-2).reshape(B, H, N, n, c, K)  # log-decay from chunk start, ≤ 0
    b_start = b[..., :1, :] - g[..., :1, :]  # before each sub-chunk   [B,H,N,n,1,K]
    b_end = b[..., -1:, :]  # at the end of each sub-chunk             [B,H,N,n,1,K]

    # Diagonal sub-blocks, factorised at the sub-chunk start: exp(b_t - b_s) = exp(b_t - b_start) · exp(b_start - b_s).
    # The second factor is ≥ 1 but bounded by exp(c · |LOG_GATE_MIN|) = exp(80) < fp32 max, thanks to the clamp.
    q_hat = q * (b - b_start).exp()
    k_hat = k * (b_end - b).exp()
    tri = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    A_diag = (q_hat @ (k * (b_start - b).exp()).transpose(-1, -2)).masked_fill(~tri, 0.0)  # [B,H,N,n,c,c]

    # Off-diagonal sub-blocks (sub-chunk i after j), through the boundary between them:
    # exp(b_t - b_s) = exp(b_t - b_start_i) · exp(b_start_i - b_end_j) · exp(b_end_j - b_s), all ≤ 1.
    if n > 1:
        between = b_start[..., 0, :].unsqueeze(-2) - b_end[..., 0, :].unsqueeze(-3)  # [B,H,N,n(i),n(j),K]
        lower = torch.ones(n, n, dtype=torch.bool, device=q.device).tril(-1)
        decay = between.masked_fill(~lower[..., None], float("-inf")).exp()
        A = torch.einsum("bhnitk,bhnijk,bhnjsk->bhnitjs", q_hat, decay, k_hat)
        eye = torch.eye(n, dtype=A.dtype, device=q.device).view(n, 1, n, 1)
        A = (A + A_diag.unsqueeze(-2) * eye).reshape(B, H, N, C, C)
    else:
        A = A_diag.reshape(B, H, N, C, C)
    o = A @ v  # [B,H,N,C,V]

    # Across chunks: state entering chunk i is S_i; o_t += (q_t exp(b_t)) S_i.
    b_flat = b.reshape(B, H, N, C, K)
    b_last = b_flat[..., -1, :]  # [B,H,N,K]
    q_in = q.reshape(B, H, N, C, K) * b_flat.exp()
    k_out = k.reshape(B, H, N, C, K) * (b_last.unsqueeze(-2) - b_flat).exp()
    local = k_out.transpose(-1, -2) @ v  # what each chunk adds to the state   [B,H,N,K,V]
    decay_chunk = b_last.exp().unsqueeze(-1)  # [B,H,N,K,1]
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.float()
    states = []
    for i in range(N):
        states.append(S)
        S = decay_chunk[:, :, i] * S + local[:, :, i]
    o = o + q_in @ torch.stack(states, dim=2)
    o = o.reshape(B, H, N * C, V)[:, :, :T] * scale
    return o.to(dtype), S
