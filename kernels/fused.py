"""Kernel ops: what the fuse pass switches operators to. Triton on CUDA, the PyTorch forms elsewhere.

Each op is a `torch.library.custom_op` (register_fake + register_autograd), so converted graphs that use
them still export and `torch.compile`. Inside, every call picks its implementation by device:

    CUDA tensors (or TRITON_INTERPRET=1, how the CPU test suite runs the kernels)   → Triton kernels
    anything else, or inputs a kernel does not support (it says why: `supported()`)  → PyTorch forms

    lincompile::chunk_gla(q, k, v, g?, scale, initial_state?, keep_a, keep_b, precision) -> (o, final_state, A, b)
                                                                                    kernels/triton_gla.py
    lincompile::recurrent_gla_step(q, k, v, g?, state, scale) -> (o, state)             kernels/triton_gla.py
    lincompile::swa_attention(q, k, v, prev_k, prev_v, seen, scale, sinks?) -> (o, lse) kernels/triton_swa.py
    lincompile::liger_attention(q, k, v, q_pre, k_pre, initial_state?, prev_k, prev_v, seen,
                                window, a, b, scale, gate_normalizer) -> (o, final_state)
                                          chunk_gla + swa_attention (LIGER_FORWARD), or kernels/triton_liger.py

Gates reach the kernels clamped (`gla.clamp_log_gate`, done in PyTorch so autograd masks the clamped
gradient). The Liger-attention op runs chunk_gla's and swa_attention's kernels, or (LIGER_FORWARD
"one_launch") one kernel with feature maps and gates in its prologue (one read of q, k, v); its backward
recomputes through chunk_gla + swa_attention, whose backward kernels are Triton.

Operators call the backend-aware wrappers at the bottom (`gla_chunked(..., backend=self.backend)`); with
backend "torch" they are exactly the operator library's opaque ops (kernels/opaque.py).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import gla as _gla
from . import opaque
from .gla import clamp_log_gate
from .opaque import grad_by_recompute

BACKENDS = ("torch", "triton")


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _runs_triton(x: Tensor) -> bool:
    """Triton for CUDA tensors, and for CPU tensors under the interpreter."""
    return (x.is_cuda or (interpreting() and x.device.type == "cpu")) and triton_installed()


def _kernel(module: str, x: Tensor, *args):
    """The Triton kernel module when it runs these inputs, else None (PyTorch forms)."""
    if not _runs_triton(x):
        return None
    mod = importlib.import_module(f"lincompile.kernels.{module}")
    return mod if mod.supported(*args) is None else None


def _require(module: str, x: Tensor, *args):
    kern = _kernel(module, x, *args)
    if kern is None:
        raise RuntimeError(f"lincompile::{module} backward: the Triton kernel does not run these inputs")
    return kern


# ---------------------------------------------------------------------------------------------------------
# Chunked gated linear attention.


def _gla_torch(q, k, v, g, scale, initial_state):
    o, S = _gla.gla_chunked(q, k, v, g, scale=scale, initial_state=initial_state)
    return o.contiguous(), S  # o is a view of the chunk-padded result; register_fake promises contiguous


def chunk_gla(q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor], scale: float,
              initial_state: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(o, final_state): `lincompile::chunk_gla`, whose two further outputs are what the backward reuses."""
    o, S, _, _ = chunk_gla_op(q, k, v, g, scale, initial_state, *_reuse(q, k, v, g, initial_state))
    return o, S


# (reuse_forward, reuse_gates, precision) of triton_gla.Tuning() (tests/test_fuse.py checks)
_REUSE_DEFAULT = (True, False, "mixed")
if os.environ.get("LINCOMPILE_GLA_TUNING") and triton_installed():
    # a configuration asked for by environment (triton_gla.TUNING_ENV) holds from the first call on: `_reuse`
    # reads it from the module, so the module is loaded now, not by that call (which may be traced). Triton
    # reads TRITON_INTERPRET when a kernel module loads, so with the variable set it is read here
    importlib.import_module("lincompile.kernels.triton_gla")


