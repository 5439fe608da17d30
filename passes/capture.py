"""Pass `capture`: the model as a torch.fx graph, via torch.export (non-strict, dynamic batch and length).

`torch.fx.symbolic_trace` cannot trace transformers 5 models; `torch.export.export(strict=False)` can. We
export the eval-mode model with `use_cache=False` and tensor-only outputs (logits), keep the graph *before*
`run_decompositions()` (so attention is still one sdpa node or a recognisable eager chain), tag every node
with its module path and layer index, and check the graph against the eager model on a probe batch.
"""

from __future__ import annotations

import contextlib

from dataclasses import dataclass, field

import torch
from torch import fx, nn

from lincompile.errors import CaptureError
from lincompile.graph import ROOT, layer_index, module_path
from lincompile.models import text_config


class CausalLMWrapper(nn.Module):
    """input_ids -> logits: the function we export (no cache, no dict outputs)."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        setattr(self, ROOT, lm)

    def forward(self, input_ids):
        return getattr(self, ROOT)(input_ids=input_ids, use_cache=False).logits


class PositionsWrapper(CausalLMWrapper):
    """(input_ids, position_ids) -> logits: positions are an input, so RoPE / learned positions follow them.

    Used by the runtime (prefill/decode at any offset). The all-ones attention mask is there because, given
    position_ids and no mask, transformers infers packed sequences from the positions; it changes nothing else.
    """

    def forward(self, input_ids, position_ids):
        return getattr(self, ROOT)(input_ids=input_ids, position_ids=position_ids,
                                   attention_mask=torch.ones_like(input_ids), use_cache=False).logits


def _sizes_from_input_ids(gm: fx.GraphModule) -> None:
    """Read batch/length sizes from input_ids, not position_ids (export may pick either: they are equal).

    Then only RoPE / position embeddings depend on position_ids, and the match pass can still evaluate
    masks from input_ids alone.
    """
    placeholders = {n.target: n for n in gm.graph.nodes if n.op == "placeholder"}
    ids, pos = placeholders["input_ids"], placeholders["position_ids"]
    for node in list(pos.users):
        if node.op == "call_function" and node.target == torch.ops.aten.sym_size.int:
            with gm.graph.inserting_after(ids):
                size = gm.graph.call_function(torch.ops.aten.sym_size.int, (ids, *node.args[1:]))
            size.meta.update(node.meta)
            node.replace_all_uses_with(size)
            gm.graph.erase_node(node)
    gm.recompile()


@dataclass
class Captured:
    gm: fx.GraphModule
    model: nn.Module
    probe: torch.Tensor
    reference_logits: torch.Tensor
    max_abs_diff: float
    max_seq_len: int
    notes: list[str] = field(default_factory=list)


def probe_ids(vocab_size: int, batch: int, length: int, device="cpu", seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, length), generator=g).to(device)


def set_attn_implementation(model: nn.Module, impl: str) -> str | None:
    """Switch the model's attention code path; returns a note when it has to fall back to eager."""
    if getattr(model.config, "_attn_implementation", None) == impl:
        return None
    try:
        model.set_attn_implementation(impl)
    except (AttributeError, ValueError) as err:
        if impl != "eager" and "does not support" in str(err):
            # Some architectures (e.g. with logit softcapping) have no sdpa path: their eager chain is matched.
            model.set_attn_implementation("eager")
            return f"{type(model).__name__} has no {impl} attention path: captured with eager"
        first = str(err).strip().splitlines()[0]
        raise CaptureError(f'cannot switch the model to attn_implementation "{impl}": {first}') from None
    return None


def _trace_attention(device):
    """On CUDA, trace SDPA through its math backend: the fused kernels pad the mask to a multiple of 8 and put
    guards on the length that a dynamic `seq` cannot satisfy. The graph still holds one SDPA node per layer,
    and at run time that node picks its kernel as usual."""
    if str(device).startswith("cuda"):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.MATH])
    return contextlib.nullcontext()


