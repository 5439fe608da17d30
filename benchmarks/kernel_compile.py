"""Compile every Triton kernel launch of the GPU path for a GPU architecture, on a machine without a GPU.

    python benchmarks/kernel_compile.py [--arch 90] [--head-dim 128] [--variants NAME ...] [--ops gla step swa liger]
                                        [--save-launches launches.json | --launches launches.json] [--json compile.json]

Before spending time on a GPU machine, check that its Triton version compiles every kernel the benchmark will
launch, and with what registers and spills. Record with this environment's Triton and compile with that
version, installed aside: `python benchmarks/kernel_compile.py --save-launches /tmp/launches.json`, then
`pip install --target /tmp/t36 --no-deps triton==3.6.0` and `PYTHONPATH=/tmp/t36 python
benchmarks/kernel_compile.py --launches /tmp/launches.json` (an older Triton's interpreter may not run on
this numpy: Triton 3.6's does not on numpy 2.x, while its compiler does).

1. Record (a subprocess under TRITON_INTERPRET=1): run what `kernels_gpu.py` checks at a short length
   (T = 128, bf16, the given head_dim, with and without GQA), recording each distinct launch: the kernel, its
   pointer dtypes, its constexprs and its launch options. `--ops` picks the workloads: gla (chunk_gla forward
   and backward under every `--variants` configuration of `kernels_gpu.VARIANTS`, plus scalar gates), step
   (the decode step), swa (sliding window with and without sink logits, forward and backward), liger
   (liger_attention in both forward forms, forward and backward). triton_swa picks a different launch
   configuration and operand dtype under the interpreter; here it is made to pick the GPU's. Outputs of this
   run are not checked (the interpreter's bf16 matmuls are wrong): only the launches matter.
2. Compile each launch with the installed Triton for `GPUTarget("cuda", arch, 32)`, marking its arguments as a
   launch would (16-byte aligned pointers, integers divisible by 16, integers equal to 1 folded), and read the
   cubin's resource usage (`kernel_resources.py`'s bundled cuobjdump). Prints one table row per launch; exits
   1 if any launch fails to compile.
Registers and spills are those of the recorded arguments: with 2 heads, an integer a real launch has divisible
by 16 (the head counts) is not here, which can change the code a little. `kernel_resources.py` compiles the GLA
kernels with the benchmark's own argument marks.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OPS = ("gla", "step", "swa", "liger")
_PTR = {"bfloat16": "*bf16", "float16": "*fp16", "float32": "*fp32", "int32": "*i32", "int64": "*i64",
        "bool": "*i1", "uint8": "*u8"}


# ------------------------------------------------------------------------------------------------------------
# 1. Recording (runs in the TRITON_INTERPRET=1 subprocess).


def _describe(x):
    """A launch argument as [kind, value]: pointers by dtype, constexpr strings and triton dtypes by name."""
    import torch
    import triton.language as tl

    if isinstance(x, torch.Tensor):
        return ["ptr", str(x.dtype).removeprefix("torch.")]
    if isinstance(x, tl.dtype):
        return ["tl_dtype", x.name]
    if x is None or isinstance(x, (bool, int, float, str)):
        return [type(x).__name__, x]
    raise TypeError(f"cannot record a launch argument of type {type(x).__name__}")


def _recorder(launches: dict):
    """Wraps the interpreter's launch so that each distinct launch lands in `launches`, then runs as usual."""
    from triton.runtime import interpreter

    run = interpreter.InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        constexprs = {name for name, ann in self.fn.__annotations__.items() if "constexpr" in str(ann)}
        params, options = dict(zip(self.arg_names, args)), {}
        for name, x in kwargs.items():
            (params if name in self.arg_names else options)[name] = x
        params = {name: _describe(x) for name, x in params.items()}

        def key_of(name, d):  # what the compiled code depends on
            if d[0] == "int" and name not in constexprs:
                return ["int", d[1] == 1, d[1] % 16 == 0]
            if d[0] == "float" and name not in constexprs:
                return ["float"]
            return d

        key = json.dumps([self.fn.__module__, self.fn.__name__, options,
                          {n: key_of(n, d) for n, d in params.items()}], sort_keys=True)
        launches.setdefault(key, {"module": self.fn.__module__, "kernel": self.fn.__name__, "options": options,
                                  "params": params})
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    interpreter.InterpretedFunction.run = recording_run


