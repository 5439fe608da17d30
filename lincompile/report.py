"""report.json -> report.md and the terminal summary printed by `lincompile apply`."""

from __future__ import annotations


def _layers(sites) -> str:
    layers = sorted(s["layer"] for s in sites if s.get("layer") is not None)
    if not layers:
        return "-"
    runs, start, prev = [], layers[0], layers[0]
    for x in layers[1:] + [None]:
        if x is not None and x == prev + 1:
            prev = x
            continue
        runs.append(f"{start}" if start == prev else f"{start}-{prev}")
        if x is not None:
            start = prev = x
    return ", ".join(runs)


def summary_lines(report: dict) -> list[str]:
    sites = report.get("sites", [])
    by_op: dict[str, list] = {}
    for s in sites:
        by_op.setdefault(s["op"], []).append(s)
    lines = [f"model {report.get('model')} ({report.get('architecture')}), spec {report.get('spec')}",
             f"sites: {report.get('sites_found', len(sites))} found, "
             + "; ".join(f"{op}: {len(v)} (layers {_layers(v)})" for op, v in by_op.items())]
    lines.append(f"capture max abs diff: {report.get('capture_max_abs_diff')}")
    if report.get("logits_max_abs_diff") is not None:
        length = f" ({report['probe_len']} tokens)" if report.get("probe_len") else ""
        lines.append(f"converted vs original logits, max abs diff on the probe{length}: "
                     f"{report['logits_max_abs_diff']:.4g}")
    errs = report.get("site_rel_error") or {}
    if errs:
        vals = sorted(errs.values())
        lines.append(f"per-site relative error vs softmax: min {vals[0]:.3g}, median {vals[len(vals) // 2]:.3g}, "
                     f"max {vals[-1]:.3g}")
    notes = sorted({n for d in report.get("site_details", []) for n in d.get("notes", [])})
    for n in notes:
        lines.append(f"note: {n}")
    t = report.get("timings_s", {})
    if t:
        lines.append("timings (s): " + ", ".join(f"{k} {v:.2f}" for k, v in t.items()))
    return lines


def render_markdown(report: dict) -> str:
    out = [f"# lincompile report: {report.get('spec')} on {report.get('model')}", ""]
    out += [f"- {line}" for line in summary_lines(report)]
    out += ["", "| layer | module | pattern | op | mask | relative error |", "|---|---|---|---|---|---|"]
    errs = report.get("site_rel_error") or {}
    details = {d["module"]: d for d in report.get("site_details", [])}
    for s in report.get("sites", []):
        d = details.get(s["module"], {})
        mask = d.get("mask_kind", "")
        if d.get("window"):
            mask += f" ({d['window']})"
        err = errs.get(s.get("key", s["module"]))
        out.append(f"| {s['layer']} | {s['module']} | {s['pattern']} | {s['op']} | {mask} | "
                   f"{'' if err is None else f'{err:.3g}'} |")
    versions = report.get("versions", {})
    if versions:
        out += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items())]
    return "\n".join(out) + "\n"
