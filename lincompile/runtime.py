"""Runtime: constant-memory generation from a converted model, with explicit state and portable programs.

    rt = lincompile.runtime.load("out/")                   # or Runtime.from_converted(converted)
    ids = rt.generate(prompt_ids, max_new_tokens=64)        # prefill once, then one decode step per token
    logits, state = rt.prefill(ids)                         # state: {name: tensor}, fixed size for linear ops
    logits, state = rt.decode(next_ids, state=state)
    rt(ids).logits                                          # a Hugging Face-style causal LM call
    rt.export("model.pt2")                                  # both programs, for torch.export.load

The programs come from the converted graph captured with positions as an input (passes/capture.py,
`positions=True`) and made stateful by passes/lift_state.py. A `Runtime` built from a `ConvertedModel`
shares its tensors (the same Parameter objects): training the converted model updates the runtime.
Layers a spec keeps as softmax (`op: keep`) decode through the `softmax` operator and its KV cache.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch
from torch import nn

from .emit import scratch_dir
from .errors import LincompileError, UsageError
from .models import text_config
from .passes import lift_state as ls

# 2: operators are rebuilt from a JSON description (format 1 pickled them).
EXPORT_FORMAT = 2


class Runtime(nn.Module):
    """Prefill and decode programs over one set of weights, with state as a flat dict of tensors."""

    def __init__(self, graph_module, spec, config, tokenizer=None, generation_config=None):
        super().__init__()
        self.graph_module = graph_module  # (input_ids, position_ids) -> logits: the chunked forms, no state
        self.spec, self.config, self.tokenizer, self.generation_config = spec, config, tokenizer, generation_config
        self.sites = _sites(graph_module, next(graph_module.parameters()).device)
        self.state_names = [ls.SEEN] + [e.name for s in self.sites for e in s.entries]
        self._per_sequence = [e.name for s in self.sites for e in s.entries if e.kind == "scalar"]
        self._has_caches = any(e.kind == "growing" for s in self.sites for e in s.entries)
        # Positions this model can take (learned position embeddings), or None: no such limit.
        self.position_limit = position_limit(graph_module, config)
        # Programs by (mode, ragged, last_only), built on first use. The ragged ones handle left padding and
        # sequences at different points; the others skip those checks (one per operator per call).
        self._programs: dict = {}

    # ----------------------------------------------------------------------------------------------
    @classmethod
    def from_model(cls, model: nn.Module, spec, tokenizer=None, allow_code: bool = False) -> "Runtime":
        """Capture, match and substitute `model` under `spec` (one capture, positions as an input)."""
        from .passes.capture import capture
        from .spec import Spec

        spec = spec if isinstance(spec, Spec) else Spec.resolve(spec)
        return cls.from_captured(capture(model, spec.capture, positions=True), spec, tokenizer, allow_code)

    @classmethod
    def from_captured(cls, captured, spec, tokenizer=None, allow_code: bool = False) -> "Runtime":
        """From `capture(model, …, positions=True)`: match, select, substitute (the captured graph is changed)."""
        gm = _substitute(captured, spec, allow_code)
        model = captured.model
        return cls(gm, spec, model.config, tokenizer, getattr(model, "generation_config", None))

    @classmethod
    def from_converted(cls, converted, check: bool = True) -> "Runtime":
        """The runtime of a `ConvertedModel`, sharing its tensors; checked against its logits."""
        from .models import build_from_config

        source = converted.graph_module
        param = next(iter(source.parameters()))
        skeleton = build_from_config(converted.config, dtype=param.dtype,
                                     attn_implementation=converted.spec.capture.attn_implementation,
                                     architecture=(converted.report or {}).get("architecture")).to(param.device)
        gm = _positions_graph(skeleton, converted.spec, converted.allow_code)
        del skeleton
        _share_tensors(gm, source)
        rt = cls(gm, converted.spec, converted.config, converted.tokenizer,
                 getattr(converted, "generation_config", None))
        if check:
            rt.check_against(converted)
            rt.check_continuation()
        return rt

    def program(self, mode: str, ragged: bool = True, opaque: bool = False, last_only: bool = False) -> nn.Module:
        """A fresh `mode` program (prefill|decode). `ragged=False, opaque=True`: the form that is exported."""
        lifted = {}
        for s in self.sites:
            op = self.graph_module.get_submodule(s.target)
            lifted[s.module] = (ls.OpaqueLiftedOp if opaque else ls.LiftedOp)(op, s.entries, mode, s.out_spec, ragged)
        return ls.lift_state(self.graph_module, self.sites, lifted, mode, last_only=last_only)

    def _program(self, mode: str, ragged: bool, last_only: bool = False) -> nn.Module:
        key = (mode, ragged, last_only)
        if key not in self._programs:
            try:
                self._programs[key] = self.program(mode, ragged=ragged, last_only=last_only)
            except LincompileError:
                if not last_only:
                    raise
                self._programs[key] = self._program(mode, ragged)  # no vocabulary projection found: all logits
        return self._programs[key]

    @property
    def prefill_program(self) -> nn.Module:
        return self._program("prefill", ragged=True)

    @property
    def decode_program(self) -> nn.Module:
        return self._program("decode", ragged=True)

    def _ragged(self, positions, state) -> bool:
        """Does this call need the per-sequence paths (left padding, sequences at different points)?"""
        if bool((positions < 0).any()):
            return True
        if positions.shape[0] == 1:
            return False
        checks = [state[n] for n in self._per_sequence] + ([state[ls.SEEN]] if self._has_caches else [])
        if not checks:
            return False
        values = torch.stack(checks)
        return bool((values != values[:, :1]).any())

    def check_against(self, converted, tolerance: float | None = None) -> float:
        """Max abs logit difference to `converted` on a probe; raise if the graphs are not the same model."""
        ids = runtime_probe(self.config, 12, self.device)
        with torch.no_grad():
            want, got = converted(ids).float(), self(ids).logits.float()
        diff = float((want - got).abs().max())
        limit = tolerance if tolerance is not None else (1e-4 if self.dtype == torch.float32 else 5e-2)
        if not diff <= limit * max(1.0, float(want.abs().max())):
            raise LincompileError(f"the runtime graph does not reproduce the converted model (max abs logit diff "
                                  f"{diff:.3g}): was the converted graph changed after conversion?")
        return diff

    def check_continuation(self, tolerance: float | None = None) -> float:
        """Max abs logit difference between one prefill of a probe and the same tokens fed as a prefill, a decode
        step and a second prefill from the state; raise if they are not the same model. Positions are inputs and
        each operator carries its state, so only something else mixing tokens (a recurrent, convolutional or
        state-space layer that is not an attention site, or positions the model makes itself) can tell them apart."""
        from .passes.capture import exact_matmul

        ids = runtime_probe(self.config, 12, self.device)
        with torch.no_grad(), exact_matmul():  # TF32 noise is not what this looks for
            want = self.prefill(ids)[0].float()
            first, state = self.prefill(ids[:, :5])
            step, state = self.decode(ids[:, 5:6], state=state)
            rest, _ = self.prefill(ids[:, 6:], state=state)
        diff = float((torch.cat([first, step, rest], 1).float() - want).abs().max())
        limit = tolerance if tolerance is not None else (1e-3 if self.dtype == torch.float32 else 5e-2)
        limit *= max(1.0, float(want.abs().max()))
        if not diff <= limit:
            raise LincompileError(
                f"this model cannot be run from a state (max abs logit diff {diff:.3g} > {limit:.3g} between one "
                "prefill and prefill + decode + prefill of the same tokens): something other than its attention "
                "sites mixes tokens (a recurrent, convolutional or state-space layer, or positions computed inside "
                "the model instead of read from position_ids), so generate and export would be wrong; the converted "
                "model itself (lincompile.load, eval, heal) is right")
        return diff

    @property
    def device(self):
        return next(self.graph_module.parameters()).device

    @property
    def dtype(self):
        return next(self.graph_module.parameters()).dtype

    # ----------------------------------------------------------------------------------------------
    def init_state(self, batch: int) -> dict[str, torch.Tensor]:
        state = {ls.SEEN: torch.zeros(batch, dtype=torch.int64, device=self.device)}
        for s in self.sites:
            op = self.graph_module.get_submodule(s.target)
            state.update(zip([e.name for e in s.entries], ls.init_entries(op, s.entries, batch, s.out_spec[2],
                                                                              self.device)))
        return state

    def state_bytes(self, state: dict, growing: bool = True) -> int:
        """Bytes held by a state (without the KV caches of softmax layers when growing=False)."""
        kinds = {e.name: e.kind for s in self.sites for e in s.entries}
        return sum(t.numel() * t.element_size() for n, t in state.items() if growing or kinds.get(n) != "growing")

    def prefill(self, input_ids, positions=None, state=None, last_only: bool = False):
        """Run T tokens per sequence: (logits [B, T, vocab] or [B, 1, vocab] with last_only, new state).

        Positions default to continuing each sequence from `state`; positions < 0 are left padding.
        """
        return self._run("prefill", input_ids, positions, state, last_only)

    def decode(self, input_ids, positions=None, state=None):
        """One token per sequence (input_ids [B, 1]) from `state`: (logits [B, 1, vocab], new state)."""
        if input_ids.dim() != 2 or input_ids.shape[1] != 1:
            raise UsageError(f"decode takes input_ids of shape [batch, 1], got {list(input_ids.shape)}")
        if state is None:
            raise UsageError("decode needs a state: run prefill first")
        return self._run("decode", input_ids, positions, state)

    def _run(self, mode, input_ids, positions, state, last_only=False):
        if input_ids.dim() != 2:
            raise UsageError(f"input_ids must be [batch, length], got shape {list(input_ids.shape)}")
        B, T = input_ids.shape
        state = self.init_state(B) if state is None else state
        if list(state) != self.state_names:
            missing = (sorted(set(self.state_names) - set(state)) or sorted(set(state) - set(self.state_names))
                       or ["(the same names in another order)"])
            raise UsageError(f"state does not fit this model (first mismatching name: {missing[0]})")
        if positions is None:  # continue each sequence where it stopped
            positions = state[ls.SEEN][:, None] + torch.arange(T, device=input_ids.device)
        if tuple(positions.shape) != (B, T):
            raise UsageError(f"positions must have the shape of input_ids {[B, T]}, got {list(positions.shape)}")
        if self.position_limit is not None and T and int(positions.max()) >= self.position_limit:
            raise UsageError(f"position {int(positions.max())} is past the model's limit of {self.position_limit} "
                             "positions (its learned position embeddings): use a shorter sequence")
        program = self._program(mode, self._ragged(positions, state), last_only)
        logits, *flat = program(input_ids, positions, *state.values())
        return logits, dict(zip(self.state_names, flat))

    def forward(self, input_ids, attention_mask=None, labels=None, **_):
        """Hugging Face-style call: `.logits` [B, T, vocab] (and `.loss` given labels). Left padding allowed."""
        from transformers.modeling_outputs import CausalLMOutput

        if attention_mask is None or bool(attention_mask.all()):
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
            logits = self.graph_module(input_ids, positions)
        else:
            logits = self.prefill(input_ids, positions_from_mask(attention_mask))[0]
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                               ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)

    # ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int = 32, *, attention_mask=None, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 eos_token_id=None, pad_token_id: int | None = None, streamer=None, generator=None):
        """Prompt (left-padded with `attention_mask` for batches) + up to `max_new_tokens`: [B, T + n].

        Greedy unless do_sample. Stops when every sequence has produced an EOS (`eos_token_id`, else the
        generation config's / tokenizer's); finished sequences are filled with `pad_token_id`. Also stops, with
        fewer tokens, where the next token would need a position past `position_limit` (see `new_token_room`).
        `streamer` follows transformers' protocol: put(prompt ids), put(each new token), end().
        """
        if max_new_tokens < 0:
            raise UsageError("max_new_tokens must be ≥ 0")
        if input_ids.dim() == 2 and input_ids.shape[1] == 0:
            raise UsageError("the prompt is empty (0 tokens): generation needs at least one token to start from")
        eos = self.eos_token_ids(eos_token_id)
        pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
        positions = None if attention_mask is None else positions_from_mask(attention_mask)
        if streamer is not None:
            streamer.put(input_ids.cpu())
        logits, state = self.prefill(input_ids, positions, last_only=True)
        n = min(max_new_tokens, self.new_token_room(int(state[ls.SEEN].max())))
        out = [input_ids]
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        eos_t = torch.tensor(eos, dtype=input_ids.dtype, device=input_ids.device)
        for step in range(n):
            token = next_token(logits[:, -1], do_sample, temperature, top_k, top_p, generator)
            token = torch.where(done, torch.full_like(token, pad), token)
            out.append(token[:, None])
            if streamer is not None:
                streamer.put(token.cpu())
            done |= torch.isin(token, eos_t)
            if bool(done.all()) or step == n - 1:
                break
            logits, state = self.decode(token[:, None], state=state)
        if streamer is not None:
            streamer.end()
        return torch.cat(out, dim=1)

    def new_token_room(self, seen: int) -> int | float:
        """How many tokens can be generated after `seen` tokens: every token fed to the model needs a position
        below `position_limit` (the last generated token is never fed, so it may be the limit + 1st)."""
        return float("inf") if self.position_limit is None else max(self.position_limit - seen + 1, 0)

    def eos_token_ids(self, eos_token_id=None) -> list[int]:
        """The ids that end a sequence: the argument, else the generation config's, tokenizer's or config's."""
        for source in (eos_token_id, getattr(self.generation_config, "eos_token_id", None),
                       getattr(self.tokenizer, "eos_token_id", None), getattr(self.config, "eos_token_id", None)):
            if source is not None:
                return [int(x) for x in (source if isinstance(source, (list, tuple)) else [source])]
        return []

    # ----------------------------------------------------------------------------------------------
    def export(self, path, batch: int = 2, length: int = 5) -> Path:
        """Write both programs to one .pt2 archive (see `export_programs`); returns the path."""
        from torch.export.pt2_archive._package import package_pt2

        path = Path(path)
        if path.suffix != ".pt2":
            raise UsageError(f"{path}: the exported file must end in .pt2")
        programs, meta = export_programs(self, batch, length)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written in a scratch folder next to PATH and renamed into place: nothing half-written. The archive's
        # inner folder is named after the file, so the scratch files keep PATH's name.
        scratch = scratch_dir(path.parent, path.name)
        try:
            (scratch / "programs").mkdir()
            packed = scratch / "programs" / path.name
            package_pt2(str(packed), exported_programs=programs, extra_files={"lincompile.json": json.dumps(meta)})
            shared = scratch / path.name
            share_weights(packed, shared)
            shared.replace(path)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return path


