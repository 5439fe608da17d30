"""Triton chunked GLA (forward, backward, decode step) against the PyTorch oracle `gla.gla_naive`.

Runs under the Triton interpreter on CPU (TRITON_INTERPRET=1, set below before triton is imported) or on a
CUDA device when the interpreter is explicitly turned off (TRITON_INTERPRET=0).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from conftest import exhaustive  # noqa: E402
from lincompile.kernels import gla  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("neither CUDA nor the Triton interpreter (TRITON_INTERPRET=1) is available", allow_module_level=True)

from lincompile.kernels import triton_gla as tg  # noqa: E402

DEVICE = "cpu" if INTERPRET else "cuda"
if INTERPRET and type(tg._h_fwd).__name__ != "InterpretedFunction":
    pytest.skip("triton_gla was imported before TRITON_INTERPRET=1 was set", allow_module_level=True)

SCALE = 0.3
# Two forms that cumulate the gates in different kernels: the interpreter forms the same sums (bit for bit); a
# GPU's cumsum over a tile of another width may round b's last bit otherwise, and a factor exp(b) then moves
# ~1e-5 where b ~ −300
SAME = 1e-6 if INTERPRET else 1e-4


@pytest.fixture(autouse=True)
def poison():
    """Every output and scratch buffer starts as NaN, so an element a kernel misses fails the comparison."""
    old, tg.POISON = tg.POISON, True
    yield
    tg.POISON = old


def rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make(B, H, Hk, T, K, V, gate, strong=False, h0=True, seed=0, dtype=torch.float32):
    """Random inputs; gate in {"channel", "scalar", None}; strong gates sit mostly at the clamp (-5)."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen)

    q, k, v = rnd(B, H, T, K), rnd(B, Hk, T, K), rnd(B, Hk, T, V)
    g = None
    if gate is not None:
        x = rnd(B, Hk, T, K if gate == "channel" else 1)
        g = gla.clamp_log_gate(F.logsigmoid(x * 4 - 6) if strong else F.logsigmoid(x))
    S0 = rnd(B, Hk, K, V) if h0 else None
    to = lambda x: None if x is None else x.to(DEVICE)  # noqa: E731
    return to(q.to(dtype)), to(k.to(dtype)), to(v.to(dtype)), to(g), to(S0)


# (B, H, Hk, T, K, V, gate, strong, initial state)
FWD = [
    (2, 4, 2, 1, 16, 16, "channel", False, True),
    (2, 4, 2, 17, 32, 33, "scalar", False, False),
    (2, 2, 2, 64, 16, 33, None, False, True),
    (2, 4, 2, 100, 32, 16, "channel", True, True),
    (2, 2, 2, 100, 16, 33, "scalar", True, False),
    (1, 2, 1, 70, 80, 65, "channel", False, True),  # K, V over one 64-wide block
]


@pytest.mark.parametrize("B,H,Hk,T,K,V,gate,strong,h0", FWD)
def test_forward(B, H, Hk, T, K, V, gate, strong, h0):
    q, k, v, g, S0 = make(B, H, Hk, T, K, V, gate, strong, h0)
    S0_copy = None if S0 is None else S0.clone()
    o, S = tg.chunk_gla_fwd(q, k, v, g, SCALE, S0)
    ro, rS = gla.gla_naive(q.cpu(), k.cpu(), v.cpu(), None if g is None else g.cpu(), SCALE,
                           None if S0 is None else S0.cpu())
    assert o.shape == (B, H, T, V) and o.dtype == q.dtype
    assert S.shape == (B, Hk, K, V) and S.dtype == torch.float32
    assert rel(o, ro) <= 1e-4
    assert rel(S, rS) <= 1e-4
    if S0 is not None:
        assert torch.equal(S0, S0_copy)  # not modified


def test_forward_non_contiguous():
    B, H, Hk, T, K, V = 1, 4, 2, 20, 16, 16
    q, k, v, g, S0 = make(B, H, Hk, T, K, V, "channel")
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, T, H, K] storage
    assert not qt.is_contiguous()
    o, S = tg.chunk_gla_fwd(qt, k, v, g, SCALE, S0)
    ro, rS = gla.gla_naive(q.cpu(), k.cpu(), v.cpu(), g.cpu(), SCALE, S0.cpu())
    assert rel(o, ro) <= 1e-4 and rel(S, rS) <= 1e-4


# (B, H, Hk, T, K, V, gate, strong, initial state, dfinal_state)
BWD = [
    (2, 4, 2, 17, 16, 33, "channel", False, True, True),
    (2, 4, 2, 100, 32, 16, "channel", True, True, True),
    (2, 2, 2, 64, 16, 16, "scalar", False, True, False),
    (2, 2, 2, 100, 16, 33, None, False, False, True),
    (2, 4, 2, 5, 32, 16, "scalar", True, False, True),
]


@pytest.mark.parametrize("B,H,Hk,T,K,V,gate,strong,h0,dfinal", BWD)
def test_backward(B, H, Hk, T, K, V, gate, strong, h0, dfinal):
    q, k, v, g, S0 = make(B, H, Hk, T, K, V, gate, strong, h0)
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(B, H, T, V, generator=gen).to(DEVICE)
    dS = torch.randn(B, Hk, K, V, generator=gen).to(DEVICE) if dfinal else None

    leaves = [None if x is None else x.detach().cpu().clone().requires_grad_() for x in (q, k, v, g, S0)]
    ro, rS = gla.gla_naive(*leaves[:4], SCALE, leaves[4])
    loss = (ro * do.cpu()).sum() + ((rS * dS.cpu()).sum() if dS is not None else 0)
    loss.backward()

    dq, dk, dv, dg, dS0 = tg.chunk_gla_bwd(q, k, v, g, SCALE, S0, do, dS)
    for name, got, x, leaf in (("dq", dq, q, leaves[0]), ("dk", dk, k, leaves[1]), ("dv", dv, v, leaves[2])):
        assert got.shape == x.shape and got.dtype == x.dtype, name
        assert rel(got, leaf.grad) <= 1e-4, name
    if g is None:
        assert dg is None
    else:
        assert dg.shape == g.shape and dg.dtype == torch.float32
        assert rel(dg, leaves[3].grad) <= 1e-4
    if S0 is None:
        assert dS0 is None
    else:
        assert dS0.shape == S0.shape and dS0.dtype == torch.float32
        assert rel(dS0, leaves[4].grad) <= 1e-4


def test_backward_wide_blocks():
    """K and V beyond one 64-wide block, GQA, per-channel gates, every gradient."""
    B, H, Hk, T, K, V = 1, 2, 1, 70, 80, 65
    q, k, v, g, S0 = make(B, H, Hk, T, K, V, "channel", strong=True)
    do = torch.randn(B, H, T, V).to(DEVICE)
    dS = torch.randn(B, Hk, K, V).to(DEVICE)
    leaves = [x.detach().cpu().clone().requires_grad_() for x in (q, k, v, g, S0)]
    ro, rS = gla.gla_naive(*leaves[:4], SCALE, leaves[4])
    ((ro * do.cpu()).sum() + (rS * dS.cpu()).sum()).backward()
    grads = tg.chunk_gla_bwd(q, k, v, g, SCALE, S0, do, dS)
    for got, leaf in zip(grads, leaves):
        assert rel(got, leaf.grad) <= 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype):
    B, H, Hk, T, K, V = 1, 4, 2, 40, 32, 33
    q, k, v, g, S0 = make(B, H, Hk, T, K, V, "channel", dtype=dtype)
    o, S = tg.chunk_gla_fwd(q, k, v, g, SCALE, S0)
    q32, k32, v32 = q.float(), k.float(), v.float()
    ro, rS = tg.chunk_gla_fwd(q32, k32, v32, g, SCALE, S0)
    assert o.dtype == dtype and S.dtype == torch.float32
    assert torch.isfinite(o).all() and torch.isfinite(S).all()
    assert rel(o, ro) <= 1e-2 and rel(S, rS) <= 1e-2
    do = torch.randn(B, H, T, V).to(DEVICE)
    dS = torch.randn(B, Hk, K, V).to(DEVICE)
    got = tg.chunk_gla_bwd(q, k, v, g, SCALE, S0, do.to(dtype), dS)
    ref = tg.chunk_gla_bwd(q32, k32, v32, g, SCALE, S0, do.to(dtype).float(), dS)
    for name, a, b, x in zip(("dq", "dk", "dv", "dg", "dS0"), got, ref, (q, k, v, g, S0)):
        assert a.dtype == (x.dtype if name in ("dq", "dk", "dv") else torch.float32), name
        assert torch.isfinite(a).all(), name
        assert rel(a, b) <= 1e-2, name


