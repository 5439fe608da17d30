"""Benchmark: how long `lincompile apply` takes on the built-in model, pass by pass (not a test).

    python benchmarks/apply.py [--model smollm2-135m] [--spec liger-attention] [--repeat 1] [--json out.json]

Reports load, capture, match, substitute, verify, save in seconds and the ratio
(capture + match + substitute) / load, measured in the same run (target ≤ 1.0).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


def run_once(model_ref: str, spec_ref: str, threads: int | None) -> dict:
    import torch

    import lincompile
    from lincompile.models import load_model

    if threads:
        torch.set_num_threads(threads)
    spec = lincompile.Spec.resolve(spec_ref)
    timings: dict = {}
    t0 = time.perf_counter()
    loaded = load_model(model_ref, attn_implementation=spec.capture.attn_implementation)
    timings["load"] = time.perf_counter() - t0
    converted = lincompile.convert(loaded.model, spec, tokenizer=loaded.tokenizer, source=model_ref, timings=timings)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        converted.save(Path(tmp) / "out")
        timings["save"] = time.perf_counter() - t0
    timings["sites"] = len(converted.sites)
    return timings


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--spec", default="liger-attention")
    parser.add_argument("--repeat", type=int, default=1, help="runs (medians are reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--json", dest="json_path", default=None, help="also write the results here")
    args = parser.parse_args(argv)

    runs = [run_once(args.model, args.spec, args.threads) for _ in range(args.repeat)]
    keys = ["load", "capture", "match", "substitute", "verify", "save"]
    med = {k: statistics.median(r[k] for r in runs) for k in keys}
    ratios = [(r["capture"] + r["match"] + r["substitute"]) / r["load"] for r in runs]
    result = {"model": args.model, "spec": args.spec, "sites": runs[0]["sites"], "repeat": args.repeat,
              "seconds": med, "ratio_compile_over_load": statistics.median(ratios), "runs": runs}
    print(f"lincompile apply: {args.spec} on {args.model} ({runs[0]['sites']} sites), median of {args.repeat}")
    print("| stage | seconds |")
    print("|---|---|")
    for k in keys:
        print(f"| {k} | {med[k]:.2f} |")
    print(f"| (capture + match + substitute) / load | {result['ratio_compile_over_load']:.2f} (target ≤ 1.0) |")
    print(json.dumps(result))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
