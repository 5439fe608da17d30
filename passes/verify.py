"""Pass `verify`: check the converted graph on the probe batch before anything is written.

- identity check: when every converted site uses the `softmax` operator, logits must match the original
  (max abs ≤ the spec's `verify.tolerance`, 1e-5 by default);
- per-site conversion gap: each operator is run on the *original* model's inputs at its site and compared
  with the original attention output (relative L2 error), so layers are judged independently;
- no NaN/Inf: the first operator (in graph order) whose output is not finite is named.

An operator with a sliding window (its `window` param) is exact softmax attention over the first w tokens, so
a probe no longer than the window says nothing about the rest of it. The probe is lengthened to twice the
largest window (and a few tokens) within what the captured graph takes and LONGEST_PROBE; a site whose window the probe still
fits inside gets a note. The original graph is kept (a copy over the same weights) until then, and is run on
the final probe with each site scored as soon as its values exist, so a long probe holds one layer's at a time.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import fx
from torch.utils._pytree import tree_leaves

from lincompile.errors import VerifyError
from lincompile.passes.capture import exact_matmul, logit_tolerance
from lincompile.passes.substitute import site_key

PAST_WINDOW = 8  # probe tokens beyond twice the largest window
# The lengthened probe's ceiling: its logits are batch · T · vocab (2 GB in fp32 at 2 × 2048 × 128k). Longer
# windows get the note instead.
LONGEST_PROBE = 2048


@dataclass
class Teacher:
    gm: fx.GraphModule  # the original graph: a copy taken before substitute, sharing the weights
    nodes: dict  # node of the captured graph -> its copy
    max_len: int  # the longest input the captured graph takes


def record_teacher(gm, probe) -> Teacher:
    """Keep the original graph (call before substitute); `verify` runs it once it knows the probe's length."""
    graph, nodes = fx.Graph(), {}
    graph.output(graph.graph_copy(gm.graph, nodes))
    return Teacher(fx.GraphModule(gm, graph), nodes, max_input_len(gm, probe.shape[1]))


def max_input_len(gm, probe_len: int) -> int:
    """input_ids' longest length in the exported graph's ranges; `probe_len` when they do not say."""
    ids = next((n for n in gm.graph.nodes if n.op == "placeholder"), None)
    val = ids.meta.get("val") if ids is not None else None
    length = val.shape[1] if val is not None and val.dim() > 1 else None
    r = getattr(gm, "range_constraints", {}).get(length.node.expr) if isinstance(length, torch.SymInt) else None
    if r is None or not r.upper.is_finite:
        return probe_len
    # Capture allows one token past its probe even where max_seq_len is shorter: that bound is not a length.
    return int(r.upper) if int(r.upper) > probe_len + 1 else probe_len


def window_of(op) -> int | None:
    """The sliding window an operator is exact softmax attention over (its `window` param), if it has one."""
    w = getattr(op, "config", {}).get("window")
    return w if isinstance(w, int) and w > 0 else None


def probe_for(probe, ops_by_site, max_len: int):
    """The probe, lengthened past twice the largest window within `max_len` (more of its own tokens, shuffled:
    ids the model takes whatever its vocabulary)."""
    T = probe.shape[1]
    windows = [w for w in map(window_of, ops_by_site.values()) if w]
    if not windows:
        return probe
    length = max(T, min(2 * max(windows, default=0) + PAST_WINDOW, max_len, LONGEST_PROBE))
    if length == T:
        return probe
    g = torch.Generator().manual_seed(1)
    more = probe[:, torch.randint(0, T, (length - T,), generator=g).to(probe.device)]
    return torch.cat([probe, more], dim=1)


