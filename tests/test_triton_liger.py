"""The fused Liger-attention forward kernel (kernels/triton_liger.py) against the PyTorch oracles.

Runs the kernel under the Triton interpreter on CPU tensors (TRITON_INTERPRET=1, set before triton is imported).
With TRITON_INTERPRET=0 and a GPU the same tests run the compiled kernel on CUDA tensors.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton")

from lincompile.kernels import triton_liger  # noqa: E402
from lincompile.kernels.gla import gla_naive  # noqa: E402
from lincompile.kernels.liger_attention import LigerAttention  # noqa: E402
from lincompile.kernels.swa import _swa_advance, swa_init_state, swa_naive  # noqa: E402
from lincompile.kernels.triton_liger import liger_attention_fwd, supported  # noqa: E402

DEV = "cuda" if os.environ["TRITON_INTERPRET"] == "0" and torch.cuda.is_available() else "cpu"
TOL = 1e-4  # relative error in fp32


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Outputs start as NaN: anything the kernel fails to write shows up."""
    monkeypatch.setattr(triton_liger, "POISON", True)


def rel(x, ref):
    x, ref = x.float(), ref.float()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def make(B, H, Hk, T, D, Dv=None, dtype=torch.float32, hot=False, seed=0):
    """q, k, v, q_pre, k_pre; `hot` scales half the kv heads' k_pre ×10 (peaky features, gates at the clamp)."""
    g = torch.Generator().manual_seed(seed)
    Dv = Dv or D
    q, q_pre = (torch.randn(B, H, T, D, generator=g) for _ in range(2))
    k, k_pre = (torch.randn(B, Hk, T, D, generator=g) for _ in range(2))
    v = torch.randn(B, Hk, T, Dv, generator=g)
    if hot:
        k_pre[:, : max(1, Hk // 2)] *= 10
    return [x.to(DEV, dtype) for x in (q, k, v, q_pre, k_pre)]


def op_for(H, Hk, D, W, a=0.3, b=0.7, gn=16.0):
    return LigerAttention(num_heads=H, num_kv_heads=Hk, head_dim=D, window=W, a=a, b=b, gate_normalizer=gn)


def fused(op, q, k, v, qp, kp, **state):
    c = op.config
    return liger_attention_fwd(q, k, v, qp, kp, window=c["window"], a=c["a"], b=c["b"], scale=op.scale,
                               gate_normalizer=c["gate_normalizer"], **state)


@pytest.mark.parametrize("T,W,H,Hk,D,gn", [
    (1, 4, 4, 2, 16, 16.0),
    (17, 64, 2, 2, 32, 2.0),
    (64, 4, 4, 2, 32, 16.0),
    (130, 64, 4, 2, 16, 2.0),
])
def test_matches_naive(T, W, H, Hk, D, gn):
    op = op_for(H, Hk, D, W, gn=gn)
    x = make(2, H, Hk, T, D, hot=True, seed=T)
    if gn == 2.0:  # make sure the -5 clamp is exercised
        assert (F.logsigmoid(x[4].float()) / gn < -5).any()
    o, S = fused(op, *x)
    assert o.shape == (2, H, T, D) and o.dtype == torch.float32 and S.shape == (2, Hk, D, D)
    assert rel(o, op.naive(*x)) <= TOL
    _, S_ref = gla_naive(*op.gla_inputs(x[3], x[4], x[2]))
    assert rel(S, S_ref) <= TOL


def _ring_case(W, seen, T, B=2, H=4, Hk=2, D=16, gn=2.0):
    """Kernel on the last T positions with the prefix as (initial state, ring) vs the whole sequence at once."""
    op = op_for(H, Hk, D, W, gn=gn)
    full = make(B, H, Hk, seen + T, D, hot=True, seed=seen)
    pre = [x[:, :, :seen] for x in full]
    cur = [x[:, :, seen:] for x in full]
    # The ring as the library's SWA state keeps it (slot i = position seen - W + i, oldest first) ...
    ring = _swa_advance(swa_init_state(B, Hk, D, D, W, device=DEV), pre[1], pre[2], W)
    assert ring["len"].item() == seen
    # ... with junk in the slots of positions before 0: the kernel must ignore them.
    junk = max(0, W - seen)
    ring["k"][:, :, :junk] = torch.randn(B, Hk, junk, D, device=DEV)
    ring["v"][:, :, :junk] = torch.randn(B, Hk, junk, D, device=DEV)
    S0 = gla_naive(*op.gla_inputs(pre[3], pre[4], pre[2]))[1]
    o, S = fused(op, *cur, initial_state=S0, prev_k=ring["k"], prev_v=ring["v"], seen=ring["len"])
    assert rel(o, op.naive(*full)[:, :, seen:]) <= TOL
    assert rel(S, gla_naive(*op.gla_inputs(full[3], full[4], full[2]))[1]) <= TOL


@pytest.mark.parametrize("W,seen,T", [(64, 3, 20), (64, 100, 17), (4, 3, 5), (4, 100, 1)])
def test_initial_state_and_ring(W, seen, T):
    _ring_case(W, seen, T)


def test_half_precision():
    """bf16 / fp16 inputs (gates at the clamp, so e^80 factors appear): finite, within 1e-2 of the fp32 run."""
    op = op_for(4, 2, 32, 64, gn=2.0)
    x = make(1, 4, 2, 20, 32, hot=True, seed=1)
    S0 = torch.randn(1, 2, 32, 32, device=DEV)
    o32, S32 = fused(op, *x, initial_state=S0)
    for dtype in (torch.bfloat16, torch.float16):
        o, S = fused(op, *[t.to(dtype) for t in x], initial_state=S0)
        assert o.dtype == dtype and S.dtype == torch.float32
        assert torch.isfinite(o).all() and torch.isfinite(S).all()
        assert rel(o, o32) <= 1e-2 and rel(S, S32) <= 1e-2


def test_odd_dims_value_blocks_and_strides():
    """D, Dv not powers of two, Dv > 64 (two value blocks), q/k views with a [B, T, H, D] memory layout."""
    B, H, Hk, T, D, Dv, W = 1, 2, 1, 20, 20, 72, 7
    q, k, v, qp, kp = make(B, H, Hk, T, D, Dv=Dv, hot=True, seed=3)
    q, k = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k))
    assert not q.is_contiguous()
    a, b, scale, gn = 0.25, 0.6, 0.3, 4.0
    o, S = liger_attention_fwd(q, k, v, qp, kp, window=W, a=a, b=b, scale=scale, gate_normalizer=gn)
    op = LigerAttention(num_heads=H, num_kv_heads=Hk, head_dim=D, v_head_dim=Dv, gate_normalizer=gn)
    gla, S_ref = gla_naive(*op.gla_inputs(qp, kp, v))
    ref = a * swa_naive(q, k, v, W, scale) + b * gla
    assert o.shape == (B, H, T, Dv) and rel(o, ref) <= TOL and rel(S, S_ref) <= TOL


