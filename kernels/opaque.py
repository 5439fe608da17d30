"""Opaque custom ops around the chunked primitives, so converted graphs export at any length.

The chunked forms loop over chunks and branch on T in Python; traced by torch.export with a dynamic sequence
length, that specialises the graph to one T. Wrapped as `torch.library.custom_op`s they are single opaque
nodes: `register_fake` gives output shapes from input shapes, and `register_autograd` differentiates by
recomputing the primitive under autograd (no extra memory kept between forward and backward).

    lincompile::gla_chunked(q, k, v, g?, scale, chunk, initial_state?, value_gated) -> (o, final_state)
    lincompile::swa_chunked(q, k, v, window, scale, prev_k, prev_v, seen) -> (o, last_k, last_v)

Operators call `gla_chunked` / `swa_chunked` from here; the kernels issue dispatches these to Triton on CUDA.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import gla as _gla
from . import swa as _swa


def grad_by_recompute(fn, inputs, wants, grads):
    """Gradients of fn(*inputs) w.r.t. the inputs flagged in `wants`, by re-running fn under autograd."""
    leaves, args = [], list(inputs)
    for i, (x, want) in enumerate(zip(inputs, wants)):
        if want and isinstance(x, Tensor) and x.is_floating_point():
            args[i] = x.detach().requires_grad_(True)
            leaves.append(i)
    result = [None] * len(inputs)
    if not leaves:
        return result
    with torch.enable_grad():
        outs = fn(*args)
    pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
    got = torch.autograd.grad([o for o, _ in pairs], [args[i] for i in leaves], [g for _, g in pairs],
                              allow_unused=True)
    for i, g in zip(leaves, got):
        result[i] = g
    return result


def differentiable(op, impl, n_tensor_inputs):
    """Autograd for a custom op by recomputation: re-run `impl` with grad enabled in backward."""

    def setup_context(ctx, inputs, output):
        # Every tensor through save_for_backward, none on ctx itself: saved tensors are what activation
        # checkpointing (lincompile/heal/remat.py) and saved-tensor hooks can see and free.
        ctx.rest = [None if isinstance(x, Tensor) else x for x in inputs]
        ctx.save_for_backward(*[x if isinstance(x, Tensor) else None for x in inputs])

    def backward(ctx, *grads):
        inputs = [t if t is not None else x for t, x in zip(ctx.saved_tensors, ctx.rest)]
        wants = tuple(ctx.needs_input_grad[:n_tensor_inputs]) + (False,) * (len(inputs) - n_tensor_inputs)
        return tuple(grad_by_recompute(impl, inputs, wants, grads))

    op.register_autograd(backward, setup_context=setup_context)


def _gla_impl(q, k, v, g, scale, chunk, initial_state, value_gated):
    form = _gla.vgla_chunked if value_gated else _gla.gla_chunked
    return form(q, k, v, g, scale=scale, chunk=chunk, initial_state=initial_state)


@torch.library.custom_op("lincompile::gla_chunked", mutates_args=())
def gla_chunked_op(q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor], scale: float, chunk: int,
                   initial_state: Optional[Tensor], value_gated: bool) -> tuple[Tensor, Tensor]:
    o, S = _gla_impl(q, k, v, g, scale, chunk, initial_state, value_gated)
    # Custom ops may not return their inputs (T == 0 hands the initial state straight back).
    return o, S.clone() if S is initial_state else S


@gla_chunked_op.register_fake
def _(q, k, v, g, scale, chunk, initial_state, value_gated):
    # The state has k's heads: kv heads under GQA (query heads of a group share it), or all heads.
    B, H, T, K = q.shape
    return q.new_empty(B, H, T, v.shape[-1]), q.new_empty(B, k.shape[1], K, v.shape[-1], dtype=torch.float32)


differentiable(gla_chunked_op, _gla_impl, 4)


def _swa_impl(q, k, v, window, scale, prev_k, prev_v, seen):
    state = {"k": prev_k, "v": prev_v, "len": seen}
    o, new = _swa.swa_chunked(q, k, v, window, scale, state=state)
    return o, new["k"], new["v"]


@torch.library.custom_op("lincompile::swa_chunked", mutates_args=())
def swa_chunked_op(q: Tensor, k: Tensor, v: Tensor, window: int, scale: float, prev_k: Tensor, prev_v: Tensor,
                   seen: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    o, nk, nv = _swa_impl(q, k, v, window, scale, prev_k, prev_v, seen)
    # Custom ops may not return views/aliases of their inputs.
    return o, nk.clone() if nk._base is not None or nk is prev_k else nk, nv.clone() if nv._base is not None or nv is prev_v else nv


@swa_chunked_op.register_fake
def _(q, k, v, window, scale, prev_k, prev_v, seen):
    return q.new_empty(*q.shape[:3], v.shape[-1]), prev_k.new_empty(prev_k.shape), prev_v.new_empty(prev_v.shape)


def _swa_impl_grad(q, k, v, window, scale, prev_k, prev_v, seen):
    return _swa_impl(q, k, v, window, scale, prev_k, prev_v, seen)


differentiable(swa_chunked_op, _swa_impl_grad, 3)


def gla_chunked(q, k, v, g, scale: float = 1.0, chunk: int = 64, initial_state=None):
    """`gla.gla_chunked` (k/v/g with kv heads or all heads; g may be None) as one opaque graph node."""
    return gla_chunked_op(q, k, v, g, float(scale), int(chunk), initial_state, False)


def vgla_chunked(q, k, v, g, scale: float = 1.0, chunk: int = 64, initial_state=None):
    """`gla.vgla_chunked` (gates on the value axis, for GSA) as one opaque graph node."""
    return gla_chunked_op(q, k, v, g, float(scale), int(chunk), initial_state, True)


def swa_chunked(q, k, v, window: int, scale: float, state=None):
    """`swa.swa_chunked` as one opaque node; state {"k", "v", "len"} as in swa.py."""
    if state is None:
        state = _swa.swa_init_state(k.shape[0], k.shape[1], k.shape[-1], v.shape[-1], window, q.dtype, q.device)
    o, nk, nv = swa_chunked_op(q, k, v, int(window), float(scale), state["k"].to(k.dtype), state["v"].to(v.dtype),
                               state["len"])
    return o, {"k": nk, "v": nv, "len": state["len"] + q.shape[2]}