def _reuse(q, k, v, g, initial_state=None) -> tuple[bool, bool, str]:
    """(keep A, keep b, precision) for this forward: `Tuning.reuse_forward` / `reuse_gates` (False with
    fuse_intra or scan_forward) when a backward can follow, and `Tuning.precision` when A is kept (A's dtype
    follows it; "" otherwise). Read here, in the wrapper, so that torch.compile guards on them and traces again when TUNING
    changes (the op's outputs depend on them); through sys.modules, not an import, because compiled code
    cannot import: before triton_gla is imported, TUNING is still at its defaults."""
    leaves = (q, k, v, g, initial_state)
    if not (torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in leaves)):
        return False, False, ""
    tg = sys.modules.get("lincompile.kernels.triton_gla")  # the name `_kernel` imports it by
    if tg is None:
        return _REUSE_DEFAULT
    t = tg.TUNING
    keep_a = t.reuse_forward and not t.keeps_nothing
    return keep_a, t.reuse_gates and not t.keeps_nothing, t.precision if keep_a else ""


def _kept(q, k, v, g, keep_a, keep_b, precision):
    """(A's shape and dtype or None, b's shape or None): what the Triton forward keeps for its backward
    (`triton_gla.kept_layout`); nothing on the PyTorch path. From register_fake, `supported()` then sees
    symbolic shapes: its checks guard on head counts and head dims, and on q and k having the same length."""
    kern = _kernel("triton_gla", q, q, k, v, g) if keep_a or keep_b else None
    if kern is None:
        return None, None
    return kern.kept_layout(q, k, v, g, keep_a, keep_b, precision or None)


# Outputs 3 and 4 are the Triton forward's intra-chunk matrix A and cumulative gates b, saved for the
# backward (`Tuning.reuse_forward`, `reuse_gates`; fla's chunk_gla keeps A too), or empty where nothing is
# kept. They are outputs because setup_context sees only inputs and outputs; `chunk_gla` above drops them, so
# graphs only read o and the final state.
@torch.library.custom_op("lincompile::chunk_gla", mutates_args=())
def chunk_gla_op(q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor], scale: float,
                 initial_state: Optional[Tensor], keep_a: bool = False, keep_b: bool = False,
                 precision: str = "") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    kern = _kernel("triton_gla", q, q, k, v, g)
    A = b = None
    if kern is not None:  # precision: the one the wrapper read (TUNING's when ""), so the fake agrees on A
        o, S, *kept = kern.chunk_gla_fwd(q, k, v, g, scale, initial_state, keep_a=keep_a, keep_b=keep_b,
                                         precision=precision or None)
        A, b = kept if kept else (None, None)
    else:
        o, S = _gla_torch(q, k, v, g, scale, initial_state)
    return (o, S.clone() if S is initial_state else S,  # custom ops may not return their inputs
            q.new_empty(0) if A is None else A, q.new_empty(0, dtype=torch.float32) if b is None else b)


@chunk_gla_op.register_fake
def _(q, k, v, g, scale, initial_state, keep_a=False, keep_b=False, precision=""):
    B, H, T, K = q.shape
    a_layout, b_shape = _kept(q, k, v, g, keep_a, keep_b, precision)
    return (q.new_empty(B, H, T, v.shape[-1]), q.new_empty(B, k.shape[1], K, v.shape[-1], dtype=torch.float32),
            q.new_empty(0) if a_layout is None else q.new_empty(a_layout[0], dtype=a_layout[1]),
            q.new_empty(0 if b_shape is None else b_shape, dtype=torch.float32))


def _none_if_empty(x):
    return None if x.dim() == 1 and x.numel() == 0 else x