@pytest.mark.parametrize("gate", ["channel", "scalar", None])
@pytest.mark.parametrize("inplace", [False, True])
def test_step(gate, inplace):
    B, H, Hk, K, V = 2, 4, 2, 32, 33
    q, k, v, g, S0 = make(B, H, Hk, 1, K, V, gate)
    q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]
    g = None if g is None else g[:, :, 0]
    state = S0.clone()
    o, S = tg.fused_recurrent_gla_step(q, k, v, g, state, SCALE, inplace=inplace)
    ro, rS = gla.gla_step(q.cpu(), k.cpu(), v.cpu(), None if g is None else g.cpu(), S0.cpu(), SCALE)
    assert o.shape == (B, H, V) and o.dtype == q.dtype and S.dtype == torch.float32
    assert rel(o, ro) <= 1e-5 and rel(S, rS) <= 1e-5
    if inplace:
        assert S is state
    else:
        assert S is not state and torch.equal(state, S0)


def test_step_matches_chunked_and_half():
    """Decoding after a chunked prefill continues the same recurrence; bf16 inputs stay close to fp32."""
    B, H, Hk, T, K, V = 1, 4, 2, 9, 16, 16
    q, k, v, g, S0 = make(B, H, Hk, T, K, V, "channel")
    _, S = tg.chunk_gla_fwd(q[:, :, :-1], k[:, :, :-1], v[:, :, :-1], g[:, :, :-1], SCALE, S0)
    o_step, S_step = tg.fused_recurrent_gla_step(q[:, :, -1], k[:, :, -1], v[:, :, -1], g[:, :, -1], S, SCALE)
    o_all, S_all = tg.chunk_gla_fwd(q, k, v, g, SCALE, S0)
    assert rel(o_step, o_all[:, :, -1]) <= 1e-5 and rel(S_step, S_all) <= 1e-5
    bf = [x.to(torch.bfloat16) for x in (q[:, :, -1], k[:, :, -1], v[:, :, -1])]
    o_bf, S_bf = tg.fused_recurrent_gla_step(*bf, g[:, :, -1], S, SCALE)
    assert o_bf.dtype == torch.bfloat16 and torch.isfinite(o_bf).all()
    assert rel(o_bf, o_step) <= 1e-2 and rel(S_bf, S_step) <= 1e-2


def test_supported_and_errors():
    q, k, v, g, _ = make(1, 2, 1, 4, 16, 16, "channel")
    assert tg.supported(q, k, v, g) is None
    assert tg.supported(q, k, v, None) is None
    assert tg.supported(q, k, v, g[..., :1]) is None
    big = torch.zeros(1, 2, 4, 300, device=DEVICE)
    assert "256" in tg.supported(big, big[:, :1], v, None)
    assert tg.supported(q, k, v, g[..., :3]) is not None
    assert tg.supported(q, k, v[:, :, :3], None) is not None  # length mismatch
    assert tg.supported(q.double(), k.double(), v.double(), None) is not None
    with pytest.raises(ValueError):
        tg.chunk_gla_fwd(q, k, v, g, SCALE, chunk=32)


# --------------------------------------------------------------------------------------------------
# Tuning knobs (tg.TUNING, read at every chunk_gla_fwd / chunk_gla_bwd call).


@pytest.fixture(autouse=True)
def restore_tuning():
    """Every test starts from the default Tuning and leaves tg.TUNING as it found it."""
    old = tg.TUNING
    tg.TUNING = tg.Tuning()
    try:
        yield
    finally:
        tg.TUNING = old


def record_scratch(monkeypatch):
    """From now on, (shape, dtype) of every buffer the wrappers allocate (`_empty`; fp32 unless given)."""
    scratch = []
    empty = tg._empty

    def record(*shape, **kw):
        scratch.append((shape, kw.get("dtype") or torch.float32))
        return empty(*shape, **kw)

    monkeypatch.setattr(tg, "_empty", record)
    return scratch


class Spy:
    """Stands in for the Triton kernel `name`: logs (name, grid) of each launch, then launches it."""

    def __init__(self, name, log):
        self.name, self.kernel, self.log = name, getattr(tg, name), log

    def __getitem__(self, grid):
        self.log.append((self.name, grid))
        return self.kernel[grid]


def oracle_grads(q, k, v, g, S0, do, dS):
    leaves = [None if x is None else x.detach().cpu().float().clone().requires_grad_() for x in (q, k, v, g, S0)]
    ro, rS = gla.gla_naive(*leaves[:4], SCALE, leaves[4])
    ((ro * do.cpu()).sum() + (rS * dS.cpu()).sum()).backward()
    return ro, rS, [None if x is None else x.grad for x in leaves]


def fwd_bwd(q, k, v, g, S0, do, dS):
    o, S = tg.chunk_gla_fwd(q, k, v, g, SCALE, S0)
    return [o, S, *tg.chunk_gla_bwd(q, k, v, g, SCALE, S0, do, dS)]


NAMES = ("o", "S", "dq", "dk", "dv", "dg", "dS0")


@pytest.mark.parametrize("dtype,gate,intra,fuse", exhaustive([
    (torch.bfloat16, "channel", "matmul", False), (torch.float16, "scalar", "matmul", False),
    (torch.bfloat16, None, "matmul", False), (torch.bfloat16, "channel", "matmul", True),
    (torch.float16, "channel", "matmul", True), (torch.bfloat16, "channel", "rows", False)], keep={0, 1, 3}))
def test_low_precision(dtype, gate, intra, fuse, monkeypatch):
    """precision "low": half-precision operands and scratch buffers, the backward's too, stay within the bf16
    tolerance of the fp32 result (with fuse_intra too, which stores no A, and with the row scheme)."""
    B, H, Hk, T, K, V = 1, 2, 1, 70, 32, 33  # two chunks (the second one a masked tail), GQA
    q, k, v, g, S0 = make(B, H, Hk, T, K, V, gate, dtype=dtype)
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(B, H, T, V, generator=gen).to(DEVICE).to(dtype)
    dS = torch.randn(B, Hk, K, V, generator=gen).to(DEVICE)
    ref = fwd_bwd(q.float(), k.float(), v.float(), g, S0, do.float(), dS)  # fp32 inputs: always "full"
    tg.TUNING = tg.Tuning(precision="mixed", intra=intra, fuse_intra=fuse)
    mixed = fwd_bwd(q, k, v, g, S0, do, dS)

    scratch = record_scratch(monkeypatch)
    tg.TUNING = tg.Tuning(precision="low", intra=intra, fuse_intra=fuse)  # read at call time
    got = fwd_bwd(q, k, v, g, S0, do, dS)
    for name, a, b, x in zip(NAMES, got, ref, (q, S0, q, k, v, g, S0)):
        if x is None:
            assert a is None, name
            continue
        assert a.dtype == (x.dtype if name in ("o", "dq", "dk", "dv") else torch.float32), name
        assert torch.isfinite(a).all(), name
        # dg = reverse cumsum of q ⊙ dq − k ⊙ dk cancels heavily, which amplifies the operand rounding:
        # 1e-3 .. 1.5e-2 over seeds (the other outputs: ≤ 4e-3)
        assert rel(a, b) <= (2e-2 if name == "dg" else 1e-2), name
    assert not torch.equal(got[2], mixed[2])  # the knob reached the backward's state kernels
    N, C = 2, tg.CHUNK
    kinds = {(B, Hk, N, K, V): "h/dh", (B, H, N * C, C): "A/dA", (B, Hk, K, V): "final state/dS0"}
    dts = {}
    for shape, dt in scratch:
        dts.setdefault(kinds.get(shape), set()).add(dt)
    assert dts["h/dh"] == {dtype}  # chunk states and their gradients in the input dtype
    assert dts["A/dA"] == ({torch.float32} if fuse else {dtype, torch.float32})  # A in the input dtype, dA fp32
    assert dts["final state/dS0"] == {torch.float32}


