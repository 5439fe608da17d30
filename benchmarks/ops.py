"""Benchmark: every operator on CPU against torch SDPA (causal), at growing sequence lengths (not a test).

    python benchmarks/ops.py [--ops liger_gla,simple_decay] [--lengths 512,2048,8192,16384] [--threads 1]
                             [--bwd-max-len 8192] [--repeats 3] [--json out.json]

Per operator and length T (B = 1, 9 query heads over 3 kv heads, head_dim 64, fp32, op defaults):
  fwd       `chunked` forward time, and SDPA-forward-time / op-forward-time measured in the same run
  fwd+bwd   forward + backward time (skipped above --bwd-max-len: minutes of autograd at 16k on one core)
  step      one decode step after a prefill of T tokens (should be flat in T)
  peak      peak growth of the RSS during one forward (MiB), sampled every millisecond, measured in a child
            process where glibc returns every freed block ≥ 64 KiB to the OS (MALLOC_MMAP_THRESHOLD_), so that
            the RSS follows live memory; timings come from this process with the allocator as usual
With one thread, times are process CPU time (time.process_time), which other processes on a busy machine
barely disturb; with more threads, wall time. `gla_kernel_gqa` is gla.gla_chunked alone on the Liger GLA
inputs with k/v/gates left at the kv heads (what liger_gla would cost without repeating them).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import torch
import torch.nn.functional as F

B, H, HK, D = 1, 9, 3, 64
KERNEL = "gla_kernel_gqa"


def clock(threads: int):
    return time.process_time if threads == 1 else time.perf_counter


def best_of(fn, repeats: int, timer) -> float:
    """Minimum over `repeats` runs after one warm-up run (seconds)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = timer()
        fn()
        times.append(timer() - t0)
    return min(times)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_growth(fn) -> float:
    """MiB above the starting RSS at the highest point sampled while fn runs (after one unmeasured run, which
    takes the one-time costs: lazy initialisation, thread pools)."""
    if not os.path.exists("/proc/self/statm"):
        return float("nan")
    fn()
    start, peak, done = rss_bytes(), [0], threading.Event()

    def poll():
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.001)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    return max(0, max(peak[0], rss_bytes()) - start) / 2**20


