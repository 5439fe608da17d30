"""Pass `lift_state`: a converted graph becomes two programs with explicit state, prefill and decode.

    prefill(input_ids [B, T], positions [B, T], seen [B], *state) -> (logits [B, T, V], seen, *state)
    decode (input_ids [B, 1], positions [B, 1], seen [B], *state) -> (logits [B, 1, V], seen, *state)

The input graph takes (input_ids, position_ids) (capture with `positions=True`) and calls one operator per
attention site (`call_module ops.<path>`). Each such call becomes a call to a `LiftedOp` that takes the
operator's state as extra inputs and returns its new state: `op.chunked(**inputs, state=…)` in prefill,
`op.step(state, **inputs at the one position)` in decode. The state is a flat, ordered list of tensors
named `<site module>.<key path>` (`model.layers.0.self_attn.swa.k`), plus `seen`: how many real tokens each
sequence has consumed. Nothing is kept in module attributes: the same weights serve both programs.

Kinds of state entries (read off `op.init_state`):
- fixed: `[B, ...]`, the same size whatever the length (recurrent states, ring buffers).
- scalar: a 0-d tensor in the operator's state (e.g. a ring buffer's `len`). Stored per sequence as `[B]`:
  sequences of one batch may have seen different numbers of tokens (left padding).
- growing: one axis has size 0 at init (a softmax KV cache): one slot per real token, left-padded with
  zeros when the sequences of a batch have seen different numbers of tokens.

Left padding: a position < 0 marks a pad. Pads must not touch the state, and operators are black boxes
(a gate computed from a zero key is not the identity), so a batch with pads, or whose sequences have seen
different numbers of tokens where the operator's state depends on it (scalar or growing entries), runs the
operator once per sequence on that sequence's real positions only; everything else in the model (projections,
MLPs, norms) stays batched. The model sees pads at position 0; their outputs are garbage nobody reads.
"""

from __future__ import annotations

import json
import operator
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from lincompile.errors import LincompileError, UsageError

SEEN = "seen"
# Operator inputs whose time axis is not 2 ([B, heads, T, dim]), and those with neither a batch nor a time axis
# (one value per head), passed to every row and step as they are.
TIME_AXIS = {"hidden": 1}
STATIC_INPUTS = ("sinks",)


@dataclass(frozen=True)
class Entry:
    """One tensor of the lifted state."""

    name: str  # flat name: "<site module>.<key path>"
    path: tuple[str, ...]  # where it sits in the operator's nested state dict
    kind: str  # fixed | scalar | growing
    dtype: torch.dtype
    grow_dim: int | None = None  # the axis (of the batched tensor) a growing entry grows along


def flatten(state, prefix=()) -> list[tuple[tuple[str, ...], torch.Tensor]]:
    """Nested dict of tensors -> [(key path, tensor)], in insertion order."""
    if isinstance(state, torch.Tensor):
        return [(prefix, state)]
    if not isinstance(state, dict):
        raise LincompileError(f"operator state must be a dict of tensors, found {type(state).__name__} at "
                              f"{'.'.join(prefix) or 'top level'}")
    out = []
    for key, value in state.items():
        out += flatten(value, prefix + (str(key),))
    return out


def unflatten(entries, tensors) -> dict:
    state: dict = {}
    for e, t in zip(entries, tensors):
        node = state
        for key in e.path[:-1]:
            node = node.setdefault(key, {})
        node[e.path[-1]] = t
    return state


