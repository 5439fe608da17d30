"""Registers, spills and shared memory of the chunk_gla intra-chunk kernels (forward A and output, backward dq/dk,
for each `Tuning.intra` and `fuse_intra`), compiled for a GPU without one.

    python benchmarks/kernel_resources.py [--arch 90] [--warps 2 4 8] [--block-k 32 64] [--head-dim 128]
                                          [--json resources.json]

Triton compiles each kernel for the target (`triton.compile` with a `GPUTarget`; its bundled ptxas makes the
cubin) and the bundled `cuobjdump --dump-resource-usage` reads what the cubin needs per thread, for the
arguments `kernels_gpu.py` gives (bf16, per-channel gates, head_dim 128, 16 heads, T a multiple of 16). That bounds
how many programs an SM holds at once (registers: 64 K per SM; shared memory: `--smem-kb` per SM), which
matters for these latency-bound kernels. It also counts the tensor-core instructions in the PTX: wgmma (Hopper's
warpgroup MMA, for tl.dot tiles of 64 rows) or mma.sync (the Ampere-style m16n8 form that 16-row tiles fall back
to). It says nothing about speed: `benchmarks/kernels_gpu.py --tune` measures that on a GPU. Runs on any machine
with Triton installed (no CUDA device, no interpreter).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # compile for the target, not the interpreter

REGS_PER_SM = 65536
MAX_WARPS_PER_SM = 64


def cuobjdump() -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not path.exists():
        sys.exit(f"kernel_resources: {path} not found (this Triton has no bundled NVIDIA tools)")
    return str(path)


# What each kernel is compiled as: (label, kernel name in triton_gla, constexprs beyond the common ones)
KERNELS = [
    ("_attn_intra", "_attn_intra", {}),  # Tuning.intra "rows"
    ("_attn_intra_split", "_attn_intra_split", {}),  # "split"
    ("_attn_intra_mm", "_attn_intra_mm", {}),  # "matmul" (the default)
    ("_attn_intra_mm raw gates", "_attn_intra_mm", {"RAW": True}),  # Tuning.raw_gates: the gate cumsum in-kernel
    ("_o_fwd", "_o_fwd", {}),  # the forward's output from A
    ("_o_fwd raw gates", "_o_fwd", {"RAW": True}),  # likewise
    ("_o_fwd_mm", "_o_fwd_mm", {"RAW": True}),  # Tuning.fuse_intra: A and the gate cumsum in the output kernel
    ("_h_fwd", "_h_fwd", {}),
    ("_h_fwd raw gates", "_h_fwd", {"RAW": True}),  # fuse_intra's forward: the gate cumsum in the scan
    ("_dqk_bwd rows", "_dqk_bwd", {"DIAG_MM": False}),  # "rows" and "split"
    ("_dqk_bwd matmul", "_dqk_bwd", {"DIAG_MM": True}),  # "matmul"
    ("_dqk_bwd matmul carry", "_dqk_bwd", {"DIAG_MM": True, "CARRY": True}),  # Tuning.dg_form "carry"
    # Tuning.dqk "split": the intra-chunk terms (into fp32 dq, dk scratch), then the inter-chunk ones
    ("_dqk_bwd matmul intra", "_dqk_bwd", {"DIAG_MM": True, "INTER": False, "fp32": {"dq", "dk"}}),
    ("_dqk_inter", "_dqk_inter", {}),
    ("_dqk_inter carry", "_dqk_inter", {"CARRY": True}),
    ("_dv_bwd", "_dv_bwd", {"FUSED": False}),
    ("_dv_bwd fused", "_dv_bwd", {"FUSED": True}),  # fuse_intra: A formed in the dv kernel
    ("_fwd_scan", "_fwd_scan", {"BK": None}),  # Tuning.scan_forward: the whole K in one block
]
_HALF = {"q", "k", "v", "do", "dq", "dk", "dv", "o"}  # bf16 tensors; every other pointer is fp32 (b, A, h, dh, dA, dB,
#                                                      dqi, dki)
_LOWP_HALF = {"A", "h", "dh"}  # the scratch buffers a LOWP launch stores in bf16
_INTS = {"T", "Tp", "H", "Hk", "N"}


def compile_kernel(kernel, extra: dict, arch: int, warps: int, block_k: int, head_dim: int, lowp: bool = False):
    """`kernel` compiled as `kernels_gpu.py` launches it: bf16 q/k/v, per-channel gates, 16 query heads on 16
    kv heads, T a multiple of 16; lowp: with LOWP and A, h, dh in bf16 (every forward kernel under the default
    precision "mixed"; every kernel under "low"). A launch specialises its arguments (Triton marks 16-byte
    aligned pointers and integers divisible by 16, and folds integers equal to 1), which changes the code; the
    same marks are given here."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    extra = dict(extra)
    if "BK" in extra and extra["BK"] is None:  # a kernel that takes the whole head in one K block
        extra["BK"] = head_dim
    fp32 = extra.pop("fp32", set())  # pointers that are fp32 in this launch although usually bf16
    common = {"G": 1, "K": head_dim, "V": head_dim, "KG": head_dim, "SBK": 1, "C": 64, "BC": 16, "BK": block_k,
              "BV": 64, "USE_G": True, "PREC": "tf32", "LOWP": lowp, "HAS_H0": False, "RAW": False, "GMIN": -5.0,
              "APREC": "tf32", "CARRY": False, "INTER": True,
              **extra}
    sig, const = {}, {}
    for p in kernel.params:
        name = p.name
        if p.is_constexpr or name == "G":
            sig[name] = "constexpr"
            const[name] = common[name]
        elif name == "scale":
            sig[name] = "fp32"
        elif name in _INTS:
            sig[name] = "i32"
        else:
            half = (name in _HALF and name not in fp32) or (lowp and name in _LOWP_HALF)
            sig[name] = "*bf16" if half else "*fp32"
    names = list(sig)
    divisible = {(names.index(a),): [["tt.divisibility", 16]] for a, t in sig.items() if t not in ("constexpr", "fp32")}
    src = ASTSource(fn=kernel, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()},
                    attrs=divisible)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})


