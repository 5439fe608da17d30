"""The fuse pass: backend resolution, what `lincompile diff` shows, and `fuse: triton` ≡ `fuse: torch`.

The Triton kernels run here under TRITON_INTERPRET=1 (CPU), so the same graph is compared with its operators
on the Triton kernel ops and on the PyTorch forms: logits, and gradients of every parameter.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere

import pytest
import torch

from conftest import make_spec, spec_text, tiny_model
from lincompile.diff import op_kind
from lincompile.errors import UsageError
from lincompile.kernels import fused
from lincompile.passes.fuse import fuse, operator_nodes, resolve_backend
from lincompile.pipeline import convert

needs_kernels = pytest.mark.skipif(
    not fused.triton_installed() or (os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available()),
    reason="needs triton (pip install 'lincompile[triton]') and CUDA or TRITON_INTERPRET=1")


def _convert(rules: str, backend: str = "torch", seed: int = 0):
    text = f"name: t\ncapture: {{attn_implementation: sdpa}}\nfuse: {{backend: {backend}}}\nrules:\n{rules}"
    return convert(tiny_model("llama", seed=seed), make_spec(text), verify=False)


def test_auto_resolves_to_torch_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    backend, notes = resolve_backend("auto")
    assert backend == "torch" and "no CUDA" in notes[0]
    assert resolve_backend("torch") == ("torch", [])


def test_auto_resolves_to_triton_on_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(fused, "triton_installed", lambda: True)
    assert resolve_backend("auto")[0] == "triton"


def test_triton_without_the_package_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(fused, "triton_installed", lambda: False)
    with pytest.raises(UsageError, match="triton package is not installed"):
        resolve_backend("triton")


def test_spec_rejects_unknown_backend():
    with pytest.raises(UsageError, match="fuse.backend"):
        make_spec(spec_text("liger_attention", extra="fuse: {backend: cuda}\n"))


def test_torch_backend_changes_nothing():
    conv = _convert("  - op: liger_attention\n", "torch")
    fuse_pass = next(p for p in conv.diff().passes() if p.name == "fuse")
    assert not fuse_pass.changed
    assert {op.backend for op in conv.operators.values()} == {"torch"}
    assert conv.report["fuse_backend"] == "torch"


@pytest.mark.skipif(not fused.triton_installed(), reason="triton is not installed")
def test_triton_backend_is_its_own_pass_in_the_diff():
    conv = _convert("  - {layers: [0], op: liger_attention}\n  - {layers: [1], op: lizard}\n", "triton")
    passes = {p.name: p for p in conv.diff().passes()}
    assert list(passes) == ["match", "substitute", "fuse"]
    fuse_pass = passes["fuse"]
    # Each operator node now reports the kernel ops it runs; nothing else in the graph moved.
    assert sorted(op_kind(r) for r in fuse_pass.removed) == ["lincompile.liger_attention", "lincompile.lizard"]
    assert sorted(op_kind(r) for r in fuse_pass.added) == ["kernel.chunk_gla+swa_attention", "kernel.liger_attention"]
    assert len(fuse_pass.replaced) == 2 and not fuse_pass.rewired
    assert {op.backend for op in conv.operators.values()} == {"triton"}
    assert any("2 operator node(s) use Triton kernel ops" in n for n in fuse_pass.notes)
    text = "\n".join(conv.diff().summary(fuse_pass))
    assert "kernel.liger_attention" in text
    # The substitute pass's diff is untouched by fusing: the operators still read as lincompile ops there.
    assert {op_kind(r) for r in passes["substitute"].added if r["op"].startswith("module:")} == {
        "lincompile.liger_attention", "lincompile.lizard"}


def test_operators_without_kernels_keep_pytorch_with_a_note():
    conv = _convert("  - {layers: [0], op: softmax}\n  - {layers: [1], op: liger_gla}\n", "torch")
    notes = fuse(conv.graph_module, "triton")
    backends = {op.name: op.backend for _, op in operator_nodes(conv.graph_module)}
    assert backends == {"softmax": "torch", "liger_gla": "triton"}
    assert any("no kernel ops for softmax" in n for n in notes)


# Two operators per tiny model (one per layer): every operator with kernel ops is covered.
PAIRS = [("liger_attention", "lizard"), ("liger_gla", "swa_sinks"), ("liger_hgrn2", "lolcats"),
         ("simple_decay", "elu_linear"), ("liger_gsa", "liger_gla")]


def _logits_and_grads(conv, ids):
    conv.zero_grad(set_to_none=True)
    logits = conv(ids)
    (logits.float().pow(2).mean()).backward()
    grads = {n: p.grad.clone() for n, p in conv.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


@needs_kernels
@pytest.mark.parametrize("pair", PAIRS, ids="+".join)
def test_fuse_triton_matches_torch_logits_and_grads(pair):
    conv = _convert(f"  - {{layers: [0], op: {pair[0]}}}\n  - {{layers: [1], op: {pair[1]}}}\n", "torch")
    if pair[0] == "liger_attention":
        conv.operators["model.layers.0.self_attn"].config["window"] = 8  # the window moves inside T
    for op in conv.operators.values():  # train-ready params: lizard/lolcats φ and gates move off their init
        with torch.no_grad():
            for p in op.parameters():
                p.add_(0.05 * torch.randn_like(p))
    ids = torch.randint(0, 128, (2, 37), generator=torch.Generator().manual_seed(1))
    ref_logits, ref_grads = _logits_and_grads(conv, ids)
    fuse(conv.graph_module, "triton")
    assert {op.backend for op in conv.operators.values()} == {"triton"}
    logits, grads = _logits_and_grads(conv, ids)
    assert _rel(logits, ref_logits) < 1e-4
    assert grads.keys() == ref_grads.keys() and grads
    worst = max(grads, key=lambda n: _rel(grads[n], ref_grads[n]))
    assert _rel(grads[worst], ref_grads[worst]) < 1e-4, worst


@needs_kernels
def test_kernel_ops_export_and_dispatch_to_pytorch_off_the_interpreter(monkeypatch):
    """The kernel ops are custom ops (export sees one node each) and fall back to PyTorch off CUDA."""
    torch.manual_seed(0)
    B, H, Hk, T, D = 1, 4, 2, 20, 16
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, Hk, T, D), torch.randn(B, Hk, T, D)
    g = torch.nn.functional.logsigmoid(torch.randn(B, Hk, T, D))

    class M(torch.nn.Module):
        def forward(self, q, k, v, g):
            return fused.chunk_gla(q, k, v, g, 0.25, None)

    ep = torch.export.export(M(), (q, k, v, g), strict=False)
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    # one getitem per output: o, the final state, and the A and b kept for the backward (unused here)
    assert targets == ["lincompile.chunk_gla.default"] + ["<built-in function getitem>"] * 4
    o_triton, S_triton = fused.chunk_gla(q, k, v, g, 0.25, None)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # no CUDA, no interpreter: the PyTorch forms
    o_torch, S_torch = fused.chunk_gla(q, k, v, g, 0.25, None)
    assert _rel(o_triton, o_torch) < 1e-5 and _rel(S_triton, S_torch) < 1e-5


@needs_kernels
def test_fused_graph_re_exports_with_kernel_nodes_at_any_length():
    conv = _convert("  - {layers: [0], op: liger_attention}\n  - {layers: [1], op: lizard}\n", "triton")
    ids = torch.randint(0, 128, (1, 10))
    seq = torch.export.Dim("seq", min=2, max=512)
    ep = torch.export.export(conv.eval(), (ids,), dynamic_shapes={"input_ids": {1: seq}}, strict=False)
    kernels = sorted(str(n.target) for n in ep.graph.nodes if str(n.target).startswith("lincompile."))
    assert kernels == ["lincompile.chunk_gla.default", "lincompile.liger_attention.default",
                       "lincompile.swa_attention.default"]
    other = torch.randint(0, 128, (1, 21))
    assert _rel(ep.module()(other), conv(other)) < 1e-5


@needs_kernels
def test_kernel_ops_go_through_torch_compile():
    """register_fake + register_autograd let AOTAutograd trace the ops (forward and backward)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 19, 16, requires_grad=True) for _ in range(3))
    ring = torch.zeros(1, 2, 8, 16)
    seen = torch.zeros((), dtype=torch.int64)

    def f(q, k, v):
        o, lse = fused.swa_attention(q, k, v, ring, ring, seen, 0.25, None)
        return o.sum() + lse.sum()

    eager = torch.autograd.grad(f(q, k, v), (q, k, v))
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    assert all(_rel(a, b) < 1e-5 for a, b in zip(got, eager))