# --------------------------------------------------------------------------------------------------
# Building the positions-aware graph.


def _positions_graph(model, spec, allow_code):
    from .passes.capture import capture

    return _substitute(capture(model, spec.capture, positions=True), spec, allow_code)


def _substitute(captured, spec, allow_code):
    """match → select → substitute → fuse on a positions capture; kept softmax layers get the softmax operator."""
    from .passes.fuse import fuse, resolve_backend
    from .passes.match import match, select
    from .passes.substitute import op_class, substitute

    assignments = select(match(captured, spec), spec)
    # `keep` layers decode through the softmax operator's KV cache; it computes what the original did.
    assignments = [(s, dataclasses.replace(r, op="softmax", params={}) if r.op == "keep" else r) for s, r in assignments]
    for site, rule in assignments:
        cls = op_class(rule.op, allow_code)
        # The softmax operator builds sliding and chunked masks itself from the size read off the site's mask.
        rebuilt = rule.op == "softmax" and (site.mask_kind in ("sliding", "chunked") and site.attrs.get("window")
                                            or site.mask_kind == "custom" and site.attrs.get("alibi_slopes"))
        if ("mask" in cls.inputs + cls.optional_inputs and "mask" in site.bindings and site.mask_kind != "causal"
                and not rebuilt):
            if rule.op == "softmax":  # a kept layer (or the identity spec)
                raise UsageError(f"{site.module}: its attention mask is {site.mask_kind} (an additive bias whose "
                                 "ALiBi slopes could not be read off it, or a pattern other than causal / sliding "
                                 "window / chunked): the decode step rebuilds only causal, sliding-window, chunked "
                                 "and ALiBi masks, so this model cannot be generated from or exported yet")
            raise UsageError(f"{site.module}: its attention mask is {site.mask_kind}; {rule.op}'s step form assumes "
                             "a causal mask, and only layers kept as softmax (op: keep) decode with another mask "
                             "(convert this layer with a sliding-window operator, or keep it)")
    substitute(captured.gm, assignments, allow_code=allow_code)
    fuse(captured.gm, resolve_backend(spec.fuse_backend)[0])
    for node in list(captured.gm.graph.nodes):
        # export's shape guards were written for length ≥ 2; the runtime also runs length 1.
        if node.op == "call_module" and node.target.startswith("_guards") and not node.users:
            captured.gm.graph.erase_node(node)
    align_positions(captured.model, captured.gm)
    captured.gm.recompile()
    return captured.gm


