"""GPU benchmark of the Triton kernels (not a test): correctness at real sizes, then speed vs fla and SDPA.

    python benchmarks/kernels_gpu.py [--head-dim 128] [--heads 16] [--lengths 2048 8192 16384 32768 65536]
                                     [--json kernels_gpu.json]
    TRITON_INTERPRET=1 python benchmarks/kernels_gpu.py --smoke      # CPU: tiny sizes, checks the script

Part 1, correctness (bf16 inputs, B=2, H=16 query / 4 kv heads, T=4096 or --check-len): every kernel against
the operator library's PyTorch forms run in fp32 on the same inputs — relative error ‖Δ‖/‖ref‖ of outputs and
gradients, target ≤ 1e-2:
    chunk_gla (per-channel gates, scalar gates; with initial and final state), recurrent_gla_step,
    swa_attention (window 64, 4 sink logits, a ring prefix), liger_attention's forward (chunked and one-launch,
    `fused.LIGER_FORWARD`); and, as a
    yardstick of what bf16 costs, fla's chunk_gla on the same check (without GQA) if fla-core is importable.
Part 2, speed (bf16, tokens·heads constant: B = tokens / T, H heads of --head-dim, no GQA so fla runs the
same problem): median ms from `triton.testing.do_bench` of forward and forward+backward for
    ours chunk_gla · fla chunk_gla (if fla-core is importable) · torch SDPA causal (flash) ·
    ours swa_attention (w=64) · ours liger_attention, its forward chunked (chunk_gla + swa_attention kernels,
    the default) and in one launch (triton_liger.py), each with the backward by recomputation.
Forward+backward times exclude the accumulation into .grad (reset between runs: do_bench's grad_to_none); up to
stop 12 they included it, ~1.3 ms for chunk_gla at 16k.
Prints the GPU name, a correctness table and a speed table, and writes both as JSON.
`--tune`: instead, A/B the chunk_gla configurations of `triton_gla.Tuning` (VARIANTS: precision, intra scheme,
fusion, warps, block sizes): correctness at T=2048 and forward / forward+backward time at T=2048 (B=32) and
T=16384 (B=4) for each, plus a per-kernel time breakdown (torch.profiler) of the first, of "rows" (the scheme
measured before the matmul default) and of the fastest. `--variant NAME` runs the main benchmark with one of
them. `--tune --warm` runs each case once, untimed, to fill Triton's cache (benchmarks/gpu_session.sh, the
prepared device session, runs one such process per variant in parallel before the timed `--tune`).
Targets (issue #6): ours ≥ fla chunk_gla speed; ≥ 5× SDPA forward at 16k.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lincompile.emit import write_text_atomic


def rel(a, b) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def bench(fn, smoke: bool, grads=()) -> float:
    """Median milliseconds of fn(). grads: leaves whose .grad is reset to None before each run, so a timed
    backward writes fresh gradients rather than adding into the previous run's (an extra elementwise pass
    over every gradient: ~1.3 ms of chunk_gla's forward+backward at 16k)."""
    grads = [x for x in grads if x is not None]

    def reset():
        for x in grads:
            x.grad = None

    if smoke:
        fn()
        reset()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, return_mode="median", grad_to_none=grads or None))


# ------------------------------------------------------------------------------------------------------------
# Part 1: correctness against the PyTorch forms.


def check_gla(B, H, Hk, T, D, dev, scalar: bool, fla_chunk_gla=None):
    """Relative errors of chunk_gla's output, final state and gradients against `gla.gla_chunked` in fp32. With
    fla_chunk_gla (fla's, [B, T, H, D] layout, no GQA): the same check of fla's kernel, as a yardstick."""
    from lincompile.kernels import fused, gla

    torch.manual_seed(0)
    bf = torch.bfloat16
    q = torch.randn(B, H, T, D, device=dev, dtype=bf) * D ** -0.5
    k = torch.randn(B, Hk, T, D, device=dev, dtype=bf) * D ** -0.5
    v = torch.randn(B, Hk, T, D, device=dev, dtype=bf)
    g = F.logsigmoid(torch.randn(B, Hk, T, 1 if scalar else D, device=dev) + 3.0) / 4  # slow decay: long memory
    S0 = torch.randn(B, Hk, D, D, device=dev) * 0.1
    do = torch.randn(B, H, T, D, device=dev, dtype=bf)
    dS = torch.randn(B, Hk, D, D, device=dev) * 0.1

    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v, g, S0)]
    if fla_chunk_gla is None:
        o, S = fused.chunk_gla(*leaves[:4], D ** -0.5, leaves[4])
    else:
        o, S = fla_chunk_gla(*(x.transpose(1, 2).contiguous() for x in leaves[:4]), scale=D ** -0.5,
                             initial_state=leaves[4], output_final_state=True)
        o = o.transpose(1, 2)
    torch.autograd.backward([o, S], [do, dS])
    ref = [x.detach().float().clone().requires_grad_(True) for x in (q, k, v, g, S0)]
    o_r, S_r = gla.gla_chunked(*ref[:4], scale=D ** -0.5, initial_state=ref[4])
    torch.autograd.backward([o_r, S_r], [do.float(), dS])
    errs = {"o": rel(o, o_r), "final_state": rel(S, S_r)}
    for name, x, r in zip(("dq", "dk", "dv", "dg", "dS0"), leaves, ref):
        errs[name] = rel(x.grad, r.grad)
    return errs