@pytest.mark.parametrize("dtype,gate,fuse", exhaustive([(torch.bfloat16, "channel", False),
                                                        (torch.bfloat16, "scalar", False),
                                                        (torch.bfloat16, "channel", True)], keep={0}))
def test_mixed_precision(dtype, gate, fuse, monkeypatch):
    """precision "mixed" (the default): the forward in half precision (output and final state within the bf16
    tolerance of fp32, not equal to "full"'s), the backward's dq, dk, dg and d initial state are "full"'s
    (fp32 h, dh and products), dv within the bf16 tolerance; the scratch buffers in the dtypes that says."""
    B, H, Hk, T, K, V = 1, 2, 1, 100, 32, 16  # two chunks (the last a masked tail), GQA
    q, k, v, g, S0 = make(B, H, Hk, T, K, V, gate, dtype=dtype)
    gen = torch.Generator().manual_seed(2)
    do = torch.randn(B, H, T, V, generator=gen).to(DEVICE).to(dtype)
    dS = torch.randn(B, Hk, K, V, generator=gen).to(DEVICE)
    ref = fwd_bwd(q.float(), k.float(), v.float(), g, S0, do.float(), dS)
    tg.TUNING = tg.Tuning(precision="full", fuse_intra=fuse)
    full = fwd_bwd(q, k, v, g, S0, do, dS)
    scratch = record_scratch(monkeypatch)
    tg.TUNING = tg.Tuning(fuse_intra=fuse)
    assert tg.TUNING.precision == "mixed"
    got = fwd_bwd(q, k, v, g, S0, do, dS)
    for name in ("o", "S", "dv"):
        i = NAMES.index(name)
        assert rel(got[i], ref[i]) <= 1e-2, name
        assert not torch.equal(got[i], full[i]), name
    for name in ("dq", "dk", "dg", "dS0"):
        i = NAMES.index(name)
        assert rel(got[i], full[i]) <= 1e-6, name
    N, C = 2, tg.CHUNK
    h = [dt for shape, dt in scratch if shape == (B, Hk, N, K, V)]
    assert h == [dtype, torch.float32, torch.float32]  # the forward's h; the backward's h and dh
    A = [dt for shape, dt in scratch if shape == (B, H, N * C, C)]
    assert A == ([torch.float32] if fuse else [dtype, dtype, torch.float32])  # A (forward, backward), dA


def test_mixed_precision_is_full_for_fp16():
    """fp16 inputs run "mixed" as "full" (fp16's range), bit for bit; "low" is still half precision."""
    q, k, v, g, S0 = make(1, 2, 1, 70, 16, 16, "channel", dtype=torch.float16)
    do = torch.randn(1, 2, 70, 16).to(DEVICE).half()
    dS = torch.randn(1, 1, 16, 16).to(DEVICE)
    tg.TUNING = tg.Tuning(precision="full")
    full = fwd_bwd(q, k, v, g, S0, do, dS)
    tg.TUNING = tg.Tuning(precision="mixed")
    for name, a, b in zip(NAMES, fwd_bwd(q, k, v, g, S0, do, dS), full):
        assert torch.equal(a, b), name
    tg.TUNING = tg.Tuning(precision="low")
    assert not torch.equal(fwd_bwd(q, k, v, g, S0, do, dS)[0], full[0])


def test_mixed_precision_keeps_an_fp32_do_out_of_half_products():
    """dA = do · v is a half-precision product under "mixed" only when do is a half tensor too: with an fp32 do,
    dq, dk and dg are "full"'s."""
    q, k, v, g, S0 = make(1, 2, 1, 70, 16, 16, "channel", dtype=torch.bfloat16)
    do = torch.randn(1, 2, 70, 16).to(DEVICE)  # fp32, not representable in bf16
    tg.TUNING = tg.Tuning(precision="full")
    full = tg.chunk_gla_bwd(q, k, v, g, SCALE, S0, do, None)
    tg.TUNING = tg.Tuning(precision="mixed")
    got = tg.chunk_gla_bwd(q, k, v, g, SCALE, S0, do, None)
    for name, a, b in zip(("dq", "dk", "dv", "dg", "dS0"), got, full):
        if name != "dv":
            assert rel(a, b) <= 1e-6, name


def test_low_precision_fused_scales_before_rounding():
    """fp16, half-precision forward: the fused output kernel rounds scale·A to fp16 as the stored A is, so q·k
    beyond fp16's range (scale·q·k within it) gives the unfused result, not inf."""
    q, k, v, g, S0 = make(1, 2, 1, 40, 16, 16, "channel", dtype=torch.float16)
    q, v = (q.float() * 70).half(), (v.float() * 0.01).half()
    k = q[:, :1].clone()  # q_t·k_t = |q_t|²
    assert (q.float() * k.float()).sum(-1).abs().max() > 65504  # q_t·k_t itself overflows fp16
    tg.TUNING = tg.Tuning(precision="low")
    ref, _ = tg.chunk_gla_fwd(q, k, v, g, SCALE, S0)
    tg.TUNING = tg.Tuning(precision="low", fuse_intra=True)
    got, _ = tg.chunk_gla_fwd(q, k, v, g, SCALE, S0)
    assert torch.isfinite(ref).all() and torch.isfinite(got).all()
    assert rel(got, ref) <= 1e-2


@pytest.mark.parametrize("dtype,fuse", exhaustive([(torch.bfloat16, False), (torch.float16, True)], keep={0}))
def test_half_states(dtype, fuse, monkeypatch):
    """half_states under precision "full": the forward stores h in the input dtype (its output stays within the
    bf16 tolerance of the fp32 result), the backward is untouched (gradients equal to "full"'s, bit for bit);
    fp32 inputs ignore it."""
    B, H, Hk, T, K, V = 1, 2, 1, 100, 32, 16  # two chunks: the second reads a state the first stored
    q, k, v, g, S0 = make(B, H, Hk, T, K, V, "channel", dtype=dtype)
    do = torch.randn(B, H, T, V).to(DEVICE).to(dtype)
    dS = torch.randn(B, Hk, K, V).to(DEVICE)
    scratch = record_scratch(monkeypatch)
    tg.TUNING = tg.Tuning(precision="full", fuse_intra=fuse, half_states=True)
    ref, _ = tg.chunk_gla_fwd(q.float(), k.float(), v.float(), g, SCALE, S0)
    assert {dt for shape, dt in scratch if len(shape) == 5} == {torch.float32}  # fp32 inputs: h in fp32
    got = fwd_bwd(q, k, v, g, S0, do, dS)
    hs = [dt for shape, dt in scratch if len(shape) == 5][1:]
    assert hs[0] == dtype and set(hs[1:]) == {torch.float32}  # the forward's h; the backward's h and dh
    tg.TUNING = tg.Tuning(precision="full", fuse_intra=fuse)
    default = fwd_bwd(q, k, v, g, S0, do, dS)
    assert rel(got[0], ref) <= 1e-2 and not torch.equal(got[0], default[0])
    for name, a, b in zip(NAMES[1:], got[1:], default[1:]):
        assert torch.equal(a, b), name


def test_precision_ignored_for_fp32():
    B, H, Hk, T, K, V = 1, 2, 1, 70, 32, 33
    q, k, v, g, S0 = make(B, H, Hk, T, K, V, "channel")
    do = torch.randn(B, H, T, V).to(DEVICE)
    dS = torch.randn(B, Hk, K, V).to(DEVICE)
    ref = fwd_bwd(q, k, v, g, S0, do, dS)
    tg.TUNING = tg.Tuning(precision="low", num_warps=8, num_stages=2)  # launch options pass through
    got = fwd_bwd(q, k, v, g, S0, do, dS)
    for name, a, b in zip(NAMES, got, ref):
        assert a.dtype == b.dtype and rel(a, b) <= 1e-6, name