def layout(op: nn.Module, prefix: str, dtype, device) -> list[Entry]:
    """The state entries of one operator, from `init_state` at batch 1 and 2 (to find the batch axis)."""
    one, two = dict(flatten(op.init_state(1, dtype, device))), dict(flatten(op.init_state(2, dtype, device)))
    if list(one) != list(two):
        raise LincompileError(f"{prefix}: init_state returns different keys for batch 1 and 2")
    entries = []
    for path, t1 in one.items():
        t2, name = two[path], ".".join((prefix,) + path)
        if t1.dim() == 0 and t2.dim() == 0:
            entries.append(Entry(name, path, "scalar", t1.dtype))
            continue
        if t1.dim() == 0 or t1.shape[0] != 1 or t2.shape[0] != 2 or t1.shape[1:] != t2.shape[1:]:
            raise LincompileError(f"state entry {name}: expected a leading batch axis or a 0-d scalar, got "
                                  f"shapes {tuple(t1.shape)} (batch 1) and {tuple(t2.shape)} (batch 2)")
        empty = [d for d in range(1, t1.dim()) if t1.shape[d] == 0]
        if len(empty) > 1:
            raise LincompileError(f"state entry {name}: more than one empty axis {tuple(t1.shape)}")
        grow = empty[0] if empty else None
        entries.append(Entry(name, path, "growing" if empty else "fixed", t1.dtype, grow))
    return entries


def init_entries(op, entries, batch, dtype, device) -> list[torch.Tensor]:
    state = dict(flatten(op.init_state(batch, dtype, device)))
    return [state[e.path].expand(batch).clone() if e.kind == "scalar" else state[e.path] for e in entries]


# --------------------------------------------------------------------------------------------------


class LiftedOp(nn.Module):
    """Calls one operator with explicit state: forward(positions, seen, *state, **inputs) -> (out, *state).

    `ragged=True` checks for pads and for sequences at different points and then calls the operator once per
    sequence; `ragged=False` (uniform batches, exported programs) calls it once for the batch, as it is.
    `out_spec` = (heads, v_head_dim, dtype) of the operator's output.
    """

    def __init__(self, op: nn.Module, entries: list[Entry], mode: str, out_spec: tuple, ragged: bool = True):
        super().__init__()
        if mode not in ("prefill", "decode"):
            raise ValueError(f"mode must be prefill or decode, not {mode}")
        self.op, self.entries, self.mode, self.out_spec, self.ragged = op, list(entries), mode, out_spec, ragged

    def forward(self, positions, seen, *state, **inputs):
        if self.ragged and self._needs_rows(positions, seen, state):
            return self._rows(positions, seen, state, inputs)
        return self._batched(state, inputs, positions.shape[0])

    def _needs_rows(self, positions, seen, state) -> bool:
        if bool((positions < 0).any()):
            return True
        for e, s in zip(self.entries, state):
            if e.kind == "scalar" and bool((s != s[0]).any()):
                return True
            if e.kind == "growing" and bool((seen != seen[0]).any()):
                return True
        return False

    def _batched(self, state, inputs, batch):
        st = unflatten(self.entries, [s[0] if e.kind == "scalar" else s for e, s in zip(self.entries, state)])
        if self.mode == "prefill":
            out, new = self.op.chunked(**inputs, state=st)
        else:
            at = {k: x if k in STATIC_INPUTS else x.select(TIME_AXIS.get(k, 2), 0) for k, x in inputs.items()}
            out, new = self.op.step(st, **at)
            out = out.unsqueeze(2)
        got = dict(flatten(new))
        if set(got) != {e.path for e in self.entries}:
            raise LincompileError(f"{type(self.op).__name__} returned state keys {sorted('.'.join(p) for p in got)}, "
                                  f"but its init_state has {sorted('.'.join(e.path) for e in self.entries)}")
        flat = []
        for e in self.entries:
            t = got[e.path].to(e.dtype)  # a stable signature: what init_state gave, whatever the inputs' dtype
            flat.append(t.expand(batch).contiguous() if e.kind == "scalar" else t)
        return (out, *flat)

    def _rows(self, positions, seen, state, inputs):
        """One operator call per sequence, on its real positions only (pads are a prefix of each row)."""
        pad = positions < 0
        n_pad = pad.sum(1)
        T = positions.shape[1]
        if not bool((pad == (torch.arange(T, device=pad.device) < n_pad[:, None])).all()):
            raise UsageError("padding must be on the left: in each row, every position < 0 comes first")
        heads, dim, dtype = self.out_spec
        outs, news = [], []
        for i in range(positions.shape[0]):
            p = int(n_pad[i])
            row_state = []
            for e, s in zip(self.entries, state):
                s = s[i:i + 1]
                if e.kind == "growing":  # the last seen[i] slots are this row's; the rest is left padding
                    n = int(seen[i])
                    s = s.narrow(e.grow_dim, s.shape[e.grow_dim] - n, n)
                row_state.append(s)
            if p == T:
                outs.append(torch.zeros(1, heads, T, dim, dtype=dtype, device=positions.device))
                news.append(row_state)
                continue
            row_inputs = {k: x if k in STATIC_INPUTS else x[i:i + 1].narrow(TIME_AXIS.get(k, 2), p, T - p)
                          for k, x in inputs.items()}
            out, *new = self._batched(row_state, row_inputs, 1)
            outs.append(F.pad(out, (0, 0, p, 0)))
            news.append(new)
        flat = []
        for j, e in enumerate(self.entries):
            parts = [row[j] for row in news]
            if e.kind == "growing":
                longest = max(t.shape[e.grow_dim] for t in parts)
                parts = [_left_pad(t, e.grow_dim, longest) for t in parts]
            flat.append(torch.cat(parts, dim=0))
        return (torch.cat(outs, dim=0), *flat)