def make_inputs(op, T, requires_grad=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = {"q": (B, H, T, D), "q_pre_rope": (B, H, T, D), "k": (B, HK, T, D), "k_kv": (B, HK, T, D),
              "k_pre_rope": (B, HK, T, D), "v": (B, HK, T, D), "v_kv": (B, HK, T, D),
              "hidden": (B, T, getattr(op, "hidden_size", H * D))}
    inputs = {name: torch.randn(*shapes[name], generator=gen).requires_grad_(requires_grad) for name in op.inputs}
    return inputs


def build(name):
    from lincompile.kernels import registry

    if name == KERNEL:
        return None
    cls = registry.get(name)
    extra = {"is_causal": True} if name == "softmax" else {}
    torch.manual_seed(0)
    return cls(num_heads=H, num_kv_heads=HK, head_dim=D, **extra)


class KernelOnly:
    """gla_chunked on Liger GLA's inputs with the kv heads not repeated: the kernel's own cost."""

    inputs = ("q_pre_rope", "k_pre_rope", "v_kv")

    def chunked(self, q_pre_rope, k_pre_rope, v_kv, state=None):
        from lincompile.kernels.gla import gla_chunked

        g = F.logsigmoid(k_pre_rope.float()) / 16
        return gla_chunked(q_pre_rope.softmax(-1), k_pre_rope.softmax(-1), v_kv, g, initial_state=state)


def measure_op(name, T, args, timer) -> dict:
    op = build(name)
    runner = KernelOnly() if op is None else op
    row = {"op": name, "T": T}
    x = make_inputs(runner, T)
    with torch.no_grad():
        row["fwd_s"] = best_of(lambda: runner.chunked(**x), args.repeats, timer)
    if T <= args.bwd_max_len:
        xg = make_inputs(runner, T, requires_grad=True)

        def fwd_bwd():
            out = runner.chunked(**xg)[0]
            out.float().square().mean().backward()

        row["fwd_bwd_s"] = best_of(fwd_bwd, max(1, args.repeats - 1), timer)
    else:
        row["fwd_bwd_s"] = None  # skipped: see --bwd-max-len
    if op is not None:
        with torch.no_grad():
            _, state = op.chunked(**x)
            one = make_inputs(op, 1, seed=1)
            one = {k: (v[:, 0] if k == "hidden" else v[:, :, 0]) for k, v in one.items()}
            steps = []
            for _ in range(max(5, 2 * args.repeats)):
                t0 = timer()
                op.step(state, **one)
                steps.append(timer() - t0)
        row["step_s"] = statistics.median(steps)
    else:
        row["step_s"] = None
    return row


def sdpa_inputs(T):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, T, D, generator=gen)
    k, v = (torch.randn(B, HK, T, D, generator=gen).repeat_interleave(H // HK, dim=1) for _ in range(2))
    return q, k, v


def sdpa_forward(T, repeats, timer) -> float:
    q, k, v = sdpa_inputs(T)
    with torch.no_grad():
        return best_of(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), repeats, timer)


def memory_child(names, lengths) -> dict:
    """Peak RSS growth of one forward per (op, T); SDPA under the name "sdpa". Run with MALLOC_MMAP_THRESHOLD_."""
    peaks = {}
    for T in lengths:
        q, k, v = sdpa_inputs(T)
        with torch.no_grad():
            peaks[f"sdpa/{T}"] = peak_rss_growth(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
        del q, k, v
        for name in names:
            op = build(name)
            runner = KernelOnly() if op is None else op
            x = make_inputs(runner, T)
            with torch.no_grad():
                peaks[f"{name}/{T}"] = peak_rss_growth(lambda: runner.chunked(**x))
    return peaks


def measure_memory(names, lengths, threads) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", "--ops", ",".join(names),
           "--lengths", ",".join(map(str, lengths)), "--threads", str(threads)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def fmt_time(s):
    if s is None:
        return "skipped"
    return f"{s * 1e3:.1f} ms" if s >= 1e-3 else f"{s * 1e6:.0f} µs"


def main(argv=None) -> int:
    from lincompile.kernels import registry

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", default=None, help="comma-separated operator names (default: all but softmax, "
                                                    f"plus {KERNEL})")
    parser.add_argument("--lengths", default="512,2048,8192,16384")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bwd-max-len", type=int, default=8192, help="skip forward+backward above this length")
    parser.add_argument("--json", default=None, help="write the rows to this file")
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    timer = clock(args.threads)
    names = args.ops.split(",") if args.ops else [n for n in registry.names() if n != "softmax"] + [KERNEL]
    for n in names:
        if n != KERNEL:
            registry.get(n)  # unknown names fail before any timing
    lengths = [int(t) for t in args.lengths.split(",")]
    if args.memory_child:
        print(json.dumps(memory_child(names, lengths)))
        return 0

    rows, sdpa = [], {}
    for T in lengths:
        # SDPA is timed before and after the operators at this length; the faster of the two is the baseline.
        first = sdpa_forward(T, 1 if T >= 8192 else args.repeats, timer)
        for name in names:
            rows.append(measure_op(name, T, args, timer))
            print(f"  {name} T={T}: fwd {fmt_time(rows[-1]['fwd_s'])}", file=sys.stderr, flush=True)
        sdpa[T] = min(first, sdpa_forward(T, 1 if T >= 8192 else args.repeats, timer))
        for row in rows:
            if row["T"] == T:
                row["sdpa_fwd_s"] = sdpa[T]
                row["fwd_speedup_vs_sdpa"] = sdpa[T] / row["fwd_s"]
    peaks = measure_memory(names, lengths, args.threads)
    for row in rows:
        row["peak_mib"] = peaks[f"{row['op']}/{row['T']}"]
        row["sdpa_peak_mib"] = peaks[f"sdpa/{row['T']}"]

    clock_name = "CPU time, 1 thread" if args.threads == 1 else f"wall time, {args.threads} threads"
    print(f"\nB={B}, heads {H}/{HK} kv, head_dim {D}, fp32, torch {torch.__version__}, {clock_name}")
    header = ["op", "T", "fwd", "SDPA fwd", "speedup", "fwd+bwd", "step", "peak MiB", "SDPA MiB"]
    table = [header] + [[r["op"], str(r["T"]), fmt_time(r["fwd_s"]), fmt_time(r["sdpa_fwd_s"]),
                         f"{r['fwd_speedup_vs_sdpa']:.1f}×", fmt_time(r["fwd_bwd_s"]),
                         "-" if r["step_s"] is None else fmt_time(r["step_s"]), f"{r['peak_mib']:.0f}",
                         f"{r['sdpa_peak_mib']:.0f}"]
                        for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for i, row in enumerate(table):
        print("  ".join(cell.ljust(w) if j < 2 else cell.rjust(w) for j, (cell, w) in enumerate(zip(row, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    if args.json:
        meta = {"batch": B, "heads": H, "kv_heads": HK, "head_dim": D, "threads": args.threads, "clock": clock_name,
                "torch": torch.__version__, "bwd_max_len": args.bwd_max_len}
        with open(args.json, "w") as f:
            json.dump({"config": meta, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
