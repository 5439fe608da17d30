"""Triton sliding-window attention (kernels/triton_swa.py) against a dense fp64 oracle, under the interpreter."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

import torch  # noqa: E402

from conftest import exhaustive  # noqa: E402
from lincompile.kernels import triton_swa as ts  # noqa: E402
from lincompile.kernels.swa import swa_naive  # noqa: E402
from lincompile.kernels.swa_sinks import _window_sums, normalise_with  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(ts, "POISON", True)


def oracle(q, k, v, pk, pv, seen: int, scale, sinks):
    """Dense masked softmax over absolute positions (ring, then this call), sinks as value-less columns."""
    B, H, T, _ = q.shape
    Hk, W = k.shape[1], pk.shape[2]
    G = H // Hk
    keys = torch.cat([pk, k], 2).repeat_interleave(G, 1)
    vals = torch.cat([pv, v], 2).repeat_interleave(G, 1)
    pos = torch.arange(W + T, device=q.device) + seen - W
    tpos = torch.arange(T, device=q.device) + seen
    mask = (pos[None] <= tpos[:, None]) & (pos[None] > tpos[:, None] - W) & (pos[None] >= 0)
    s = (q @ keys.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks[None, :, None, :].expand(B, H, T, sinks.shape[-1])], -1)
    lse = s.logsumexp(-1)
    o = s.softmax(-1)[..., : W + T] @ vals
    return o, lse


def make(B, H, Hk, T, W, D, Dv, m, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(DEV, dtype)

    q, k, v = r(B, H, T, D), r(B, Hk, T, D), r(B, Hk, T, Dv)
    pk, pv = r(B, Hk, W, D), r(B, Hk, W, Dv)
    sinks = (torch.randn(H, m, generator=g) * 2).to(DEV) if m else None
    return q, k, v, pk, pv, sinks


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def check(B, H, Hk, T, W, seen, D, Dv, m, noncontig=False, seed=0):
    q, k, v, pk, pv, sinks = make(B, H, Hk, T, W, D, Dv, m, seed=seed)
    if noncontig:  # [B, T, H, D] storage, as attention projections produce it
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
        v = v.transpose(1, 2).contiguous().transpose(1, 2)
    scale = D ** -0.5
    seen_t = torch.tensor(seen, dtype=torch.int64, device=DEV)
    o, lse = ts.swa_fwd(q, k, v, pk, pv, seen_t, scale, sinks)
    assert o.dtype == q.dtype and lse.dtype == torch.float32
    assert o.shape == (B, H, T, Dv) and lse.shape == (B, H, T)

    ins = [x.double().requires_grad_() for x in (q, k, v, pk, pv)]
    s64 = sinks.double().requires_grad_() if sinks is not None else None
    o_ref, lse_ref = oracle(*ins, seen, scale, s64)
    assert rel(o, o_ref) <= 1e-4, rel(o, o_ref)
    assert rel(lse, lse_ref) <= 1e-4, rel(lse, lse_ref)

    g = torch.Generator().manual_seed(seed + 1)
    do = torch.randn(o.shape, generator=g).to(DEV)
    dlse = torch.randn(lse.shape, generator=g).to(DEV)
    ((o_ref * do.double()).sum() + (lse_ref * dlse.double()).sum()).backward()
    grads = ts.swa_bwd(q, k, v, pk, pv, seen_t, scale, sinks, o, lse, do, dlse)
    names = ("dq", "dk", "dv", "dprev_k", "dprev_v")
    for name, got, x, ref in zip(names, grads, (q, k, v, pk, pv), ins):
        assert got.shape == x.shape and got.dtype == x.dtype, name
        assert torch.isfinite(got).all(), name
        if ref.grad.norm() == 0:  # e.g. a ring whose slots never existed
            assert got.abs().max() == 0, name
        else:
            assert rel(got, ref.grad) <= 1e-4, (name, rel(got, ref.grad))
    if sinks is None:
        assert grads[5] is None
    else:
        assert grads[5].shape == sinks.shape and grads[5].dtype == torch.float32
        assert rel(grads[5], s64.grad) <= 1e-4, ("dsinks", rel(grads[5], s64.grad))
    return q, k, v, pk, pv, sinks, o, lse


SMALL = (16, 16, 16, 16, 16, 16)  # many blocks per window: block alignment, tails, skipped blocks
MIXED = (16, 32, 32, 16, 16, 32)  # BM ≠ BN in every kernel

#        B  H  Hk   T   W  seen  D  Dv  m  blocks (None: the module's default, as on the GPU)
CASES = [(2, 4, 2, 1, 1, 0, 16, 16, 0, None),
         (2, 4, 2, 5, 4, 3, 16, 24, 4, SMALL),
         (2, 2, 2, 40, 16, 16, 32, 16, 4, SMALL),
         (2, 4, 2, 100, 37, 200, 16, 24, 0, None),
         (2, 4, 2, 40, 64, 3, 32, 24, 4, MIXED),
         (2, 2, 2, 100, 64, 0, 16, 16, 4, None),
         (2, 4, 2, 5, 37, 200, 32, 16, 0, SMALL),
         (2, 4, 2, 40, 16, 3, 16, 16, 4, MIXED),
         (2, 4, 2, 40, 1, 200, 16, 24, 4, SMALL),
         (2, 2, 2, 1, 64, 200, 32, 24, 4, None),
         (2, 4, 2, 100, 4, 0, 16, 16, 0, None)]


@pytest.mark.parametrize("B,H,Hk,T,W,seen,D,Dv,m,blocks", exhaustive(CASES, keep={0, 1, 2, 3, 7, 9}))
def test_fp32_against_oracle(B, H, Hk, T, W, seen, D, Dv, m, blocks, monkeypatch):
    if blocks is not None:
        monkeypatch.setattr(ts, "BLOCKS", blocks)
    check(B, H, Hk, T, W, seen, D, Dv, m)


def test_odd_head_dims_and_strides(monkeypatch):
    monkeypatch.setattr(ts, "BLOCKS", MIXED)
    check(2, 4, 2, 21, 7, 5, 20, 12, 3, noncontig=True)


def test_dlse_none_is_zero():
    q, k, v, pk, pv, sinks = make(1, 2, 1, 9, 4, 16, 16, 2, seed=3)
    seen = torch.tensor(2)
    o, lse = ts.swa_fwd(q, k, v, pk, pv, seen, 0.25, sinks)
    do = torch.randn_like(o)
    a = ts.swa_bwd(q, k, v, pk, pv, seen, 0.25, sinks, o, lse, do, None)
    b = ts.swa_bwd(q, k, v, pk, pv, seen, 0.25, sinks, o, lse, do, torch.zeros_like(lse))
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_matches_swa_naive():
    B, H, Hk, T, W, D = 2, 4, 2, 30, 8, 16
    q, k, v, pk, pv, _ = make(B, H, Hk, T, W, D, D, 0, seed=5)
    o, _ = ts.swa_fwd(q, k, v, pk, pv, torch.tensor(0), D ** -0.5)
    ref = swa_naive(q, k, v, W, D ** -0.5)
    assert rel(o, ref) <= 1e-5


def test_matches_window_sums_with_sinks():
    B, H, Hk, T, W, D, Dv, seen = 2, 4, 2, 20, 6, 16, 24, 4
    q, k, v, pk, pv, sinks = make(B, H, Hk, T, W, D, Dv, 4, seed=6)
    seen_t = torch.tensor(seen)
    o, _ = ts.swa_fwd(q, k, v, pk, pv, seen_t, 0.3, sinks)
    num, den, c = _window_sums(q, k, v, pk, pv, seen_t, 0.3)
    ref = normalise_with(num, den, c, sinks[None, :, None, :].expand(B, H, T, 4))
    assert rel(o, ref) <= 1e-5


def test_bf16_close_to_fp32():
    B, H, Hk, T, W, seen, D, Dv, m = 2, 4, 2, 40, 16, 5, 32, 16, 4
    q, k, v, pk, pv, sinks = make(B, H, Hk, T, W, D, Dv, m, seed=7)
    seen_t = torch.tensor(seen)
    scale = D ** -0.5
    o32, lse32 = ts.swa_fwd(q, k, v, pk, pv, seen_t, scale, sinks)
    do = torch.randn_like(o32)
    dlse = torch.randn_like(lse32)
    g32 = ts.swa_bwd(q, k, v, pk, pv, seen_t, scale, sinks, o32, lse32, do, dlse)
    bf = [x.bfloat16() for x in (q, k, v, pk, pv)]
    o16, lse16 = ts.swa_fwd(*bf, seen_t, scale, sinks)
    assert o16.dtype == torch.bfloat16 and lse16.dtype == torch.float32
    assert rel(o16, o32) <= 1e-2 and rel(lse16, lse32) <= 1e-2
    g16 = ts.swa_bwd(*bf, seen_t, scale, sinks, o16, lse16, do.bfloat16(), dlse)
    for name, a, b in zip(("dq", "dk", "dv", "dprev_k", "dprev_v", "dsinks"), g16, g32):
        assert torch.isfinite(a).all(), name
        assert a.dtype == (torch.float32 if name == "dsinks" else torch.bfloat16)
        assert rel(a, b) <= 1e-2, (name, rel(a, b))


def test_supported():
    q, k, v, pk, _, _ = make(1, 4, 2, 3, 2, 16, 16, 0)
    assert ts.supported(q, k, v, pk) is None
    big = torch.zeros(1, 4, 3, 160)
    assert ts.supported(big, big[:, :2], big[:, :2], torch.zeros(1, 2, 2, 160))
    assert ts.supported(q, k[:, :1].expand(1, 3, 3, 16), v, pk)
    assert ts.supported(q.double(), k, v, pk)


def _gpu_check():
    """`TRITON_INTERPRET=0 python tests/test_triton_swa.py` on a GPU: large shapes against the oracle, and timings."""
    import triton

    torch.manual_seed(0)
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        for B, H, Hk, T, W, seen, D, Dv, m in [(1, 8, 2, 1000, 256, 300, 128, 128, 4),
                                               (2, 4, 4, 333, 100, 50, 80, 96, 0)]:
            q, k, v, pk, pv, sinks = make(B, H, Hk, T, W, D, Dv, m)
            q, k, v, pk, pv = (x.to(dt) for x in (q, k, v, pk, pv))
            seen_t, scale = torch.tensor(seen, device=DEV), D ** -0.5
            o, lse = ts.swa_fwd(q, k, v, pk, pv, seen_t, scale, sinks)
            ins = [x.double().requires_grad_() for x in (q, k, v, pk, pv)]
            s64 = sinks.double().requires_grad_() if sinks is not None else None
            o_ref, lse_ref = oracle(*ins, seen, scale, s64)
            do, dlse = torch.randn_like(o), torch.randn_like(lse)
            ((o_ref * do.double()).sum() + (lse_ref * dlse.double()).sum()).backward()
            g = ts.swa_bwd(q, k, v, pk, pv, seen_t, scale, sinks, o, lse, do, dlse)
            errs = [rel(o, o_ref), rel(lse, lse_ref)] + [rel(a, x.grad) for a, x in zip(g, ins)]
            errs += [rel(g[5], s64.grad)] if sinks is not None else []
            print(str(dt), T, W, D, Dv, "o lse dq dk dv dpk dpv [ds]:", " ".join(f"{e:.1e}" for e in errs))
    B, H, Hk, T, D = 4, 32, 8, 4096, 128
    for W in (128, 256):
        q, k, v, pk, pv, sinks = make(B, H, Hk, T, W, D, D, 4, dtype=torch.bfloat16)
        seen_t, scale = torch.tensor(100, device=DEV), D ** -0.5
        o, lse = ts.swa_fwd(q, k, v, pk, pv, seen_t, scale, sinks)
        do, dlse = torch.randn_like(o), torch.randn_like(lse)
        fwd = triton.testing.do_bench(lambda: ts.swa_fwd(q, k, v, pk, pv, seen_t, scale, sinks))
        bwd = triton.testing.do_bench(lambda: ts.swa_bwd(q, k, v, pk, pv, seen_t, scale, sinks, o, lse, do, dlse))

        def torch_fwd():
            num, den, c = _window_sums(q, k, v, pk, pv, seen_t, scale)
            return normalise_with(num, den, c, sinks[None, :, None, :].expand(B, H, T, 4))
        ref = triton.testing.do_bench(torch_fwd)
        err = rel(o, torch_fwd())
        flops = 4 * B * H * T * W * D
        print(f"bf16 B{B} H{H}/{Hk} T{T} W{W} D{D}: fwd {fwd:.3f} ms ({flops / fwd / 1e9:.0f} TFLOP/s useful), "
              f"bwd {bwd:.3f} ms, torch _window_sums fwd {ref:.3f} ms, rel err vs torch {err:.1e}")


if __name__ == "__main__":
    _gpu_check()