def runtime_probe(config, length: int, device="cpu") -> torch.Tensor:
    """[2, length] token ids for the runtime's checks, without the pad id: RoBERTa's own numbering skips pads
    (unmasked ones too) and the runtime's does not, so a pad in a probe would tell them apart for no fault."""
    from .passes.capture import probe_ids

    cfg = text_config(config)
    ids = probe_ids(cfg.vocab_size, 2, length, device)
    pad = getattr(cfg, "pad_token_id", None)
    if isinstance(pad, int) and 0 <= pad < cfg.vocab_size:
        ids[ids == pad] = (pad + 1) % cfg.vocab_size
    return ids


def align_positions(model, gm) -> int:
    """Make the positions graph take the runtime's positions (0 for the first token) where the model numbers them
    otherwise, and return the shift added (0: none). RoBERTa and its kin number the tokens from padding_idx + 1
    when they are given no position_ids, and use position_ids as they are otherwise: the runtime's own positions
    then read other rows of the position table and every logit differed (0.6 on a tiny model). So the model is run
    on a probe without positions and with 0, 1, 2 …, the indices its position tables are looked up with are
    compared, and their difference, if it is one constant, is added to the position_ids input; any other
    difference is refused. Lookups it cannot watch (a table read other than by `F.embedding`) leave the graph as it
    is. Models without a learned position table (RoPE: only differences of positions count) are left alone and
    cost nothing."""
    tables = _position_tables(gm)
    if not tables:
        return 0
    from .graph import ROOT

    try:  # the graph's names are the model's under the capture wrapper's ROOT
        params = [model.get_parameter(target.removeprefix(ROOT + ".")) for _, target, _ in tables]
    except AttributeError:  # a table that is no parameter of the model as it is named in the graph
        return 0
    weights, rows = {id(p) for p in params}, min(int(p.shape[0]) for p in params)
    device = next(model.parameters()).device
    ids = runtime_probe(model.config, max(2, min(12, rows // 2)), device)  # within the table, shifted or not
    numbered = torch.arange(ids.shape[1], device=device).expand_as(ids)
    seen = []
    for kwargs in ({}, {"position_ids": numbered}):  # as the capture's two wrappers call it
        with torch.no_grad(), _Lookups(weights) as lookups:
            model(input_ids=ids, use_cache=False, **kwargs,
                  **({"attention_mask": torch.ones_like(ids)} if kwargs else {}))
        seen.append(lookups.indices)
    if len(seen[0]) != len(seen[1]) or not seen[0]:
        return 0
    try:  # (GPT-2 numbers one row [1, T] for the whole batch)
        shifts = {int(v) for own, given in zip(*seen) for v in (own - given).unique()}
    except RuntimeError:  # shapes that do not broadcast: something else than one table lookup per token
        shifts = set()
    if len(shifts) != 1:
        raise LincompileError(f"{type(model).__name__} numbers its positions itself in a way the runtime cannot "
                              f"feed (its position tables are read at shifts {sorted(shifts)[:4]} from 0, 1, 2 …): "
                              "it cannot be generated from or exported")
    shift = shifts.pop()
    if shift:
        placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.target == "position_ids")
        with gm.graph.inserting_after(placeholder):
            shifted = gm.graph.call_function(torch.ops.aten.add.Tensor, (placeholder, shift))
        placeholder.replace_all_uses_with(shifted, delete_user_cb=lambda u: u is not shifted)
        if "val" in placeholder.meta:
            shifted.meta["val"] = placeholder.meta["val"]
    return shift


class _Lookups(torch.overrides.TorchFunctionMode):
    """Records the indices of every embedding lookup into the given weights (by identity)."""

    def __init__(self, weights):
        super().__init__()
        self.weights, self.indices = weights, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.embedding:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            if id(weight) in self.weights:
                self.indices.append(args[0].detach().clone())
        return func(*args, **kwargs)


def _sites(gm, device) -> list[ls.OpSite]:
    from .kernels.base import Operator

    sites = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), Operator):
            continue
        op, val = gm.get_submodule(node.target), node.meta.get("val")
        for method in ("init_state", "step"):  # the decode forms (optional for conversion and healing)
            if getattr(type(op), method) is getattr(Operator, method):
                raise UsageError(op.missing_form(method))
        if val is None or val.dim() != 4:
            raise LincompileError(f"{node.target}: no recorded output shape [batch, heads, seq, dim]")
        module = node.target.split(".", 1)[1]
        out_spec = (int(val.shape[1]), int(val.shape[3]), val.dtype)
        sites.append(ls.OpSite(node.target, module, ls.layout(op, module, val.dtype, device), out_spec))
    return sites