def test_empty_sequence_returns_initial_state():
    op = op_for(2, 2, 16, 4)
    x = make(1, 2, 2, 0, 16)
    S0 = torch.randn(1, 2, 16, 16, device=DEV)
    o, S = fused(op, *x, initial_state=S0)
    assert o.shape == (1, 2, 0, 16) and torch.equal(S, S0)


def test_supported_and_errors():
    q = torch.zeros(1, 4, 8, 16, device=DEV)
    k = torch.zeros(1, 2, 8, 16, device=DEV)
    assert supported(q, k, k, 64) is None
    assert "window" in supported(q, k, k, 65)
    assert "head dims" in supported(torch.zeros(1, 4, 8, 160), torch.zeros(1, 2, 8, 160), k, 4)
    assert "kv heads" in supported(q, torch.zeros(1, 3, 8, 16), torch.zeros(1, 3, 8, 16), 4)
    assert "dtype" in supported(q, k.half(), k, 4)
    with pytest.raises(ValueError, match="all or none"):
        liger_attention_fwd(q, k, k, q, k, window=4, a=.5, b=.5, scale=.25, gate_normalizer=16.0,
                            prev_k=torch.zeros(1, 2, 4, 16, device=DEV))


@pytest.mark.parametrize("D", [16, 20, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prologue_matches_pytorch(D, dtype):
    """liger_prologue (the chunked forward's feature maps and gates) against fused._liger_inputs' PyTorch form,
    on strided inputs ([B, T, H, D] transposed, as projections give them) with a tail block and gates from
    tiny to far past the clamp."""
    from lincompile.kernels.fused import _liger_inputs

    gen = torch.Generator().manual_seed(D)
    q_pre = (torch.randn(2, 67, 4, D, generator=gen) * 3).to(DEV, dtype).transpose(1, 2)
    k_pre = (torch.randn(2, 67, 2, D, generator=gen) * 3).to(DEV, dtype).transpose(1, 2)
    k_pre[0, 0, :4, 0] = torch.tensor([30.0, -30.0, 60.0, -100.0], dtype=dtype)  # logsigmoid ≈ -1e-13 / clamp
    got = triton_liger.liger_prologue(q_pre, k_pre, 4.0)
    want = _liger_inputs(q_pre, k_pre, 4.0)
    assert [x.dtype for x in got] == [dtype, dtype, torch.float32]
    assert all(x.is_contiguous() for x in got)
    tol = 1e-6 if dtype == torch.float32 else 4e-3  # bf16: one rounding of φ, at most one step apart
    for x, ref in zip(got, want):
        assert x.shape == ref.shape and rel(x, ref) < tol
    assert got[2][0, 0, 0, 0].item() == pytest.approx(-torch.exp(torch.tensor(-30.0)).item() / 4, rel=1e-5)
    assert got[2][0, 0, 1:, 0].tolist()[:3] == [-5.0, pytest.approx(-torch.exp(torch.tensor(-60.0)).item() / 4,
                                                                     rel=1e-5), -5.0]


def test_prologue_errors_and_empty():
    x = torch.randn(1, 2, 0, 16, device=DEV)
    phq, phk, g = triton_liger.liger_prologue(x, x, 16.0)
    assert phq.shape == phk.shape == g.shape == (1, 2, 0, 16)
    with pytest.raises(ValueError, match="k_pre head dim 300 outside"):
        triton_liger.liger_prologue(torch.randn(1, 1, 2, 16), torch.randn(1, 1, 2, 300), 16.0)
    with pytest.raises(ValueError, match="q_pre dtype torch.int64"):
        triton_liger.liger_prologue(torch.ones(1, 1, 2, 16, dtype=torch.long), torch.randn(1, 1, 2, 16), 16.0)
    with pytest.raises(ValueError, match="gate_normalizer must be positive"):
        triton_liger.liger_prologue(torch.randn(1, 1, 2, 16), torch.randn(1, 1, 2, 16), 0.0)


@pytest.mark.parametrize("D,dtype", [(16, torch.float32), (20, torch.float32), (64, torch.bfloat16)])
def test_prologue_backward_matches_autograd(D, dtype):
    """liger_prologue_bwd against autograd through the PyTorch form, gates at the clamp (no gradient) included;
    with dg None the gate term is left out."""
    from lincompile.kernels.fused import _liger_inputs

    gen = torch.Generator().manual_seed(D)
    q_pre = (torch.randn(1, 67, 4, D, generator=gen) * 3).to(DEV, dtype).transpose(1, 2)
    k_pre = (torch.randn(1, 67, 2, D, generator=gen) * 20).to(DEV, dtype).transpose(1, 2)  # many clamped gates
    dphq, dphk = (torch.randn(x.shape, generator=gen).to(DEV, dtype) for x in (q_pre, k_pre))
    dg = torch.randn(k_pre.shape, generator=gen).to(DEV)
    leaves = [x.detach().float().requires_grad_() for x in (q_pre, k_pre)]
    outs = _liger_inputs(*leaves, 4.0)
    assert (outs[2] == -5.0).float().mean() > 0.1  # the clamp is exercised
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for with_gate in (True, False):
        grads = torch.autograd.grad(outs, leaves, (dphq.float(), dphk.float(), dg if with_gate else 0 * dg),
                                    retain_graph=True)
        got = triton_liger.liger_prologue_bwd(q_pre, k_pre, dphq, dphk, dg if with_gate else None, 4.0)
        for x, ref, inp in zip(got, grads, (q_pre, k_pre)):
            assert x.dtype == inp.dtype and x.shape == inp.shape and rel(x, ref) < tol, with_gate
    with pytest.raises(ValueError, match="gradient shapes"):
        triton_liger.liger_prologue_bwd(q_pre, k_pre, dphk, dphk, None, 4.0)