def check_step(B, H, Hk, D, dev):
    from lincompile.kernels import fused, gla

    torch.manual_seed(1)
    q, k, v = (torch.randn(B, h, D, device=dev, dtype=torch.bfloat16) for h in (H, Hk, Hk))
    g = F.logsigmoid(torch.randn(B, Hk, D, device=dev))
    S = torch.randn(B, Hk, D, D, device=dev)
    o, S1 = fused.recurrent_gla_step(q, k, v, g, S.clone(), D ** -0.5)
    o_r, S_r = gla.gla_step(q.float(), k.float(), v.float(), g, S, scale=D ** -0.5)
    return {"o": rel(o, o_r), "state": rel(S1, S_r)}


def check_swa(B, H, Hk, T, D, W, m, dev):
    from lincompile.kernels import fused

    torch.manual_seed(2)
    bf = torch.bfloat16
    q, k, v = (torch.randn(B, h, T, D, device=dev, dtype=bf) for h in (H, Hk, Hk))
    pk, pv = (torch.randn(B, Hk, W, D, device=dev, dtype=bf) for _ in range(2))
    seen = torch.tensor(3 * W, device=dev)
    sinks = torch.randn(H, m, device=dev) if m else None  # m = 0: no sink logits
    do, dlse = torch.randn(B, H, T, D, device=dev, dtype=bf), torch.randn(B, H, T, device=dev)
    leaves = [x if x is None else x.detach().clone().requires_grad_(True) for x in (q, k, v, pk, pv, sinks)]
    o, lse = fused.swa_attention(*leaves[:5], seen, D ** -0.5, leaves[5])
    torch.autograd.backward([o, lse], [do, dlse])
    ref = [x if x is None else x.detach().float().clone().requires_grad_(True) for x in (q, k, v, pk, pv, sinks)]
    o_r, lse_r = fused._swa_torch(*ref[:5], seen, D ** -0.5, ref[5])
    torch.autograd.backward([o_r, lse_r], [do.float(), dlse])
    errs = {"o": rel(o, o_r), "lse": rel(lse, lse_r)}
    for name, x, r in zip(("dq", "dk", "dv", "dprev_k", "dprev_v", "dsinks")[: 6 if m else 5], leaves, ref):
        errs[name] = rel(x.grad, r.grad)
    return errs


@contextlib.contextmanager
def liger_forward(forward):
    """`fused.LIGER_FORWARD` set to `forward` for the duration."""
    from lincompile.kernels import fused

    before, fused.LIGER_FORWARD = fused.LIGER_FORWARD, forward
    try:
        yield
    finally:
        fused.LIGER_FORWARD = before


def check_liger(B, H, Hk, T, D, dev, forward="chunked"):
    from lincompile.kernels import fused
    from lincompile.kernels.liger_attention import LigerAttention

    torch.manual_seed(3)
    bf = torch.bfloat16
    q, q_pre = (torch.randn(B, H, T, D, device=dev, dtype=bf) for _ in range(2))
    k, k_pre, v = (torch.randn(B, Hk, T, D, device=dev, dtype=bf) for _ in range(3))
    op = LigerAttention(num_heads=H, num_kv_heads=Hk, head_dim=D).to(dev)
    state = op.init_state(B, torch.float32, dev)
    state["gla"] = torch.randn_like(state["gla"]) * 0.1
    o_r, st_r = op.chunked(*(x.float() for x in (q, k, v, q_pre, k_pre)), state=state)  # PyTorch forms, fp32
    cfg = op.config
    with liger_forward(forward):
        o, st = fused.liger_attention_chunked(q, k, v, q_pre, k_pre, window=cfg["window"], a=cfg["a"], b=cfg["b"],
                                              scale=op.scale, gate_normalizer=cfg["gate_normalizer"], state=state)
    return {"o": rel(o, o_r), "final_state": rel(st["gla"], st_r["gla"])}