def check_against_oracle(H, Hk, T, K, V, gate, B=1, faint=False):
    """Forward and every gradient of the kernels (under the current tg.TUNING) against the oracle, fp32, 1e-4;
    strong gates (faint: log gates ~ −0.01, so a whole chunk's decay exp(b_last) stays ~0.5 and the state
    carried across chunks matters), an initial state, random output and final-state gradients."""
    q, k, v, g, S0 = make(B, H, Hk, T, K, V, gate, strong=True)
    gen = torch.Generator().manual_seed(1)
    if faint and g is not None:
        g = F.logsigmoid(torch.randn(g.shape, generator=gen) + 4.5).to(DEVICE)
    do = torch.randn(B, H, T, V, generator=gen).to(DEVICE)
    dS = torch.randn(B, Hk, K, V, generator=gen).to(DEVICE)
    ro, rS, grads = oracle_grads(q, k, v, g, S0, do, dS)
    got = fwd_bwd(q, k, v, g, S0, do, dS)
    for name, a, b in zip(NAMES, got, [ro, rS, *grads]):
        if b is None:
            assert a is None, name
        else:
            assert rel(a, b) <= 1e-4, name


# (block_k, block_v, H, Hk, T, K, V, gate)
BLOCKS = [
    (32, 32, 2, 1, 70, 64, 64, "channel"),  # K and V over two blocks each, GQA
    (32, 32, 2, 2, 70, 64, 64, "scalar"),
    (16, 16, 2, 1, 40, 40, 33, "channel"),  # three blocks each, masked tails
    (16, 32, 2, 1, 70, 33, 48, "scalar"),
    (16, 16, 2, 1, 20, 32, 32, None),
]


@pytest.mark.parametrize("block_k,block_v,H,Hk,T,K,V,gate", exhaustive(BLOCKS, keep={0, 2, 4}))
def test_block_sizes(block_k, block_v, H, Hk, T, K, V, gate):
    """Smaller K / V blocks (the kernels loop over several) match the oracle; forward and every gradient."""
    tg.TUNING = tg.Tuning(block_k=block_k, block_v=block_v)
    check_against_oracle(H, Hk, T, K, V, gate)


# (intra, block_k, block_v, H, Hk, T, K, V, gate, faint) for Tuning.dg_form "carry"; faint gates keep the
# exp(b_last) ⊙ Σ_v h ⊙ dh part of the carry (and the initial state's share in it) far from 0
CARRY = [
    ("matmul", 64, 64, 4, 2, 150, 32, 17, "channel", False),  # GQA, three chunks, the last a masked tail
    ("matmul", 16, 16, 2, 1, 70, 40, 33, "channel", False),  # K and V over several blocks, partial last ones
    ("matmul", 64, 64, 2, 2, 130, 16, 16, "scalar", False),  # one gate per step: the carry summed over K
    ("rows", 64, 64, 2, 1, 100, 32, 16, "channel", False),
    ("matmul", 64, 64, 2, 1, 1, 16, 16, "channel", False),  # a single row: the carry is the final-state term
    ("matmul", 64, 64, 2, 1, 40, 16, 16, None, False),  # no gates: no carry
    ("matmul", 64, 64, 2, 1, 150, 32, 17, "channel", True),
    ("matmul", 16, 16, 2, 1, 200, 40, 33, "channel", True),  # four chunks, K and V over several blocks
    ("matmul", 64, 64, 2, 2, 130, 16, 16, "scalar", True),
    ("rows", 32, 64, 2, 1, 100, 64, 16, "channel", True),
]


@pytest.mark.parametrize("intra,block_k,block_v,H,Hk,T,K,V,gate,faint", exhaustive(CARRY, keep={0, 1, 2, 3, 4, 5, 6}))
def test_dg_carry(intra, block_k, block_v, H, Hk, T, K, V, gate, faint, monkeypatch):
    """dg_form "carry" (within-chunk suffix sums plus Σ_v S_n ⊙ dS_n per chunk, from `_dqk_bwd`) gives the
    oracle's forward and gradients, with an initial state and a final-state gradient, and replaces the
    whole-sequence scan."""
    ran = []
    for name in ("_rev_cumsum", "_chunk_suffix"):
        monkeypatch.setattr(tg, name, Spy(name, ran))
    tg.TUNING = tg.Tuning(dg_form="carry", intra=intra, block_k=block_k, block_v=block_v)
    check_against_oracle(H, Hk, T, K, V, gate, faint=faint)
    assert [name for name, _ in ran] == ([] if gate is None else ["_chunk_suffix"])


# (intra, dg_form, block_k, block_v, B, H, Hk, T, K, V, gate, faint) for Tuning.dqk "split"; faint gates keep
# the carry's exp(b_last) ⊙ Σ_v h ⊙ dh term far from 0 (see CARRY)
DQK_SPLIT = [
    ("matmul", "scan", 64, 64, 1, 4, 2, 150, 32, 17, "channel", False),  # GQA, three chunks, a masked tail
    ("matmul", "carry", 16, 16, 1, 2, 1, 70, 40, 33, "channel", False),  # K and V over several blocks
    ("matmul", "carry", 64, 64, 1, 2, 2, 150, 32, 17, "channel", True),  # the carry of kv head 1
    ("matmul", "scan", 64, 64, 2, 2, 2, 130, 16, 16, "scalar", False),  # two sequences
    ("matmul", "carry", 64, 64, 2, 4, 2, 100, 16, 16, "scalar", True),
    ("rows", "carry", 64, 64, 1, 2, 1, 100, 32, 16, "channel", False),
    ("matmul", "scan", 64, 64, 1, 2, 1, 40, 16, 16, None, False),
]


@pytest.mark.parametrize("intra,dg_form,block_k,block_v,B,H,Hk,T,K,V,gate,faint",
                         exhaustive(DQK_SPLIT, keep={0, 1, 2, 6}))
def test_dqk_split(intra, dg_form, block_k, block_v, B, H, Hk, T, K, V, gate, faint, monkeypatch):
    """dqk "split" (intra-chunk terms by `_dqk_bwd` INTER=False, inter-chunk ones by `_dqk_inter` in 64-row
    tiles) gives the oracle's gradients; both kernels run once per backward."""
    ran = []
    for name in ("_dqk_bwd", "_dqk_inter"):
        monkeypatch.setattr(tg, name, Spy(name, ran))
    tg.TUNING = tg.Tuning(dqk="split", intra=intra, dg_form=dg_form, block_k=block_k, block_v=block_v)
    check_against_oracle(H, Hk, T, K, V, gate, B=B, faint=faint)
    assert [name for name, _ in ran] == ["_dqk_bwd", "_dqk_inter"]