def _check_dynamic(program, positions: bool, seq_max: int) -> None:
    """Dim.DYNAMIC accepts guards that narrow a dimension: refuse a graph that would not take every batch size
    and length the capture promises, and (positions capture) one whose position_ids are not input_ids' shape."""
    user_inputs = program.graph_signature.user_inputs
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder" and n.name in user_inputs]
    shapes = [tuple(n.meta["val"].shape) for n in placeholders if "val" in n.meta]
    if not shapes:
        return
    batch, seq = shapes[0][0], shapes[0][1]
    bounds = (("batch", 1, 4096), ("length", 2, seq_max))

    def check(what, dim, low, high, where=""):
        if not isinstance(dim, torch.SymInt):
            raise CaptureError(f"torch.export fixed the {what}{where} at {dim}: the model's code does not allow another")
        r = program.range_constraints.get(dim.node.expr)
        # export reports sizes as ≥ 2 (its 0/1 rule) yet runs size 1: only a bound past that is a narrowing
        if r is not None and (int(r.lower) > max(low, 2) or (r.upper.is_finite and int(r.upper) < high)):
            raise CaptureError(f"torch.export narrowed the {what}{where} to [{r.lower}, {r.upper}] "
                               f"(expected [{low}, {high}])")

    for (what, low, high), dim in zip(bounds, (batch, seq)):
        check(what, dim, low, high)
    if not positions or len(placeholders) < 2 or len(shapes) < 2:
        return
    pos = placeholders[1]
    if not pos.users:
        return  # the model never reads position_ids (e.g. ALiBi): any shape will do
    if len(shapes[1]) != len(shapes[0]):
        raise CaptureError(f"position_ids were captured with shape {shapes[1]}, not input_ids' {shapes[0]}")
    # Export may give position_ids symbols of their own when nothing ties them to input_ids' (a model that reads
    # them only where the two need not agree): that is fine as long as each is free, i.e. takes every size
    # input_ids' dim takes. A dim fixed or narrowed by the model's code is not.
    for (what, low, high), dim, ids_dim in zip(bounds, shapes[1], shapes[0]):
        if isinstance(dim, torch.SymInt) and isinstance(ids_dim, torch.SymInt) and dim.node.expr == ids_dim.node.expr:
            continue
        if isinstance(dim, torch.SymInt) and not dim.node.expr.is_Symbol:
            raise CaptureError(f"position_ids were captured with shape {shapes[1]}, not input_ids' {shapes[0]}")
        check(what, dim, low, high, where=" of position_ids")


def _check_guards(gm, positions: bool, seq_max: int) -> None:
    """Export may also keep a guard on the length that no range says: Qwen3-Next's and Qwen3.5's gated delta rule
    (in PyTorch) loops over 64-token chunks in Python, so the graph holds for the number of chunks of the probe
    alone. Check the guards at every length up to 300 and at powers of two (± 1) below the longest; they read
    shapes only, so empty inputs do. (The longest itself is left out: a model that slices a position table of
    exactly that length, as GPT-Neo does, keeps a guard `length != limit` and takes one token fewer, as it did
    before this check.)"""
    guards = getattr(gm, "_guards_fn", None)
    if guards is None:
        return
    powers = {2 ** k + d for k in range(1, 40) if 2 ** k < seq_max for d in (-1, 0, 1)}
    lengths = sorted({*range(2, min(seq_max - 1, 300) + 1), *(n for n in powers if 2 <= n < seq_max)})
    for length in lengths:
        ids = torch.empty(1, length, dtype=torch.long, device="meta")
        try:
            guards(*((ids, ids) if positions else (ids,)))
        except AssertionError as err:
            guard = str(err).strip().splitlines()[0] if str(err).strip() else "a guard"
            raise CaptureError(f"the captured graph does not take {length} tokens ({guard}): the model's code fixes "
                               "something that depends on the length (a Python loop over chunks of the sequence, "
                               "say), so torch.export gives no graph for every length") from None
        except Exception:  # a guard that needs more than shapes: the verify pass runs the graph itself
            return


