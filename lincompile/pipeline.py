"""The compiler pipeline: capture → match → substitute → fuse → verify, and the ConvertedModel it returns.

    converted = lincompile.convert(model, Spec.builtin("liger-attention"))
    logits = converted(input_ids)          # [B, T, vocab], differentiable
    converted.save("out/")                 # lincompile.load("out/") rebuilds it
"""

from __future__ import annotations

import platform
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import UsageError
from .graph import module_path, op_name
from .spec import Spec


def versions() -> dict:
    import transformers

    from . import __version__

    return {"lincompile": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def snapshot(gm) -> list[dict]:
    """What `lincompile diff` compares: one row per graph node."""
    rows = []
    for n in gm.graph.nodes:
        if n.op in ("placeholder", "output"):
            continue
        rows.append({"name": n.name, "op": op_name(n) if n.op != "get_attr" else "get_attr",
                     "target": str(n.target), "module": n.meta.get("lincompile_module", module_path(n)),
                     "layer": n.meta.get("lincompile_layer"),
                     "args": [a.name for a in n.all_input_nodes]})
        if n.op == "call_module" and "lincompile_op" in n.meta:
            # After the fuse pass an operator node reports the kernel ops it runs.
            rows[-1]["opname"] = n.meta.get("lincompile_kernel") or f"lincompile.{n.meta['lincompile_op']}"
    return rows


@dataclass
class PassRecord:
    name: str
    seconds: float
    nodes: list[dict]
    notes: list[str] = field(default_factory=list)


class ConvertedModel(nn.Module):
    """A converted causal LM: `model(input_ids)` returns logits `[B, T, vocab]` and backpropagates."""

    def __init__(self, graph_module, spec: Spec, sites, config, tokenizer=None, report: dict | None = None,
                 history: list[PassRecord] | None = None, allow_code: bool = False):
        super().__init__()
        self.graph_module = graph_module
        self.spec = spec
        self.sites = sites
        self.config = config
        self.tokenizer = tokenizer
        self.report = report or {}
        self.history = history or []
        self.allow_code = allow_code

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.graph_module(input_ids)

    def train(self, mode: bool = True):
        # Exported graph modules refuse train()/eval(): the graph is fixed in eval mode (no dropout).
        self.training = mode
        ops = getattr(self.graph_module, "ops", None)
        if ops is not None:
            ops.train(mode)
        return self

    @property
    def operators(self) -> dict[str, nn.Module]:
        ops = getattr(self.graph_module, "ops", None)
        if ops is None:
            return {}
        from .kernels.base import Operator

        return {name: m for name, m in ops.named_modules() if isinstance(m, Operator)}

    def save(self, path, overwrite: bool = False):
        from .emit import save

        return save(self, path, overwrite=overwrite)

    def diff(self):
        from .diff import GraphDiff

        return GraphDiff(self.history)


@contextmanager
def _timed(timings: dict, key: str):
    t0 = time.perf_counter()
    yield
    timings[key] = round(timings.get(key, 0.0) + time.perf_counter() - t0, 4)


def convert(model: nn.Module, spec: Spec | str, *, tokenizer=None, allow_code: bool = False, source: str | None = None,
            timings: dict | None = None, progress=None, verify: bool = True) -> ConvertedModel:
    """Compile a causal LM with a spec. `progress(stage)` is called as each pass starts (for the CLI)."""
    from .passes.capture import capture
    from .passes.match import match, select
    from .passes.fuse import fuse, resolve_backend
    from .passes.substitute import site_key, substitute
    from .passes.verify import record_teacher
    from .passes.verify import verify as run_verify

    spec = spec if isinstance(spec, Spec) else Spec.resolve(spec)
    for rule in spec.rules:
        if ":" in rule.op and not allow_code:
            raise UsageError(f'{rule.where[0]}:{rule.where[1]}:{rule.where[2]}: op "{rule.op}" is user Python code: '
                             "pass --allow-code (or allow_code=True) to load it")
    timings = {} if timings is None else timings
    history: list[PassRecord] = []
    step = progress or (lambda stage: None)

    step("capture")
    t0 = time.perf_counter()
    with _timed(timings, "capture"):
        captured = capture(model, spec.capture)  # where the weights live (capture's default)
    history.append(PassRecord("capture", time.perf_counter() - t0, snapshot(captured.gm), captured.notes))

    step("match")
    t0 = time.perf_counter()
    with _timed(timings, "match"):
        result = match(captured, spec)
        assignments = select(result, spec)
    history.append(PassRecord("match", time.perf_counter() - t0, history[-1].nodes,
                              [f"{len(result.sites)} sites, {len(assignments)} selected"]))

    teacher = record_teacher(captured.gm, captured.probe) if verify else None

    step("substitute")
    t0 = time.perf_counter()
    with _timed(timings, "substitute"):
        added = substitute(captured.gm, assignments, allow_code=allow_code)
    history.append(PassRecord("substitute", time.perf_counter() - t0, snapshot(captured.gm)))
    ops_by_site = {id(s): added[s.replacement.target] for s, _ in assignments if s.op != "keep"}

    step("fuse")
    t0 = time.perf_counter()
    with _timed(timings, "fuse"):
        backend, fuse_notes = resolve_backend(spec.fuse_backend)
        fuse_notes += fuse(captured.gm, backend)
    history.append(PassRecord("fuse", time.perf_counter() - t0, snapshot(captured.gm), fuse_notes))

    checks = {}
    if verify:
        step("verify")
        with _timed(timings, "verify"):
            checks = run_verify(captured.gm, [s for s, _ in assignments], ops_by_site, teacher, captured.probe,
                                captured.reference_logits, spec.verify_tolerance)
    sites = [s for s, _ in assignments]
    report = {
        "model": source or getattr(model.config, "_name_or_path", "") or type(model).__name__,
        "architecture": type(model).__name__,
        "spec": spec.name,
        # "key" (a module's later attention sites: its operator's name, as site_rel_error names it) only where
        # it is not the module path
        "sites": [{"module": s.module, "layer": s.layer, "pattern": s.pattern, "op": s.op,
                   **({"key": site_key(s)} if site_key(s) != s.module else {})} for s in sites],
        "sites_found": len(result.sites),
        "capture_max_abs_diff": captured.max_abs_diff,
        "logits_max_abs_diff": checks.get("logits_max_abs_diff"),
        "site_rel_error": checks.get("site_rel_error", {}),
        "probe_len": checks.get("probe_len"),
        "fuse_backend": backend,
        "site_details": [s.to_json() for s in sites],
        "near_misses": [m.__dict__ for m in result.near_misses],
        "notes": captured.notes + fuse_notes,
        "timings_s": timings,
        "versions": versions(),
    }
    return ConvertedModel(captured.gm, spec, sites, model.config, tokenizer=tokenizer, report=report,
                          history=history, allow_code=allow_code)