# The backward passes are custom ops too: AOTAutograd (torch.compile) traces a backward formula with fake
# tensors, which must not reach a Triton launch or a recomputation under autograd.
@torch.library.custom_op("lincompile::chunk_gla_bwd", mutates_args=())
def chunk_gla_bwd(q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor], scale: float, initial_state: Optional[Tensor],
                  do: Tensor, dS: Optional[Tensor], A: Optional[Tensor] = None,
                  b: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The Triton backward (chunk_gla's autograd calls it only where the Triton kernels run); A, b: the
    forward's, reused where they fit (`triton_gla.chunk_gla_bwd`)."""
    kern = _require("triton_gla", q, q, k, v, g)
    dq, dk, dv, dg, dS0 = kern.chunk_gla_bwd(q, k, v, g, scale, initial_state, do.contiguous(), dS, A=A, b=b)
    return dq, dk, dv, q.new_empty(0) if dg is None else dg, q.new_empty(0) if dS0 is None else dS0


@chunk_gla_bwd.register_fake
def _(q, k, v, g, scale, initial_state, do, dS, A=None, b=None):
    # Contiguous, as the kernels allocate them (empty_like would copy the inputs' strides; inductor trusts these).
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            q.new_empty(0) if g is None else g.new_empty(g.shape, dtype=torch.float32),
            q.new_empty(0) if initial_state is None else initial_state.new_empty(initial_state.shape,
                                                                                 dtype=torch.float32))


def _chunk_gla_setup(ctx, inputs, output):
    q, k, v, g, scale, initial_state = inputs[:6]
    ctx.scale = scale
    ctx.mark_non_differentiable(output[2], output[3])
    ctx.save_for_backward(q, k, v, g, initial_state, output[2], output[3])


def _chunk_gla_backward(ctx, do, dS, _dA, _db):
    q, k, v, g, S0, A, b = ctx.saved_tensors
    if _kernel("triton_gla", q, q, k, v, g) is None:  # PyTorch forms: differentiate by recomputation
        wants = tuple(ctx.needs_input_grad[:4]) + (False, ctx.needs_input_grad[5])
        dq, dk, dv, dg, _, dS0 = grad_by_recompute(_gla_torch, (q, k, v, g, ctx.scale, S0), wants, (do, dS))
        return dq, dk, dv, dg, None, dS0, None, None, None
    do = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device) if do is None else do
    dq, dk, dv, dg, dS0 = chunk_gla_bwd(q, k, v, g, ctx.scale, S0, do, dS, _none_if_empty(A), _none_if_empty(b))
    return dq, dk, dv, _none_if_empty(dg), None, _none_if_empty(dS0), None, None, None


chunk_gla_op.register_autograd(_chunk_gla_backward, setup_context=_chunk_gla_setup)


@torch.library.custom_op("lincompile::recurrent_gla_step", mutates_args=())
def recurrent_gla_step(q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor], state: Tensor,
                       scale: float) -> tuple[Tensor, Tensor]:
    """One decode position (no autograd: decoding does not train)."""
    kern = _kernel("triton_gla", q, q[:, :, None], k[:, :, None], v[:, :, None], None if g is None else g[:, :, None])
    if kern is not None:
        return kern.fused_recurrent_gla_step(q, k, v, g, state, scale)
    return _gla.gla_step(q, k, v, g, state, scale=scale)


@recurrent_gla_step.register_fake
def _(q, k, v, g, state, scale):
    return q.new_empty(*q.shape[:2], v.shape[-1]), state.new_empty(state.shape)


# ---------------------------------------------------------------------------------------------------------
# Sliding-window softmax attention with a ring-buffer prefix and optional sink logits, returning lse.


def _swa_torch(q, k, v, prev_k, prev_v, seen, scale, sinks):
    """(o, lse) from the blocked PyTorch window sums (kernels/swa_sinks.py)."""
    from .swa_sinks import _window_sums

    num, den, c = _window_sums(q, k, v, prev_k, prev_v, seen, scale)
    if sinks is not None and sinks.shape[-1]:
        tau = sinks.float()[None, :, None, :]  # [1, H, 1, m]
        ref = torch.maximum(c, tau.amax(-1)).detach()
        w = (c - ref).exp()
        num, den = num * w[..., None], den * w + (tau - ref[..., None]).exp().sum(-1)
        c = ref
    return (num / den[..., None]).to(q.dtype), c + den.log()


