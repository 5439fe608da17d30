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
    assert targets == ["lincompile.chunk_gla.default", "<built-in function getitem>", "<built-in function getitem>"]
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


@pytest.mark.skipif(not fused.triton_installed(), reason="triton is not installed")
def test_heal_graphs_are_fused_too():
    """Healing trains the graph the fuse pass prepared (on CUDA: through the Triton kernels)."""
    from lincompile.heal.build import build

    spec = make_spec("name: t\ncapture: {attn_implementation: sdpa}\nfuse: {backend: triton}\nrules:\n"
                     "  - op: lizard\n")
    graphs = build(tiny_model("llama"), spec, with_teacher=True)
    assert {op.backend for op in graphs.converted.operators.values()} == {"triton"}