def correctness(args, dev):
    B, H, Hk, T, D = 2, 16, 4, args.check_len, args.head_dim
    if args.smoke:
        B, H, Hk, T, D = 1, 4, 2, 100, 32
    rows = []
    fla = None if args.no_fla or args.smoke else _fla()  # fla's kernels need a GPU
    for name, fn in [
        ("chunk_gla per-channel gates", lambda: check_gla(B, H, Hk, T, D, dev, scalar=False)),
        ("chunk_gla scalar gates", lambda: check_gla(B, H, Hk, T, D, dev, scalar=True)),
        ("recurrent_gla_step", lambda: check_step(8 if not args.smoke else 2, H, Hk, D, dev)),
        ("swa_attention w=64, 4 sinks, ring", lambda: check_swa(B, H, Hk, T, D, 64, 4, dev)),
        ("liger_attention fwd, chunked", lambda: check_liger(B, H, Hk, T, D, dev)),
        ("liger_attention fwd, one launch", lambda: check_liger(B, H, Hk, T, D, dev, "one_launch")),
        *([("fla chunk_gla (yardstick, no GQA)", lambda: check_gla(B, H, H, T, D, dev, False, fla))] if fla else []),
    ]:
        try:
            errs = fn()
            rows.append({"kernel": name, "errors": errs, "max": max(errs.values()), "ok": max(errs.values()) <= 1e-2})
        except Exception as err:  # report and go on: the speed part still runs
            rows.append({"kernel": name, "errors": {}, "max": float("nan"), "ok": False, "error": repr(err)[:300]})
        r = rows[-1]
        detail = ", ".join(f"{k} {v:.1e}" for k, v in r["errors"].items()) or r.get("error", "")
        print(f"  {name:36s} {'ok ' if r['ok'] else 'BAD'} max {r['max']:.2e}  ({detail})", flush=True)
    return rows


# ------------------------------------------------------------------------------------------------------------
# Part 2: speed.


def _fla():
    """fla's chunk_gla, or None (fla-core is optional)."""
    try:
        from fla.ops.gla import chunk_gla
    except Exception as err:
        print(f"  (fla chunk_gla not available: {type(err).__name__}: {err})")
        return None
    return chunk_gla


def speed(args, dev):
    from lincompile.kernels import fused

    fla_chunk_gla = None if args.no_fla or args.smoke else _fla()
    H, D, bf = args.heads, args.head_dim, torch.bfloat16
    rows = []
    for T in args.lengths:
        B = max(1, args.tokens // T)
        torch.manual_seed(0)
        mk = lambda *s: torch.randn(*s, device=dev, dtype=bf, requires_grad=True)  # noqa: E731
        q, k, v = mk(B, H, T, D), mk(B, H, T, D), mk(B, H, T, D)
        with torch.no_grad():
            q.mul_(D ** -0.5)
            k.mul_(D ** -0.5)
        g = (F.logsigmoid(torch.randn(B, H, T, D, device=dev) + 3.0) / 4).requires_grad_(True)
        do = torch.randn(B, H, T, D, device=dev, dtype=bf)
        ring = torch.zeros(B, H, 64, D, device=dev, dtype=bf)
        seen = torch.zeros((), dtype=torch.int64, device=dev)
        qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_(True) for x in (q, k, v))
        gt = g.detach().transpose(1, 2).contiguous().requires_grad_(True)
        dot = do.transpose(1, 2).contiguous()

        def liger(forward):
            def run():
                with liger_forward(forward):
                    return fused.liger_attention(q, k, v, q, k, None, ring, ring, seen, 64, 0.5, 0.5, D ** -0.5,
                                                 16.0)[0]
            return run

        def fb(fwd, grad_out):
            def run():
                out = fwd()
                out.backward(grad_out)
            return run

        cases = {
            "ours chunk_gla": (lambda: fused.chunk_gla(q, k, v, g, D ** -0.5, None)[0], do),
            "torch sdpa (flash)": (lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), do),
            "ours swa_attention w64": (lambda: fused.swa_attention(q, k, v, ring, ring, seen, D ** -0.5, None)[0], do),
            "ours liger_attention": (liger("chunked"), do),
            "ours liger_attention one launch": (liger("one_launch"), do),
        }
        if fla_chunk_gla is not None:  # fla autotunes on its first call (minutes)
            cases["fla chunk_gla"] = (lambda: fla_chunk_gla(qt, kt, vt, gt, scale=D ** -0.5)[0], dot)
        for name, (fwd, grad_out) in cases.items():
            row = {"T": T, "B": B, "H": H, "D": D, "kernel": name}
            try:
                with torch.no_grad():
                    row["fwd_ms"] = bench(fwd, args.smoke)
                row["fwd_bwd_ms"] = bench(fb(fwd, grad_out), args.smoke, (q, k, v, g, qt, kt, vt, gt))
            except Exception as err:
                row["error"] = repr(err)[:300]
            for x in (q, k, v, g, qt, kt, vt, gt):
                x.grad = None
            rows.append(row)
            print(f"  T={T:6d} B={B:3d} {name:32s} fwd {row.get('fwd_ms', float('nan')):9.3f} ms   "
                  f"fwd+bwd {row.get('fwd_bwd_ms', float('nan')):9.3f} ms  {row.get('error', '')}", flush=True)
        cases.clear()
        if dev == "cuda":
            torch.cuda.empty_cache()
    return rows