@pytest.mark.parametrize("dg_form", exhaustive(["scan", "carry"], keep={1}))
def test_dqk_split_in_low_precision(dg_form, monkeypatch):
    """Under "low" the split form rounds the same operands as the fused one: dq, dk, dg agree closely."""
    q, k, v, g, S0 = make(1, 2, 1, 100, 32, 16, "channel", dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(4)
    do = torch.randn(1, 2, 100, 16, generator=gen).to(DEVICE).bfloat16()
    tg.TUNING = tg.Tuning(precision="low", dg_form=dg_form)
    fused = tg.chunk_gla_bwd(q, k, v, g, SCALE, S0, do, None)
    ran = []
    monkeypatch.setattr(tg, "_dqk_inter", Spy("_dqk_inter", ran))
    tg.TUNING = tg.Tuning(precision="low", dg_form=dg_form, dqk="split")
    split = tg.chunk_gla_bwd(q, k, v, g, SCALE, S0, do, None)
    assert len(ran) == 1
    for name, a, b in zip(NAMES[2:], split, fused):
        assert rel(a, b) <= 2e-3, name


def test_dg_carry_without_final_state_gradient():
    """Without a final-state gradient the last chunk's carry is 0 (dh there is 0), as the scan has no `last`."""
    q, k, v, g, S0 = make(1, 2, 1, 100, 16, 16, "channel", strong=True)
    do = torch.randn(1, 2, 100, 16).to(DEVICE)
    tg.TUNING = tg.Tuning(dg_form="scan")
    want = tg.chunk_gla_bwd(q, k, v, g, SCALE, S0, do, None)
    tg.TUNING = tg.Tuning(dg_form="carry")
    got = tg.chunk_gla_bwd(q, k, v, g, SCALE, S0, do, None)
    for name, a, b in zip(("dq", "dk", "dv", "dg", "dS0"), got, want):
        assert rel(a, b) <= 1e-5, name


def test_dg_carry_keeps_low_precision_dg_accurate():
    """What "carry" is for: under precision "low" (h and dh rounded to bf16 in dq and dk's products) the scan
    sums the rounding of the cancelling terms q ⊙ dq − k ⊙ dk over the whole sequence; the carry form sums it
    within a chunk. Its dg error is well under the scan's and under the 1e-2 bf16 target (interpreter, this
    seed: 1.9e-3 against 4.0e-3 at T = 256; 2.0e-3 against 6.2e-3 at T = 512, head_dim 32)."""
    B, H, Hk, T, D = 1, 2, 1, 256, 64
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(B, h, T, D, generator=gen) * D ** -0.5 for h in (H, Hk))
    v = torch.randn(B, Hk, T, D, generator=gen)
    g = F.logsigmoid(torch.randn(B, Hk, T, D, generator=gen) + 3.0) / 4  # slow decay: long memory
    do = torch.randn(B, H, T, D, generator=gen)
    q, k, v, do = (x.to(DEVICE).bfloat16() for x in (q, k, v, do))
    g = g.to(DEVICE)
    ref = [x.detach().float().cpu().clone().requires_grad_(True) for x in (q, k, v, g)]
    o, _ = gla.gla_chunked(*ref, scale=SCALE)
    o.backward(do.float().cpu())
    errs = {}
    for form in tg.DG_FORM:
        tg.TUNING = tg.Tuning(precision="low", dg_form=form)
        dg = tg.chunk_gla_bwd(q, k, v, g, SCALE, None, do, None)[3]
        errs[form] = rel(dg, ref[3].grad)
    assert errs["carry"] <= 1e-2 and errs["carry"] < errs["scan"] / 1.5, errs


# (intra, fuse_intra, block_k, H, Hk, T, K, V, gate): tails inside the first and second 16-row blocks of a chunk,
# a single row; the default ("matmul", unfused) runs in every test above
INTRA = [
    ("rows", False, 64, 2, 2, 70, 16, 17, "channel"),  # two kv heads, the tail chunk's rows 6..63 past T
    ("rows", False, 16, 2, 1, 40, 40, 16, "scalar"),  # K over three blocks, T inside the third row block
    ("split", False, 64, 4, 2, 70, 16, 17, "channel"),
    ("split", False, 64, 2, 2, 17, 16, 16, "scalar"),  # one chunk, T inside the second row block
    ("split", False, 16, 2, 1, 40, 40, 16, "channel"),
    ("split", False, 64, 2, 1, 128, 32, 32, None),  # no gates: the diagonal block is a matmul
    ("split", False, 64, 2, 2, 1, 16, 16, "channel"),  # a single row
    ("matmul", True, 64, 4, 2, 70, 16, 17, "channel"),
    ("matmul", True, 16, 2, 1, 40, 40, 33, "scalar"),  # K and V over several blocks
    ("matmul", True, 16, 2, 1, 40, 40, 33, "channel"),  # per-channel gates over K blocks, a partial last one
    ("matmul", True, 64, 2, 1, 100, 32, 16, None),
    ("matmul", True, 64, 2, 2, 1, 16, 16, "channel"),
]
KERNEL_OF = {"matmul": "_attn_intra_mm", "rows": "_attn_intra", "split": "_attn_intra_split"}