def record(head_dim: int, variants: list[str], ops: list[str]) -> list[dict]:
    import dataclasses

    import torch
    from triton.runtime import interpreter

    sys.path.insert(0, str(HERE))
    import kernels_gpu as kg
    from lincompile.kernels import fused, triton_swa
    from lincompile.kernels.liger_attention import LigerAttention

    # only launches are wanted: no overflow checks (the GPU compiler has none outside debug mode), and
    # triton_swa's GPU launch configuration and bf16 operands rather than its interpreter ones
    builder = interpreter.interpreter_builder
    builder.options = dataclasses.replace(builder.options, sanitize_overflow=False)
    triton_swa._interpreting = lambda q: False
    launches: dict = {}
    _recorder(launches)
    B, T, D = 1, 128, head_dim
    heads = ((2, 1), (2, 2))  # GQA (G = 2) and none (G = 1, which Triton folds into the code)
    t0 = time.time()

    def done(what):
        print(f"  recorded {what}: {len(launches)} distinct launches, {time.time() - t0:.0f} s", flush=True)

    if "gla" in ops:
        for name in variants:
            kg.set_variant(name)
            for H, Hk in heads:
                kg.check_gla(B, H, Hk, T, D, "cpu", scalar=False)
            done(f"chunk_gla {name!r}")
        kg.set_variant("default")
        kg.check_gla(B, 2, 1, T, D, "cpu", scalar=True)
        done("chunk_gla scalar gates")
    if "step" in ops:
        for H, Hk in heads:
            kg.check_step(2, H, Hk, D, "cpu")
        done("recurrent_gla_step")
    if "swa" in ops:
        for (H, Hk), sinks in zip(heads, (4, 0)):
            kg.check_swa(B, H, Hk, T, D, 64, sinks, "cpu")
        done("swa_attention")
    if "liger" in ops:
        for form in fused.LIGER_FORWARDS:
            for H, Hk in heads:
                op = LigerAttention(num_heads=H, num_kv_heads=Hk, head_dim=D)
                cfg = op.config
                xs = [torch.randn(B, h, T, D, dtype=torch.bfloat16, requires_grad=True) for h in (H, Hk, Hk, H, Hk)]
                with kg.liger_forward(form):
                    o, st = fused.liger_attention_chunked(*xs, window=cfg["window"], a=cfg["a"], b=cfg["b"],
                                                          scale=op.scale, gate_normalizer=cfg["gate_normalizer"],
                                                          state=op.init_state(B, torch.float32, "cpu"))
                    (o.float().sum() + st["gla"].sum()).backward()
            done(f"liger_attention {form!r}")
    return list(launches.values())


# ------------------------------------------------------------------------------------------------------------
# 2. Compiling (this process, no interpreter).