@contextlib.contextmanager
def exact_matmul():
    """The capture check compares fp32 logits: TF32 matmuls (a user's global setting) would hide nothing
    but add 1e-3-level noise, so the check runs them at full precision."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def logit_tolerance(tolerance: float, reference: torch.Tensor) -> float:
    """The allowed max abs logit difference between two runs of the same model: `tolerance` for fp32 on CPU,
    widened by a few ulps of the logits' scale for half precision, and by 1e-4 of it on GPUs, whose GEMMs pick
    algorithms per layout (the graph's layouts are not always eager's). A broken graph is off by O(1)."""
    scale = max(1.0, float(reference.float().abs().max()))
    if reference.dtype in (torch.bfloat16, torch.float16):
        tolerance = max(tolerance, 8 * torch.finfo(reference.dtype).eps * scale)
    if reference.device.type != "cpu":
        tolerance = max(tolerance, 1e-4 * scale)
    return tolerance


def length_limit(config, cfg) -> int:
    """The longest sequence a captured graph takes: the spec's capture.max_seq_len, or the model's own position
    limit when smaller (the graph keeps it as a guard on the length)."""
    max_len = cfg.max_seq_len
    config = text_config(config)
    for name in POSITION_LIMIT_FIELDS:  # the first one the config has
        limit = getattr(config, name, None)
        if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
            return min(max_len, limit)
    return max_len


# What configs call the longest sequence the model was built for (MPT builds its ALiBi bias that long).
POSITION_LIMIT_FIELDS = ("max_position_embeddings", "n_positions", "max_seq_len", "max_sequence_length",
                         "seq_length", "n_ctx")


def check_length(what: str, length: int, where, config, cfg) -> None:
    """One line, before any work, when `length` tokens are more than the converted graph at `where` takes."""
    from lincompile.errors import UsageError

    limit = length_limit(config, cfg)
    if length > limit:
        raise UsageError(f"{what} {length} is longer than {where} takes ({limit} tokens: the smaller of the "
                         "spec's capture.max_seq_len and the model's position limit)")


def capture(model: nn.Module, cfg, device=None, tolerance: float = 1e-5, positions: bool = False) -> Captured:
    """Export `model` and verify the captured graph reproduces its logits on a probe batch.

    `device` (default: where the model's parameters are) is where the probe runs and the graph is traced.

    `positions=True` exports `(input_ids, position_ids)` instead of `(input_ids)` (see PositionsWrapper).
    """
    model.eval()
    if device is None:
        device = str(next(model.parameters()).device)
    notes = [n for n in [set_attn_implementation(model, cfg.attn_implementation)] if n]
    config = model.config
    max_len = length_limit(config, cfg)
    probe_len = min(cfg.probe_len, max_len)
    probe = probe_ids(text_config(config).vocab_size, cfg.probe_batch, probe_len, device)
    wrapper = (PositionsWrapper if positions else CausalLMWrapper)(model).eval()
    # Dim.DYNAMIC, not named Dims: shape functions (CUDA attention and matmul, older torch on CPU too) leave
    # guards on the length that always hold (min() of strides, padding to 8) but that named Dims reject.
    dims = {"input_ids": {0: torch.export.Dim.DYNAMIC(min=1, max=4096),
                          1: torch.export.Dim.DYNAMIC(min=2, max=max(max_len, probe_len + 1))}}
    inputs = (probe,)
    if positions:
        dims["position_ids"] = dims["input_ids"]
        inputs = (probe, torch.arange(probe_len, device=probe.device).expand_as(probe))
    try:
        with torch.no_grad(), _trace_attention(device):
            program = torch.export.export(wrapper, inputs, dynamic_shapes=dims, strict=False)
    except Exception as err:  # torch.export raises many types; the first line is what the user needs
        lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
        first = lines[0] if lines else type(err).__name__
        reason = next((line for line in lines[1:] if line.startswith("- ")), None)  # constraint errors' cause
        raise CaptureError(f"torch.export failed on {type(model).__name__}: {first}"
                           + (f" {reason}" if reason else "")) from err
    _check_dynamic(program, positions, max(max_len, probe_len + 1))
    gm = program.module()
    _check_guards(gm, positions, max(max_len, probe_len + 1))
    if positions:
        _sizes_from_input_ids(gm)
    for node in gm.graph.nodes:
        path = module_path(node)
        node.meta["lincompile_module"] = path
        node.meta["lincompile_layer"] = layer_index(path)
    with torch.no_grad(), exact_matmul():
        reference = wrapper(*inputs)
        got = gm(*inputs)
    diff = (got.float() - reference.float()).abs().max().item()
    tolerance = logit_tolerance(tolerance, reference)
    if not diff <= tolerance:
        raise CaptureError(f"captured graph does not reproduce the model: max abs logit diff {diff:.3g} > {tolerance:g}")
    return Captured(gm=gm, model=model, probe=probe, reference_logits=reference, max_abs_diff=diff, max_seq_len=max_len,
                    notes=notes)