class OpaqueLiftedOp(nn.Module):
    """`LiftedOp` (uniform batches) behind the custom op `lincompile::lifted_op`: what exported programs call.

    torch.export cannot keep the length dynamic through an operator's chunked form (it loops over a
    length-dependent number of chunks), so the exported graph calls one opaque op per site. Its string
    argument (`key`) is a JSON description of the `LiftedOp`: the operator's class, the arguments it was built
    with, its plain attributes and the names and shapes of its tensors. Any process that imports
    lincompile.runtime rebuilds the operator from it on the meta device; nothing is pickled (a program could
    otherwise run code on load). The real weights are passed as tensor arguments, so they stay parameters of
    the program.
    """

    def __init__(self, op: nn.Module, entries: list[Entry], mode: str, out_spec: tuple, ragged: bool = False):
        super().__init__()  # `ragged` is accepted for LiftedOp's signature; exported programs are uniform
        self.op = op
        # The operator's tensors as the LiftedOp names them (it holds the operator as `op`, as this module does).
        self.tensor_names = [f"op.{n}" for n, _ in op.named_parameters(remove_duplicate=False)] + \
                            [f"op.{n}" for n, _ in op.named_buffers(remove_duplicate=False)]
        # Described and rebuilt here, not in forward: rebuilding makes tensors, which torch.export would trace.
        self._description = describe(op, entries, mode, out_spec, self.tensor_names)
        object.__setattr__(self, "_lifted", _rebuilt_like(op, self._description))  # not a submodule: meta tensors
        self._keys: dict[tuple, str] = {}

    def key(self, input_names: tuple) -> str:
        if input_names not in self._keys:
            key = json.dumps({**self._description, "inputs": list(input_names)}, sort_keys=True)
            _SKELETONS[key] = (self._lifted, self.tensor_names, input_names)
            self._keys[input_names] = key
        return self._keys[input_names]

    def forward(self, positions, seen, *state, **inputs):
        tensors = [_fetch(self, n) for n in self.tensor_names]
        out = torch.ops.lincompile.lifted_op(self.key(tuple(inputs)), tensors, list(inputs.values()),
                                             [positions, seen, *state])
        return tuple(out)


KEY_FORMAT = 1