@torch.library.custom_op("lincompile::swa_attention", mutates_args=())
def swa_attention(q: Tensor, k: Tensor, v: Tensor, prev_k: Tensor, prev_v: Tensor, seen: Tensor, scale: float,
                  sinks: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    kern = _kernel("triton_swa", q, q, k, v, prev_k)
    if kern is not None:
        return kern.swa_fwd(q, k, v, prev_k, prev_v, seen, scale, sinks)
    return _swa_torch(q, k, v, prev_k, prev_v, seen, scale, sinks)


@swa_attention.register_fake
def _(q, k, v, prev_k, prev_v, seen, scale, sinks):
    B, H, T, _ = q.shape
    return q.new_empty(B, H, T, v.shape[-1]), q.new_empty(B, H, T, dtype=torch.float32)


@torch.library.custom_op("lincompile::swa_attention_bwd", mutates_args=())
def swa_attention_bwd(q: Tensor, k: Tensor, v: Tensor, prev_k: Tensor, prev_v: Tensor, seen: Tensor, scale: float,
                      sinks: Optional[Tensor], o: Tensor, lse: Tensor, do: Tensor,
                      dlse: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The Triton backward (swa_attention's autograd calls it only where the Triton kernels run)."""
    kern = _require("triton_swa", q, q, k, v, prev_k)
    dq, dk, dv, dpk, dpv, ds = kern.swa_bwd(q, k, v, prev_k, prev_v, seen, scale, sinks, o, lse, do.contiguous(), dlse)
    return dq, dk, dv, dpk, dpv, q.new_empty(0) if ds is None else ds


@swa_attention_bwd.register_fake
def _(q, k, v, prev_k, prev_v, seen, scale, sinks, o, lse, do, dlse):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), prev_k.new_empty(prev_k.shape),
            prev_v.new_empty(prev_v.shape),
            q.new_empty(0) if sinks is None else sinks.new_empty(sinks.shape, dtype=torch.float32))


def _swa_setup(ctx, inputs, output):
    q, k, v, prev_k, prev_v, seen, scale, sinks = inputs
    ctx.scale = scale
    ctx.save_for_backward(q, k, v, prev_k, prev_v, seen, sinks, *output)


def _swa_backward(ctx, do, dlse):
    q, k, v, prev_k, prev_v, seen, sinks, o, lse = ctx.saved_tensors
    if _kernel("triton_swa", q, q, k, v, prev_k) is None:  # PyTorch forms: differentiate by recomputation
        wants = tuple(ctx.needs_input_grad[:5]) + (False, False, ctx.needs_input_grad[7])
        dq, dk, dv, dpk, dpv, _, _, ds = grad_by_recompute(
            _swa_torch, (q, k, v, prev_k, prev_v, seen, ctx.scale, sinks), wants, (do, dlse))
        return dq, dk, dv, dpk, dpv, None, None, ds
    do = torch.zeros_like(o) if do is None else do
    dq, dk, dv, dpk, dpv, ds = swa_attention_bwd(q, k, v, prev_k, prev_v, seen, ctx.scale, sinks, o, lse, do, dlse)
    return dq, dk, dv, dpk, dpv, None, None, _none_if_empty(ds)


swa_attention.register_autograd(_swa_backward, setup_context=_swa_setup)


# ---------------------------------------------------------------------------------------------------------
# Liger attention: GLA over φ = softmax feature maps with gates from k_pre, + SWA, + the mix.

# How the Triton path runs lincompile::liger_attention's forward:
#   "chunked" (default): chunk_gla's and swa_attention's kernels, which run in parallel over chunks; feature
#       maps and gates from the prologue ops below, b folded into chunk_gla's scale, the mix one add
#       (`_liger_composed(kernels=True)`)
#   "one_launch": triton_liger.py's single kernel (feature maps and gates in its prologue, one read of q, k,
#       v), which walks T in one program per (batch, kv head, V block). On the H100 (stop 12, B·T = 64k, 16
#       heads of 128) it took 15.2 ms at every T from 2k to 16k, against 3.2 ms for chunk_gla's forward plus
#       0.95 for swa_attention's: reading q, k, v once does not pay for the sequential walk.
# Read at every call (the op runs its body eagerly, also under torch.compile); the backward is the same.
LIGER_FORWARDS = ("chunked", "one_launch")
LIGER_FORWARD = "chunked"


def _prologue_kernels(q_pre, k_pre):
    """triton_liger when its prologue kernels run these inputs, else None."""
    if not _runs_triton(q_pre):
        return None
    kern = importlib.import_module("lincompile.kernels.triton_liger")
    return kern if kern.prologue_supported(q_pre, k_pre) is None else None


# The prologue of the chunked forward (and of the backward) as ops of their own, for the same reason as the
# backward ops above: AOTAutograd traces `_liger_backward` with fake tensors. No autograd: only the op's
# forward (under no_grad) and its backward call them.
@torch.library.custom_op("lincompile::liger_prologue", mutates_args=())
def liger_prologue(q_pre: Tensor, k_pre: Tensor, gate_normalizer: float) -> tuple[Tensor, Tensor, Tensor]:
    """(φ(q_pre), φ(k_pre), g) in one Triton launch per input (`triton_liger.liger_prologue`)."""
    return _require_prologue(q_pre, k_pre).liger_prologue(q_pre, k_pre, gate_normalizer)


@liger_prologue.register_fake
def _(q_pre, k_pre, gate_normalizer):
    return q_pre.new_empty(q_pre.shape), k_pre.new_empty(k_pre.shape), k_pre.new_empty(k_pre.shape,
                                                                                        dtype=torch.float32)


@torch.library.custom_op("lincompile::liger_prologue_bwd", mutates_args=())
def liger_prologue_bwd(q_pre: Tensor, k_pre: Tensor, dphi_q: Tensor, dphi_k: Tensor, dg: Optional[Tensor],
                       gate_normalizer: float) -> tuple[Tensor, Tensor]:
    """(dq_pre, dk_pre) through the prologue (`triton_liger.liger_prologue_bwd`)."""
    return _require_prologue(q_pre, k_pre).liger_prologue_bwd(q_pre, k_pre, dphi_q, dphi_k, dg, gate_normalizer)


@liger_prologue_bwd.register_fake
def _(q_pre, k_pre, dphi_q, dphi_k, dg, gate_normalizer):
    return q_pre.new_empty(q_pre.shape), k_pre.new_empty(k_pre.shape)


def _require_prologue(q_pre, k_pre):
    kern = _prologue_kernels(q_pre, k_pre)
    if kern is None:
        raise RuntimeError("lincompile::liger_prologue: the Triton kernel does not run these inputs")
    return kern


def _liger_inputs(q_pre, k_pre, gate_normalizer, kernels=False):
    """(φ(q_pre), φ(k_pre), g): liger_gla's "softmax" feature maps and the clamped gates. kernels: in one
    Triton launch per input where it runs them (`triton_liger.liger_prologue`; no autograd), rather than in
    about ten passes of PyTorch."""
    if kernels and _prologue_kernels(q_pre, k_pre) is not None:
        return liger_prologue(q_pre, k_pre, float(gate_normalizer))
    phi = lambda x: x.float().softmax(-1).to(x.dtype)  # noqa: E731
    return phi(q_pre), phi(k_pre), clamp_log_gate(F.logsigmoid(k_pre.float()) / gate_normalizer)


def _liger_composed(q, k, v, q_pre, k_pre, initial_state, prev_k, prev_v, seen, window, a, b, scale,
                    gate_normalizer, kernels=False):
    """The same op out of the two kernel ops above (differentiable: their backward is Triton). kernels (the
    op's chunked forward, under no_grad): the prologue in Triton, and b folded into chunk_gla's scale (its
    output is linear in the query side), which leaves the mix one fused add."""
    swa, _ = swa_attention(q, k, v, prev_k, prev_v, seen, scale, None)
    gq, gk, g = _liger_inputs(q_pre, k_pre, gate_normalizer, kernels)
    if kernels:
        gla, S = chunk_gla(gq, gk, v, g, float(b), initial_state)
        return torch.add(gla, swa, alpha=a).to(q.dtype), S  # one rounding when gla is wider (fp32 q_pre)
    gla, S = chunk_gla(gq, gk, v, g, 1.0, initial_state)
    return (a * swa.float() + b * gla.float()).to(q.dtype), S


@torch.library.custom_op("lincompile::liger_attention", mutates_args=())
def liger_attention(q: Tensor, k: Tensor, v: Tensor, q_pre: Tensor, k_pre: Tensor, initial_state: Optional[Tensor],
                    prev_k: Tensor, prev_v: Tensor, seen: Tensor, window: int, a: float, b: float, scale: float,
                    gate_normalizer: float) -> tuple[Tensor, Tensor]:
    if LIGER_FORWARD not in LIGER_FORWARDS:
        raise ValueError(f"fused.LIGER_FORWARD must be one of {', '.join(LIGER_FORWARDS)}, got {LIGER_FORWARD!r}")
    kern = _kernel("triton_liger", q, q, k, v, window) if LIGER_FORWARD == "one_launch" else None
    if kern is not None:
        o, S = kern.liger_attention_fwd(q, k, v, q_pre, k_pre, window=window, a=a, b=b, scale=scale,
                                        gate_normalizer=gate_normalizer, initial_state=initial_state,
                                        prev_k=prev_k, prev_v=prev_v, seen=seen)
        return o, S.clone() if S is initial_state else S
    with torch.no_grad():  # no autograd inside an op; nor is A kept for a backward (chunk_gla's `_reuse`)
        o, S = _liger_composed(q, k, v, q_pre, k_pre, initial_state, prev_k, prev_v, seen, window, a, b, scale,
                               gate_normalizer, kernels=True)
    return o, S.clone() if S is initial_state else S


@liger_attention.register_fake
def _(q, k, v, q_pre, k_pre, initial_state, prev_k, prev_v, seen, window, a, b, scale, gate_normalizer):
    B, H, T, D = q.shape
    return q.new_empty(B, H, T, v.shape[-1]), q.new_empty(B, k.shape[1], D, v.shape[-1], dtype=torch.float32)


def _liger_setup(ctx, inputs, output):
    ctx.params = inputs[9:]
    ctx.save_for_backward(*inputs[:9])


def _liger_backward(ctx, do, dS):
    q, k, v, q_pre, k_pre, S0, prev_k, prev_v, seen = ctx.saved_tensors
    window, a, b, scale, gate_normalizer = ctx.params
    if _kernel("triton_gla", q, q_pre, k_pre, v, None) is None or _kernel("triton_swa", q, q, k, v, prev_k) is None:
        wants = tuple(ctx.needs_input_grad[:8]) + (False,) * 6
        inputs = (q, k, v, q_pre, k_pre, S0, prev_k, prev_v, seen) + tuple(ctx.params)
        return tuple(grad_by_recompute(_liger_composed, inputs, wants, (do, dS)))
    # The mix is linear: the SWA branch gets a·do, the GLA branch b·do (as chunk_gla's scale, as in the
    # forward); each goes through its Triton backward (recomputing the SWA forward for its lse), then through
    # the prologue (`triton_liger.liger_prologue_bwd`, or by hand): no autograd inside, so AOTAutograd can
    # trace this formula too.
    do = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device) if do is None else do
    o_w, lse = swa_attention(q, k, v, prev_k, prev_v, seen, scale, None)
    dq, dk, dv_w, dpk, dpv, _ = swa_attention_bwd(q, k, v, prev_k, prev_v, seen, scale, None, o_w, lse,
                                                  (a * do.float()).to(o_w.dtype), None)
    kernels = _prologue_kernels(q_pre, k_pre) is not None
    if kernels:
        fq, fk, g = liger_prologue(q_pre, k_pre, float(gate_normalizer))
    else:
        fq, fk = q_pre.float().softmax(-1), k_pre.float().softmax(-1)
        raw = F.logsigmoid(k_pre.float()) / gate_normalizer
        g = raw.clamp(min=_gla.LOG_GATE_MIN)
    dfq, dfk, dv_g, dg, dS0 = chunk_gla_bwd(fq.to(q_pre.dtype), fk.to(k_pre.dtype), v, g, float(b), S0,
                                            do.to(v.dtype), dS)
    if kernels:
        dq_pre, dk_pre = liger_prologue_bwd(q_pre, k_pre, dfq, dfk, _none_if_empty(dg), float(gate_normalizer))
    else:
        dfq, dfk = dfq.float(), dfk.float()
        dq_pre = fq * (dfq - (fq * dfq).sum(-1, keepdim=True))  # softmax feature map
        dk_pre = fk * (dfk - (fk * dfk).sum(-1, keepdim=True))
        dk_pre = dk_pre + dg * (raw >= _gla.LOG_GATE_MIN) * torch.sigmoid(-k_pre.float()) / gate_normalizer
    return (dq, dk, torch.add(dv_w, dv_g).to(v.dtype), dq_pre.to(q_pre.dtype), dk_pre.to(k_pre.dtype),
            _none_if_empty(dS0), dpk, dpv, None) + (None,) * 5