@needs_kernels
def test_liger_attention_goes_through_torch_compile():
    """The op's backward formula (swa's and chunk_gla's backward ops, the prologue ops) traces under
    AOTAutograd with fake tensors and gives the eager gradients."""
    op, args = _op_cases()["liger_attention"]

    def f(q, k, v, q_pre, k_pre, S0):
        o, S = op(q, k, v, q_pre, k_pre, S0, *args[6:])
        return o.square().sum() + S.sum()

    eager = torch.autograd.grad(f(*args[:6]), args[:6])
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(*args[:6]), args[:6])
    assert all(_rel(a, b) < 1e-5 for a, b in zip(got, eager))


def _gla_leaves(dtype, gate, seed=0):
    gen = torch.Generator().manual_seed(seed)
    B, H, Hk, T, D = 1, 4, 2, 20, 16
    q, k, v = (torch.randn(B, h, T, D, generator=gen).to(dtype) for h in (H, Hk, Hk))
    g = None if gate is None else torch.nn.functional.logsigmoid(
        torch.randn(B, Hk, T, D if gate == "channel" else 1, generator=gen))
    return [None if x is None else x.requires_grad_() for x in (q, k, v, g)]


@needs_kernels
@pytest.mark.parametrize("dtype,gate,h0", [(torch.float32, "channel", False), (torch.bfloat16, "scalar", True),
                                           (torch.bfloat16, None, False)])