def speed_table(rows) -> list[str]:
    by = {(r["T"], r["kernel"]): r for r in rows}
    names = ["ours chunk_gla", "fla chunk_gla", "torch sdpa (flash)", "ours swa_attention w64",
             "ours liger_attention", "ours liger_attention one launch"]
    lines = ["| T | B | " + " | ".join(f"{n} fwd / fwd+bwd (ms)" for n in names)
             + " | SDPA / ours fwd | fla / ours fwd+bwd |",
             "|---|---|" + "---|" * (len(names) + 2)]

    def cell(r):
        if r is None or "fwd_ms" not in r:
            return "—"
        return f"{r['fwd_ms']:.3f} / {r.get('fwd_bwd_ms', math.nan):.3f}"

    def ratio(a, b, key):
        return f"{a[key] / b[key]:.2f}×" if a and b and key in a and key in b else "—"

    for T in sorted({r["T"] for r in rows}):
        got = [by.get((T, n)) for n in names]
        B = next((r["B"] for r in got if r), "?")
        lines.append(f"| {T} | {B} | " + " | ".join(cell(r) for r in got) + f" | {ratio(got[2], got[0], 'fwd_ms')} | "
                     f"{ratio(got[1], got[0], 'fwd_bwd_ms')} |")
    return lines


# ------------------------------------------------------------------------------------------------------------
# Tuning: chunk_gla launch configurations, A/B in one run.

VARIANTS = {
    "default": {},  # precision "mixed", intra "matmul": the forward in bf16, the backward's h, dh, dq/dk in fp32
    "full": {"precision": "full"},  # fp32 operands (TF32) and buffers everywhere: the default up to stop 11
    "full half h": {"precision": "full", "half_states": True},  # ... with the forward's h in bf16
    "low": {"precision": "low"},  # bf16 operands and buffers in the backward too (dg 1.3e-2 at 2k before)
    "carry": {"dg_form": "carry"},  # dg within chunks plus each chunk's Σ_v S ⊙ dS (not yet timed)
    "low carry": {"precision": "low", "dg_form": "carry"},  # "low" with dg's rounding bounded by the chunk
    "rows": {"intra": "rows"},  # the diagonal blocks one row at a time: the default measured up to stop 10
    "split": {"intra": "split"},  # "rows" with A by _attn_intra_split (one program per 16-row block)
    "fused": {"fuse_intra": True},  # neither A nor (forward) the cumulative gates are ever stored
    "low fused": {"precision": "low", "fuse_intra": True},
    "no reuse": {"reuse_forward": False},  # the backward forms A again, as up to stop 12
    "keep b": {"reuse_gates": True},  # ... and keeps the cumulative gates too (fp32, g's size)
    "low carry keep b": {"precision": "low", "dg_form": "carry", "reuse_gates": True},
    "raw gates": {"raw_gates": True},  # no gate cumsum kernel in the forward: each kernel cumulates g (not yet timed)
    # the forward in one sequential kernel, the state in registers: no h, A, b buffers (not yet timed); V blocks
    # of 64 give B·Hk·2 programs at head_dim 128 (one per SM), 128 halve that but form A once per kv head
    "scan": {"scan_forward": True},
    "scan bv128": {"scan_forward": True, "block_v": 128},
    "scan bv32": {"scan_forward": True, "block_v": 32},
    "split dqk": {"dqk": "split"},  # dq/dk's inter-chunk products in their own 64-row kernel (wgmma), as fla
    "low carry split dqk": {"precision": "low", "dg_form": "carry", "dqk": "split"},
    "w8": {"num_warps": 8},
    "bv32": {"block_v": 32},  # twice the programs for the state scans (h, dh)
}