def resources(compiled) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(compiled.asm["cubin"])
        run = subprocess.run([cuobjdump(), "--dump-resource-usage", str(path)], capture_output=True, text=True)
    fields = dict(re.findall(r"(\w+):(\d+)", run.stdout.split("Function", 1)[-1]))
    if run.returncode or not {"REG", "STACK", "LOCAL", "SHARED"} <= set(fields):
        sys.exit(f"kernel_resources: cannot read cuobjdump's resource usage (exit {run.returncode}): "
                 f"{(run.stderr or run.stdout).strip()[:500]}")
    return {"registers": int(fields["REG"]), "stack_bytes": int(fields["STACK"]),
            "local_bytes": int(fields["LOCAL"]), "shared_bytes": int(fields["SHARED"]) + compiled.metadata.shared}


def tensor_core_ops(ptx: str) -> dict:
    """{"wgmma": count, "mma.sync": count, "shapes": [...]}: the tensor-core instructions in the PTX. On Hopper
    a tl.dot of 64 or more rows becomes wgmma (warpgroup MMA, m64nNk*); one of 16 rows falls back to the
    Ampere-style mma.sync m16n8k*, with a fraction of wgmma's throughput."""
    return {"wgmma": len(re.findall(r"\bwgmma\.mma_async\.", ptx)),
            "mma.sync": len(re.findall(r"\bmma\.sync\.", ptx)),
            "shapes": sorted(set(re.findall(r"\b(?:wgmma\.mma_async|mma\.sync)\.\S*?\.(m\d+n\d+k\d+)", ptx)))}


def programs_per_sm(r: dict, warps: int, smem_kb: int) -> int:
    """Resident programs per SM (Hopper limits): registers are allocated per warp in units of 256 (per-thread
    counts rounded up to a multiple of 8), each block also reserves 1 KB of shared memory, at most 32 blocks
    and 64 warps."""
    regs_per_warp = -(-r["registers"] // 8) * 8 * 32
    by_regs = REGS_PER_SM // (regs_per_warp * warps)
    by_smem = (smem_kb * 1024) // (r["shared_bytes"] + 1024)
    return min(by_regs, by_smem, 32, MAX_WARPS_PER_SM // warps)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90, help="compute capability × 10 (90: H100)")
    p.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    p.add_argument("--block-k", type=int, nargs="+", default=[64])
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--smem-kb", type=int, default=228, help="shared memory per SM (H100: 228)")
    p.add_argument("--lowp", action="store_true",
                   help="LOWP launches with A, h, dh in bf16 (the forward kernels under the default precision)")
    p.add_argument("--json", dest="json_path", type=Path, default=None)
    args = p.parse_args(argv)
    from lincompile.kernels import triton_gla as tg

    rows = []
    import triton

    print(f"sm_{args.arch}, Triton {triton.__version__}, head_dim {args.head_dim}, bf16, per-channel gates"
          + (", LOWP" if args.lowp else ""))
    print("| kernel | warps | BK | registers | spills (stack/local bytes) | shared bytes | programs per SM | "
          "tensor-core instructions (PTX) |")
    print("|---|---|---|---|---|---|---|---|")
    for label, name, extra in KERNELS:
        for warps in args.warps:
            for bk in args.block_k:
                kernel = compile_kernel(getattr(tg, name), extra, args.arch, warps, bk, args.head_dim, args.lowp)
                r = resources(kernel)
                r.update(kernel=label, warps=warps, block_k=bk,
                         programs_per_sm=programs_per_sm(r, warps, args.smem_kb),
                         tensor_core=tensor_core_ops(kernel.asm["ptx"]))
                rows.append(r)
                tc = r["tensor_core"]
                mma = ", ".join(f"{kind} ×{tc[kind]}" for kind in ("wgmma", "mma.sync") if tc[kind])
                print(f"| {r['kernel']} | {warps} | {bk} | {r['registers']} | {r['stack_bytes']}/{r['local_bytes']} | "
                      f"{r['shared_bytes']} | {r['programs_per_sm']} | {mma or 'none'} "
                      f"({' '.join(tc['shapes'])}) |", flush=True)
    if args.json_path:
        import triton

        args.json_path.write_text(json.dumps({"arch": args.arch, "triton": triton.__version__,
                                              "head_dim": args.head_dim, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
