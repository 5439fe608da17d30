"""Decode and prefill: SmolLM2-135M original (transformers `generate`, KV cache, sdpa) vs converted (runtime).

    python benchmarks/decode.py                                     # every section at the issue's lengths
    python benchmarks/decode.py --sections decode --decode-lengths 1024 4096 --specs liger-attention

CPU, fp32. Each model runs in its own worker process, one after the other, in the same run; the parent
prints the tables with the ratios. Sections:
- decode:  batch-1 ms per token after L tokens of context, and the physical limit of the speed-up
           (weights + KV bytes) / (weights + state bytes): decode reads every weight and the whole KV cache
           (or state) once per token, so a memory-bound decoder cannot beat that ratio.
- batch:   tokens/s at batch 8 after L tokens of context.
- prefill: seconds to process an L-token prompt (logits of the last position only, as generate does).
Context is not prefilled for decode and batch: the KV cache and the state are random tensors of the right
shapes (speed does not depend on their values). Bytes: KV cache = 2 · layers · kv_heads · head_dim · 4 · L
per sequence, measured on the tensors; state = the runtime's state tensors. Peak RSS: VmHWM of the worker
during each measurement (reset through /proc/self/clear_refs before it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ALL = {"decode": [1024, 4096, 16384, 32768], "batch": [8192, 16384], "prefill": [2048, 8192, 16384, 32768]}


# --------------------------------------------------------------------------------------------------
# Worker: one model, every requested measurement.


def reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not Linux, or not allowed: the peak is then the process's peak so far


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def weight_bytes(module) -> int:
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


class Original:
    """transformers' generate with its DynamicCache, filled with random keys/values to stand for context."""

    def __init__(self, model):
        self.model, c = model, model.config
        self.layers, self.kv_heads = c.num_hidden_layers, c.num_key_value_heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.weights = weight_bytes(model)

    def context(self, batch, length):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        for layer in range(self.layers):
            k = torch.randn(batch, self.kv_heads, length, self.head_dim)
            cache.update(k, torch.randn_like(k), layer)
        return cache, nbytes(t for layer in cache.layers for t in (layer.keys, layer.values)) // batch

    def decode(self, cache, batch, steps):
        length = cache.get_seq_length()
        ids = torch.randint(0, 1000, (batch, length + 1))  # generate feeds what the cache lacks: the last token
        t0 = time.perf_counter()
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                                  max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0)
        assert out.shape[1] == length + 1 + steps
        return time.perf_counter() - t0

    def prefill(self, ids):
        t0 = time.perf_counter()
        self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
        return time.perf_counter() - t0


class Converted:
    """lincompile's runtime: one decode program call per token, state filled with random values."""

    def __init__(self, model, spec):
        from lincompile.runtime import Runtime

        self.rt = Runtime.from_model(model, spec)
        self.weights = weight_bytes(self.rt.graph_module)

    def context(self, batch, length):
        state = self.rt.init_state(batch)
        for name, t in state.items():
            if t.dtype.is_floating_point:
                state[name] = torch.randn_like(t) * 0.1
            elif t.dim() == 1:  # seen and per-sequence counters (ring buffer lengths): L tokens consumed
                state[name] = torch.full_like(t, length)
        return state, self.rt.state_bytes(state) // batch

    def decode(self, state, batch, steps):
        token = torch.randint(0, 1000, (batch, 1))
        t0 = time.perf_counter()
        for _ in range(steps):
            logits, state = self.rt.decode(token, state=state)
            token = logits[:, -1].argmax(-1, keepdim=True)
        return time.perf_counter() - t0

    def prefill(self, ids):
        t0 = time.perf_counter()
        self.rt.prefill(ids, last_only=True)
        return time.perf_counter() - t0


def worker(args) -> dict:
    from lincompile.models import load_model

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = load_model(args.model).model
    runner = Original(model) if args.variant == "original" else Converted(model, args.variant)
    result = {"variant": args.variant, "setup_s": round(time.perf_counter() - t0, 1), "weights_bytes": runner.weights,
              "threads": args.threads, "decode": {}, "batch": {}, "prefill": {}}
    with torch.no_grad():
        warm, _ = runner.context(1, 16)
        runner.decode(warm, 1, 2)
        for section, batch in (("decode", 1), ("batch", args.batch)):
            for length in getattr(args, f"{section}_lengths"):
                ctx, per_seq = runner.context(batch, length)
                reset_peak()
                seconds = runner.decode(ctx, batch, args.steps) / args.steps  # mean over the steps of one call
                result[section][length] = {"ms_per_step": 1e3 * seconds, "tokens_per_s": batch / seconds,
                                           "bytes_per_sequence": per_seq, "peak_rss": peak_rss()}
                del ctx
                print(f"[{args.variant}] {section} L={length}: {result[section][length]}", file=sys.stderr, flush=True)
        for length in args.prefill_lengths:
            ids = torch.randint(0, 1000, (1, length))
            reset_peak()
            result["prefill"][length] = {"s": runner.prefill(ids), "peak_rss": peak_rss()}
            print(f"[{args.variant}] prefill L={length}: {result['prefill'][length]}", file=sys.stderr, flush=True)
    return result


# --------------------------------------------------------------------------------------------------
# Parent: run the workers, print the tables.


def mb(x) -> str:
    return f"{x / 1e6:,.1f} MB" if x < 1e9 else f"{x / 1e9:,.2f} GB"