def set_variant(name: str):
    from lincompile.kernels import triton_gla

    triton_gla.TUNING = triton_gla.Tuning(**VARIANTS[name])


def gla_inputs(B, H, T, D, dev):
    torch.manual_seed(0)
    bf = torch.bfloat16
    q, k, v = (torch.randn(B, H, T, D, device=dev, dtype=bf) * s for s in (D ** -0.5, D ** -0.5, 1.0))
    g = F.logsigmoid(torch.randn(B, H, T, D, device=dev) + 3.0) / 4
    return [x.requires_grad_(True) for x in (q, k, v, g)], torch.randn(B, H, T, D, device=dev, dtype=bf)


def profile_gla(B, H, T, D, dev) -> dict:
    """Per-kernel CUDA time (ms) of one chunk_gla forward+backward."""
    from torch.profiler import ProfilerActivity, profile

    from lincompile.kernels import fused

    (q, k, v, g), do = gla_inputs(B, H, T, D, dev)
    run = lambda: fused.chunk_gla(q, k, v, g, D ** -0.5, None)[0].backward(do)  # noqa: E731
    run()
    for x in (q, k, v, g):
        x.grad = None  # fresh gradients, as bench() times them
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t:
            out[e.key[:60]] = round(t / 1e3, 3)
    return dict(sorted(out.items(), key=lambda kv: -kv[1])[:14])


def tune(args, dev, save=lambda partial: None) -> dict:
    H, D = args.heads, args.head_dim
    sizes = [(32, 2048), (4, 16384)] if not args.smoke else [(1, 64), (1, 128)]
    if args.warm:  # one sequence each: the same compiled kernels (the batch only sizes the grids), in less
        sizes = [(1, T) for _, T in sizes]  # memory, for the parallel warm-up processes on one GPU
    names = args.variants or list(VARIANTS)
    try:
        return _tune(args, dev, H, D, sizes, names, save)
    finally:
        set_variant("default")


