"""Triton kernels of Liger Attention: the prologue of its chunked form, and a one-launch forward.

The prologue (`liger_prologue`, `liger_prologue_bwd`): the softmax feature maps φ(q_pre), φ(k_pre) and the
clamped log gates max(logsigmoid(k_pre) / gate_normalizer, -5), one program per 2048 elements of rows, one read
of each input; and the gradients back through them (φ and the gates recomputed in fp32). The default forward of
`lincompile::liger_attention` (`fused.LIGER_FORWARD = "chunked"`) feeds them to chunk_gla's kernels.

The one-launch forward (`liger_attention_fwd`, LIGER_FORWARD "one_launch"), below:

    o_t = a · SWA_W(q, k, v)_t + b · GLA(φ(q_pre), φ(k_pre), v, g)_t

in ONE launch that reads q, k, v, q_pre, k_pre once. The reference is `liger_attention.LigerAttention`
(`naive` / `chunked`); the maths per query head h (kv head h // G, G = H // Hk):

    GLA (no RoPE, scale 1):  φ(x) = softmax of x over the head dim;  g_t = max(logsigmoid(k_pre_t) / gate_normalizer, -5)
                             S_t = Diag(exp(g_t)) S_{t-1} + φ(k_pre_t) v_tᵀ   (S [D, Dv] fp32 per kv head),  gla_t = S_tᵀ φ(q_pre_t)
    SWA (RoPE'd q, k):       softmax of scale · q_t·k_p over P_t - W < p ≤ P_t, p ≥ 0 (P_t = seen + t); keys with
                             p < seen come from the ring buffer prev_k/prev_v [B, Hk, W, ·], slot i = position seen - W + i.

Kernel structure
----------------
One program per (batch, kv head, block of BV value channels): grid (B·Hk, cdiv(Dv, BV)). It walks the sequence in
blocks of BLOCK = 16 positions, sequentially, and keeps in registers:
  * the GLA state S [BK, BV] fp32 (initial_state or 0), stored once at the end as the final state;
  * the RoPE'd keys/values of the previous NH = cdiv(W - 1, 16) ≤ 4 blocks (the SWA history), rotated every block —
    before the first block they are filled from the ring buffer, so the ring, k and v are each read once.
For each block: load k_pre → φ(k) (softmax prologue) and the log gates (logsigmoid, normaliser, clamp) in-kernel, and
the block's k and v; then for each of the G query heads of the group: load q_pre → φ(q) and q, compute
  GLA:  inter-block (φ(q_t) ⊙ e^{b_t}) S_in  +  intra-block Σ_{s≤t} [(φ(q_t) ⊙ e^{b_t}) · (φ(k_s) ⊙ e^{-b_s})] v_s
  SWA:  scores against the block's own keys and the NH history blocks (masked by window / causality / existence),
        a max over all of them, then exp (all exponents ≤ 0), row sums and P·V — an exact two-pass softmax within
        registers (every row sees at least its own key, so the max is finite);
and store a · swa + b · gla in q.dtype. Then S ← Diag(e^{b_end}) S + (φ(k) ⊙ e^{b_end - b})ᵀ v and rotate the history.
The dots have M, N, K ≥ 16 (head dims are padded to powers of two ≥ 16, masked).

Numerical scheme (per-channel gates)
------------------------------------
b_t is the cumulative log gate *from the start of the 16-position block* (a cumsum over ≤ 16 gates, each ≥ -5, so
b_t ∈ [-80, 0]; cumulative sums restart every block, never differences of long sums). Every exponential:
  e^{b_t} ≤ 1 (query side, and the inter-block state read), e^{b_end - b_s} ≤ 1 (keys decayed to the block end),
  e^{b_end} ≤ 1 (state decay), e^{-b_s} ≤ e^{80} ≈ 5.5e34 (the intra-block key factor: φ(k) ≤ 1 so the product
  is finite; the pairs s > t that it makes large are masked to 0 after the dot, and Σ_d ≤ 128·e^{80} < fp32 max).
The intra-block terms are sums of positive products (softmax features), so there is no cancellation. The SWA part
exponentiates score - row max ≤ 0 only.

Precision: φ(q), φ(k), the gates, the state and every accumulation are fp32 (the PyTorch forms round φ to the
input dtype; the kernel does not, so with bf16 inputs it is if anything closer to the fp32 maths). Every tl.dot
takes fp32 operands (half-precision tiles are upcast, exactly), with input_precision="ieee" for fp32 inputs and
"tf32" for fp16/bf16 inputs: tf32 holds fp16/bf16 values exactly, and the GLA factor e^{80} does not fit fp16.
(Upcasting also sidesteps the Triton interpreter's bf16 tl.dot, which multiplies the raw uint16 bit patterns.)

Backward is not provided here (callers differentiate by recomputation with other kernels). Runs on CUDA tensors, or
on CPU tensors under TRITON_INTERPRET=1 (the tests).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .gla import LOG_GATE_MIN

# Tests set this: the wrapper fills its outputs with NaN before the launch, so an element the kernel fails to
# write shows up as NaN instead of as a plausible stale value.
POISON = False

BLOCK = 16  # positions per step of the sequential walk (and the sub-chunk of the gate factorisation)
MAX_WINDOW = 64  # the SWA history is at most 4 blocks of 16
MAX_HEAD_DIM = 128
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Launch overrides (None: the built-in heuristic), for benchmarking: value channels per program, warps per program.
BLOCK_V: int | None = None
NUM_WARPS: int | None = None


@triton.jit
def _feature(x, col_ok):
    """Row softmax over the (masked) head dim of an fp32 tile."""
    x = tl.where(col_ok, x, float("-inf"))
    m = tl.max(x, axis=1)
    e = tl.exp(x - m[:, None])
    return e / tl.sum(e, axis=1)[:, None]


@triton.jit
def _ring_tile(base, stride_t, j: tl.constexpr, W, seen, rows, cols, col_ok, dtype: tl.constexpr,
               BLOCK: tl.constexpr, BC: tl.constexpr, NR: tl.constexpr):
    """History block j (positions -16j .. -16j+15 relative to this call) from the ring (if j ≤ NR), in `dtype`."""
    if j <= NR:
        p = rows - BLOCK * j  # relative position; slot W + p holds it (if it ever existed)
        slot = W + p
        ok = (slot >= 0) & (p + seen >= 0)
        tile = tl.load(base + slot[:, None] * stride_t + cols[None, :], mask=ok[:, None] & col_ok[None, :],
                       other=0.0).to(dtype)
    else:
        tile = tl.zeros([BLOCK, BC], dtype=dtype)
    return tile


@triton.jit
def _swa_scores(qc, kj, j: tl.constexpr, t0, rows, W, seen, scale, PREC: tl.constexpr, BLOCK: tl.constexpr):
    """Masked scores of the block's queries against history block j (j = 0: the block itself)."""
    s = tl.dot(qc, tl.trans(kj.to(tl.float32)), input_precision=PREC) * scale
    dist = rows[:, None] - rows[None, :] + BLOCK * j  # query position minus key position
    ok = (dist >= 0) & (dist < W)
    if j > 0:
        ok = ok & ((t0 - BLOCK * j + rows[None, :] + seen) >= 0)  # positions before the first token never existed
    return tl.where(ok, s, float("-inf"))


