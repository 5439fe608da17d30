"""The CUDA paths end to end on a tiny Llama: capture on the GPU (run at lengths and batch sizes other than the
probe's), heal (transfer + LoRA + distillation through the Triton kernels), the healed model loaded on the GPU
against the same model loaded on the CPU, and generation on the GPU.

Skipped where there is no CUDA device (CI); run them on a GPU machine with `pytest tests/test_cuda.py`.
"""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

import lincompile
from lincompile.cli import main

from conftest import tiny_model
from healkit import austen_text, tiny_model_dir, write_text

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SPEC = """\
name: tiny-lizard
rules:
  - op: lizard
    params: {window: 8}
"""


def rel(a, b) -> float:
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.fixture(scope="module")
def healed(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda")
    model = tiny_model_dir(root / "model")
    train = write_text(root / "train.txt", austen_text("emma.txt", 0, 24_000))
    (root / "spec.yaml").write_text(SPEC)
    runner = CliRunner()
    result = runner.invoke(main, ["apply", str(root / "spec.yaml"), str(model), "-o", str(root / "out")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["heal", str(root / "out"), "--data", str(train), "--device", "cuda",
                                  "--transfer-steps", "3", "--steps", "4", "--seq-len", "32", "--batch-size", "2",
                                  "--distill", "0.3", "--eval-every", "2", "--no-progress"])
    assert result.exit_code == 0, result.output
    return root / "out"


def test_convert_captures_on_the_gpu():
    model = tiny_model("llama").cuda()
    converted = lincompile.convert(model, lincompile.Spec.builtin("lizard"))
    for batch, length in ((1, 5), (3, 37), (2, 130)):  # odd sizes: nothing was specialised to the probe's
        ids = torch.randint(0, 128, (batch, length), device="cuda")
        with torch.no_grad():
            logits = converted(ids)
        assert logits.shape == (batch, length, 128) and logits.is_cuda and torch.isfinite(logits).all()
    kernels = [n.meta.get("lincompile_kernel") for n in converted.graph_module.graph.nodes]
    assert any(k for k in kernels), "the fuse pass put no kernel node into the CUDA graph"


def test_heal_on_cuda_then_load_on_gpu_and_cpu_agree(healed):
    import json

    report = json.loads((healed / "heal" / "report.json").read_text())
    assert set(report["stages"]) == {"transfer", "lora"}
    gpu = lincompile.load(healed, device="cuda")
    cpu = lincompile.load(healed)
    ids = torch.randint(0, 128, (3, 37), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = gpu(ids.cuda()), cpu(ids)
    assert torch.isfinite(a).all()
    assert rel(a, b) < 1e-3


def test_generate_on_cuda(healed):
    result = CliRunner().invoke(main, ["generate", str(healed), "the lady said", "--max-new-tokens", "8",
                                       "--device", "cuda"])
    assert result.exit_code == 0, result.output
    assert "[8 tokens" in result.output, result.output


def test_gradient_checkpointing_through_the_triton_kernels():
    """heal --gradient-checkpointing on CUDA: the recomputed layers run the kernels again (their custom ops'
    autograd inside torch.utils.checkpoint) and give the gradients of the plain graph."""
    from lincompile.heal.build import build
    from lincompile.heal.remat import checkpoint_layers

    graphs = build(tiny_model("llama").cuda(), lincompile.Spec.builtin("lizard"), with_teacher=False)
    gm = graphs.converted.graph_module
    assert any(n.meta.get("lincompile_kernel") for n in gm.graph.nodes), "no kernel node: nothing to check"
    params = graphs.op_parameters()
    for p in params.values():
        p.requires_grad_(True)
    ids = torch.randint(0, 128, (2, 150), device="cuda", generator=torch.Generator("cuda").manual_seed(0))

    def step():
        for p in params.values():
            p.grad = None
        loss = gm(ids).float().logsumexp(-1).mean()
        loss.backward()
        return loss.detach(), {k: p.grad.clone() for k, p in params.items()}

    loss, grads = step()
    assert checkpoint_layers(gm) == [0, 1]
    loss2, grads2 = step()
    assert rel(loss2, loss) < 1e-6
    for k in grads:
        assert rel(grads2[k], grads[k]) < 1e-4, k