def describe(op, entries, mode, out_spec, tensor_names) -> dict:
    """What `rebuild` needs of one operator call, JSON-ready (the input names are added per call)."""
    from lincompile.kernels import registry
    from lincompile.kernels.base import Operator

    cls = type(op)
    if not isinstance(op, Operator) or "_init_args" not in vars(op):
        raise LincompileError(f"cannot export {cls.__name__}: it is not a lincompile Operator")
    if "<locals>" in cls.__qualname__:
        raise LincompileError(f"cannot export operator {cls.__name__}: it is defined inside a function, where a "
                              "program cannot find it (define it at the top level of a module)")
    builtin = cls.name in registry.names() and registry.get(cls.name) is cls
    args, kwargs = vars(op)["_init_args"]
    # Plain attributes set after construction (the fuse pass's `backend`, a hook's choices) go with the
    # arguments; anything else is what the constructor makes of them. Only values JSON keeps as they are.
    attrs = {}
    for path, module in op.named_modules():
        plain = {k: v for k, v in vars(module).items() if not k.startswith("_") and _json_exact(v)}
        if plain:
            attrs[path] = plain
    tensors = dict(op.named_parameters(remove_duplicate=False)) | dict(op.named_buffers(remove_duplicate=False))
    desc = {"format": KEY_FORMAT, "op": cls.name if builtin else f"{cls.__module__}:{cls.__qualname__}",
            "args": list(args), "kwargs": kwargs, "attrs": attrs,
            "tensors": [[n, list(tensors[n[len("op."):]].shape)] for n in tensor_names],
            "entries": [[e.name, list(e.path), e.kind, _dtype_name(e.dtype), e.grow_dim] for e in entries],
            "mode": mode, "out_spec": [out_spec[0], out_spec[1], _dtype_name(out_spec[2])]}
    try:
        json.dumps(desc, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise LincompileError(f"cannot export operator {cls.__name__}: it was built with arguments that JSON cannot "
                              f"describe ({err})") from None
    return desc


def rebuild(key: str) -> tuple:
    """(LiftedOp over the operator rebuilt on the meta device, tensor names, input names) from a key."""
    from torch.utils._python_dispatch import _disable_current_modes

    from lincompile.kernels import registry
    from lincompile.kernels.base import Operator

    try:
        desc = json.loads(key)
    except ValueError:
        desc = None
    if not isinstance(desc, dict) or desc.get("format") != KEY_FORMAT:
        raise LincompileError("this program's operator calls were written by another version of lincompile: "
                              "export the model again")
    ref = desc["op"]
    if ":" in ref:
        # User code is never imported because a program names it: the process running it imports it first.
        module_name, _, qualname = ref.partition(":")
        cls = sys.modules.get(module_name)
        for part in qualname.split(".") if cls is not None else ():
            cls = getattr(cls, part, None)
        if cls is None:
            raise UsageError(f'this program calls the user operator "{ref}": import {module_name} before running it')
        # The file names what gets called: only an Operator class, never any other callable of a loaded module
        # (builtins:exec would otherwise run whatever the file supplies).
        if not (isinstance(cls, type) and issubclass(cls, Operator)):
            raise LincompileError(f'this program names "{ref}" as an operator, which is not a lincompile Operator '
                                  "class: refusing to call it")
    else:
        cls = registry.get(ref)
    # Not traced by a mode that may be active (a fake-tensor pass over the program): only shapes matter here.
    with _disable_current_modes(), torch.device("meta"):
        op = cls(*desc["args"], **desc["kwargs"])
    for path, attrs in desc["attrs"].items():
        module = op.get_submodule(path)
        for name, value in attrs.items():
            # Only values the rebuilt module already holds as plain data (the fuse pass's `backend`, …).
            if name not in vars(module) or not _json_exact(vars(module)[name]):
                raise LincompileError(f"this program sets {path or 'the operator'}.{name}, which "
                                      f"{type(module).__name__} does not hold as plain data: refusing it")
            setattr(module, name, value)
    entries = [Entry(n, tuple(p), kind, _dtype(dt), grow) for n, p, kind, dt, grow in desc["entries"]]
    heads, dim, dtype = desc["out_spec"]
    lifted = LiftedOp(op, entries, desc["mode"], (heads, dim, _dtype(dtype)), ragged=False)
    return lifted.requires_grad_(False), [n for n, _ in desc["tensors"]], tuple(desc.get("inputs", ()))


def _rebuilt_like(op, description: dict) -> LiftedOp:
    """Rebuilt from `description` now, at export rather than at load: it must hold the same tensors as `op`."""
    lifted = rebuild(json.dumps(description))[0]
    want = {n: shape for n, shape in description["tensors"]}
    got = {f"op.{n}": list(t.shape) for n, t in [*lifted.op.named_parameters(remove_duplicate=False),
                                                   *lifted.op.named_buffers(remove_duplicate=False)]}
    if got != want:
        odd = sorted(n for n in set(got) | set(want) if got.get(n) != want.get(n))[0]
        raise LincompileError(f"cannot export operator {type(op).__name__}: rebuilt from its arguments it has "
                              f"{odd[len('op.'):]} of shape {got.get(odd)}, not {want.get(odd)} (were its tensors "
                              "replaced after it was built?)")
    return lifted


def _json_exact(value) -> bool:
    try:
        return json.loads(json.dumps(value, allow_nan=False)) == value
    except (TypeError, ValueError):
        return False


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise LincompileError(f"this program names {name!r} as a dtype, which is not a torch dtype")
    return dtype


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


_SKELETONS: dict[str, tuple] = {}


def _skeleton(key: str):
    if key not in _SKELETONS:
        _SKELETONS[key] = rebuild(key)
    return _SKELETONS[key]


@torch.library.custom_op("lincompile::lifted_op", mutates_args=())
def lifted_op(key: str, tensors: list[torch.Tensor], inputs: list[torch.Tensor],
              state: list[torch.Tensor]) -> list[torch.Tensor]:
    lifted, tensor_names, input_names = _skeleton(key)
    out = torch.func.functional_call(lifted, dict(zip(tensor_names, tensors)), tuple(state),
                                     dict(zip(input_names, inputs)))
    # A custom op's outputs may not alias its inputs or each other (a state entry can come back unchanged).
    seen_ptrs = {t.untyped_storage().data_ptr() for t in [*tensors, *inputs, *state]}
    result = []
    for t in out:
        ptr = t.untyped_storage().data_ptr()
        result.append(t.clone() if ptr in seen_ptrs else t)
        seen_ptrs.add(ptr)
    return result


@lifted_op.register_fake
def _(key, tensors, inputs, state):
    lifted = _skeleton(key)[0]
    positions, _seen, *st = state
    (B, T), (heads, dim, dtype) = positions.shape, lifted.out_spec
    out = [positions.new_empty((B, heads, T, dim), dtype=dtype)]
    for e, s in zip(lifted.entries, st):
        shape = list(s.shape)
        if e.kind == "growing":
            shape[e.grow_dim] = shape[e.grow_dim] + T
        out.append(s.new_empty(shape))
    return out


def _left_pad(t: torch.Tensor, dim: int, length: int) -> torch.Tensor:
    missing = length - t.shape[dim]
    if not missing:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


# --------------------------------------------------------------------------------------------------


@dataclass
class OpSite:
    """What the pass needs to know about one operator call of the input graph."""

    target: str  # the call_module target, ops.<module path>
    module: str  # the site's module path (state names start with it)
    entries: list[Entry]
    out_spec: tuple  # (heads, v_head_dim, dtype)


def lift_state(gm: fx.GraphModule, sites: list[OpSite], lifted: dict[str, nn.Module], mode: str,
               last_only: bool = False) -> fx.GraphModule:
    """The program for `mode`: a new GraphModule sharing gm's weights, calling `lifted[target]` per site.

    `last_only`: logits of the last position only ([B, 1, vocab]): what generation needs after a prompt,
    without a [B, T, vocab] tensor (6 GB for SmolLM2 at 32 k tokens).
    """
    graph = fx.Graph()
    val_map: dict = {}
    logits = graph.graph_copy(gm.graph, val_map)
    if isinstance(logits, (tuple, list)):  # an exported module returns a pytree: its only leaf is the logits
        (logits,) = logits
    if last_only:
        _last_position_only(graph, logits)
    placeholders = {n.target: n for n in graph.nodes if n.op == "placeholder"}
    if set(placeholders) != {"input_ids", "position_ids"}:
        raise LincompileError(f"lift_state needs a graph of (input_ids, position_ids), got {sorted(placeholders)}")
    old_positions = placeholders["position_ids"]
    by_target = {s.target: s for s in sites}
    entries = [e for s in sites for e in s.entries]

    with graph.inserting_after(placeholders["input_ids"]):
        positions = graph.placeholder("positions")
    with graph.inserting_after(positions):
        seen = graph.placeholder(SEEN)
    last, state_in = seen, {}
    for e in entries:
        with graph.inserting_after(last):
            last = state_in[e.name] = graph.placeholder(_identifier(e.name))
    # The model sees pads at position 0 (their outputs are never read); operators see the raw positions.
    with graph.inserting_after(last):
        clamped = graph.call_function(torch.clamp_min, (positions, 0))
    old_positions.replace_all_uses_with(clamped)
    graph.erase_node(old_positions)

    state_out, done = {}, set()
    for node in list(graph.nodes):
        if node.op != "call_module" or node.target not in by_target:
            continue
        site = by_target[node.target]
        done.add(node.target)
        kwargs = {k: v for k, v in node.kwargs.items() if k != "mask"}  # step forms keep causality themselves
        with graph.inserting_before(node):
            call = graph.call_module(f"lifted.{site.module}", (positions, seen, *[state_in[e.name] for e in site.entries]),
                                     kwargs)
            out = graph.call_function(operator.getitem, (call, 0))
            for j, e in enumerate(site.entries):
                state_out[e.name] = graph.call_function(operator.getitem, (call, j + 1))
        node.replace_all_uses_with(out)
        graph.erase_node(node)
    missing = set(by_target) - done
    if missing:
        raise LincompileError(f"lift_state: no call to {sorted(missing)[0]} in the graph")

    # graph_copy left the insertion point at the end of the graph.
    real = graph.call_function(torch.ge, (positions, 0))
    count = graph.call_function(torch.sum, (real,), {"dim": 1})
    new_seen = graph.call_function(torch.add, (seen, count))
    graph.output((logits, new_seen, *[state_out[e.name] for e in entries]))

    for node in list(graph.nodes):
        # export's shape guards were written for (input_ids, position_ids) of length ≥ 2; decode has length 1.
        if node.op == "call_module" and node.target.startswith("_guards") and not node.users:
            graph.erase_node(node)
    root = {}
    for node in graph.nodes:
        if node.op in ("get_attr", "call_module") and node.target not in root:
            root[node.target] = (lifted[node.target[len("lifted."):]] if node.target.startswith("lifted.")
                                 else _fetch(gm, node.target))
    program = fx.GraphModule(root, graph, class_name=f"{mode.capitalize()}Program")
    from lincompile.passes.substitute import clean_graph

    clean_graph(program)
    return program


def _last_position_only(graph: fx.Graph, logits: fx.Node) -> None:
    """Slice the input of the vocabulary projection to the last position (found walking back from the logits
    through one-input ops such as a final softcap)."""
    node = logits
    while node.op == "call_function" and getattr(node.target, "__name__", "") not in ("linear.default",
                                                                                       "matmul.default"):
        inputs = [a for a in node.args if isinstance(a, fx.Node)]
        if len(inputs) != 1:
            raise LincompileError(f"cannot find the vocabulary projection behind the logits (stopped at {node.name})")
        node = inputs[0]
    if node.op != "call_function":
        raise LincompileError(f"cannot find the vocabulary projection behind the logits (stopped at {node.name})")
    hidden = node.args[0]
    with graph.inserting_before(node):
        last = graph.call_function(torch.ops.aten.slice.Tensor, (hidden, 1, -1, None))
    node.replace_input_with(hidden, last)


def _fetch(gm, target):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _identifier(name: str) -> str:
    return "state_" + "".join(c if c.isalnum() else "_" for c in name)