def signature(jit, params: dict):
    """(signature, constexprs, attrs) for `ASTSource`, from a recorded launch of `jit`. Scalars get the type
    the installed Triton gives them at a launch (`mangle_type`)."""
    import triton.language as tl
    from triton.runtime.jit import mangle_type

    sig, const, attrs = {}, {}, {}
    for idx, p in enumerate(jit.params):
        kind, value = params.get(p.name, ["default", p.default])
        if kind == "tl_dtype":
            kind, value = "constexpr", getattr(tl, value) if hasattr(tl, value) else tl.dtype(value)
        if p.is_constexpr or kind in ("default", "constexpr", "NoneType", "str") or (kind == "int" and value == 1):
            sig[p.name] = "constexpr"  # Triton folds integers equal to 1 (and None) into the code as well
            const[(idx,)] = value
        elif kind == "ptr":
            sig[p.name] = _PTR[value]
            attrs[(idx,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        elif kind in ("int", "float", "bool"):
            sig[p.name] = mangle_type(value)
            if kind == "int" and value % 16 == 0:
                attrs[(idx,)] = [["tt.divisibility", 16]]
        else:
            raise ValueError(f"{jit.__name__}: cannot type argument {p.name} = {value!r} ({kind})")
    return sig, const, attrs


def label(launch: dict) -> str:
    """The kernel with what sets its variant apart: flags that are on, strings, dtypes and sizes equal to 1.
    Launches that differ only in pointer dtypes or in which sizes divide by 16 share a label."""
    bits = []
    for name, (kind, value) in launch["params"].items():
        if kind == "bool" and value and name.isupper():
            bits.append(name)
        elif kind == "str" and name.isupper():
            bits.append(f"{name}={value}")
        elif kind == "tl_dtype":
            bits.append(f"{name}={value}")
        elif kind == "int" and value == 1 and name[:1].isupper():  # folded into the code (G = 1: no GQA)
            bits.append(f"{name}=1")
    return " ".join([launch["kernel"], *bits])


def compile_all(launches: list[dict], arch: int, smem_kb: int) -> list[dict]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sys.path.insert(0, str(HERE))
    import kernel_resources as kr

    rows = []
    print("| kernel | module | warps | stages | registers | spills (stack/local bytes) | shared bytes | "
          "programs per SM |")
    print("|---|---|---|---|---|---|---|---|")
    for launch in sorted(launches, key=lambda x: (x["module"], label(x))):
        opts = {k: launch["options"][k] for k in ("num_warps", "num_stages") if k in launch["options"]}
        row = {"kernel": label(launch), "module": launch["module"].rsplit(".", 1)[-1], **opts}
        warps = opts.get("num_warps", 4)
        try:
            jit = getattr(importlib.import_module(launch["module"]), launch["kernel"])
            sig, const, attrs = signature(jit, launch["params"])
            compiled = triton.compile(ASTSource(fn=jit, signature=sig, constexprs=const, attrs=attrs),
                                      target=GPUTarget("cuda", arch, 32), options=opts)
            row.update(kr.resources(compiled))
            row["programs_per_sm"] = kr.programs_per_sm(row, warps, smem_kb)
            print(f"| {row['kernel']} | {row['module']} | {warps} | {opts.get('num_stages', 'default')} | "
                  f"{row['registers']} | {row['stack_bytes']}/{row['local_bytes']} | {row['shared_bytes']} | "
                  f"{row['programs_per_sm']} |", flush=True)
        except Exception as err:  # report every launch, then fail
            row["error"] = f"{type(err).__name__}: {err}"
            print(f"| {row['kernel']} | {row['module']} | {warps} | - | FAILED: {row['error'][:300]!r} |", flush=True)
        rows.append(row)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90, help="compute capability × 10 (90: H100)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--variants", nargs="+", default=None, help="kernels_gpu.VARIANTS names (default: all)")
    p.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    p.add_argument("--smem-kb", type=int, default=228, help="shared memory per SM (H100: 228)")
    p.add_argument("--json", dest="json_path", type=Path, default=None)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--save-launches", type=Path, default=None, help="also write the recorded launches here")
    source.add_argument("--launches", type=Path, default=None,
                        help="compile these recorded launches (from --save-launches) instead of recording")
    p.add_argument("--record", type=Path, default=None, help=argparse.SUPPRESS)  # the subprocess's step 1
    args = p.parse_args(argv)
    sys.path.insert(0, str(HERE))
    if args.record:  # step 1, under the interpreter
        import warnings

        warnings.filterwarnings("ignore")  # numpy's overflow warnings from the interpreter's bf16 matmuls
        import kernels_gpu as kg

        variants = args.variants or list(kg.VARIANTS)
        unknown = sorted(set(variants) - set(kg.VARIANTS))
        if unknown:
            sys.exit(f"kernel_compile: unknown variant(s) {', '.join(unknown)}; known: {', '.join(kg.VARIANTS)}")
        args.record.write_text(json.dumps(record(args.head_dim, variants, args.ops), indent=1))
        return 0

    os.environ["TRITON_INTERPRET"] = "0"  # this process compiles for the target (set before any kernel import)
    import triton

    if args.launches:
        try:
            launches = json.loads(args.launches.read_text())
        except (OSError, ValueError) as err:
            sys.exit(f"kernel_compile: cannot read launches from {args.launches}: {err}")
        if not isinstance(launches, list) or not all(
                isinstance(x, dict) and {"module", "kernel", "options", "params"} <= set(x) for x in launches):
            sys.exit(f"kernel_compile: {args.launches} is not a list of recorded launches (from --save-launches)")
    else:
        print(f"recording the launches (interpreter; head_dim {args.head_dim}, bf16, T = 128) ...", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "launches.json"
            cmd = [sys.executable, __file__, "--record", str(path), "--head-dim", str(args.head_dim),
                   "--ops", *args.ops]
            if args.variants:
                cmd += ["--variants", *args.variants]
            run = subprocess.run(cmd, env=dict(os.environ, TRITON_INTERPRET="1"))
            if run.returncode:
                return run.returncode
            launches = json.loads(path.read_text())
        if args.save_launches:
            from lincompile.emit import write_text_atomic

            write_text_atomic(args.save_launches, json.dumps(launches, indent=1))
    print(f"\nsm_{args.arch}, Triton {triton.__version__}: {len(launches)} distinct launches")
    rows = compile_all(launches, args.arch, args.smem_kb)
    failed = [r for r in rows if "error" in r]
    spilled = [r for r in rows if r.get("stack_bytes") or r.get("local_bytes")]
    print(f"\n{len(rows) - len(failed)} compiled, {len(failed)} failed; {len(spilled)} spill registers")
    if args.json_path:
        from lincompile.emit import write_text_atomic

        write_text_atomic(args.json_path, json.dumps({"arch": args.arch, "triton": triton.__version__,
                                                      "head_dim": args.head_dim, "rows": rows}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