liger_attention.register_autograd(_liger_backward, setup_context=_liger_setup)


# ---------------------------------------------------------------------------------------------------------
# Backend-aware entry points for the operators (backend "torch": the operator library's own opaque ops).


def _ring(state, k, v, window):
    if state is None:
        from .swa import swa_init_state

        state = swa_init_state(k.shape[0], k.shape[1], k.shape[-1], v.shape[-1], window, k.dtype, k.device)
    return state


def _ring_after(state, k, v):
    """The last w keys/values after appending k, v (no branch on T: graphs re-export at any length)."""
    W = state["k"].shape[2]
    return {"k": torch.cat([state["k"].to(k.dtype), k], dim=2)[:, :, -W:],
            "v": torch.cat([state["v"].to(v.dtype), v], dim=2)[:, :, -W:], "len": state["len"] + k.shape[2]}


def gla_chunked(q, k, v, g, scale: float = 1.0, chunk: int = 64, initial_state=None, backend: str = "torch"):
    if backend != "triton":
        return opaque.gla_chunked(q, k, v, g, scale=scale, chunk=chunk, initial_state=initial_state)
    g = None if g is None else clamp_log_gate(g)
    return chunk_gla(q, k, v, g, float(scale), None if initial_state is None else initial_state.float())


def gla_step(q, k, v, g, state, scale: float = 1.0, backend: str = "torch"):
    if backend != "triton":
        return _gla.gla_step(q, k, v, g, state, scale=scale)
    return recurrent_gla_step(q, k, v, None if g is None else clamp_log_gate(g), state.float(), float(scale))


