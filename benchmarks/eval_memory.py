"""Evaluation memory (not a test): peak memory of scoring one long window, three ways.

    python benchmarks/eval_memory.py [--model smollm2-135m] [--spec liger-attention] [--contexts 4096]
                                     [--device cpu|cuda] [--json results.json]

What `lincompile eval` (heal/evaluate.block_metrics) does with a converted model, against what it did before:
- whole: logits of the whole window, an fp32 copy, cross-entropy over all of them at once (the old scoring);
- logit-chunks: the whole logits, scored a chunk of tokens at a time (what any model, a plain HF one too, gets);
- head-chunks: the graph stops before its LM head, which then runs a chunk of tokens at a time (converted models).
Each runs in its own worker process on random tokens; peak is the worker's peak RSS while scoring (VmHWM reset
after the model is built: the model's own memory is included) on CPU, peak allocated on CUDA. The NLL columns
show the three agree. Ratios are against `whole`, from the same run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from remat import mb, peak_bytes, reset_peak, run_worker  # noqa: E402

MODES = ("whole", "logit-chunks", "head-chunks")


def worker(args) -> dict:
    from lincompile.heal.evaluate import block_metrics
    from lincompile.models import load_model
    from lincompile.pipeline import convert
    from lincompile.spec import Spec

    torch.manual_seed(0)
    spec = Spec.resolve(args.spec)
    model = load_model(args.model, device=args.device, attn_implementation=spec.capture.attn_implementation).model
    converted = convert(model, spec, verify=False)
    ids = torch.randint(0, model.config.vocab_size, (1, args.context), device=args.device)
    reset_peak(args.device)
    t0 = time.perf_counter()
    if args.mode == "whole":
        with torch.no_grad():
            logits = converted(ids)[:, :-1].float()
            nll = float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)))
    elif args.mode == "logit-chunks":
        nll = block_metrics(lambda x: converted(x), ids, device=args.device)["loss"]  # no graph_module: logits
    else:
        nll = block_metrics(converted, ids, device=args.device)["loss"]
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    return {"mode": args.mode, "context": args.context, "nll": nll, "peak_bytes": peak_bytes(args.device),
            "seconds": time.perf_counter() - t0, "vocab": model.config.vocab_size}


def table(rows: list[dict], device: str) -> str:
    peak = "peak allocated" if device.startswith("cuda") else "peak RSS"
    lines = [f"| context | scoring | {peak} | ratio | NLL | seconds |", "|---|---|---|---|---|---|"]
    for r in rows:
        whole = next(w for w in rows if w["context"] == r["context"] and w["mode"] == "whole")
        lines.append(f"| {r['context']:,} | {r['mode']} | {mb(r['peak_bytes'])} | "
                     f"{r['peak_bytes'] / whole['peak_bytes']:.2f}× | {r['nll']:.7f} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="model reference (lincompile.models.load_model)")
    p.add_argument("--spec", default="liger-attention")
    p.add_argument("--contexts", type=int, nargs="+", default=[4096])
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", dest="json_path", type=Path)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--context", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    rows = []
    for T in args.contexts:
        for mode in MODES:
            cmd = ["--model", args.model, "--spec", args.spec, "--mode", mode, "--context", str(T),
                   "--device", args.device]
            rows.append(run_worker(__file__, cmd, f"{mode} at {T} tokens"))
            print(f"  {mode} T={T}: {mb(rows[-1]['peak_bytes'])}", file=sys.stderr)
    device = args.device if not args.device.startswith("cuda") else torch.cuda.get_device_name()
    print(f"Scoring one window of {args.model} ({args.spec}), batch 1, {device}, torch {torch.__version__}\n")
    print(table(rows, args.device))
    result = {"model": args.model, "spec": args.spec, "device": device, "rows": rows}
    print("\n" + json.dumps(result))
    if args.json_path:
        args.json_path.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
