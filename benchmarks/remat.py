"""Gradient checkpointing in healing (not a test): memory and time of one LoRA training step, with and without.

    python benchmarks/remat.py [--model smollm2-135m] [--specs liger-attention lolcats] [--seq-lens 512 2048]
                               [--batch-size 1] [--steps 3] [--device cpu|cuda] [--json results.json]

Each (spec, length, checkpointing) runs in its own worker process, one after the other in the same run, so
peak memory is that configuration's alone. A step is what `lincompile heal` does in its LoRA stage: the
converted graph (LoRA r=8 on q/k/v/o of the converted layers, the operators' own parameters frozen) on random
tokens, cross-entropy (the heal's own loss: checkpointed, the LM head and the loss also run a chunk of tokens
at a time), backward. Columns:
- kept: bytes autograd holds for backward at the end of the forward (saved tensors, each storage once, weights
  not counted): what checkpointing saves, exactly;
- peak: the worker's peak RSS during the steps on CPU (VmHWM, reset before them), peak allocated on CUDA;
- step: median seconds per step.
Ratios are checkpointed / plain, from the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        except OSError:  # not allowed in some containers: the peak is then the worker's whole life
            pass


def peak_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def worker(args) -> dict:
    from peft import LoraConfig

    from lincompile.heal.build import build
    from lincompile.heal.finetune import LMLoss
    from lincompile.heal.head import outline_head
    from lincompile.heal.remat import checkpoint_layers
    from lincompile.models import load_model
    from lincompile.spec import Spec

    torch.manual_seed(0)
    spec = Spec.resolve(args.spec)
    model = load_model(args.model, device=args.device, attn_implementation=spec.capture.attn_implementation).model
    names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)} &
                   {"q_proj", "k_proj", "v_proj", "o_proj"})
    graphs = build(model, spec, lora_config=LoraConfig(r=8, lora_alpha=16, target_modules=names), with_teacher=False)
    layers = checkpoint_layers(graphs.converted.graph_module) if args.remat else []
    if args.remat:  # as `heal --gradient-checkpointing` does: the head and its loss a chunk of tokens at a time
        graphs.loss_head = outline_head(graphs.converted.graph_module)[0]
    loss_fn = LMLoss(graphs).train()
    params = list(graphs.lora_parameters().values())
    for p in params:
        p.requires_grad_(True)
    weights = {t.untyped_storage().data_ptr() for t in graphs.converted.graph_module.parameters()}
    weights |= {t.untyped_storage().data_ptr() for t in graphs.converted.graph_module.buffers()}
    ids = torch.randint(0, model.config.vocab_size, (args.batch_size, args.seq_len), device=args.device)
    times, kept = [], 0
    reset_peak(args.device)
    for i in range(args.steps):
        seen, total = set(), [0]

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in weights and ptr not in seen:
                seen.add(ptr)
                total[0] += t.untyped_storage().nbytes()
            return t

        t0 = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = loss_fn(ids)
        kept = total[0]
        loss.backward()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        for p in params:
            p.grad = None
    return {"spec": args.spec, "seq_len": args.seq_len, "remat": args.remat, "layers": len(layers),
            "kept_bytes": kept, "peak_bytes": peak_bytes(args.device), "step_s": statistics.median(times),
            "loss": float(loss)}


def run_worker(script: str, args: list[str], what: str) -> dict:
    """One configuration in a fresh process (its peak memory is its own): the JSON line it prints."""
    done = subprocess.run([sys.executable, script, "--worker", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if done.returncode != 0:
        sys.exit(f"{what} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def mb(n: int) -> str:
    return f"{n / 2**20:,.0f} MB"


def table(rows: list[dict], device: str) -> str:
    peak = "peak allocated" if device.startswith("cuda") else "peak RSS"
    lines = [f"| spec | tokens | kept plain | kept checkpointed | ratio | {peak} plain | {peak} checkpointed | ratio "
             "| step plain | step checkpointed | ratio |", "|" + "---|" * 11]
    for a in rows:
        if a["remat"]:
            continue
        b = next(r for r in rows if r["remat"] and r["spec"] == a["spec"] and r["seq_len"] == a["seq_len"])
        lines.append(f"| {a['spec']} | {a['seq_len']:,} | {mb(a['kept_bytes'])} | {mb(b['kept_bytes'])} | "
                     f"{b['kept_bytes'] / a['kept_bytes']:.2f}× | {mb(a['peak_bytes'])} | {mb(b['peak_bytes'])} | "
                     f"{b['peak_bytes'] / a['peak_bytes']:.2f}× | {a['step_s']:.2f} s | {b['step_s']:.2f} s | "
                     f"{b['step_s'] / a['step_s']:.2f}× |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="model reference (lincompile.models.load_model)")
    p.add_argument("--specs", nargs="+", default=["liger-attention", "lolcats"])
    p.add_argument("--seq-lens", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", dest="json_path", type=Path)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--seq-len", type=int, help=argparse.SUPPRESS)
    p.add_argument("--remat", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    rows = []
    for spec in args.specs:
        for T in args.seq_lens:
            for remat in (False, True):
                cmd = ["--model", args.model, "--spec", spec, "--seq-len", str(T), "--batch-size", str(args.batch_size),
                       "--steps", str(args.steps), "--device", args.device] + (["--remat"] if remat else [])
                rows.append(run_worker(__file__, cmd, f"{spec} at {T} tokens{' checkpointed' if remat else ''}"))
                print(f"  {spec} T={T} {'checkpointed' if remat else 'plain'}: {rows[-1]['step_s']:.2f} s/step",
                      file=sys.stderr)
    device = args.device if not args.device.startswith("cuda") else torch.cuda.get_device_name()
    print(f"LoRA step on {args.model}, batch {args.batch_size}, {device}, torch {torch.__version__}\n")
    print(table(rows, args.device))
    result = {"model": args.model, "device": device, "batch_size": args.batch_size, "rows": rows}
    print("\n" + json.dumps(result))
    if args.json_path:
        args.json_path.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