def swa_chunked(q, k, v, window: int, scale: float, state=None, backend: str = "torch"):
    """Normalised sliding-window attention and the ring after it (kernels/swa.py's state layout)."""
    if backend != "triton":
        return opaque.swa_chunked(q, k, v, window, scale, state=state)
    state = _ring(state, k, v, window)
    o, _ = swa_attention(q, k, v, state["k"].to(k.dtype), state["v"].to(v.dtype), state["len"], float(scale), None)
    return o, _ring_after(state, k, v)


def window_attention(q, k, v, ring: dict, scale: float, sinks=None) -> tuple[Tensor, Tensor]:
    """(o, lse) over the window (ring + this call's keys) and optional sink logits `[H, m]`."""
    if sinks is not None and not sinks.shape[-1]:
        sinks = None
    return swa_attention(q, k, v, ring["k"].to(k.dtype), ring["v"].to(v.dtype), ring["len"], float(scale), sinks)


def liger_attention_chunked(q, k, v, q_pre, k_pre, *, window, a, b, scale, gate_normalizer, state=None):
    """Liger attention through the fused op; state {"gla", "swa"} as LigerAttention keeps it."""
    state = state or {}
    ring = _ring(state.get("swa"), k, v, window)
    S0 = state.get("gla")
    o, S = liger_attention(q, k, v, q_pre, k_pre, None if S0 is None else S0.float(), ring["k"].to(k.dtype),
                           ring["v"].to(v.dtype), ring["len"], int(window), float(a), float(b), float(scale),
                           float(gate_normalizer))
    return o, {"gla": S, "swa": _ring_after(ring, k, v)}