def _share_tensors(gm, source) -> None:
    """Point gm's operators and tensors at `source`'s (same names): one set of weights for both."""
    from .kernels.base import Operator

    for name, module in list(gm.named_modules()):
        if isinstance(module, Operator):
            try:
                theirs = source.get_submodule(name)
            except AttributeError:
                continue  # a kept softmax layer: the converted graph has no operator there (and no tensors)
            parent, _, leaf = name.rpartition(".")
            setattr(gm.get_submodule(parent), leaf, theirs)
    mine = dict(gm.named_parameters(remove_duplicate=False)) | dict(gm.named_buffers(remove_duplicate=False))
    theirs = dict(source.named_parameters(remove_duplicate=False)) | dict(source.named_buffers(remove_duplicate=False))
    if set(mine) != set(theirs):
        odd = sorted(set(mine) ^ set(theirs))
        raise LincompileError(f"the converted graph and its runtime differ in tensors ({len(odd)}, e.g. {odd[0]}): "
                              "was the converted graph changed after conversion (unmerged adapters)?")
    for name, t in theirs.items():
        owner, _, leaf = name.rpartition(".")
        module = gm.get_submodule(owner)
        table = module._parameters if leaf in module._parameters else module._buffers
        table[leaf] = t


# Ops that read other values at the positions (positions as their index): what they give is no longer positions.
INDEXING_OPS = {"gather", "index", "index_select", "take", "take_along_dim", "embedding"}


