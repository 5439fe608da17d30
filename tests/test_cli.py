"""The command line end to end on a tiny model directory, and every bad input with its one-line error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from lincompile.cli import main

from conftest import tiny_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(path)
    return path


def run(*args, stdout_only=False):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, (result.stdout if stdout_only else result.output)


def one_line_error(code, output, expected_code, needle):
    assert code == expected_code, output
    lines = [line for line in output.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], output
    assert "Traceback" not in output


def test_apply_identity_writes_everything(model_dir, tmp_path):
    out = tmp_path / "out"
    code, output = run("apply", "identity", model_dir, "-o", out)
    assert code == 0, output
    assert "sites: 2 found, softmax: 2" in output
    for name in ("model.safetensors", "spec.yaml", "config.json", "report.json", "report.md", "lincompile.json"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    for key in ("model", "spec", "sites", "capture_max_abs_diff", "site_rel_error", "timings_s", "versions"):
        assert key in report
    assert set(report["timings_s"]) >= {"load", "capture", "match", "substitute", "verify", "save"}
    assert report["sites"][0] == {"module": "model.layers.0.self_attn", "layer": 0, "pattern": "sdpa", "op": "softmax"}
    assert report["site_rel_error"]["model.layers.1.self_attn"] < 1e-6
    assert "torch" in (out / "spec.yaml").read_text()  # versions recorded with the resolved spec
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind


def test_existing_output_needs_overwrite(model_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    one_line_error(*run("apply", "identity", model_dir, "-o", out), 2, "already exists: pass --overwrite")
    code, output = run("apply", "identity", model_dir, "-o", out, "--overwrite")  # an empty folder
    assert code == 0, output
    code, output = run("apply", "identity", model_dir, "-o", out, "--overwrite")  # an earlier output
    assert code == 0 and (out / "lincompile.json").is_file(), output


def test_overwrite_never_replaces_what_lincompile_did_not_write(model_dir, tmp_path, monkeypatch):
    victim = tmp_path / "notes"
    (victim / "sub").mkdir(parents=True)
    (victim / "notes.txt").write_text("keep me")
    one_line_error(*run("apply", "identity", model_dir, "-o", victim, "--overwrite"), 2,
                   "is not a lincompile output directory (no lincompile.json)")
    afile = tmp_path / "afile"
    afile.write_text("keep me too")
    one_line_error(*run("apply", "identity", model_dir, "-o", afile, "--overwrite"), 2, "is not a directory")
    link = tmp_path / "link"
    link.symlink_to(victim)
    one_line_error(*run("apply", "identity", model_dir, "-o", link, "--overwrite"), 2, "is a symbolic link")
    link.unlink()
    monkeypatch.chdir(victim / "sub")
    for here in (".", "..", str(victim)):
        one_line_error(*run("apply", "identity", model_dir, "-o", here, "--overwrite"), 2, "not the current directory")
    assert (victim / "notes.txt").read_text() == "keep me" and (victim / "sub").is_dir()
    assert afile.read_text() == "keep me too" and sorted(p.name for p in tmp_path.iterdir()) == ["afile", "notes"]


def test_load_in_fresh_process_reproduces_logits(model_dir, tmp_path):
    out = tmp_path / "out"
    assert run("apply", "liger-attention", model_dir, "-o", out)[0] == 0
    import lincompile

    ids = torch.randint(0, 128, (2, 19), generator=torch.Generator().manual_seed(1))
    expected = lincompile.load(out)(ids)
    torch.save(ids, tmp_path / "ids.pt")
    script = (
        "import sys, torch, lincompile\n"
        f"ids = torch.load({str(tmp_path / 'ids.pt')!r})\n"
        f"m = lincompile.load({str(out)!r})\n"
        f"torch.save(m(ids).detach(), {str(tmp_path / 'logits.pt')!r})\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    got = torch.load(tmp_path / "logits.pt")
    assert torch.equal(got, expected.detach())


def test_match_dry_run_table(model_dir):
    code, output = run("match", "liger-attention", model_dir)
    assert code == 0, output
    assert "2 sites" in output and "model.layers.1.self_attn" in output and "causal" in output
    code, output = run("match", "liger-attention", model_dir, "--json", stdout_only=True)
    data = json.loads(output)
    assert [s["layer"] for s in data["sites"]] == [0, 1]
    assert data["sites"][0]["bindings"]["k_pre_rope"] != "absent"


def test_overwrite_refuses_an_output_that_is_being_healed(model_dir, tmp_path):
    from lincompile.heal.outdir import lock

    out = tmp_path / "out"
    assert run("apply", "identity", model_dir, "-o", out)[0] == 0
    with lock(out):  # what a running heal holds
        one_line_error(*run("apply", "identity", model_dir, "-o", out, "--overwrite"), 2, "is being healed")
    assert run("apply", "identity", model_dir, "-o", out, "--overwrite")[0] == 0


def test_match_dry_run_shows_the_sites_then_why_the_spec_fails(model_dir, tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text("rules:\n  - op: softmax\n    layers: [7]\n")  # a layer the model does not have
    code, output = run("match", spec, model_dir)
    assert code == 2 and "2 sites" in output and "(spec error)" in output, output
    assert output.strip().splitlines()[-1].startswith(f"error: {spec}:3:")
    code, stdout = run("match", spec, model_dir, "--json", stdout_only=True)
    data = json.loads(stdout)
    assert code == 2 and len(data["sites"]) == 2 and data["error"].startswith(f"{spec}:3:")


def test_validate_and_specs():
    code, output = run("validate", "liger-attention")
    assert code == 0 and output.startswith("ok:")


def test_validate_shows_each_rules_scope_and_checks_heal_data(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text("rules:\n  - {modules: 'model\\.layers\\.[01]\\..*', op: keep}\n  - {mask: sliding, op: keep}\n"
                    "  - {op: liger_attention}\nheal:\n  data: {train: [corpus.txt]}\n")
    one_line_error(*run("validate", spec), 2, f"{spec}: heal.data: not found: {tmp_path / 'corpus.txt'}")
    (tmp_path / "corpus.txt").write_text("text " * 100)
    code, output = run("validate", spec)
    assert code == 0 and output.strip().endswith(
        "keep (layers all, modules model\\.layers\\.[01]\\..*), keep (layers all, mask sliding), "
        "liger_attention (layers all)"), output
    code, output = run("specs")
    assert code == 0 and "liger-attention" in output and "identity" in output
    code, output = run("specs", "show", "identity")
    assert code == 0 and "op: softmax" in output
    one_line_error(*run("specs", "show", "identty"), 2, 'did you mean "identity"')


def test_spec_errors_exit_2(tmp_path, model_dir):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  - op: softmax\n    layers: [7]\n")
    one_line_error(*run("apply", bad, model_dir, "-o", tmp_path / "o"), 2,
                   f"{bad}:3:13: layer 7 is out of range: the model has attention layers 0-1")
    bad.write_text("rules:\n  - op: softmax\n    modules: 'nothing\\..*'\n")
    one_line_error(*run("apply", bad, model_dir, "-o", tmp_path / "o"), 2, "selects no site")
    bad.write_text("rules: [\n")
    one_line_error(*run("validate", bad), 2, "invalid YAML")
    one_line_error(*run("validate", tmp_path / "missing.yaml"), 2, "spec file not found")
    assert not (tmp_path / "o").exists()


def test_model_errors(tmp_path):
    one_line_error(*run("apply", "identity", tmp_path / "no-such-model", "-o", tmp_path / "o"), 2, "model not found")
    from transformers import ViTConfig

    vit = tmp_path / "vit"
    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32).save_pretrained(vit)
    one_line_error(*run("apply", "identity", vit, "-o", tmp_path / "o"), 2, "is not a causal LM")


def test_a_lincompile_output_or_a_checkpoint_missing_weights_is_not_a_model(model_dir, tmp_path):
    """transformers only logs weights it could not find and initialises them at random: converting that would
    linearise noise. An earlier lincompile output (its tensors are named lm.*) and a checkpoint of another
    architecture are refused in one line, before anything is written."""
    out = tmp_path / "out"
    assert run("apply", "identity", model_dir, "-o", out)[0] == 0
    one_line_error(*run("apply", "identity", out, "-o", tmp_path / "again"), 2, "is a lincompile output directory")
    from safetensors.torch import load_file, save_file

    partial = tmp_path / "partial"
    partial.mkdir()
    for f in model_dir.iterdir():
        (partial / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(partial / "model.safetensors"))
    dropped = [k for k in tensors if k.endswith("layers.1.self_attn.k_proj.weight")]
    assert dropped
    save_file({k: v for k, v in tensors.items() if k not in dropped}, str(partial / "model.safetensors"),
              metadata={"format": "pt"})
    one_line_error(*run("apply", "identity", partial, "-o", tmp_path / "o"), 2,
                   "1 weight(s) of LlamaForCausalLM are not in the checkpoint (model.layers.1.self_attn.k_proj.weight)")
    assert not (tmp_path / "again").exists() and not (tmp_path / "o").exists()


def test_a_damaged_output_is_named_in_one_line(model_dir, tmp_path):
    """A truncated model.safetensors, a garbled lincompile.json or a missing file: export and load name the
    file (exit 1), instead of a bare SafetensorError or JSONDecodeError."""
    import shutil

    import lincompile
    from lincompile.errors import LincompileError

    out = tmp_path / "out"
    assert run("apply", "identity", model_dir, "-o", out)[0] == 0
    # (and generate says at once, before loading anything, that OUT has no tokenizer: the tiny model has none)
    one_line_error(*run("generate", out, "hi"), 2, "has no tokenizer files")
    cases = {"truncated": lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:100]),
             "garbled": lambda d: (d / "lincompile.json").write_text("{not json"),
             "missing": lambda d: (d / "model.safetensors").unlink()}
    needles = {"truncated": "model.safetensors is damaged", "garbled": "lincompile.json is damaged",
               "missing": "model.safetensors is missing: convert the model again"}
    for case, damage in cases.items():
        d = tmp_path / case
        shutil.copytree(out, d)
        damage(d)
        one_line_error(*run("export", d, "-o", tmp_path / f"{case}.pt2"), 1, needles[case])
        assert not (tmp_path / f"{case}.pt2").exists()
        with pytest.raises(LincompileError, match=needles[case]):
            lincompile.load(d)


def test_sigterm_cleans_up_like_ctrl_c(model_dir, tmp_path, monkeypatch):
    """SIGTERM (timeout, Slurm, docker stop) mid-write: the half-written output is removed, exit 128 + 15."""
    import os
    import signal

    import lincompile.report

    def terminate(report):
        os.kill(os.getpid(), signal.SIGTERM)
        return "unreachable"

    monkeypatch.setattr(lincompile.report, "render_markdown", terminate)
    before = signal.getsignal(signal.SIGTERM)
    code, output = run("apply", "identity", model_dir, "-o", tmp_path / "o")
    assert code == 143 and "terminated (SIGTERM)" in output, output
    assert list(tmp_path.iterdir()) == [], list(tmp_path.iterdir())
    assert signal.getsignal(signal.SIGTERM) is before  # the command's handler is gone after it


def test_scratch_left_by_a_killed_run_is_removed_by_the_next(model_dir, tmp_path):
    """SIGKILL leaves the scratch folder behind; the next run writing the same OUT removes it, but never the
    scratch of a run that is still alive."""
    import os

    import socket

    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    host = socket.gethostname()
    stale = tmp_path / f".o.tmp-{dead}@{host}-abc"
    live = tmp_path / f".o.tmp-{os.getpid()}@{host}-xyz"
    elsewhere = tmp_path / f".o.tmp-{dead}@{host}x-abc"  # another machine's run (a shared filesystem)
    other = tmp_path / f".other.tmp-{dead}@{host}-abc"
    for d in (stale, live, elsewhere, other):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"half")
    assert run("apply", "identity", model_dir, "-o", tmp_path / "o")[0] == 0
    assert not stale.exists() and live.exists() and elsewhere.exists() and other.exists()


def test_unreachable_hub_fails_at_once(tmp_path, monkeypatch):
    """A hub id that is not cached, with the hub unreachable: one line at once, not five logged retries."""
    import socket

    import huggingface_hub.constants

    tried = []

    def refuse(address, timeout=None):
        tried.append(address)
        raise OSError("Name or service not known")

    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "https://huggingface.co")
    monkeypatch.setattr(socket, "create_connection", refuse)
    one_line_error(*run("apply", "identity", "someone/no-such-model", "-o", tmp_path / "o"), 2,
                   "someone/no-such-model is not in the Hugging Face cache and huggingface.co cannot be reached")
    assert tried and tried[0][0] == "huggingface.co" and not (tmp_path / "o").exists()


def test_no_attention_found(tmp_path, model_dir):
    spec = tmp_path / "s.yaml"
    spec.write_text("capture: {attn_implementation: eager}\nrules:\n  - pattern: sdpa\n    op: softmax\n")
    one_line_error(*run("apply", spec, model_dir, "-o", tmp_path / "o"), 2,
                   "0 sites matched; patterns tried: sdpa; the sdpa pattern needs `capture: {attn_implementation: sdpa}`")
    # A user pattern of eager ops on an sdpa capture: the error says which capture would find it.
    text = (ROOT / "specs" / "custom-pattern.yaml").read_text().replace("attn_implementation: eager",
                                                                         "attn_implementation: sdpa")
    spec.write_text(text)
    one_line_error(*run("apply", spec, model_dir, "-o", tmp_path / "o"), 2,
                   "0 sites matched; patterns tried: eager_attention; the graph was captured with sdpa and has 2 "
                   "scaled_dot_product_attention node(s): a pattern of matmul/softmax ops needs `capture: "
                   "{attn_implementation: eager}`")


def test_custom_op_needs_allow_code(tmp_path, model_dir, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    one_line_error(*run("apply", "custom-op", model_dir, "-o", tmp_path / "o"), 2, "pass --allow-code")
    code, output = run("apply", "custom-op", model_dir, "-o", tmp_path / "o", "--allow-code")
    assert code == 0, output
    # The tempered softmax starts at temperature 1: identical to the original.
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert max(report["site_rel_error"].values()) < 1e-6


def test_help_everywhere():
    for cmd in ([], ["apply"], ["match"], ["diff"], ["validate"], ["specs"]):
        code, output = run(*cmd, "--help")
        assert code == 0 and "Usage" in output


def test_diff_in_three_formats(model_dir, tmp_path):
    code, output = run("diff", "liger-attention", model_dir)
    assert code == 0, output
    assert "model.layers.{0..1}.self_attn: aten.scaled_dot_product_attention → lincompile.liger_attention" in output
    for fmt, needle in (("html", "<html"), ("dot", "digraph")):
        target = tmp_path / f"d.{fmt}"
        code, output = run("diff", "liger-attention", model_dir, "--format", fmt, "--layer", "1", "-o", target)
        assert code == 0, output
        assert needle in target.read_text()
    one_line_error(*run("diff", "liger-attention", model_dir, "--layer", "5"), 2,
                   "no converted site in that layer (converted layers: [0, 1])")
    hybrid = tmp_path / "hybrid.yaml"
    hybrid.write_text("rules:\n  - {layers: [0], op: keep}\n  - {op: liger_attention}\n")
    one_line_error(*run("diff", hybrid, model_dir, "--layer", "0"), 2,
                   "--layer 0: that layer is kept as softmax (op: keep), so no pass changed it (converted layers: [1])")
    one_line_error(*run("diff", hybrid, model_dir, "--layer", "5"), 2,
                   "no converted site in that layer (converted layers: [1])")


@pytest.mark.parametrize("cmd", [["apply", "identity", "MODEL", "-o", "OUT"], ["generate", "OUT", "hi"],
                                 ["eval", "OUT", "--data", "x.txt"], ["heal", "OUT", "--data", "x.txt"]])
def test_a_device_the_machine_lacks_is_a_usage_error(cmd, tmp_path):
    """--device is checked when the flags are parsed, before any model is loaded: a typo, or a device this
    machine does not have, is exit code 2 with one line naming the flag; cpu:0 is taken as cpu."""
    cmd = [str(tmp_path / c) if c in ("MODEL", "OUT") else c for c in cmd]
    for device, needle in (("bogus", "'bogus' is not a torch device"), ("cuda:99", "'cuda:99': this machine has")):
        code, output = run(*cmd, "--device", device)
        assert code == 2 and "Invalid value for '--device'" in output and needle in output, output
        assert "Traceback" not in output
    assert not (tmp_path / "OUT").exists()
    from lincompile.cli import DEVICE

    assert DEVICE.convert("cpu:0", None, None) == "cpu"


def test_heal_budget_is_steps_or_tokens(tmp_path):
    """--steps and --tokens (and their --transfer- forms) set one budget two ways: both is a usage error, before
    anything is read."""
    for flags, needle in ((["--steps", "1", "--tokens", "100"], "--steps and --tokens"),
                          (["--transfer-steps", "1", "--transfer-tokens", "9"], "--transfer-steps and --transfer-tokens")):
        one_line_error(*run("heal", tmp_path / "none", "--data", "x.txt", *flags), 2, needle)