def tables(results: dict, specs: list[str]) -> str:
    base = results["original"]
    lines = []
    if base["decode"]:
        head = "| context | original ms/token |" + "".join(f" {s} ms/token | speed-up | physical limit | % of limit |"
                                                         for s in specs)
        lines += ["### Decode latency, batch 1", "", head, "|" + "---|" * (2 + 4 * len(specs))]
        for L, b in base["decode"].items():
            row = f"| {int(L):,} | {b['ms_per_step']:.1f} |"
            for s in specs:
                c = results[s]["decode"][L]
                limit = (base["weights_bytes"] + b["bytes_per_sequence"]) / (results[s]["weights_bytes"] +
                                                                            c["bytes_per_sequence"])
                ratio = b["ms_per_step"] / c["ms_per_step"]
                row += f" {c['ms_per_step']:.1f} | {ratio:.2f}× | {limit:.2f}× | {100 * ratio / limit:.0f} % |"
            lines.append(row)
        lines.append("")
    if base["batch"]:
        head = "| context | original tok/s |" + "".join(f" {s} tok/s | ratio |" for s in specs)
        lines += [f"### Decode throughput, batch {results['batch_size']}", "", head, "|" + "---|" * (2 + 2 * len(specs))]
        for L, b in base["batch"].items():
            row = f"| {int(L):,} | {b['tokens_per_s']:.2f} |"
            for s in specs:
                c = results[s]["batch"][L]
                row += f" {c['tokens_per_s']:.2f} | {c['tokens_per_s'] / b['tokens_per_s']:.2f}× |"
            lines.append(row)
        lines.append("")
    if base["prefill"]:
        head = "| prompt | original s |" + "".join(f" {s} s | speed-up |" for s in specs) + \
               " peak RSS original |" + "".join(f" peak RSS {s} |" for s in specs)
        lines += ["### Prefill (last-position logits)", "", head, "|" + "---|" * (3 + 3 * len(specs))]
        for L, b in base["prefill"].items():
            row = f"| {int(L):,} | {b['s']:.2f} |"
            for s in specs:
                c = results[s]["prefill"][L]
                row += f" {c['s']:.2f} | {b['s'] / c['s']:.2f}× |"
            row += f" {mb(b['peak_rss'])} |" + "".join(f" {mb(results[s]['prefill'][L]['peak_rss'])} |" for s in specs)
            lines.append(row)
        lines.append("")
    if base["decode"]:
        head = "| context | original KV cache |" + "".join(f" {s} state | KV / state |" for s in specs) + \
               " peak RSS original |" + "".join(f" peak RSS {s} |" for s in specs)
        lines += ["### Memory per sequence (batch-1 decode; peak RSS of the worker while decoding)", "", head,
                  "|" + "---|" * (3 + 3 * len(specs))]
        for L, b in base["decode"].items():
            kv = b["bytes_per_sequence"]
            row = f"| {int(L):,} | {mb(kv)} |"
            for s in specs:
                state = results[s]["decode"][L]["bytes_per_sequence"]
                row += f" {mb(state)} | {kv / state:,.0f}× |"
            row += f" {mb(b['peak_rss'])} |" + "".join(f" {mb(results[s]['decode'][L]['peak_rss'])} |" for s in specs)
            lines.append(row)
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="model reference (lincompile.models.load_model)")
    p.add_argument("--specs", nargs="+", default=["liger-attention", "lolcats"])
    p.add_argument("--sections", default="decode,batch,prefill", help="comma-separated: decode, batch, prefill")
    for name, lengths in ALL.items():
        p.add_argument(f"--{name}-lengths", type=int, nargs="*", default=None,
                       help=f"context lengths (default {' '.join(map(str, lengths))})")
    p.add_argument("--batch", type=int, default=8, help="batch size of the batch section")
    p.add_argument("--steps", type=int, default=8, help="decode steps timed per length (their mean is reported)")
    p.add_argument("--threads", type=int, default=1, help="torch threads in each worker")
    p.add_argument("--json", dest="json_out", default=None, help="also write the raw results here")
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    chosen = {s.strip() for s in args.sections.split(",")}
    for name, lengths in ALL.items():
        if getattr(args, f"{name}_lengths") is None:
            setattr(args, f"{name}_lengths", lengths if name in chosen else [])
    if args.variant:  # inside a worker
        Path(args.result).write_text(json.dumps(worker(args)))
        return
    results = {"batch_size": args.batch}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for variant in ["original", *args.specs]:
            out = Path(tmp) / f"{variant}.json"
            cmd = [sys.executable, __file__, "--variant", variant, "--result", str(out), "--model", args.model,
                   "--batch", str(args.batch), "--steps", str(args.steps), "--threads", str(args.threads)]
            for name in ALL:
                cmd += [f"--{name}-lengths", *map(str, getattr(args, f"{name}_lengths"))]
            subprocess.run(cmd, check=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            results[variant] = json.loads(out.read_text())
    for variant in ["original", *args.specs]:  # JSON turned the integer keys into strings
        for section in ALL:
            results[variant][section] = {int(k): v for k, v in results[variant][section].items()}
    print(f"SmolLM2-135M ({args.model}), CPU fp32, {args.threads} thread(s), {args.steps} timed steps per length, "
          f"run took {time.perf_counter() - t0:.0f} s; weights: " +
          ", ".join(f"{v} {mb(results[v]['weights_bytes'])}" for v in ["original", *args.specs]) + "\n")
    print(tables(results, args.specs))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