@triton.jit
def _liger_fwd_kernel(
    q_ptr, k_ptr, v_ptr, qp_ptr, kp_ptr, o_ptr, s0_ptr, sT_ptr, rk_ptr, rv_ptr, seen_ptr,
    T, HK, G, D, DV, W,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sqpb, sqph, sqpt, skpb, skph, skpt,
    srkb, srkh, srkt, srvb, srvh, srvt,
    scale, mix_a, mix_b, gate_norm,
    BK: tl.constexpr, BV: tl.constexpr, NH: tl.constexpr, NR: tl.constexpr, HAS_S0: tl.constexpr,
    HAS_RING: tl.constexpr,
    PREC: tl.constexpr, LOG_GATE_MIN: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    iv = tl.program_id(1)
    bb = (pid // HK).to(tl.int64)
    hk = (pid % HK).to(tl.int64)
    rows = tl.arange(0, BLOCK)
    dk = tl.arange(0, BK)
    dv = iv * BV + tl.arange(0, BV)
    k_ok = dk < D
    v_ok = dv < DV
    kv_dt = k_ptr.dtype.element_ty
    vv_dt = v_ptr.dtype.element_ty

    k_base = k_ptr + bb * skb + hk * skh
    v_base = v_ptr + bb * svb + hk * svh
    kp_base = kp_ptr + bb * skpb + hk * skph
    s_off = (bb * HK + hk) * D * DV + dk[:, None] * DV + dv[None, :]
    s_mask = k_ok[:, None] & v_ok[None, :]

    if HAS_S0:
        S = tl.load(s0_ptr + s_off, mask=s_mask, other=0.0).to(tl.float32)
    else:
        S = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_RING:
        seen = tl.load(seen_ptr).to(tl.int64)
    else:
        seen = 0  # nothing seen before this call

    # SWA history: keys / values of the previous NH blocks (j = 1 is the most recent), initially from the ring.
    rk_base = rk_ptr + bb * srkb + hk * srkh
    rv_base = rv_ptr + bb * srvb + hk * srvh
    k1 = _ring_tile(rk_base, srkt, 1, W, seen, rows, dk, k_ok, kv_dt, BLOCK, BK, NR)
    v1 = _ring_tile(rv_base, srvt, 1, W, seen, rows, dv, v_ok, vv_dt, BLOCK, BV, NR)
    k2 = _ring_tile(rk_base, srkt, 2, W, seen, rows, dk, k_ok, kv_dt, BLOCK, BK, NR)
    v2 = _ring_tile(rv_base, srvt, 2, W, seen, rows, dv, v_ok, vv_dt, BLOCK, BV, NR)
    k3 = _ring_tile(rk_base, srkt, 3, W, seen, rows, dk, k_ok, kv_dt, BLOCK, BK, NR)
    v3 = _ring_tile(rv_base, srvt, 3, W, seen, rows, dv, v_ok, vv_dt, BLOCK, BV, NR)
    k4 = _ring_tile(rk_base, srkt, 4, W, seen, rows, dk, k_ok, kv_dt, BLOCK, BK, NR)
    v4 = _ring_tile(rv_base, srvt, 4, W, seen, rows, dv, v_ok, vv_dt, BLOCK, BV, NR)

    causal = rows[:, None] >= rows[None, :]
    last = rows[:, None] == BLOCK - 1
    for ib in range(0, tl.cdiv(T, BLOCK)):
        t0 = ib * BLOCK
        pos = t0 + rows
        row_ok = pos < T
        km = row_ok[:, None] & k_ok[None, :]
        vm = row_ok[:, None] & v_ok[None, :]
        # ---- key side, once per kv head: φ(k_pre), log gates, RoPE'd k, v
        kpre = tl.load(kp_base + pos[:, None] * skpt + dk[None, :], mask=km, other=0.0)
        kpf = kpre.to(tl.float32)
        khat = _feature(kpf, k_ok[None, :])  # φ stays fp32 (the PyTorch forms round it to the input dtype)
        khat = tl.where(row_ok[:, None], khat, 0.0)
        ex = tl.exp(-tl.abs(kpf))
        log1p = tl.where(ex < 1e-4, ex - 0.5 * ex * ex, tl.log(1.0 + ex))
        g = tl.maximum((tl.minimum(kpf, 0.0) - log1p) / gate_norm, LOG_GATE_MIN)
        g = tl.where(km, g, 0.0)  # padding rows/channels: no decay
        bcum = tl.cumsum(g, axis=0)  # log decay from the block start, in [-80, 0]
        bend = tl.sum(tl.where(last, bcum, 0.0), axis=0)  # [BK]: over the whole block
        e_b = tl.exp(bcum)  # ≤ 1
        k_in = khat / e_b  # φ(k_s) e^{-b_s} ≤ e^80 (intra-block key factor)
        kc = tl.load(k_base + pos[:, None] * skt + dk[None, :], mask=km, other=0.0)
        vc = tl.load(v_base + pos[:, None] * svt + dv[None, :], mask=vm, other=0.0)
        vf = vc.to(tl.float32)

        for gi in range(0, G):
            h = hk * G + gi
            # ---- GLA
            qpre = tl.load(qp_ptr + bb * sqpb + h * sqph + pos[:, None] * sqpt + dk[None, :], mask=km, other=0.0)
            qhat = _feature(qpre.to(tl.float32), k_ok[None, :])
            qd = qhat * e_b  # φ(q_t) e^{b_t} ≤ 1
            gla = tl.dot(qd, S, input_precision=PREC)
            A = tl.dot(qd, tl.trans(k_in), input_precision=PREC)
            A = tl.where(causal, A, 0.0)
            gla += tl.dot(A, vf, input_precision=PREC)
            # ---- SWA: two-pass softmax over the block itself and the NH history blocks
            qc = tl.load(q_ptr + bb * sqb + h * sqh + pos[:, None] * sqt + dk[None, :], mask=km, other=0.0)
            qc = qc.to(tl.float32)
            s0 = _swa_scores(qc, kc, 0, t0, rows, W, seen, scale, PREC, BLOCK)
            m = tl.max(s0, axis=1)
            if NH >= 1:
                s1 = _swa_scores(qc, k1, 1, t0, rows, W, seen, scale, PREC, BLOCK)
                m = tl.maximum(m, tl.max(s1, axis=1))
            if NH >= 2:
                s2 = _swa_scores(qc, k2, 2, t0, rows, W, seen, scale, PREC, BLOCK)
                m = tl.maximum(m, tl.max(s2, axis=1))
            if NH >= 3:
                s3 = _swa_scores(qc, k3, 3, t0, rows, W, seen, scale, PREC, BLOCK)
                m = tl.maximum(m, tl.max(s3, axis=1))
            if NH >= 4:
                s4 = _swa_scores(qc, k4, 4, t0, rows, W, seen, scale, PREC, BLOCK)
                m = tl.maximum(m, tl.max(s4, axis=1))
            p = tl.exp(s0 - m[:, None])
            l = tl.sum(p, axis=1)
            acc = tl.dot(p, vf, input_precision=PREC)
            if NH >= 1:
                p = tl.exp(s1 - m[:, None])
                l += tl.sum(p, axis=1)
                acc += tl.dot(p, v1.to(tl.float32), input_precision=PREC)
            if NH >= 2:
                p = tl.exp(s2 - m[:, None])
                l += tl.sum(p, axis=1)
                acc += tl.dot(p, v2.to(tl.float32), input_precision=PREC)
            if NH >= 3:
                p = tl.exp(s3 - m[:, None])
                l += tl.sum(p, axis=1)
                acc += tl.dot(p, v3.to(tl.float32), input_precision=PREC)
            if NH >= 4:
                p = tl.exp(s4 - m[:, None])
                l += tl.sum(p, axis=1)
                acc += tl.dot(p, v4.to(tl.float32), input_precision=PREC)
            o = mix_a * (acc / l[:, None]) + mix_b * gla
            o_off = ((bb * HK * G + h) * T + pos[:, None]) * DV + dv[None, :]
            tl.store(o_ptr + o_off, o.to(o_ptr.dtype.element_ty), mask=vm)

        # ---- state update: S ← Diag(e^{b_end}) S + (φ(k) ⊙ e^{b_end - b})ᵀ v   (all factors ≤ 1)
        k_end = khat * tl.exp(bend[None, :] - bcum)
        S = S * tl.exp(bend)[:, None] + tl.dot(tl.trans(k_end), vf, input_precision=PREC)
        # ---- rotate the SWA history
        if NH >= 4:
            k4 = k3
            v4 = v3
        if NH >= 3:
            k3 = k2
            v3 = v2
        if NH >= 2:
            k2 = k1
            v2 = v1
        if NH >= 1:
            k1 = kc
            v1 = vc

    tl.store(sT_ptr + s_off, S, mask=s_mask)


@triton.jit
def _rows_tile(x_ptr, T, NH, D, sb, sh, st, BR: tl.constexpr, BD: tl.constexpr):
    """The prologue kernels' tile: BR rows of one (batch, head) of a strided x [B, NH, T, D] in fp32 (0 past T
    and D), their offsets in a contiguous [B, NH, T, D], the tile's mask and the head-dim mask."""
    pid_t, bh = tl.program_id(0), tl.program_id(1)
    rows = pid_t * BR + tl.arange(0, BR)
    cols = tl.arange(0, BD)
    col_ok = (cols < D)[None, :]
    ok = (rows < T)[:, None] & col_ok
    base = x_ptr + (bh // NH).to(tl.int64) * sb + (bh % NH).to(tl.int64) * sh
    x = tl.load(base + rows[:, None].to(tl.int64) * st + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    return x, (bh.to(tl.int64) * T + rows[:, None]) * D + cols[None, :], ok, col_ok


@triton.jit
def _prologue_kernel(x_ptr, phi_ptr, g_ptr, T, NH, D, sb, sh, st, inv_gn, LOG_GATE_MIN: tl.constexpr,
                     BR: tl.constexpr, BD: tl.constexpr, GATE: tl.constexpr):
    """φ(x) = softmax of x over the head dim, in x's dtype, for BR rows of one (batch, head); with GATE also
    g = max(logsigmoid(x) / gate_normalizer, LOG_GATE_MIN) in fp32. Outputs are contiguous [B, NH, T, D]."""
    x, out, ok, col_ok = _rows_tile(x_ptr, T, NH, D, sb, sh, st, BR, BD)
    tl.store(phi_ptr + out, _feature(x, col_ok).to(phi_ptr.dtype.element_ty), mask=ok)
    if GATE:
        tl.store(g_ptr + out, tl.maximum(_logsigmoid(x) * inv_gn, LOG_GATE_MIN), mask=ok)


@triton.jit
def _logsigmoid(x):
    """logsigmoid(x) = min(x, 0) - log1p(e^{-|x|}); log1p(u) = log(w)·u / (w - 1) with w = 1 + u (u itself
    where w rounds to 1), so gates near 0 keep their relative precision."""
    u = tl.exp(-tl.abs(x))
    w = 1.0 + u
    exact = w == 1.0
    return tl.minimum(x, 0.0) - tl.where(exact, u, tl.log(w) * (u / tl.where(exact, 1.0, w - 1.0)))


@triton.jit
def _prologue_bwd_kernel(x_ptr, dphi_ptr, dg_ptr, dx_ptr, T, NH, D, sb, sh, st, inv_gn,
                         LOG_GATE_MIN: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr, GATE: tl.constexpr):
    """dx = φ ⊙ (dφ - Σ_d φ ⊙ dφ) for φ = softmax(x) (recomputed in fp32); with GATE plus the gate's
    dg ⊙ [logsigmoid(x)/gn ≥ LOG_GATE_MIN] ⊙ sigmoid(-x) / gn. dφ, dg, dx contiguous [B, NH, T, D]."""
    x, out, ok, col_ok = _rows_tile(x_ptr, T, NH, D, sb, sh, st, BR, BD)
    phi = _feature(x, col_ok)
    dphi = tl.load(dphi_ptr + out, mask=ok, other=0.0).to(tl.float32)
    dx = phi * (dphi - tl.sum(phi * dphi, axis=1)[:, None])
    if GATE:
        dg = tl.load(dg_ptr + out, mask=ok, other=0.0).to(tl.float32)
        live = _logsigmoid(x) * inv_gn >= LOG_GATE_MIN  # the clamp passes no gradient below its floor
        e = tl.exp(-tl.abs(x))
        sig_neg = tl.where(x >= 0, e / (1.0 + e), 1.0 / (1.0 + e))  # sigmoid(-x) without overflow
        dx += tl.where(live, dg * sig_neg * inv_gn, 0.0)
    tl.store(dx_ptr + out, dx.to(dx_ptr.dtype.element_ty), mask=ok)


MAX_PROLOGUE_DIM = 256


def prologue_supported(q_pre, k_pre) -> str | None:
    """None when `liger_prologue` runs these inputs, else a one-line reason."""
    for name, x in (("q_pre", q_pre), ("k_pre", k_pre)):
        if x.dim() != 4:
            return f"{name} must be 4-D [B, H, T, D]"
        if x.dtype not in _DTYPES:
            return f"{name} dtype {x.dtype}: need fp16/bf16/fp32"
        if not 1 <= x.shape[-1] <= MAX_PROLOGUE_DIM:
            return f"{name} head dim {x.shape[-1]} outside 1..{MAX_PROLOGUE_DIM}"
        if x.device.type != "cuda" and not _interpreting():
            return f"{x.device.type} tensors need TRITON_INTERPRET=1"
    return None


def liger_prologue(q_pre, k_pre, gate_normalizer: float):
    """(φ(q_pre), φ(k_pre), g): the softmax feature maps in the inputs' dtype and the clamped log gates
    logsigmoid(k_pre) / gate_normalizer (fp32), all contiguous, in one read of each input: what the chunked
    forward of `lincompile::liger_attention` feeds chunk_gla (`fused._liger_inputs` is the PyTorch form)."""
    reason = prologue_supported(q_pre, k_pre)
    if reason is not None:
        raise ValueError(f"liger_prologue: {reason}")
    if gate_normalizer <= 0:
        raise ValueError("gate_normalizer must be positive")
    phis = [torch.empty(x.shape, device=x.device, dtype=x.dtype) for x in (q_pre, k_pre)]
    g = torch.empty(k_pre.shape, device=k_pre.device, dtype=torch.float32)
    if POISON:
        for out in (*phis, g):
            out.fill_(float("nan"))
    for x, phi, gate in ((q_pre, phis[0], False), (k_pre, phis[1], True)):
        if x.numel() == 0:
            continue
        x = _last_dim_contiguous(x)
        grid, BR, BD = _rows_launch(x)
        _prologue_kernel[grid](x, phi, g, x.shape[2], x.shape[1], x.shape[3], x.stride(0), x.stride(1),
                               x.stride(2), 1.0 / float(gate_normalizer), LOG_GATE_MIN=LOG_GATE_MIN, BR=BR, BD=BD,
                               GATE=gate)
    return phis[0], phis[1], g


def _rows_launch(x):
    """(grid, BR, BD) of the prologue kernels for x [B, NH, T, D]: BR rows per program, 2048 elements (at
    4 warps and head_dim 128 on sm_90, 4096 made the backward with gates spill; 2048: 177 registers, none)."""
    B, NH, T, D = x.shape
    BD = max(16, triton.next_power_of_2(D))
    BR = max(1, min(64, 2048 // BD))
    return (triton.cdiv(T, BR), B * NH), BR, BD


def liger_prologue_bwd(q_pre, k_pre, dphi_q, dphi_k, dg, gate_normalizer: float):
    """(dq_pre, dk_pre) in the inputs' dtypes: the gradients through `liger_prologue` of dφ(q_pre), dφ(k_pre)
    and dg (fp32 or None: no gate gradient), with φ and the gates recomputed in fp32, one read of each."""
    reason = prologue_supported(q_pre, k_pre)
    if reason is not None:
        raise ValueError(f"liger_prologue_bwd: {reason}")
    if gate_normalizer <= 0:
        raise ValueError("gate_normalizer must be positive")
    if dphi_q.shape != q_pre.shape or dphi_k.shape != k_pre.shape or (dg is not None and dg.shape != k_pre.shape):
        raise ValueError(f"liger_prologue_bwd: gradient shapes {tuple(dphi_q.shape)} / {tuple(dphi_k.shape)} / "
                         f"{None if dg is None else tuple(dg.shape)} do not match q_pre / k_pre")
    dxs = [torch.empty(x.shape, device=x.device, dtype=x.dtype) for x in (q_pre, k_pre)]
    if POISON:
        for out in dxs:
            out.fill_(float("nan"))
    for x, dphi, dx, gate in ((q_pre, dphi_q, dxs[0], False), (k_pre, dphi_k, dxs[1], dg is not None)):
        if x.numel() == 0:
            continue
        x = _last_dim_contiguous(x)
        grid, BR, BD = _rows_launch(x)
        _prologue_bwd_kernel[grid](x, dphi.contiguous(), dg.contiguous() if gate else dphi, dx, x.shape[2],
                                   x.shape[1], x.shape[3], x.stride(0), x.stride(1), x.stride(2),
                                   1.0 / float(gate_normalizer), LOG_GATE_MIN=LOG_GATE_MIN, BR=BR, BD=BD,
                                   GATE=gate)
    return dxs[0], dxs[1]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def supported(q, k, v, window) -> str | None:
    """None when the fused kernel handles these inputs, else a one-line reason."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return "q, k, v must be 4-D [B, H, T, D]"
    B, H, T, D = q.shape
    if k.shape[0] != B or v.shape[0] != B or k.shape[2] != T or v.shape[2] != T or k.shape[1] != v.shape[1]:
        return f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    if k.shape[3] != D:
        return f"q and k head dims differ ({D} vs {k.shape[3]})"
    if k.shape[1] == 0 or H % k.shape[1]:
        return f"{H} query heads cannot share {k.shape[1]} kv heads"
    if not 1 <= int(window) <= MAX_WINDOW:
        return f"window {window} outside 1..{MAX_WINDOW}"
    if D > MAX_HEAD_DIM or v.shape[3] > MAX_HEAD_DIM or D < 1 or v.shape[3] < 1:
        return f"head dims {D}/{v.shape[3]} outside 1..{MAX_HEAD_DIM}"
    if q.dtype not in _DTYPES or q.dtype != k.dtype or q.dtype != v.dtype:
        return f"dtypes {q.dtype}/{k.dtype}/{v.dtype}: need one of fp16/bf16/fp32 for all three"
    if not (q.device == k.device == v.device):
        return "q, k, v on different devices"
    if q.device.type != "cuda" and not _interpreting():
        return f"{q.device.type} tensors need TRITON_INTERPRET=1"
    return None


def _last_dim_contiguous(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def liger_attention_fwd(q, k, v, q_pre, k_pre, *, window: int, a: float, b: float, scale: float,
                        gate_normalizer: float, initial_state=None, prev_k=None, prev_v=None, seen=None):
    """(o [B,H,T,Dv] in q.dtype, final GLA state [B,Hk,D,Dv] fp32). The ring buffer update is left to the caller.

    q, q_pre `[B, H, T, D]`; k, k_pre `[B, Hk, T, D]`; v `[B, Hk, T, Dv]`; initial_state `[B, Hk, D, Dv]` or None;
    prev_k / prev_v `[B, Hk, window, ·]` ring buffers (slot i = absolute position seen - window + i) with `seen` a
    0-dim int64 tensor (read on the device), or all three None for a fresh sequence.
    """
    reason = supported(q, k, v, window)
    if reason is not None:
        raise ValueError(f"liger_attention_fwd: {reason}")
    B, H, T, D = q.shape
    Hk, Dv = k.shape[1], v.shape[3]
    if q_pre.shape != q.shape or k_pre.shape != k.shape:
        raise ValueError(f"q_pre {tuple(q_pre.shape)} / k_pre {tuple(k_pre.shape)} must match q / k")
    if gate_normalizer <= 0:
        raise ValueError("gate_normalizer must be positive")
    has_ring = prev_k is not None
    if has_ring != (prev_v is not None) or has_ring != (seen is not None):
        raise ValueError("prev_k, prev_v and seen go together (all or none)")
    if has_ring:
        if prev_k.shape != (B, Hk, window, D) or prev_v.shape != (B, Hk, window, Dv):
            raise ValueError(f"ring buffers {tuple(prev_k.shape)} / {tuple(prev_v.shape)}: "
                             f"expected {(B, Hk, window, D)} / {(B, Hk, window, Dv)}")
        prev_k, prev_v = _last_dim_contiguous(prev_k), _last_dim_contiguous(prev_v)
        seen = seen.reshape(()).to(device=q.device, dtype=torch.int64)
    if initial_state is not None:
        if initial_state.shape != (B, Hk, D, Dv):
            raise ValueError(f"initial_state {tuple(initial_state.shape)}: expected {(B, Hk, D, Dv)}")
        initial_state = initial_state.to(torch.float32).contiguous()
    q, k, v, q_pre, k_pre = (_last_dim_contiguous(x) for x in (q, k, v, q_pre, k_pre))

    o = torch.empty(B, H, T, Dv, device=q.device, dtype=q.dtype)
    final = torch.empty(B, Hk, D, Dv, device=q.device, dtype=torch.float32)
    if POISON:
        o.fill_(float("nan"))
        final.fill_(float("nan"))
    BK = max(16, triton.next_power_of_2(D))
    BV = BLOCK_V or max(16, min(64, triton.next_power_of_2(Dv)))
    NH = triton.cdiv(int(window) - 1, BLOCK)
    rk, rv = (prev_k, prev_v) if has_ring else (k, v)  # dummies when there is no ring (never read)
    grid = (B * Hk, triton.cdiv(Dv, BV))
    _liger_fwd_kernel[grid](
        q, k, v, q_pre, k_pre, o,
        initial_state if initial_state is not None else final, final, rk, rv, seen if has_ring else final,
        T, Hk, H // Hk, D, Dv, int(window),
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), q_pre.stride(0), q_pre.stride(1), q_pre.stride(2),
        k_pre.stride(0), k_pre.stride(1), k_pre.stride(2),
        rk.stride(0), rk.stride(1), rk.stride(2), rv.stride(0), rv.stride(1), rv.stride(2),
        float(scale), float(a), float(b), float(gate_normalizer),
        BK=BK, BV=BV, NH=NH, NR=NH if has_ring else 0, HAS_S0=initial_state is not None, HAS_RING=has_ring,
        PREC="ieee" if q.dtype == torch.float32 else "tf32", LOG_GATE_MIN=LOG_GATE_MIN, BLOCK=BLOCK,
        num_warps=NUM_WARPS or (8 if BK * BV >= 64 * 64 else 4),  # H100: 8 warps best from 64×64 up
    )
    return o, final