@pytest.mark.parametrize("intra,fuse_intra,block_k,H,Hk,T,K,V,gate", exhaustive(INTRA, keep={0, 1, 3, 4, 5, 6, 7, 9, 10, 11}))
def test_intra_kinds(intra, fuse_intra, block_k, H, Hk, T, K, V, gate, monkeypatch):
    """Every Tuning.intra (and fuse_intra) gives the oracle's forward and gradients, and launches the kernels it
    names: A by `_attn_intra` (one program per chunk) or `_attn_intra_split` / `_attn_intra_mm` (one per
    16-row block), in the forward and in the backward's recompute; with fuse_intra no A kernel runs at all
    (`_o_fwd_mm` in the forward, `_dv_bwd` forms A itself) and the forward stores no cumulative gates."""
    grids = []
    for name in (*KERNEL_OF.values(), "_o_fwd", "_o_fwd_mm", "_chunk_cumsum"):
        monkeypatch.setattr(tg, name, Spy(name, grids))
    tg.TUNING = tg.Tuning(intra=intra, fuse_intra=fuse_intra, block_k=block_k)
    check_against_oracle(H, Hk, T, K, V, gate)
    n = -(-T // tg.CHUNK)
    nv = -(-V // 64)
    A = (KERNEL_OF[intra], (n if intra == "rows" else 4 * n, H))
    cum = [("_chunk_cumsum", (n, 1, Hk))] if gate else []  # K, KG ≤ 64: one K block
    if fuse_intra:  # the forward cumulates the gates in its own kernels, and nothing builds A
        assert grids == [("_o_fwd_mm", (4 * n, nv, H))] + cum
    else:  # the backward rebuilds A for dv
        assert grids == cum + [A, ("_o_fwd", (n, nv, H))] + cum + [A]


# (B, H, Hk, T, K, V, gate, block_k, dtype) for Tuning.raw_gates
RAW_GATES = [
    (1, 2, 1, 100, 40, 33, "channel", 16, torch.float32),  # GQA, K over three blocks (a partial last one), a tail
    (2, 4, 2, 40, 16, 16, "scalar", 64, torch.float32),  # one gate per step, two sequences, GQA over 2 kv heads
    (1, 2, 1, 70, 32, 16, "channel", 64, torch.bfloat16),  # "mixed": the half-precision forward kernels
]


@pytest.mark.parametrize("B,H,Hk,T,K,V,gate,block_k,dtype", RAW_GATES)
def test_raw_gates(B, H, Hk, T, K, V, gate, block_k, dtype, monkeypatch):
    """raw_gates: the forward launches no `_chunk_cumsum` (`_h_fwd`, `_attn_intra_mm` and `_o_fwd` cumulate and
    clamp g in their tiles) and gives the default's output, final state and A (which the backward reuses); a
    forward asked to keep b still forms it, the same b."""
    q, k, v, g, S0 = make(B, H, Hk, T, K, V, gate, strong=True, dtype=dtype)
    g = g * 1.5  # many gates below LOG_GATE_MIN, which every cumsum must clamp alike
    tg.TUNING = tg.Tuning(block_k=block_k)
    want = tg.chunk_gla_fwd(q, k, v, g, SCALE, S0, keep_a=True, keep_b=True)
    log = []
    for name in ("_chunk_cumsum", "_h_fwd", "_attn_intra_mm", "_o_fwd"):
        monkeypatch.setattr(tg, name, Spy(name, log))
    tg.TUNING = tg.Tuning(block_k=block_k, raw_gates=True)
    o, S, A, no_b = tg.chunk_gla_fwd(q, k, v, g, SCALE, S0, keep_a=True)  # what the custom op asks by default
    assert [name for name, _ in log] == ["_h_fwd", "_attn_intra_mm", "_o_fwd"]
    assert torch.isfinite(o).all() and o.dtype == dtype and no_b is None
    assert rel(o, want[0]) <= SAME and rel(S, want[1]) <= SAME and rel(A, want[2]) <= SAME
    log.clear()
    *_, b = tg.chunk_gla_fwd(q, k, v, g, SCALE, S0, keep_b=True)
    assert [name for name, _ in log] == ["_chunk_cumsum", "_h_fwd", "_attn_intra_mm", "_o_fwd"]
    assert torch.equal(b, want[3])


# (B, H, Hk, T, K, V, gate, h0, dtype) for Tuning.scan_forward
SCAN_FORWARD = [
    (1, 2, 1, 100, 40, 33, "channel", True, torch.float32),  # GQA (one state update for two heads), K and V
    #                                                          not powers of two, a tail chunk
    (2, 4, 2, 70, 80, 65, "channel", True, torch.float32),  # K in one 128-wide block, V over two blocks (two
    #                                                         programs per kv head), two sequences, GQA
    (2, 4, 2, 70, 16, 16, "scalar", False, torch.float32),  # two sequences, GQA over two kv heads, no S0
    (1, 2, 2, 64, 32, 16, None, True, torch.float32),  # no gates, one whole chunk
    (1, 2, 1, 70, 32, 16, "channel", True, torch.bfloat16),  # "mixed": the state rounded as the h buffer is
    (1, 2, 2, 1, 16, 16, "channel", True, torch.float32),  # a single row
]


@pytest.mark.parametrize("B,H,Hk,T,K,V,gate,h0,dtype", SCAN_FORWARD)
def test_scan_forward(B, H, Hk, T, K, V, gate, h0, dtype, monkeypatch):
    """scan_forward: the forward is one `_fwd_scan` launch of (V blocks, batch·kv heads) programs and gives
    the default forward's output and final state; it keeps nothing for a backward (kept_layout agrees)."""
    q, k, v, g, S0 = make(B, H, Hk, T, K, V, gate, strong=True, h0=h0, dtype=dtype)
    if g is not None:
        g = g * 1.5  # many gates below LOG_GATE_MIN, which the scan must clamp as `_chunk_cumsum` does
    want = tg.chunk_gla_fwd(q, k, v, g, SCALE, S0)
    log, buffers = [], []
    for name in ("_chunk_cumsum", "_h_fwd", "_attn_intra_mm", "_o_fwd", "_o_fwd_mm", "_fwd_scan"):
        monkeypatch.setattr(tg, name, Spy(name, log))
    empty = tg._empty
    monkeypatch.setattr(tg, "_empty", lambda *shape, **kw: buffers.append(shape) or empty(*shape, **kw))
    tg.TUNING = tg.Tuning(scan_forward=True)
    o, S, A, b = tg.chunk_gla_fwd(q, k, v, g, SCALE, S0, keep_a=True, keep_b=True)
    assert log == [("_fwd_scan", (-(-V // 64), B * Hk))]
    assert buffers == [(B, H, T, V), (B, Hk, K, V)]  # o and the final state: no scratch that grows with T
    assert A is None and b is None and tg.kept_layout(q, k, v, g) == (None, None)
    assert o.dtype == dtype and torch.isfinite(o).all() and S.dtype == torch.float32
    assert rel(S, want[1]) <= SAME
    assert rel(o, want[0]) <= (SAME if dtype == torch.float32 else 5e-3)  # bf16: o rounded in its last place
    ro, rS = gla.gla_naive(*(None if x is None else x.float().cpu() for x in (q, k, v, g)), SCALE,
                           None if S0 is None else S0.cpu())
    oracle_tol = 1e-4 if dtype == torch.float32 else 2e-2  # bf16: operands of the products in bf16
    assert rel(S, rS) <= oracle_tol and rel(o, ro) <= oracle_tol


def test_scan_forward_then_backward():
    """The backward after a scan forward forms A, b and h itself: the oracle's forward and every gradient."""
    tg.TUNING = tg.Tuning(scan_forward=True)
    check_against_oracle(2, 1, 70, 20, 20, "channel")


def test_fuse_intra_batches():
    """fuse_intra with two batches, GQA, per-channel gates over three K blocks: the batch strides of the raw
    gates, the fused output and the fused dv."""
    tg.TUNING = tg.Tuning(fuse_intra=True, block_k=16)
    check_against_oracle(2, 1, 70, 40, 20, "channel", B=2)


# (B, H, Hk, T, K, gate, dtype): A itself, each kind against "rows"
SAME_A = [
    (2, 4, 2, 60, 32, "channel", torch.float32),  # tail in the last row block, two batches, GQA
    (1, 2, 2, 100, 16, None, torch.float32),  # no gates, a tail chunk
    (1, 2, 1, 130, 16, "scalar", torch.float32),  # three chunks, scalar gates
    (1, 2, 1, 70, 32, "channel", torch.bfloat16),  # bf16 operands and a bf16 A
]


@pytest.mark.parametrize("B,H,Hk,T,K,gate,dtype", exhaustive(SAME_A, keep={1, 3}))
def test_intra_kinds_give_the_same_A(B, H, Hk, T, K, gate, dtype):
    """The intra-chunk matrix A of "split" and "matmul" equals "rows"'s element by element, including the
    rows past T (zeros in all; the end-to-end tests cannot see them, they meet masked outputs)."""
    q, k, v, g, _ = make(B, H, Hk, T, K, 16, gate, strong=True, dtype=dtype)
    lowp = dtype != torch.float32
    As = {}
    for intra in tg.INTRA:
        tg.TUNING = tg.Tuning(precision="low" if lowp else "full", intra=intra)
        As[intra] = tg._Setup(q, k, v, g, tg.CHUNK).intra(SCALE).float()
    upper = torch.ones(tg.CHUNK, tg.CHUNK, dtype=torch.bool).triu(1).repeat(As["rows"].shape[2] // tg.CHUNK, 1)
    for intra, a in As.items():
        assert torch.isfinite(a).all(), intra
        assert rel(a, As["rows"]) <= (1e-2 if lowp else 1e-6), intra
        assert (a[:, :, T:] == 0).all(), intra
        assert (a[:, :, upper] == 0).all(), intra  # nothing above the diagonal of each chunk


@pytest.mark.parametrize("intra,fuse,qs,ks", exhaustive(
    [(intra, fuse, qs, ks) for intra, fuse in [("matmul", False), ("matmul", True), ("rows", False), ("split", False)]
     for qs, ks in [(100.0, 100.0), (1e-7, 1e7)]], keep={0, 3, 4, 7}))
def test_gates_at_the_clamp_with_large_inputs(intra, fuse, qs, ks):
    """The matmul scheme's largest factors (e^35 on the query side, e^40 on the key side of a 16-row block)
    occur when the gates sit at LOG_GATE_MIN; half the channels do here, beside slow ones. Large q and k
    (~100), and tiny q with huge k (1e-7, 1e7: k·e^40 is finite, k·e^75, a reference at the block's start,
    is not) match the oracle for every scheme."""
    B, H, Hk, T, K, V = 1, 2, 1, 80, 32, 16
    q, k, v, _, S0 = make(B, H, Hk, T, K, V, None)
    q, k = q * qs, k * ks
    g = torch.full((B, Hk, T, K), gla.LOG_GATE_MIN).to(DEVICE)
    g[..., : K // 2] = -1e-3  # a slow half beside the fastest one
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(B, H, T, V, generator=gen).to(DEVICE)
    dS = torch.randn(B, Hk, K, V, generator=gen).to(DEVICE)
    ro, rS, grads = oracle_grads(q, k, v, g, S0, do, dS)
    tg.TUNING = tg.Tuning(intra=intra, fuse_intra=fuse)
    got = fwd_bwd(q, k, v, g, S0, do, dS)
    for name, a, b in zip(NAMES, got, [ro, rS, *grads]):
        assert torch.isfinite(a).all(), name
        assert rel(a, b) <= 1e-4, name


@pytest.mark.parametrize("fuse,KG", [(False, 16), (True, 16), (False, 1), (True, 1)])
def test_gates_below_the_clamp(fuse, KG):
    """Gates below LOG_GATE_MIN are clamped inside the kernels, as in every form of kernels/gla.py: the
    outputs are those of the clamped gates and no gradient reaches the clamped entries (fuse_intra: the
    forward's kernels cumulate and clamp the gates themselves); per-channel and scalar gates."""
    tg.TUNING = tg.Tuning(fuse_intra=fuse)
    B, H, Hk, T, K, V = 1, 2, 1, 70, 16, 16
    q, k, v, _, S0 = make(B, H, Hk, T, K, V, None)
    gen = torch.Generator().manual_seed(2)
    g = (torch.randn(B, Hk, T, KG, generator=gen) * 6 - 4).clamp_max(0).to(DEVICE)  # ~1/2 below -5
    assert (g < gla.LOG_GATE_MIN).float().mean() > 0.3
    do = torch.randn(B, H, T, V, generator=gen).to(DEVICE)
    dS = torch.randn(B, Hk, K, V, generator=gen).to(DEVICE)
    ro, rS, grads = oracle_grads(q, k, v, g, S0, do, dS)
    got = fwd_bwd(q, k, v, g, S0, do, dS)
    for name, a, b in zip(NAMES, got, [ro, rS, *grads]):
        assert rel(a, b) <= 1e-4, name
    dg = got[5]
    assert (dg[g < gla.LOG_GATE_MIN] == 0).all() and (dg[g >= gla.LOG_GATE_MIN] != 0).any()


@pytest.mark.parametrize("kw", [{}, dict(fuse_intra=True), dict(scan_forward=True)])
def test_a_nan_gate_stays_nan(kw):
    """The clamp keeps a NaN gate NaN (as torch's clamp does), so a diverging model is not hidden."""
    tg.TUNING = tg.Tuning(**kw)
    q, k, v, g, S0 = make(1, 2, 1, 40, 16, 16, "channel")
    g = g.clone()
    g[0, 0, 20, 3] = float("nan")
    o, S = tg.chunk_gla_fwd(q, k, v, g, SCALE, S0)
    assert torch.isnan(o[:, :, 20:]).all() and torch.isnan(S[:, :, 3]).all()
    assert torch.isfinite(o[:, :, :16]).all()  # (rows 16-19 share a reference with row 20: NaN too)
    step_o, step_S = tg.fused_recurrent_gla_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], g[:, :, 20], S0, SCALE)
    assert torch.isnan(step_S[:, :, 3]).all() and torch.isnan(step_o).all()


def test_decode_step_clamps_the_gate():
    """The decode step clamps like the chunk kernels and `gla.gla_step`: one step from a state equals a
    one-position chunk, with gates far below LOG_GATE_MIN."""
    q, k, v, _, S0 = make(2, 4, 2, 1, 16, 16, None)
    g = torch.full((2, 2, 1, 16), -30.0).to(DEVICE)
    o, S = tg.chunk_gla_fwd(q, k, v, g, SCALE, S0)
    so, sS = tg.fused_recurrent_gla_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], g[:, :, 0], S0, SCALE)
    assert rel(so, o[:, :, 0]) <= 1e-5 and rel(sS, S) <= 1e-5


# --------------------------------------------------------------------------------------------------
# The backward reusing the forward's A and cumulative gates b (Tuning.reuse_forward).

REUSE = [  # dtype, gate, precision, intra, initial state
    (torch.float32, "channel", "mixed", "matmul", True), (torch.bfloat16, "channel", "mixed", "matmul", False),
    (torch.float16, "channel", "mixed", "matmul", True),  # fp16 runs "mixed" as "full": A in fp32
    (torch.bfloat16, "scalar", "low", "rows", True), (torch.float16, None, "full", "split", True)]
INTRA_KERNEL = {"matmul": "_attn_intra_mm", "rows": "_attn_intra", "split": "_attn_intra_split"}


@pytest.mark.parametrize("dtype,gate,precision,intra,h0", exhaustive(REUSE, keep={0, 1, 2, 4}))
def test_reuse_forward_gives_the_same_gradients_without_recomputing(dtype, gate, precision, intra, h0, monkeypatch):
    """The forward's A and b (keep_a, keep_b), shaped and typed as `kept_layout` says, make the backward skip
    the gate cumsum and the A kernel and give bit-identical gradients."""
    B, H, Hk, T, K, V = 1, 2, 1, 70, 32, 16
    q, k, v, g, S0 = make(B, H, Hk, T, K, V, gate, h0=h0, dtype=dtype)
    gen = torch.Generator().manual_seed(3)
    do = torch.randn(B, H, T, V, generator=gen).to(DEVICE).to(dtype)
    dS = torch.randn(B, Hk, K, V, generator=gen).to(DEVICE)
    tg.TUNING = tg.Tuning(precision=precision, intra=intra)
    o, S, A, b = tg.chunk_gla_fwd(q, k, v, g, SCALE, S0, keep_a=True, keep_b=True)
    o2, S2 = tg.chunk_gla_fwd(q, k, v, g, SCALE, S0)
    assert torch.equal(o, o2) and torch.equal(S, S2)
    a_layout, b_shape = tg.kept_layout(q, k, v, g)
    assert (tuple(A.shape), A.dtype) == a_layout
    assert A.dtype == (torch.float32 if dtype == torch.float32 or precision == "full"
                       or (dtype == torch.float16 and precision == "mixed") else dtype)
    assert b is None if gate is None else tuple(b.shape) == b_shape and b.dtype == torch.float32
    ref = tg.chunk_gla_bwd(q, k, v, g, SCALE, S0, do, dS)
    log = []
    for name in ("_chunk_cumsum", INTRA_KERNEL[intra], "_h_fwd"):
        monkeypatch.setattr(tg, name, Spy(name, log))
    got = tg.chunk_gla_bwd(q, k, v, g, SCALE, S0, do, dS, A=A, b=b)
    assert [name for name, _ in log] == ["_h_fwd"]  # h is recomputed (its precision differs), A and b are not
    for name, x, y in zip(NAMES[2:], got, ref):
        assert (x is None and y is None) or torch.equal(x, y), name
    log.clear()
    _, _, A1, b1 = tg.chunk_gla_fwd(q, k, v, g, SCALE, S0, keep_a=True)  # only what is asked for
    assert A1 is not None and b1 is None
    assert [name for name, _ in log] == (["_h_fwd", INTRA_KERNEL[intra]] if gate is None else
                                         ["_chunk_cumsum", "_h_fwd", INTRA_KERNEL[intra]])


def test_reuse_forward_recomputes_what_does_not_fit(monkeypatch):
    """A and b that the backward would not form alike (another precision, shape or dtype, or a
    non-contiguous layout) are formed again."""
    q, k, v, g, S0 = make(1, 2, 1, 40, 16, 16, "channel", dtype=torch.bfloat16)
    do = torch.randn(1, 2, 40, 16).to(DEVICE).bfloat16()
    _, _, A, b = tg.chunk_gla_fwd(q, k, v, g, SCALE, S0, keep_a=True, keep_b=True)  # "mixed": A in bf16
    ref = tg.chunk_gla_bwd(q, k, v, g, SCALE, S0, do, None)
    log = []
    for name in ("_chunk_cumsum", "_attn_intra_mm"):
        monkeypatch.setattr(tg, name, Spy(name, log))
    strided = A.transpose(-1, -2).contiguous().transpose(-1, -2)  # A's shape, dtype and values, other strides
    got = tg.chunk_gla_bwd(q, k, v, g, SCALE, S0, do, None, A=strided, b=b)
    assert [name for name, _ in log] == ["_attn_intra_mm"]
    assert all(torch.equal(x, y) for x, y in zip(got[:4], ref[:4]))
    log.clear()
    tg.chunk_gla_bwd(q, k, v, g, SCALE, S0, do, None, A=A[:, :, :32].contiguous(), b=b[..., :8].contiguous())
    assert [name for name, _ in log] == ["_chunk_cumsum", "_attn_intra_mm"]
    log.clear()
    tg.TUNING = tg.Tuning(precision="full")  # changed between the forward and the backward: A in fp32
    ref = tg.chunk_gla_bwd(q, k, v, g, SCALE, S0, do, None)
    log.clear()
    got = tg.chunk_gla_bwd(q, k, v, g, SCALE, S0, do, None, A=A, b=b)
    assert [name for name, _ in log] == ["_attn_intra_mm"]  # b (fp32 either way) fits, A does not
    assert all(torch.equal(x, y) for x, y in zip(got[:4], ref[:4]))


def test_kept_layout():
    q, k, v, g, S0 = make(1, 2, 1, 20, 16, 16, "channel")
    assert tg.kept_layout(q, k, v, g) == (((1, 2, 64, 64), torch.float32), (1, 1, 64, 16))
    assert tg.kept_layout(q, k, v, g, keep_a=False) == (None, (1, 1, 64, 16))
    assert tg.kept_layout(q, k, v, None, keep_b=True) == (((1, 2, 64, 64), torch.float32), None)
    tg.TUNING = tg.Tuning(fuse_intra=True)  # the forward forms neither
    assert tg.kept_layout(q, k, v, g) == (None, None)
    o, S, A, b = tg.chunk_gla_fwd(q, k, v, g, SCALE, S0, keep_a=True, keep_b=True)
    assert A is None and b is None and torch.isfinite(o).all()


def test_kept_layout_at_zero_length():
    q, k, v, g, S0 = make(1, 2, 1, 0, 16, 16, "scalar")
    o, S, A, b = tg.chunk_gla_fwd(q, k, v, g, SCALE, S0, keep_a=True, keep_b=True)
    assert tuple(A.shape) == (1, 2, 0, tg.CHUNK) and tuple(b.shape) == (1, 1, 0, 1)
    assert torch.equal(S, S0)


@pytest.mark.parametrize("kw", [dict(block_k=48), dict(block_v=8), dict(block_k=512), dict(block_v=0),
                                dict(block_k=32.0), dict(num_warps=3), dict(num_warps=0), dict(num_stages=0),
                                dict(intra="diagonal"), dict(intra="rows", fuse_intra=True),
                                dict(precision="bf16"), dict(precision=True), dict(dg_form="flat"),
                                dict(reuse_forward=1), dict(reuse_gates=None), dict(dqk="inter"),
                                dict(raw_gates=1), dict(intra="split", raw_gates=True), dict(fuse_intra=1),
                                dict(scan_forward="yes"), dict(intra="rows", scan_forward=True)])
def test_bad_tuning(kw):
    with pytest.raises(ValueError):
        tg.Tuning(**kw)


def test_parse_tuning():
    """The form of LINCOMPILE_GLA_TUNING: name=value items, booleans and optional ints spelled out; each bad
    item a ValueError that says what was expected."""
    t = tg.parse_tuning(" precision=low, dg_form=carry,scan_forward=yes,num_warps=8,num_stages=none ")
    assert t == tg.Tuning(precision="low", dg_form="carry", scan_forward=True, num_warps=8)
    assert tg.parse_tuning("") == tg.Tuning() and tg.parse_tuning("fuse_intra=0,block_v=32").block_v == 32
    for text, match in [("precison=low", 'did you mean "precision"'), ("scan_forward=2", "1/0/true"),
                        ("num_warps=x", "an int or none"), ("block_k=none", "an int, got"),
                        ("precision", "is not name=value"), ("block_k=48", "power of two"),
                        ("intra=rows,fuse_intra=1", "needs intra"), ("num_warps=--4", "an int or none"),
                        ("block_v=32,block_v=64", "given twice")]:
        with pytest.raises(ValueError, match=match):
            tg.parse_tuning(text)


def test_bad_tuning_at_call_time():
    """A Tuning edited after construction is checked again when the kernels read it."""
    q, k, v, g, S0 = make(1, 2, 1, 4, 16, 16, "channel")
    tg.TUNING = tg.Tuning(block_k=32)
    tg.TUNING.block_k = 24
    with pytest.raises(ValueError, match="block_k"):
        tg.chunk_gla_fwd(q, k, v, g, SCALE, S0)
    tg.TUNING.block_k = 32
    tg.TUNING.block_v = 300
    with pytest.raises(ValueError, match="block_v"):
        tg.chunk_gla_bwd(q, k, v, g, SCALE, S0, torch.zeros_like(v.expand(1, 2, 4, 16)), None)


def test_tuning_default_is_restored():
    """The autouse fixture gives every test the default configuration, whatever an earlier test assigned."""
    assert tg.TUNING == tg.Tuning()
    assert (tg.TUNING.precision, tg.TUNING.num_warps, tg.TUNING.num_stages, tg.TUNING.block_k,
            tg.TUNING.block_v, tg.TUNING.intra, tg.TUNING.fuse_intra, tg.TUNING.half_states, tg.TUNING.dg_form,
            tg.TUNING.reuse_forward, tg.TUNING.reuse_gates, tg.TUNING.dqk, tg.TUNING.raw_gates,
            tg.TUNING.scan_forward) == (
        "mixed", None, None, 64, 64, "matmul", False, False, "scan", True, False, "fused", False, False)


# --------------------------------------------------------------------------------------------------
# The gate cumsum kernels against the PyTorch expressions they replace.


@pytest.mark.parametrize("T,KG,dtype", exhaustive(
    [(T, KG, dtype) for T in [1, 17, 64, 100, 129, 200] for KG in [1, 5, 32, 80]
     for dtype in [torch.float32, torch.bfloat16]], keep={2, 11, 17, 30, 36, 47}))
def test_cum_gates_matches_torch(T, KG, dtype):
    """Chunk-local cumsum == g.float() zero-padded to whole chunks, reshaped, cumsum over the chunk axis."""
    B, Hk, C = 2, 3, tg.CHUNK
    N = -(-T // C)
    gen = torch.Generator().manual_seed(T * 1000 + KG)
    g = F.logsigmoid(torch.randn(B, Hk, T, KG, generator=gen)).clamp_min(-5).to(dtype).to(DEVICE)
    b, kg, sbk = tg._cum_gates(g, B, Hk, T, N, C)
    ref = F.pad(g.float(), (0, 0, 0, N * C - T)).reshape(B, Hk, N, C, KG).cumsum(3).reshape(B, Hk, N * C, KG)
    assert (kg, sbk) == (KG, 1 if KG > 1 else 0)
    assert b.shape == ref.shape and b.dtype == torch.float32 and b.is_contiguous()
    assert rel(b, ref) <= 1e-6
    assert torch.isfinite(b).all()  # every row of the poisoned buffer written, the padding rows too
    if N * C > T:  # flat after the last position (zero gates)
        assert rel(b[:, :, T:], b[:, :, T - 1:T].expand_as(b[:, :, T:])) <= 1e-6
    nc = g[:, :, :].transpose(2, 3).contiguous().transpose(2, 3)  # non-contiguous gates
    assert rel(tg._cum_gates(nc, B, Hk, T, N, C)[0], ref) <= 1e-6
    assert tg._cum_gates(None, B, Hk, T, N, C) == (None, 1, 0)


@pytest.mark.parametrize("T,K,with_last", exhaustive(
    [(T, K, last) for T in [1, 17, 64, 100, 129, 300] for K in [1, 16, 40, 80] for last in [False, True]],
    keep={1, 10, 14, 20, 29, 35, 44, 47}))
def test_reverse_cumsum_matches_torch(T, K, with_last):
    """Reverse cumsum over the whole sequence == x (+ last at row T−1) .flip(2).cumsum(2).flip(2)."""
    B, Hk = 2, 3
    gen = torch.Generator().manual_seed(T * 1000 + K)
    x = torch.randn(B, Hk, T, K, generator=gen).to(DEVICE)
    last = torch.randn(B, Hk, K, generator=gen).to(DEVICE) if with_last else None
    x_copy = x.clone()
    xl = x.clone()
    if with_last:
        xl[:, :, T - 1] += last
    ref = xl.flip(2).cumsum(2).flip(2)
    got = tg._reverse_cumsum(x, last)
    assert got.shape == x.shape and got.dtype == torch.float32
    assert rel(got, ref) <= 1e-6
    assert torch.equal(x, x_copy)  # not modified
    inplace = tg._reverse_cumsum(x, last, out=x)
    assert inplace is x and rel(x, ref) <= 1e-6


def test_reverse_cumsum_keeps_small_suffixes():
    """A suffix far smaller than the total keeps its own relative accuracy (no total − prefix cancellation)."""
    T, K = 200, 16
    x = torch.full((1, 1, T, K), 1e-3)
    x[:, :, :10] = 1e6
    got = tg._reverse_cumsum(x.to(DEVICE)).cpu()
    ref = x.double().flip(2).cumsum(2).flip(2)
    assert ((got[:, :, 10:] - ref[:, :, 10:]).abs() / ref[:, :, 10:]).max() <= 1e-5