def _tune(args, dev, H, D, sizes, names, save) -> dict:
    from lincompile.kernels import fused

    rows = []
    quick = args.smoke or args.warm  # one untimed-quality run per case: compiles, no do_bench
    for name in names:
        set_variant(name)
        row = {"variant": name, **VARIANTS[name]}
        try:
            B0, T0 = (2, 2048) if not args.smoke else (1, 100)
            errs = check_gla(B0, H, max(1, H // 4), T0, D, dev, scalar=False)
            row["max_rel_err"] = max(errs.values())
            row["errors"] = {out: float(f"{e:.3g}") for out, e in errs.items()}
            for B, T in sizes:
                (q, k, v, g), do = gla_inputs(B, H, T, D, dev)
                fwd = lambda: fused.chunk_gla(q, k, v, g, D ** -0.5, None)[0]  # noqa: E731
                with torch.no_grad():
                    row[f"fwd_ms_{T}"] = bench(fwd, quick)
                row[f"fwd_bwd_ms_{T}"] = bench(lambda: fwd().backward(do), quick, (q, k, v, g))
                del q, k, v, g, do
        except Exception as err:
            row["error"] = repr(err)[:300]
        rows.append(row)
        print("  " + json.dumps(row), flush=True)
        save({"rows": rows, "partial": True})  # a run cut short still leaves the variants it finished
        if dev == "cuda":
            torch.cuda.empty_cache()
    if args.warm:  # the kernels are compiled and cached: what --warm is for
        return {"rows": rows, "sdpa": {}, "best": None, "profile": {}}
    sdpa = {}
    for B, T in sizes:  # the yardstick of the target: ≥ 5× SDPA forward at 16k
        (q, k, v, _), do = gla_inputs(B, H, T, D, dev)
        fwd = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
        with torch.no_grad():
            sdpa[f"fwd_ms_{T}"] = bench(fwd, args.smoke)
        sdpa[f"fwd_bwd_ms_{T}"] = bench(lambda: fwd().backward(do), args.smoke, (q, k, v))
    print(f"  torch sdpa: {json.dumps(sdpa)}", flush=True)
    ok = [r for r in rows if "error" not in r and r.get("max_rel_err", 1) <= 1e-2]
    best = min(ok, key=lambda r: r.get(f"fwd_bwd_ms_{sizes[1][1]}", math.inf))["variant"] if ok else None
    prof = {}
    if dev == "cuda" and not args.smoke:
        for name in dict.fromkeys([names[0], *(["rows"] if "rows" in names else []), best]):
            if name is None:
                continue
            set_variant(name)
            prof[name] = profile_gla(4, H, 16384, D, dev)
            print(f"  profile {name} (B=4 T=16384, fwd+bwd, ms): {json.dumps(prof[name])}", flush=True)
    return {"rows": rows, "sdpa": sdpa, "best": best, "profile": prof}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 16384, 32768, 65536])
    p.add_argument("--tokens", type=int, default=65536, help="B·T (tokens per batch), constant across lengths")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--check-len", type=int, default=4096)
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--no-fla", action="store_true",
                   help="leave out fla chunk_gla, timed and checked (its autotuning takes minutes)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, no do_bench (CPU under TRITON_INTERPRET=1)")
    p.add_argument("--json", dest="json_path", default=None)
    p.add_argument("--tune", action="store_true", help="A/B the chunk_gla launch configurations (see VARIANTS)")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=None, help="with --tune: which")
    p.add_argument("--variant", choices=list(VARIANTS), default=None, help="run the benchmark with this one")
    p.add_argument("--warm", action="store_true",
                   help="with --tune: run each case once, untimed, to fill Triton's cache for a later --tune "
                        "(benchmarks/gpu_session.sh runs one such process per variant in parallel)")
    p.add_argument("--skip-check", action="store_true", help="leave out the correctness part")
    args = p.parse_args(argv)
    if args.tune and args.variant:
        p.error("--variant is for the benchmark; with --tune, choose with --variants")
    if args.variants and not args.tune:
        p.error("--variants goes with --tune")
    if args.warm and not args.tune:
        p.error("--warm goes with --tune")
    if args.smoke:
        args.lengths, args.tokens, args.heads, args.head_dim = [64, 128], 128, 2, 32
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("kernels_gpu.py needs a CUDA device (or TRITON_INTERPRET=1 with --smoke)")
    import triton

    gpu = torch.cuda.get_device_name() if dev == "cuda" else "CPU (Triton interpreter)"
    print(f"device: {gpu} · torch {torch.__version__} · triton {triton.__version__}", flush=True)
    t0 = time.perf_counter()
    head = {"device": gpu, "torch": torch.__version__, "triton": triton.__version__}

    def save(result):
        if args.json_path:
            write_text_atomic(Path(args.json_path), json.dumps({**head, **result}, indent=1))

    if args.tune:
        print(f"chunk_gla variants (bf16, H = {args.heads}, D = {args.head_dim}; median ms):", flush=True)
        result = {**tune(args, dev, save), "seconds": round(time.perf_counter() - t0, 1)}
        print(f"  best: {result['best']} ({result['seconds']} s)")
        save(result)
        return
    if args.variant:
        set_variant(args.variant)
        print(f"chunk_gla variant: {args.variant} {VARIANTS[args.variant]}", flush=True)
    checks = []
    if not args.skip_check:
        print("correctness (bf16 inputs vs the PyTorch forms in fp32, relative error, target ≤ 1e-2):", flush=True)
        checks = correctness(args, dev)
        print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    rows = []
    if not args.skip_speed:
        print(f"speed (bf16, B·T = {args.tokens}, H = {args.heads}, D = {args.head_dim}; median ms):", flush=True)
        rows = speed(args, dev)
        print("\n".join(speed_table(rows)))
    result = {"variant": args.variant, "correctness": checks, "speed": rows,
              "seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps({**head, **result}))
    save(result)


if __name__ == "__main__":
    main()
