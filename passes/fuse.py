"""Pass `fuse`: switch the substituted operators to kernel ops (Triton on CUDA) where the backend says so.

    fuse: {backend: auto | triton | torch}        auto = triton when CUDA and triton are there, else torch

With the Triton backend every operator node whose operator has kernel ops (`Operator.kernel_names()`) runs
them: its chunked form calls `lincompile::chunk_gla`, `lincompile::swa_attention` or
`lincompile::liger_attention` (both of those kernels and the mix, as one op), and its decode
step `lincompile::recurrent_gla_step` (kernels/fused.py). Those ops run Triton on CUDA tensors (or under
TRITON_INTERPRET=1) and the PyTorch forms elsewhere, so a graph fused for Triton stays correct on any
device. The node keeps its target (module paths, hence weight names and adapters, do not depend on the
backend); its reported op becomes the kernel ops (`kernel.liger_attention`), which is what `lincompile
diff` shows for this pass. Operators without kernel ops (softmax) are left as they are, with a note.
"""

from __future__ import annotations

from torch import fx

from lincompile.errors import UsageError
from lincompile.kernels import fused

KERNEL_PREFIX = "kernel."


def resolve_backend(requested: str) -> tuple[str, list[str]]:
    """The backend to use for `fuse.backend` on this machine, and notes saying why."""
    import torch

    notes = []
    if requested == "torch":
        return "torch", notes
    if requested == "auto":
        if not torch.cuda.is_available():
            return "torch", ["fuse: auto → torch (no CUDA device)"]
        if not fused.triton_installed():
            return "torch", ["fuse: auto → torch (triton is not installed: pip install 'lincompile[triton]')"]
        return "triton", ["fuse: auto → triton (CUDA)"]
    if requested == "triton":
        if not fused.triton_installed():
            raise UsageError("fuse.backend is triton but the triton package is not installed "
                             "(pip install 'lincompile[triton]'), or use backend: auto")
        if not torch.cuda.is_available() and not fused.interpreting():
            notes.append("fuse: triton without a CUDA device: the kernel ops run their PyTorch forms on CPU "
                         "(TRITON_INTERPRET=1 runs the Triton kernels in the interpreter)")
        return "triton", notes
    raise UsageError(f'unknown fuse backend "{requested}" (expected one of auto, triton, torch)')


def operator_nodes(gm: fx.GraphModule):
    for node in gm.graph.nodes:
        if node.op == "call_module" and "lincompile_op" in node.meta:
            yield node, gm.get_submodule(node.target)


def fuse(gm: fx.GraphModule, backend: str) -> list[str]:
    """Set every operator's backend; returns notes (what was fused, what was not and why)."""
    notes, fused_nodes, kept = [], 0, set()
    for node, op in operator_nodes(gm):
        kernels = op.kernel_names() if backend == "triton" else ()
        op.backend = "triton" if kernels else "torch"
        if kernels:
            node.meta["lincompile_kernel"] = KERNEL_PREFIX + "+".join(kernels)
            fused_nodes += 1
        else:
            node.meta.pop("lincompile_kernel", None)
            if backend == "triton":
                kept.add(op.name)
    if backend == "triton":
        notes.append(f"fuse: {fused_nodes} operator node(s) use Triton kernel ops")
        if kept:
            notes.append(f"fuse: no kernel ops for {', '.join(sorted(kept))}: PyTorch forms kept")
    return notes