def test_chunk_gla_op_passes_opcheck(dtype, gate, h0):
    """register_fake gives the real outputs' shapes and dtypes, A and b kept for the backward included
    (torch.library.opcheck: schema, fake tensors, autograd registration, AOT dispatch with dynamic shapes)."""
    q, k, v, g = _gla_leaves(dtype, gate)
    S0 = torch.randn(1, 2, 16, 16) if h0 else None
    o, S, A, b = fused.chunk_gla_op(q, k, v, g, 0.25, S0, True, True, "mixed")
    assert A.shape == (1, 4, 64, 64) and A.dtype == (torch.float32 if dtype == torch.float32 else dtype)
    assert b.shape == ((0,) if gate is None else (1, 2, 64, 16 if gate == "channel" else 1))
    torch.library.opcheck(fused.chunk_gla_op, (q, k, v, g, 0.25, S0, True, True, "mixed"))
    _, _, A, b = fused.chunk_gla_op(q, k, v, g, 0.25, S0)  # nothing asked for: nothing kept
    assert A.shape == b.shape == (0,)


@needs_kernels
def test_chunk_gla_op_keeps_nothing_on_the_pytorch_path(monkeypatch):
    q, k, v, g = _gla_leaves(torch.float32, "channel")
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # no CUDA, no interpreter: the PyTorch forms
    _, _, A, b = fused.chunk_gla_op(q, k, v, g, 0.25, None, True, True)
    assert A.shape == (0,) and b.shape == (0,)
    torch.library.opcheck(fused.chunk_gla_op, (q, k, v, g, 0.25, None, True, True),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def _op_cases():
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).requires_grad_()

    B, H, Hk, T, D = 1, 4, 2, 20, 16
    q, k, v = rnd(B, H, T, D), rnd(B, H, T, D), rnd(B, H, T, D)
    ring, seen = torch.zeros(B, H, 8, D), torch.zeros((), dtype=torch.int64)
    g = torch.nn.functional.logsigmoid(torch.randn(B, Hk, D, generator=gen))
    return {
        "recurrent_gla_step": (fused.recurrent_gla_step, (torch.randn(B, H, D), torch.randn(B, Hk, D),
                                                          torch.randn(B, Hk, D), g, torch.randn(B, Hk, D, D), 0.25)),
        "swa_attention": (fused.swa_attention, (q, k, v, ring, ring, seen, 0.25, rnd(H, 2))),
        # a ≠ b: the chunked forward folds b into chunk_gla's scale; an initial state, whose gradient it reaches;
        # GQA; a ring of 8 keys / values of which the last 5 positions exist
        "liger_attention": (fused.liger_attention, (q, rnd(B, Hk, T, D), rnd(B, Hk, T, D), rnd(B, H, T, D),
                                                    rnd(B, Hk, T, D), rnd(B, Hk, D, D), torch.randn(B, Hk, 8, D),
                                                    torch.randn(B, Hk, 8, D), torch.tensor(5), 8, 0.3, 0.8, 0.25,
                                                    16.0)),
        "liger_prologue": (fused.liger_prologue, (rnd(B, H, T, D), rnd(B, Hk, T, D).transpose(1, 2), 16.0)),
        "liger_prologue_bwd": (fused.liger_prologue_bwd, (rnd(B, H, T, D), rnd(B, Hk, T, D), rnd(B, H, T, D),
                                                          rnd(B, Hk, T, D), rnd(B, Hk, T, D).float(), 16.0)),
    }


