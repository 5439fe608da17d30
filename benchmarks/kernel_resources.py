"""Registers, spills and shared memory of the chunk_gla intra-chunk kernels, compiled for a GPU without one.

    python benchmarks/kernel_resources.py [--arch 90] [--warps 2 4 8] [--block-k 32 64] [--head-dim 128]
                                          [--json resources.json]

Triton compiles each kernel for the target (`triton.compile` with a `GPUTarget`; its bundled ptxas makes the
cubin) and the bundled `cuobjdump --dump-resource-usage` reads what the cubin needs per thread. That bounds
how many programs an SM holds at once (registers: 64 K per SM; shared memory: `--smem-kb` per SM), which
matters for these latency-bound kernels. It says nothing about speed: `benchmarks/kernels_gpu.py --tune`
measures that on a GPU. Runs on any machine with Triton installed (no CUDA device, no interpreter).
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


def compile_intra(kernel, arch: int, warps: int, block_k: int, head_dim: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {"q": "*bf16", "k": "*bf16", "b": "*fp32", "A": "*fp32", "scale": "fp32", "T": "i32", "Tp": "i32",
           "H": "i32", "Hk": "i32", "G": "i32"}
    const = {"K": head_dim, "KG": head_dim, "SBK": 1, "C": 64, "BC": 16, "BK": block_k, "USE_G": True,
             "PREC": "tf32", "LOWP": False}  # bf16 inputs, per-channel gates: the benchmark's case
    sig.update({name: "constexpr" for name in const})
    src = ASTSource(fn=kernel, signature=sig, constexprs={(list(sig).index(k),): v for k, v in const.items()})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})


def resources(compiled) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(compiled.asm["cubin"])
        out = subprocess.run([cuobjdump(), "--dump-resource-usage", str(path)], capture_output=True, text=True,
                             check=True).stdout
    fields = dict(re.findall(r"(\w+):(\d+)", out.split("Function", 1)[1]))
    return {"registers": int(fields["REG"]), "stack_bytes": int(fields["STACK"]),
            "local_bytes": int(fields["LOCAL"]), "shared_bytes": int(fields["SHARED"]) + compiled.metadata.shared}


def programs_per_sm(r: dict, warps: int, smem_kb: int) -> int:
    by_regs = REGS_PER_SM // (r["registers"] * 32 * warps)
    by_smem = (smem_kb * 1024) // r["shared_bytes"] if r["shared_bytes"] else by_regs
    return min(by_regs, by_smem, MAX_WARPS_PER_SM // warps)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90, help="compute capability × 10 (90: H100)")
    p.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    p.add_argument("--block-k", type=int, nargs="+", default=[64])
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--smem-kb", type=int, default=228, help="shared memory per SM (H100: 228)")
    p.add_argument("--json", dest="json_path", type=Path, default=None)
    args = p.parse_args(argv)
    from lincompile.kernels import triton_gla as tg

    rows = []
    print(f"sm_{args.arch}, head_dim {args.head_dim}, bf16, per-channel gates")
    print("| kernel | warps | BK | registers | spills (stack/local bytes) | shared bytes | programs per SM |")
    print("|---|---|---|---|---|---|---|")
    for kernel in (tg._attn_intra, tg._attn_intra_split):
        for warps in args.warps:
            for bk in args.block_k:
                r = resources(compile_intra(kernel, args.arch, warps, bk, args.head_dim))
                r.update(kernel=kernel.__name__, warps=warps, block_k=bk,
                         programs_per_sm=programs_per_sm(r, warps, args.smem_kb))
                rows.append(r)
                print(f"| {r['kernel']} | {warps} | {bk} | {r['registers']} | {r['stack_bytes']}/{r['local_bytes']} | "
                      f"{r['shared_bytes']} | {r['programs_per_sm']} |", flush=True)
    if args.json_path:
        args.json_path.write_text(json.dumps({"arch": args.arch, "head_dim": args.head_dim, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
