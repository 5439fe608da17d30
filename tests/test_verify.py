"""The verify pass's probe: longer than the operators' windows, so their linear part is what gets measured."""

from __future__ import annotations

import lincompile
from lincompile.passes import verify as verify_pass
from lincompile.report import render_markdown, summary_lines

from conftest import make_spec, tiny_model

# One capture per test (captures dominate the time): lolcats in layer 0, swa_sinks in layer 1, windows of 32,
# the default probe's own length.
SPEC = ("name: t\n{capture}rules:\n  - {{layers: [0], op: lolcats, params: {{window: 32}}}}\n"
        "  - {{layers: [1], op: swa_sinks, params: {{window: 32, num_sinks: 4}}}}\n")


def convert(monkeypatch, capture=""):
    """The converted model and what the verify pass returned."""
    seen = []

    def spy(*args, **kwargs):
        seen.append(run(*args, **kwargs))
        return seen[-1]

    run = verify_pass.verify
    monkeypatch.setattr(verify_pass, "verify", spy)
    converted = lincompile.convert(tiny_model("llama"), make_spec(SPEC.format(capture=capture)))
    return converted, seen[0]


def test_probe_outlasts_the_largest_window(monkeypatch):
    # A 32-token probe fits inside a 32-token window, where both operators are exactly softmax attention: the
    # report showed ~1e-7 per site. Twice the window and 8 tokens more reach the linear part / the sinks.
    converted, checks = convert(monkeypatch)
    assert min(converted.report["site_rel_error"].values()) > 1e-3
    assert converted.report["logits_max_abs_diff"] > 1e-3
    assert checks["probe_len"] == converted.report["probe_len"] == 2 * 32 + 8 and checks["notes"] == []
    assert not any(d["notes"] for d in converted.report["site_details"])


def test_probe_capped_inside_the_window_is_noted(monkeypatch):
    converted, checks = convert(monkeypatch, capture="capture: {max_seq_len: 24}\n")
    assert checks["probe_len"] == 24
    note = "probe of 24 tokens fits inside the window 32 of model.layers.0.self_attn: the linear part was not exercised"
    assert checks["notes"][0] == note
    assert note in converted.report["site_details"][0]["notes"]
    assert f"note: {note}" in summary_lines(converted.report)
    assert max(converted.report["site_rel_error"].values()) < 1e-5  # what the note warns about


def test_report_states_the_probe_length():
    report = {"model": "m", "spec": "s", "sites": [], "logits_max_abs_diff": 0.5, "probe_len": 72}
    line = "converted vs original logits, max abs diff on the probe (72 tokens): 0.5"
    assert line in summary_lines(report) and line in render_markdown(report)


def test_long_windows_lengthen_the_probe_only_up_to_its_ceiling():
    import torch

    probe = torch.arange(64).view(2, 32)
    ops = {1: type("Op", (), {"config": {"window": 100_000}})()}
    longer = verify_pass.probe_for(probe, ops, max_len=32768)
    assert longer.shape == (2, verify_pass.LONGEST_PROBE) and torch.equal(longer[:, :32], probe)
    assert set(longer[0].tolist()) <= set(probe[0].tolist())  # more of the probe's own tokens