@needs_kernels
@pytest.mark.parametrize("name", ["recurrent_gla_step", "swa_attention", "liger_attention"])
@pytest.mark.parametrize("interpret", ["1", "0"], ids=["triton", "pytorch"])
def test_kernel_ops_pass_opcheck(name, interpret, monkeypatch):
    """The other kernel ops' fakes agree with both implementations (the check that found chunk_gla's
    PyTorch path returning a non-contiguous o where its fake promised a contiguous one)."""
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    op, args = _op_cases()[name]
    # the PyTorch forms' AOT trace with dynamic shapes takes 10-15 s here; fake tensors are what matter
    checks = ("test_schema", "test_autograd_registration", "test_faketensor") if interpret == "0" else None
    torch.library.opcheck(op, args, **({"test_utils": checks} if checks else {}))


@needs_kernels
@pytest.mark.parametrize("name", ["liger_prologue", "liger_prologue_bwd"])
def test_prologue_ops_pass_opcheck(name):
    """Triton only (their callers check that it runs), no autograd (they are called under none): the fakes
    agree with the kernels."""
    op, args = _op_cases()[name]
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


@needs_kernels
def test_liger_attention_forward_runs_the_chosen_kernels(monkeypatch):
    """LIGER_FORWARD "chunked" (default) runs chunk_gla's and swa_attention's kernels, "one_launch" the single
    kernel of triton_liger.py; both agree with the PyTorch forms, and with the same backward."""
    from lincompile.kernels import triton_gla, triton_liger, triton_swa

    calls = []
    for mod, name in ((triton_liger, "liger_attention_fwd"), (triton_gla, "chunk_gla_fwd"), (triton_swa, "swa_fwd"),
                      (triton_liger, "liger_prologue"), (triton_liger, "liger_prologue_bwd")):
        def spy(*a, _f=getattr(mod, name), _n=name, **kw):
            calls.append(_n)
            return _f(*a, **kw)
        monkeypatch.setattr(mod, name, spy)
    op, args = _op_cases()["liger_attention"]
    do = torch.randn(1, 4, 20, 16, generator=torch.Generator().manual_seed(2))

    dS = torch.randn(1, 2, 16, 16, generator=torch.Generator().manual_seed(3))

    def run():
        leaves = [x.detach().requires_grad_() for x in args[:6]]  # q, k, v, q_pre, k_pre, initial state
        o, S = op(*leaves, *args[6:])
        ((o * do).sum() + (S * dS).sum()).backward()
        return o.detach(), S.detach(), [x.grad for x in leaves]

    want = {"chunked": ["swa_fwd", "liger_prologue", "chunk_gla_fwd"], "one_launch": ["liger_attention_fwd"]}
    got = {}
    for choice in fused.LIGER_FORWARDS:
        monkeypatch.setattr(fused, "LIGER_FORWARD", choice)
        calls.clear()
        got[choice] = run()
        forward = calls[:calls.index("swa_fwd", 1 if choice == "chunked" else 0)]  # the backward recomputes swa
        assert forward == want[choice], (choice, calls)
        assert calls[len(forward):] == ["swa_fwd", "liger_prologue", "liger_prologue_bwd"], (choice, calls)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the PyTorch forms
    ref = run()
    for choice, (o, S, grads) in got.items():
        assert _rel(o, ref[0]) < 1e-5 and _rel(S, ref[1]) < 1e-5, choice
        assert len(grads) == 6 and all(x is not None for x in grads)
        for x, r in zip(grads, ref[2]):
            assert _rel(x, r) < 1e-4, choice
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(fused, "LIGER_FORWARD", "fused")
    with pytest.raises(ValueError, match="LIGER_FORWARD must be one of chunked, one_launch, got 'fused'"):
        op(*args)