def position_limit(gm, config) -> int | None:
    """The positions a model can take, where something in it really stops there: learned position embeddings
    (GPT-2's wpe), a table indexed by position. State is no limit (constant for linear operators, a growing
    cache for softmax), and neither are rotary embeddings, computed for any position (a RoPE model only gets
    worse past its training length), so their config's max_position_embeddings is not applied; nor is the
    spec's capture.max_seq_len, the longest length traced (the runtime's programs drop the shape guards).

    The table is found in the graph (`_position_tables`). Its limit is its rows less the constant added to the
    positions before the lookup (OPT's 2, RoBERTa's padding_idx + 1: see `align_positions`), and at most the
    config's max_position_embeddings.
    """
    tables = _position_tables(gm)
    if not tables:
        return None
    limits = []
    for _, target, shift in tables:
        owner, _, leaf = target.rpartition(".")
        limits.append(int(getattr(gm.get_submodule(owner), leaf).shape[0]) - shift)
    configured = getattr(text_config(config), "max_position_embeddings", None)
    return min(limits + ([configured] if isinstance(configured, int) and configured > 0 else []))


def _position_tables(gm) -> list[tuple]:
    """[(embedding node, its weight's name, the constant added to the positions before it)]: embedding lookups
    indexed by what is made from the position_ids input, but not by values read from another tensor at the
    positions (BERT's token-type table is looked up with values gathered at the positions: it has two rows, but
    no position limit)."""
    from .graph import short_op
    from .walk import const_value

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder" and n.target == "position_ids"]
    shifts, tables = {p: 0 for p in placeholders}, []  # node made from the positions -> constant added so far
    for node in gm.graph.nodes:  # topological order: a node's inputs come before it
        if node in shifts or node.op != "call_function":
            continue
        source = next((a for a in node.all_input_nodes if a in shifts), None)
        if source is None:
            continue
        op = short_op(node)
        if str(node.target) == "aten.embedding.default":
            weight, indices = node.args[:2]
            if indices in shifts and isinstance(weight, torch.fx.Node) and weight.op == "get_attr":
                tables.append((node, weight.target, shifts[indices]))
        elif op not in INDEXING_OPS or (node.args and node.args[0] in shifts):  # (positions indexed: positions)
            shift = shifts[node.args[0] if node.args and node.args[0] in shifts else source]
            if op in ("add", "sub") and len(node.all_input_nodes) == 1 and len(node.args) >= 2:
                c = const_value(node.args[1])
                shift = shift + int(c) if op == "add" and c is not None and c == int(c) else shift
                shift = shift - int(c) if op == "sub" and c is not None and c == int(c) else shift
            shifts[node] = shift
    return tables