class _SiteScorer(fx.Interpreter):
    """Runs the original graph; scores each operator once its site's bindings and output are computed, then
    drops them."""

    def __init__(self, teacher: Teacher, sites, ops_by_site):
        super().__init__(teacher.gm, garbage_collect_values=True)
        order = {n: i for i, n in enumerate(teacher.gm.graph.nodes)}
        self.due: dict[fx.Node, list] = {}  # node -> the sites complete once it is computed
        self.uses: Counter = Counter()  # node -> sites still to score that need its value
        for site in sites:
            op = ops_by_site.get(id(site))
            if op is None:
                continue
            mapping, _ = type(op).bind(site)
            args = {arg: teacher.nodes[site.bindings[src]] for arg, src in mapping.items()}
            out = teacher.nodes[site.output]
            needed = set(args.values()) | {out}
            self.due.setdefault(max(needed, key=order.get), []).append((site, op, args, out, needed))
            self.uses.update(needed)
        self.values: dict[fx.Node, torch.Tensor] = {}
        self.errors: dict[str, float] = {}

    def run_node(self, n: fx.Node):
        result = super().run_node(n)
        if n in self.uses:
            self.values[n] = result
        for site, op, args, out, needed in self.due.pop(n, ()):
            self.errors[site_key(site)] = site_error(site, op, {a: self.values[x] for a, x in args.items()},
                                                  self.values[out])
            self.uses.subtract(needed)
            for x in needed:
                if self.uses[x] <= 0:
                    self.values.pop(x, None)
        return result


def site_error(site, op, inputs, ref) -> float:
    """Relative error of an operator against softmax attention, on the teacher's own inputs."""
    out = op(**inputs).float()
    if not torch.isfinite(out).all():
        raise VerifyError(f"operator {op.name} at {site.module} (layer {site.layer}) produced NaN/Inf "
                          "on the probe batch; nothing was written")
    ref = ref.float()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def verify(gm, sites, ops_by_site, teacher: Teacher, probe, reference_logits, tolerance: float) -> dict:
    """Run the converted graph on the probe; raise VerifyError on non-finite output or identity mismatch.

    The probe is lengthened past the operators' windows (see the module docstring); the result says how long
    it was (`probe_len`) and, in `notes` (also added to the sites'), which windows it still fits inside."""
    probe = probe_for(probe, ops_by_site, teacher.max_len)
    T = probe.shape[1]
    notes = []
    for s in sites:
        w = window_of(ops_by_site.get(id(s)))
        if w and T <= w:
            notes.append(f"probe of {T} tokens fits inside the window {w} of {s.module}: the linear part was "
                         "not exercised")
            s.notes.append(notes[-1])
    bad = []

    def hook(module, args, kwargs, output):
        if not bad and isinstance(output, torch.Tensor) and not torch.isfinite(output).all():
            bad.append(module)

    handles = [op.register_forward_hook(hook, with_kwargs=True) for op in ops_by_site.values()]
    try:
        with torch.no_grad(), exact_matmul():  # as the reference logits were computed (capture)
            logits = gm(probe)
    finally:
        for h in handles:
            h.remove()
    by_op = {id(op): s for s in sites for op in [ops_by_site.get(id(s))] if op is not None}
    if bad:
        s = by_op[id(bad[0])]
        raise VerifyError(f"operator {bad[0].name} at {s.module} (layer {s.layer}) produced NaN/Inf on the probe "
                          "batch; nothing was written")
    if not torch.isfinite(logits).all():
        raise VerifyError("the converted model's logits contain NaN/Inf on the probe batch; nothing was written")
    scorer = _SiteScorer(teacher, sites, ops_by_site)
    with torch.no_grad(), exact_matmul():
        reference = tree_leaves(scorer.run(probe))[0]  # the graph's one output: the original logits
    # Chunks along T: the fp32 copies of a long probe's logits would be batch · T · vocab · 4 bytes each.
    diff = max(float((a.float() - b.float()).abs().max())
               for a, b in zip(logits.split(256, dim=1), reference.split(256, dim=1)))
    identity = bool(ops_by_site) and all(op.name == "softmax" for op in ops_by_site.values())
    tolerance = logit_tolerance(tolerance, reference_logits)  # half precision, GPUs: rounding-level slack
    if identity and not diff <= tolerance:
        raise VerifyError(f"identity conversion changed the logits: max abs diff {diff:.3g} > {tolerance:g}")
    return {"logits_max_abs_diff": diff, "site_rel_error": scorer.errors, "identity": identity, "probe_len": T,
            "notes": notes}