@needs_kernels
def test_what_the_forward_keeps_follows_tuning_and_grad_mode(monkeypatch):
    from lincompile.kernels import triton_gla as tg

    t = tg.Tuning()
    assert fused._REUSE_DEFAULT == (t.reuse_forward, t.reuse_gates, t.precision)
    q, k, v, g = _gla_leaves(torch.float32, "channel")
    assert fused._reuse(q, k, v, g) == (True, False, "mixed")
    with torch.no_grad():
        assert fused._reuse(q, k, v, g) == (False, False, "")  # no backward to keep anything for
    q, k, v, g = (x.detach() for x in (q, k, v, g))
    assert fused._reuse(q, k, v, g) == (False, False, "")
    assert fused._reuse(q, k, v, g.requires_grad_()) == (True, False, "mixed")
    assert fused._reuse(q, k, v, g.detach(), torch.zeros(1, 2, 16, 16, requires_grad=True)) == (True, False, "mixed")
    for kw, want in ((dict(reuse_gates=True, precision="low"), (True, True, "low")),
                     (dict(reuse_forward=False, reuse_gates=True), (False, True, "")),
                     (dict(fuse_intra=True, reuse_gates=True), (False, False, "")),
                     (dict(scan_forward=True, reuse_gates=True), (False, False, ""))):
        monkeypatch.setattr(tg, "TUNING", tg.Tuning(**kw))
        assert fused._reuse(q, k, v, g) == want, kw


@pytest.mark.skipif(not fused.triton_installed(), reason="triton is not installed")
def test_tuning_from_the_environment(tmp_path):
    """LINCOMPILE_GLA_TUNING sets the starting configuration, loaded with the fused ops so that the first call's
    wrapper already reads it (scan_forward: nothing kept for the backward); a bad value fails the import with
    one line that names the variable, the knob and the likely one."""
    import subprocess
    import sys

    code = ("import sys, torch\n"
            "from lincompile.kernels import fused\n"
            "tg = sys.modules['lincompile.kernels.triton_gla']\n"
            "x = torch.zeros(1, 2, 8, 16, requires_grad=True)\n"
            "print(tg.TUNING.scan_forward, tg.TUNING.precision, fused._reuse(x, x, x, x))\n")
    env = dict(os.environ, TRITON_INTERPRET="1", LINCOMPILE_GLA_TUNING="scan_forward=1, precision=low")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["True", "low", "(False,", "False,", "'')"]
    env["LINCOMPILE_GLA_TUNING"] = "precison=low"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode != 0
    msg = "LINCOMPILE_GLA_TUNING='precison=low': unknown knob 'precison' (did you mean \"precision\"?)"
    assert run.stderr.strip().splitlines()[-1].startswith(f"lincompile.kernels.triton_gla.TuningEnvError: {msg}")
    # the operator registry does not count a failed import as loaded: a retry fails the same way, not with "no ops"
    retry = ("from lincompile.kernels import registry\n"
             "for _ in range(2):\n"
             "    try:\n        print(len(registry.names()))\n"
             "    except ValueError as err:\n        print(type(err).__name__)\n")
    run = subprocess.run([sys.executable, "-c", retry], capture_output=True, text=True, env=env, timeout=300)
    assert run.stdout.split() == ["TuningEnvError", "TuningEnvError"], run.stderr[-2000:]
    # the CLI: that one line, exit code 2, nothing written
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "lincompile", "apply", "liger-attention", str(tmp_path / "none"),
                          "-o", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 2 and run.stderr.strip().splitlines()[-1].startswith(f"error: {msg}")
    assert not out.exists()