def next_token(logits, do_sample=False, temperature=1.0, top_k=None, top_p=None, generator=None):
    """[B, vocab] -> [B]: argmax, or a sample after temperature, top-k and nucleus (top-p) filtering."""
    if not do_sample:
        return logits.argmax(-1)
    if temperature <= 0:
        raise UsageError("temperature must be > 0 when sampling")
    logits = logits.float() / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        ordered, order = logits.sort(dim=-1, descending=True)
        probs = ordered.softmax(-1)
        # Drop a token when the ones before it already reach top_p (the most likely one always stays).
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] 0/1 mask (left padding) -> positions: 0, 1, … on real tokens, -1 on pads."""
    mask = attention_mask.bool()
    if bool((mask[:, :-1] & ~mask[:, 1:]).any()):
        raise UsageError("attention_mask: only left padding is supported (a 0 after a 1 in some row)")
    return torch.where(mask, mask.long().cumsum(1) - 1, torch.full_like(mask, -1, dtype=torch.long))


# --------------------------------------------------------------------------------------------------
# Loading an output directory directly (one capture, not two as lincompile.load + from_converted would).


def load(path, allow_code: bool = False, device: str = "cpu", check: bool = True) -> Runtime:
    """The runtime of a `lincompile apply` output directory, without the original model or network; `check`: refuse
    a model that cannot run from a state (see `Runtime.check_continuation`)."""
    from .emit import architecture, load_tokenizer, load_weights, read_outdir
    from .models import build_from_config

    root, meta, spec, config = read_outdir(path)
    for rule in spec.rules:
        if ":" in rule.op and not allow_code:
            raise UsageError(f'{root}: op "{rule.op}" is user Python code: pass --allow-code to load it')
    model = build_from_config(config, dtype=meta.get("dtype", "float32"),
                              attn_implementation=meta["attn_implementation"], architecture=architecture(root, meta))
    gm = _positions_graph(model.to(device), spec, allow_code)  # captured where it will run (see emit.load)
    load_weights(gm, root, meta, device)
    tokenizer, generation = load_tokenizer(root), None
    if (root / "generation_config.json").exists():
        from transformers import GenerationConfig

        generation = GenerationConfig.from_pretrained(str(root))
    rt = Runtime(gm, spec, config, tokenizer, generation)
    if check:
        rt.check_continuation()
    return rt


# --------------------------------------------------------------------------------------------------
# Export: torch.export programs in one .pt2 archive.


def export_programs(rt: Runtime, batch: int = 2, length: int = 5):
    """({"model": prefill, "decode": decode} ExportedPrograms, metadata) with dynamic batch and length.

    The prefill program is named "model" so that plain `torch.export.load(path)` returns it; the decode
    program is read with `load_exported` (or `torch.export.pt2_archive._package.load_pt2`). Operators run
    inside each program as the opaque custom op `lincompile::lifted_op` (registered when lincompile.runtime
    is imported), because their chunked forms loop over a length-dependent number of chunks. Exported
    programs take uniform batches: no left padding, every sequence at the same point.
    """
    from torch.export import Dim

    init = rt.init_state(1)
    if any(t.dtype.is_floating_point and bool(t.any()) for t in init.values()):
        raise LincompileError("an operator's initial state is not zero: the exported metadata cannot describe it")
    kinds = {e.name: e for s in rt.sites for e in s.entries}
    B, T = Dim("batch", min=1, max=4096), Dim("seq", min=1, max=rt.spec.capture.max_seq_len)
    cache = Dim("cache", min=0, max=1 << 20)

    def state_dims():
        dims = [{0: B}]
        for name in rt.state_names[1:]:
            e = kinds[name]
            dims.append({0: B, e.grow_dim: cache} if e.kind == "growing" else {0: B})
        return dims

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, text_config(rt.config).vocab_size, (batch, 2 * length + 1), generator=g).to(rt.device)
    programs = {}
    with torch.no_grad():
        # Example inputs past the start, so that no size is 0 or 1 (export would make such sizes constants).
        _, state = rt.prefill(ids[:, :length + 1])
        ids = ids[:, length + 1:].contiguous()  # a view's strides would become guards of the program
        pos = state[ls.SEEN][:, None] + torch.arange(length, device=rt.device)
        prefill = rt.program("prefill", ragged=False, opaque=True)
        programs["model"] = torch.export.export(prefill, (ids, pos, *state.values()), strict=False,
                                                dynamic_shapes=[{0: B, 1: T}, {0: B, 1: T}, *state_dims()])
        _, state = rt.prefill(ids, pos, state)
        decode = rt.program("decode", ragged=False, opaque=True)
        one = ids[:, :1].contiguous()
        programs["decode"] = torch.export.export(decode, (one, state[ls.SEEN][:, None], *state.values()), strict=False,
                                                 dynamic_shapes=[{0: B}, {0: B}, *state_dims()])
    meta = {"format": EXPORT_FORMAT, "inputs": ["input_ids", "positions", *rt.state_names],
            "outputs": ["logits", *rt.state_names], "programs": {"model": "prefill", "decode": "decode"},
            "state": [{"name": ls.SEEN, "kind": "counter", "dtype": "int64", "shape": []}] +
                     [{"name": n, "kind": kinds[n].kind, "dtype": str(t.dtype).replace("torch.", ""),
                       "shape": list(t.shape[1:]), "grow_dim": kinds[n].grow_dim}
                      for n, t in list(init.items())[1:]],
            "vocab_size": text_config(rt.config).vocab_size, "eos_token_id": rt.eos_token_ids(),
            "position_limit": rt.position_limit}  # positions must stay below it (None: no limit)
    return programs, meta


def share_weights(src: Path, dest: Path) -> dict[str, dict[str, str]]:
    """Copy the .pt2 archive SRC to DEST with the programs sharing their weight payloads; returns, per program,
    {its payload dropped: the earlier program's payload used instead}.

    `package_pt2` writes every program's weights on their own, so the prefill and decode programs (the same
    parameters) doubled the file. A later program's payload is dropped when an earlier program stores the same
    parameter (same name) with the same bytes; its weight config (data/weights/<program>_weights_config.json:
    name -> payload, with each tensor's own sizes, strides and offset) then names the earlier payload. Only
    names are matched, never bare contents, so two parameters that merely hold equal values (fresh norms)
    stay apart, and each program loads its own tensors as before.
    """
    from torch.export.pt2_archive._package import PT2ArchiveReader

    with PT2ArchiveReader(str(src)) as reader:  # closed after: the scratch folder must be removable
        return _copy_sharing(reader, dest)


def _copy_sharing(reader, dest: Path) -> dict[str, dict[str, str]]:
    import hashlib

    from torch.export.pt2_archive._package import PT2ArchiveWriter

    weights = "data/weights/"
    names = reader.get_file_names()
    configs = {n: json.loads(reader.read_bytes(n)) for n in names
               if n.startswith(weights) and n.endswith("_weights_config.json")}
    digests = {}

    def digest(payload):
        if payload not in digests:
            digests[payload] = hashlib.sha256(reader.read_bytes(weights + payload)).hexdigest()
        return digests[payload]

    earlier, dropped = {}, {}  # parameter name -> payload of the first program storing it
    for config_name, config in configs.items():
        entries = config["config"]
        remap = {}
        for fqn, entry in entries.items():
            own, other = entry["path_name"], earlier.get(fqn)
            # A payload is a whole storage (each entry keeps its own view of it), so equal bytes make any entry
            # on it valid on the other payload; two payloads never fold into one (no new aliasing).
            if (other is not None and own not in remap and other not in remap.values()
                    and digest(own) == digest(other)):
                remap[own] = other
        for fqn, entry in entries.items():
            entry["path_name"] = remap.get(entry["path_name"], entry["path_name"])
            earlier.setdefault(fqn, entry["path_name"])
        dropped[config_name[len(weights):-len("_weights_config.json")]] = remap
    gone = {weights + p for remap in dropped.values() for p in remap}
    # The writer adds its own bookkeeping records (.data/*, byteorder, archive_format/version).
    bookkeeping = {".data/version", ".data/serialization_id", "byteorder", "archive_format", "archive_version"}
    with PT2ArchiveWriter(str(dest)) as writer:
        for name in names:
            if name in bookkeeping or name in gone:
                continue
            data = json.dumps(configs[name]).encode() if name in configs else reader.read_bytes(name)
            writer.write_bytes(name, data)
    return dropped


class Exported:
    """Both programs of a .pt2 written by `Runtime.export`, and the state they take."""

    def __init__(self, path):
        from torch.export.pt2_archive._package import load_pt2

        contents = load_pt2(str(path))
        if "decode" not in contents.exported_programs or "lincompile.json" not in contents.extra_files:
            raise UsageError(f"{path} was not written by `lincompile export` (no decode program or metadata)")
        self.meta = json.loads(contents.extra_files["lincompile.json"])
        if self.meta.get("format") != EXPORT_FORMAT:
            raise UsageError(f"{path} was written by another version of lincompile (export format "
                             f"{self.meta.get('format')}, this one reads {EXPORT_FORMAT}): export the model again")
        self.prefill_program = contents.exported_programs["model"]
        self.decode_program = contents.exported_programs["decode"]
        self.prefill = self.prefill_program.module()
        self.decode = self.decode_program.module()
        self.state_names = [s["name"] for s in self.meta["state"]]
        self.position_limit = self.meta.get("position_limit")  # a learned position table's end, or None

    def init_state(self, batch: int, device="cpu") -> list[torch.Tensor]:
        return [torch.zeros(batch, *s["shape"], dtype=getattr(torch, s["dtype"]), device=device)
                for s in self.meta["state"]]


def load_exported(path) -> Exported:
    return Exported(path)


# --------------------------------------------------------------------------------------------------
# ConvertedModel.generate / .runtime(), until pipeline.py grows them.


def runtime_of(converted, rebuild: bool = False) -> Runtime:
    """The (cached) runtime of a ConvertedModel; rebuilt if asked (after replacing its tensors)."""
    rt = converted.__dict__.get("_lincompile_runtime")
    if rt is None or rebuild:
        rt = Runtime.from_converted(converted)
        converted.__dict__["_lincompile_runtime"] = rt  # not a registered submodule: state_dict is unchanged
    return rt


def _generate(self, input_ids, max_new_tokens: int = 32, **kwargs):
    return runtime_of(self).generate(input_ids, max_new_tokens, **kwargs)


def _install():
    from .pipeline import ConvertedModel

    if not hasattr(ConvertedModel, "generate"):
        ConvertedModel.generate = _generate
    if not hasattr(ConvertedModel, "runtime"):
        ConvertedModel.runtime = runtime_of


_install()
