"""Pass `verify`: check the converted graph on the probe batch before anything is written.

- identity check: when every converted site uses the `softmax` operator, logits must match the original
  (max abs ≤ the spec's `verify.tolerance`, 1e-5 by default);
- per-site conversion gap: each operator is run on the *original* model's inputs at its site and compared
  with the original attention output (relative L2 error), so layers are judged independently;
- no NaN/Inf: the first operator (in graph order) whose output is not finite is named.
"""

from __future__ import annotations

import torch

from lincompile.errors import VerifyError
from lincompile.graph import record
from lincompile.passes.capture import exact_matmul, logit_tolerance


def record_teacher(gm, sites, probe) -> dict:
    """Values of every site's bindings and output in the *original* graph (call before substitute)."""
    nodes = set()
    for s in sites:
        nodes |= set(s.bindings.values())
        nodes.add(s.output)
    return record(gm, nodes, probe)


def site_errors(sites, ops_by_site, teacher) -> dict[str, float]:
    """Relative error of each operator against softmax attention, on the teacher's own inputs."""
    errors = {}
    with torch.no_grad():
        for site in sites:
            op = ops_by_site.get(id(site))
            if op is None:
                continue
            mapping, _ = type(op).bind(site)
            inputs = {arg: teacher[site.bindings[src]] for arg, src in mapping.items()}
            out = op(**inputs).float()
            ref = teacher[site.output].float()
            if not torch.isfinite(out).all():
                raise VerifyError(f"operator {op.name} at {site.module} (layer {site.layer}) produced NaN/Inf "
                                  "on the probe batch; nothing was written")
            errors[site.module] = float((out - ref).norm() / ref.norm().clamp_min(1e-30))
    return errors


def verify(gm, sites, ops_by_site, teacher, probe, reference_logits, tolerance: float) -> dict:
    """Run the converted graph on the probe; raise VerifyError on non-finite output or identity mismatch."""
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
    diff = float((logits.float() - reference_logits.float()).abs().max())
    errors = site_errors(sites, ops_by_site, teacher)
    identity = bool(ops_by_site) and all(op.name == "softmax" for op in ops_by_site.values())
    tolerance = logit_tolerance(tolerance, reference_logits)  # half precision, GPUs: rounding-level slack
    if identity and not diff <= tolerance:
        raise VerifyError(f"identity conversion changed the logits: max abs diff {diff:.3g} > {tolerance:g}")
    return {"logits_max_abs_diff": diff, "site_rel_error": errors, "identity": identity}