@needs_kernels
def test_chunk_gla_op_runs_the_precision_it_is_given():
    """The op's precision argument (what the wrapper read from TUNING) sets A's dtype in the real op and in
    its fake alike, whatever TUNING says by the time it runs."""
    q, k, v, g = _gla_leaves(torch.bfloat16, "channel")
    for precision, dtype in (("full", torch.float32), ("mixed", torch.bfloat16), ("low", torch.bfloat16)):
        o, _, A, _ = fused.chunk_gla_op(q, k, v, g, 0.25, None, True, False, precision)
        assert A.dtype == dtype, precision
        with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
            fake = [mode.from_tensor(x) for x in (q, k, v, g)]
            assert fused.chunk_gla_op(*fake, 0.25, None, True, False, precision)[2].dtype == dtype, precision
    with pytest.raises(ValueError, match="precision must be one of"):
        fused.chunk_gla_op(q, k, v, g, 0.25, None, True, False, "bf16")


@needs_kernels
def test_chunk_gla_backward_reuses_the_forward(monkeypatch):
    """Through the op's autograd, the backward launches what the forward did not keep, and no more: A by
    default, b too with reuse_gates, both after a scan_forward; the gradients are those of a recomputing backward, bit for bit. Under
    torch.compile (AOTAutograd) the same, and a changed TUNING traces the wrapper again."""
    from lincompile.kernels import triton_gla as tg

    def grads(fn=fused.chunk_gla):
        leaves = _gla_leaves(torch.bfloat16, "channel")
        o, S = fn(*leaves, 0.25, None)
        (o.float().square().sum() + S.sum()).backward()
        return [x.grad for x in leaves]

    launches = []

    class Count:
        def __init__(self, name):
            self.name, self.kernel = name, getattr(tg, name)

        def __getitem__(self, grid):
            launches.append(self.name)
            return self.kernel[grid]

    for name in ("_chunk_cumsum", "_attn_intra_mm", "_fwd_scan"):
        monkeypatch.setattr(tg, name, Count(name))
    forward = ["_chunk_cumsum", "_attn_intra_mm"]
    reused = grads()
    assert launches == forward + ["_chunk_cumsum"]  # the default keeps A, not b
    for kw, backward in ((dict(reuse_gates=True), []), (dict(reuse_forward=False), forward)):
        launches.clear()
        monkeypatch.setattr(tg, "TUNING", tg.Tuning(**kw))
        assert all(torch.equal(a, b) for a, b in zip(grads(), reused)), kw
        assert launches == forward + backward, kw
    launches.clear()
    monkeypatch.setattr(tg, "TUNING", tg.Tuning(scan_forward=True))  # keeps nothing: the backward forms b and A
    assert all(torch.equal(a, b) for a, b in zip(grads(), reused))
    assert launches == ["_fwd_scan"] + forward
    monkeypatch.setattr(tg, "TUNING", tg.Tuning())
    torch._dynamo.reset()
    compiled_fn = torch.compile(fused.chunk_gla, backend="aot_eager", fullgraph=True)
    launches.clear()
    assert all(torch.equal(a, b) for a, b in zip(grads(compiled_fn), reused))
    assert launches == forward + ["_chunk_cumsum"]
    monkeypatch.setattr(tg, "TUNING", tg.Tuning(reuse_forward=False))  # guarded: traced again, keeps nothing
    launches.clear()
    assert all(torch.equal(a, b) for a, b in zip(grads(compiled_fn), reused))
    assert launches == forward + forward
    monkeypatch.setattr(tg, "TUNING", tg.Tuning(precision="full"))  # guarded too: A's dtype follows it
    launches.clear()
    assert all(_rel(a, b) < 1e-2 for a, b in zip(grads(compiled_fn), reused))
    assert launches == forward + ["_chunk_cumsum"]
    torch._dynamo.reset()


@pytest.mark.skipif(not fused.triton_installed(), reason="triton is not installed")
def test_heal_graphs_are_fused_too():
    """Healing trains the graph the fuse pass prepared (on CUDA: through the Triton kernels)."""
    from lincompile.heal.build import build

    spec = make_spec("name: t\ncapture: {attn_implementation: sdpa}\nfuse: {backend: triton}\nrules:\n"
                     "  - op: lizard\n")
    graphs = build(tiny_model("llama"), spec, with_teacher=True)
    assert {op.backend for op in graphs.converted.operators.values()} == {"triton"}
