"""Triton sliding-window softmax attention (flash style) with a ring-buffer key prefix and sink logits.

Per query head h and query t of this call (absolute position P_t = seen + t), with window W:

    keys visible to t:  P_t − W < p ≤ P_t  and  p ≥ 0
    s_p = scale · q_t·k_p,   lse_t = log(Σ_p exp(s_p) + Σ_j exp(τ_{h,j})),   o_t = Σ_p exp(s_p − lse_t) v_p

Keys with p ≥ seen are this call's k[p − seen]; keys with p < seen come from the ring `prev_k`/`prev_v`
(slot i holds absolute position seen − W + i; slots with a negative position never existed). τ are optional
sink logits `[H, m]` that have no values: they only take mass (kernels/lizard.py).

Extended key index: j ∈ [0, W + T), j < W is ring slot j, j ≥ W is k[j − W]; it is at absolute position
seen − W + j. Query t sits at extended index t + W and sees t < j ≤ t + W with j ≥ W − seen, so every
query block visits only the O(BM + W) keys of its window.

Kernels (pure functions; the caller wraps them in custom ops):
  forward   one program per (query block, b, query head): online softmax over the window's key blocks in
            the log2 domain (running max and sum start from the sink logits); writes o and lse.
  dq        one program per (query block, b, query head): recomputes p = exp(s − lse) and
            ds = p · (dp − Δ' ), Δ'_t = Σ o_t·do_t − dlse_t.
  dk/dv     one program per (extended key block, b, kv head): loops over the G query heads of the kv group
            and the query blocks that see the block; stores the ring part to dprev_k/dprev_v.
  Δ' and dsinks_{h,j} = −Σ_{b,t} exp(τ_{h,j} − lse_t) Δ'_t are O(T) PyTorch reductions.
GQA: query head h reads kv head h // (H / Hk) inside the kernels; k/v are never repeated.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

POISON = False  # tests: fill every output buffer with NaN before launch, so unwritten elements show

_RCP_LN2 = 1.4426950408889634
_LN2 = 0.6931471805599453
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 128
# Block sizes (each ≥ 16 for tl.dot, powers of two): forward (BM, BN), dq (BM, BN), dk/dv (BM, BN).
# A module setting so tests can shrink them; the interpreter uses the same ones as the GPU.
BLOCKS = (64, 64, 64, 32, 32, 64)


@triton.jit
def _load_keys(K, PK, k_base, pk_base, offs_j, offs_d, sk_t, sk_d, spk_t, spk_d, W, T, D, DT: tl.constexpr):
    """Rows offs_j of the extended key sequence (ring slots, then this call's keys), zeros outside."""
    dmask = (offs_d < D)[None, :]
    in_ring = offs_j < W
    ring = tl.load(PK + pk_base + offs_j[:, None] * spk_t + offs_d[None, :] * spk_d,
                   mask=in_ring[:, None] & dmask, other=0.0)
    cur = tl.load(K + k_base + (offs_j - W)[:, None] * sk_t + offs_d[None, :] * sk_d,
                  mask=((offs_j >= W) & (offs_j < W + T))[:, None] & dmask, other=0.0)
    return tl.where(in_ring[:, None], ring.to(DT), cur.to(DT))


@triton.jit
def _swa_fwd_kernel(Q, K, V, PK, PV, SEEN, SINKS, O, LSE,
                    sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d,
                    spk_b, spk_h, spk_t, spk_d, spv_b, spv_h, spv_t, spv_d,
                    so_b, so_h, so_t, so_d, sl_b, sl_h, sl_t,
                    H, G, T, W, D, DV, M, qk_scale2,
                    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BS: tl.constexpr,
                    HAS_SINKS: tl.constexpr, PREC: tl.constexpr, DT: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    hk = (h // G).to(tl.int64)
    seen = tl.load(SEEN)
    first = tl.maximum(W - seen, 0).to(tl.int32)  # first extended index that exists

    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    mrow = offs_m < T
    q_base = b * sq_b + h.to(tl.int64) * sq_h
    q = tl.load(Q + q_base + offs_m[:, None] * sq_t + offs_d[None, :] * sq_d,
                mask=mrow[:, None] & (offs_d < D)[None, :], other=0.0).to(DT)
    k_base = b * sk_b + hk * sk_h
    v_base = b * sv_b + hk * sv_h
    pk_base = b * spk_b + hk * spk_h
    pv_base = b * spv_b + hk * spv_h

    # Running max and sum (log2 domain) start with the sink logits, which have no values.
    m_i = tl.full([BM], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    if HAS_SINKS:
        offs_s = tl.arange(0, BS)
        tau = tl.load(SINKS + h * M + offs_s, mask=offs_s < M, other=float("-inf")).to(tl.float32) * 1.4426950408889634
        m0 = tl.maximum(tl.max(tau, 0), -1.0e30)
        m_i = m_i * 0.0 + m0
        l_i = l_i + tl.sum(tl.exp2(tau - m0), 0)
    acc = tl.zeros([BM, BDV], dtype=tl.float32)

    t_ext = offs_m + W  # extended index of each query
    j_lo = tl.maximum(pid_m * BM + 1, first)
    j_hi = tl.minimum(pid_m * BM + BM + W, W + T)
    for j0 in range((j_lo // BN) * BN, j_hi, BN):
        offs_j = j0 + tl.arange(0, BN)
        kb = _load_keys(K, PK, k_base, pk_base, offs_j, offs_d, sk_t, sk_d, spk_t, spk_d, W, T, D, DT)
        vb = _load_keys(V, PV, v_base, pv_base, offs_j, offs_dv, sv_t, sv_d, spv_t, spv_d, W, T, DV, DT)
        s = tl.dot(q, tl.trans(kb), input_precision=PREC) * qk_scale2
        valid = ((offs_j[None, :] <= t_ext[:, None]) & (offs_j[None, :] > t_ext[:, None] - W)
                 & (offs_j >= first)[None, :] & (offs_j < W + T)[None, :])
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(DT), vb, input_precision=PREC)
        m_i = m_new

    l_safe = tl.where(l_i > 0, l_i, 1.0)  # only padding rows can be empty: every query sees itself
    o = acc / l_safe[:, None]
    o_base = b * so_b + h.to(tl.int64) * so_h
    tl.store(O + o_base + offs_m[:, None] * so_t + offs_dv[None, :] * so_d, o.to(O.dtype.element_ty),
             mask=mrow[:, None] & (offs_dv < DV)[None, :])
    lse = (m_i + tl.log2(l_safe)) * 0.6931471805599453
    tl.store(LSE + b * sl_b + h.to(tl.int64) * sl_h + offs_m * sl_t, lse, mask=mrow)


@triton.jit
def _swa_bwd_dq_kernel(Q, K, V, PK, PV, SEEN, DO, LSE, DELTA, DQ,
                       sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d,
                       spk_b, spk_h, spk_t, spk_d, spv_b, spv_h, spv_t, spv_d,
                       sdo_b, sdo_h, sdo_t, sdo_d, sdq_b, sdq_h, sdq_t, sdq_d, sl_b, sl_h, sl_t,
                       H, G, T, W, D, DV, qk_scale2, scale,
                       BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
                       PREC: tl.constexpr, DT: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    hk = (h // G).to(tl.int64)
    seen = tl.load(SEEN)
    first = tl.maximum(W - seen, 0).to(tl.int32)

    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    mrow = offs_m < T
    q = tl.load(Q + b * sq_b + h.to(tl.int64) * sq_h + offs_m[:, None] * sq_t + offs_d[None, :] * sq_d,
                mask=mrow[:, None] & (offs_d < D)[None, :], other=0.0).to(DT)
    do = tl.load(DO + b * sdo_b + h.to(tl.int64) * sdo_h + offs_m[:, None] * sdo_t + offs_dv[None, :] * sdo_d,
                 mask=mrow[:, None] & (offs_dv < DV)[None, :], other=0.0).to(DT)
    l_off = b * sl_b + h.to(tl.int64) * sl_h + offs_m * sl_t
    lse2 = tl.load(LSE + l_off, mask=mrow, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + l_off, mask=mrow, other=0.0)
    k_base = b * sk_b + hk * sk_h
    v_base = b * sv_b + hk * sv_h
    pk_base = b * spk_b + hk * spk_h
    pv_base = b * spv_b + hk * spv_h

    dq = tl.zeros([BM, BD], dtype=tl.float32)
    t_ext = offs_m + W
    j_lo = tl.maximum(pid_m * BM + 1, first)
    j_hi = tl.minimum(pid_m * BM + BM + W, W + T)
    for j0 in range((j_lo // BN) * BN, j_hi, BN):
        offs_j = j0 + tl.arange(0, BN)
        kb = _load_keys(K, PK, k_base, pk_base, offs_j, offs_d, sk_t, sk_d, spk_t, spk_d, W, T, D, DT)
        vb = _load_keys(V, PV, v_base, pv_base, offs_j, offs_dv, sv_t, sv_d, spv_t, spv_d, W, T, DV, DT)
        s = tl.dot(q, tl.trans(kb), input_precision=PREC) * qk_scale2
        valid = ((offs_j[None, :] <= t_ext[:, None]) & (offs_j[None, :] > t_ext[:, None] - W)
                 & (offs_j >= first)[None, :] & (offs_j < W + T)[None, :] & mrow[:, None])
        p = tl.exp2(tl.where(valid, s, float("-inf")) - lse2[:, None])
        dp = tl.dot(do, tl.trans(vb), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(DT), kb, input_precision=PREC)

    dq = dq * scale
    tl.store(DQ + b * sdq_b + h.to(tl.int64) * sdq_h + offs_m[:, None] * sdq_t + offs_d[None, :] * sdq_d,
             dq.to(DQ.dtype.element_ty), mask=mrow[:, None] & (offs_d < D)[None, :])


@triton.jit
def _store_keys(DK, DPK, dk_base, dpk_base, x, offs_j, offs_d, sdk_t, sdk_d, sdpk_t, sdpk_d, W, T, D):
    """Rows offs_j of an extended-key gradient: ring slots to DPK, this call's keys to DK."""
    dmask = (offs_d < D)[None, :]
    in_ring = offs_j < W
    tl.store(DPK + dpk_base + offs_j[:, None] * sdpk_t + offs_d[None, :] * sdpk_d, x.to(DPK.dtype.element_ty),
             mask=in_ring[:, None] & dmask)
    tl.store(DK + dk_base + (offs_j - W)[:, None] * sdk_t + offs_d[None, :] * sdk_d, x.to(DK.dtype.element_ty),
             mask=((offs_j >= W) & (offs_j < W + T))[:, None] & dmask)


@triton.jit
def _swa_bwd_dkdv_kernel(Q, K, V, PK, PV, SEEN, DO, LSE, DELTA, DK, DV_, DPK, DPV,
                         sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d,
                         spk_b, spk_h, spk_t, spk_d, spv_b, spv_h, spv_t, spv_d,
                         sdo_b, sdo_h, sdo_t, sdo_d, sl_b, sl_h, sl_t,
                         sdk_b, sdk_h, sdk_t, sdk_d, sdv_b, sdv_h, sdv_t, sdv_d,
                         sdpk_b, sdpk_h, sdpk_t, sdpk_d, sdpv_b, sdpv_h, sdpv_t, sdpv_d,
                         HK, G, T, W, D, DV, qk_scale2, scale,
                         BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
                         PREC: tl.constexpr, DT: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HK).to(tl.int64)
    hk = pid_bh % HK
    seen = tl.load(SEEN)
    first = tl.maximum(W - seen, 0).to(tl.int32)

    offs_j = pid_n * BN + tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    hk64 = hk.to(tl.int64)
    k_base = b * sk_b + hk64 * sk_h
    v_base = b * sv_b + hk64 * sv_h
    pk_base = b * spk_b + hk64 * spk_h
    pv_base = b * spv_b + hk64 * spv_h
    kb = _load_keys(K, PK, k_base, pk_base, offs_j, offs_d, sk_t, sk_d, spk_t, spk_d, W, T, D, DT)
    vb = _load_keys(V, PV, v_base, pv_base, offs_j, offs_dv, sv_t, sv_d, spv_t, spv_d, W, T, DV, DT)
    jrow = (offs_j >= first) & (offs_j < W + T)

    dk = tl.zeros([BN, BD], dtype=tl.float32)
    dv = tl.zeros([BN, BDV], dtype=tl.float32)
    # Query t sees key j when t < j ≤ t + W: t ∈ [j − W, j). Keys before `first` never existed.
    j_min = tl.maximum(pid_n * BN, first)
    j_end = tl.minimum(pid_n * BN + BN, W + T)  # exclusive
    t_lo = tl.maximum(j_min - W, 0)
    t_hi = tl.minimum(j_end - 1, T)
    t_hi = tl.where(j_min < j_end, t_hi, t_lo)
    for g in range(0, G):
        h = (hk * G + g).to(tl.int64)
        q_base = b * sq_b + h * sq_h
        do_base = b * sdo_b + h * sdo_h
        l_base = b * sl_b + h * sl_h
        for t0 in range((t_lo // BM) * BM, t_hi, BM):
            offs_t = t0 + tl.arange(0, BM)
            trow = offs_t < T
            q = tl.load(Q + q_base + offs_t[:, None] * sq_t + offs_d[None, :] * sq_d,
                        mask=trow[:, None] & (offs_d < D)[None, :], other=0.0).to(DT)
            do = tl.load(DO + do_base + offs_t[:, None] * sdo_t + offs_dv[None, :] * sdo_d,
                         mask=trow[:, None] & (offs_dv < DV)[None, :], other=0.0).to(DT)
            lse2 = tl.load(LSE + l_base + offs_t * sl_t, mask=trow, other=0.0) * 1.4426950408889634
            delta = tl.load(DELTA + l_base + offs_t * sl_t, mask=trow, other=0.0)
            sT = tl.dot(kb, tl.trans(q), input_precision=PREC) * qk_scale2  # [BN, BM]
            t_ext = offs_t + W
            valid = ((offs_j[:, None] <= t_ext[None, :]) & (offs_j[:, None] > offs_t[None, :])
                     & jrow[:, None] & trow[None, :])
            pT = tl.exp2(tl.where(valid, sT, float("-inf")) - lse2[None, :])
            dv += tl.dot(pT.to(DT), do, input_precision=PREC)
            dpT = tl.dot(vb, tl.trans(do), input_precision=PREC)
            dsT = pT * (dpT - delta[None, :])
            dk += tl.dot(dsT.to(DT), q, input_precision=PREC)

    dk = dk * scale
    _store_keys(DK, DPK, b * sdk_b + hk64 * sdk_h, b * sdpk_b + hk64 * sdpk_h, dk, offs_j, offs_d,
                sdk_t, sdk_d, sdpk_t, sdpk_d, W, T, D)
    _store_keys(DV_, DPV, b * sdv_b + hk64 * sdv_h, b * sdpv_b + hk64 * sdpv_h, dv, offs_j, offs_dv,
                sdv_t, sdv_d, sdpv_t, sdpv_d, W, T, DV)


# --------------------------------------------------------------------------------------------------


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _empty(shape, like: torch.Tensor, dtype=None) -> torch.Tensor:
    x = torch.empty(shape, dtype=like.dtype if dtype is None else dtype, device=like.device)
    if POISON:
        x.fill_(float("nan"))
    return x


def _prec(q) -> str:
    return "ieee" if q.dtype == torch.float32 else "tf32"


def _compute_dtype(q):
    """Operand dtype of tl.dot. The interpreter's bf16 dot is wrong (Triton 3.9), so it upcasts bf16 there."""
    if q.dtype == torch.float32 or (q.dtype == torch.bfloat16 and _interpreting(q)):
        return tl.float32
    return tl.float16 if q.dtype == torch.float16 else tl.bfloat16


def _interpreting(q) -> bool:
    return q.device.type == "cpu" or os.environ.get("TRITON_INTERPRET", "0") == "1"


def _fwd_config(q, BD, BDV):
    """(BM, BN, num_warps, num_stages). One fixed config (no autotuning)."""
    BM, BN = BLOCKS[:2]
    if _interpreting(q):
        return BM, BN, 1, 1
    return BM, BN, 8 if max(BD, BDV) >= 128 else 4, 2


def _bwd_config(q, BD, BDV):
    """(BM_dq, BN_dq, BM_kv, BN_kv, num_warps, num_stages)."""
    if _interpreting(q):
        return (*BLOCKS[2:], 1, 1)
    return (*BLOCKS[2:], 8 if max(BD, BDV) >= 128 else 4, 2)


def _seen(seen, q):
    if not torch.is_tensor(seen):
        seen = torch.tensor(int(seen), dtype=torch.int64, device=q.device)
    return seen.to(device=q.device, dtype=torch.int64).reshape(())


def supported(q, k, v, prev_k) -> str | None:
    """None when the kernels handle these inputs, else a one-line reason (the caller falls back to PyTorch)."""
    if not all(torch.is_tensor(x) for x in (q, k, v, prev_k)):
        return "inputs are not tensors"
    if q.device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return f"device {q.device.type} (Triton needs CUDA or TRITON_INTERPRET=1)"
    if any(x.device != q.device for x in (k, v, prev_k)):
        return "inputs on different devices"
    if any(x.dtype not in _DTYPES for x in (q, k, v, prev_k)):
        return "dtype not in fp16/bf16/fp32"
    if len({q.dtype, k.dtype, v.dtype}) != 1:
        return "q, k, v dtypes differ"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or prev_k.dim() != 4:
        return "expected 4-d [B, H, T, D] tensors"
    B, H, T, D = q.shape
    Hk = k.shape[1]
    if k.shape[0] != B or v.shape[0] != B or prev_k.shape[0] != B:
        return "batch sizes differ"
    if Hk == 0 or H % Hk or v.shape[1] != Hk or prev_k.shape[1] != Hk:
        return f"{H} query heads cannot share {Hk} kv heads"
    if k.shape[2] != T or v.shape[2] != T:
        return "q, k, v lengths differ"
    if k.shape[3] != D or prev_k.shape[3] != D:
        return "head dims of q, k, prev_k differ"
    if T < 1:
        return "empty sequence"
    if prev_k.shape[2] < 1:
        return "window < 1"
    if D > _MAX_HEAD_DIM or v.shape[3] > _MAX_HEAD_DIM:
        return f"head dim > {_MAX_HEAD_DIM}"
    if D < 1 or v.shape[3] < 1:
        return "empty head dim"
    return None


def swa_fwd(q, k, v, prev_k, prev_v, seen, scale: float, sinks=None):
    """(o [B,H,T,Dv] in q.dtype, lse [B,H,T] fp32)."""
    B, H, T, D = q.shape
    Hk, W, Dv = k.shape[1], prev_k.shape[2], v.shape[-1]
    o = _empty((B, H, T, Dv), q)
    lse = _empty((B, H, T), q, torch.float32)
    if T == 0 or B * H == 0:
        return o, lse
    seen = _seen(seen, q)
    has_sinks = sinks is not None and sinks.shape[-1] > 0
    M = sinks.shape[-1] if has_sinks else 0
    sk = sinks.to(device=q.device, dtype=torch.float32).contiguous() if has_sinks else lse
    BD, BDV = _pow2(D), _pow2(Dv)
    BM, BN, warps, stages = _fwd_config(q, BD, BDV)
    grid = (triton.cdiv(T, BM), B * H)
    _swa_fwd_kernel[grid](
        q, k, v, prev_k, prev_v, seen, sk, o, lse,
        *q.stride(), *k.stride(), *v.stride(), *prev_k.stride(), *prev_v.stride(), *o.stride(), *lse.stride(),
        H, H // Hk, T, W, D, Dv, M, float(scale) * _RCP_LN2,
        BM=BM, BN=BN, BD=BD, BDV=BDV, BS=max(2, triton.next_power_of_2(max(M, 1))),
        HAS_SINKS=has_sinks, PREC=_prec(q), DT=_compute_dtype(q), num_warps=warps, num_stages=stages)
    return o, lse


def swa_bwd(q, k, v, prev_k, prev_v, seen, scale: float, sinks, o, lse, do, dlse):
    """(dq, dk, dv, dprev_k, dprev_v, dsinks) with the shapes/dtypes of the inputs (dsinks fp32 [H,m] or None).

    ds_p = p_p · (dp_p − Δ_t + dlse_t) with Δ_t = Σ o_t·do_t; the sinks enter through lse only:
    ∂lse_t/∂τ_j = π_tj = exp(τ_j − lse_t) and ∂o_t/∂τ_j = −π_tj o_t, so dτ_j = −Σ_t π_tj (Δ_t − dlse_t).
    """
    B, H, T, D = q.shape
    Hk, W, Dv = k.shape[1], prev_k.shape[2], v.shape[-1]
    dq, dk, dv = _empty(q.shape, q), _empty(k.shape, k), _empty(v.shape, v)
    dpk, dpv = _empty(prev_k.shape, prev_k), _empty(prev_v.shape, prev_v)
    has_sinks = sinks is not None
    dsinks = None
    if T == 0 or B * H == 0:
        dq.zero_(), dk.zero_(), dv.zero_(), dpk.zero_(), dpv.zero_()
        return dq, dk, dv, dpk, dpv, (torch.zeros_like(sinks, dtype=torch.float32) if has_sinks else None)
    seen = _seen(seen, q)
    lse = lse.float().contiguous()
    delta = (o.float() * do.float()).sum(-1)
    if dlse is not None:
        delta = delta - dlse.float()
    delta = delta.contiguous()
    if has_sinks:
        s32 = sinks.to(device=q.device, dtype=torch.float32)
        dsinks = -(torch.exp(s32[None, :, None, :] - lse[..., None]) * delta[..., None]).sum((0, 2))
    BD, BDV = _pow2(D), _pow2(Dv)
    BMq, BNq, BMk, BNk, warps, stages = _bwd_config(q, BD, BDV)
    common_strides = (*q.stride(), *k.stride(), *v.stride(), *prev_k.stride(), *prev_v.stride())
    qk_scale2 = float(scale) * _RCP_LN2
    assert lse.stride() == delta.stride()
    _swa_bwd_dq_kernel[(triton.cdiv(T, BMq), B * H)](
        q, k, v, prev_k, prev_v, seen, do, lse, delta, dq,
        *common_strides, *do.stride(), *dq.stride(), *lse.stride(),
        H, H // Hk, T, W, D, Dv, qk_scale2, float(scale),
        BM=BMq, BN=BNq, BD=BD, BDV=BDV, PREC=_prec(q), DT=_compute_dtype(q), num_warps=warps, num_stages=stages)
    _swa_bwd_dkdv_kernel[(triton.cdiv(W + T, BNk), B * Hk)](
        q, k, v, prev_k, prev_v, seen, do, lse, delta, dk, dv, dpk, dpv,
        *common_strides, *do.stride(), *lse.stride(),
        *dk.stride(), *dv.stride(), *dpk.stride(), *dpv.stride(),
        Hk, H // Hk, T, W, D, Dv, qk_scale2, float(scale),
        BM=BMk, BN=BNk, BD=BD, BDV=BDV, PREC=_prec(q), DT=_compute_dtype(q), num_warps=warps, num_stages=stages)
    return dq, dk, dv, dpk, dpv, dsinks
