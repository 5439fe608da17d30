"""Healing end to end on a tiny Llama with LoLCATs (window 8, so 32-token blocks exercise the linear part).

One `lincompile apply` with a heal: section converts and heals once for the whole module (captures are the
slow part); the resume and data-parallel tests heal copies of that directory again: a new heal always
starts from the pre-heal weights kept in OUT/heal/original.safetensors.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from lincompile.cli import main

from healkit import austen_text, tiny_model_dir, write_text

SPEC = """\
name: tiny-lolcats
rules:
  - op: lolcats
    params: {window: 8}
heal:
  data: {train: data/train.txt, eval: data/heldout.txt, seq_len: 32, eval_blocks: 4}
  transfer: {steps: 12, lr: 0.01, warmup: 2}
  lora:
    steps: 20
    lr: 0.01
    r: 4
    alpha: 8
    warmup: 2
    batch_size: 2
    distill: {weight: 0.3, temperature: 2.0}
  eval_every: 10
  checkpoint_every: 5
"""
# The resume and data-parallel runs: short, checkpointing often, same global batch (2 sequences).
RERUN = ["--transfer-steps", "3", "--steps", "6", "--checkpoint-every", "2", "--eval-every", "100", "--no-progress"]
SINGLE = RERUN + ["--batch-size", "2"]  # both stages; two processes get --batch-size 1 each
# for the kill test: a tiny model's LoRA step takes tens of milliseconds, so the stage is longer there, to leave
# a window of several steps between its first checkpoint and its last
LONG = ["--transfer-steps", "3", "--steps", "16", "--checkpoint-every", "2", "--eval-every", "100", "--no-progress",
        "--batch-size", "2"]


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def one_line_error(code, output, expected_code, needle):
    assert code == expected_code, output
    errors = [line for line in output.strip().splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], output
    assert "Traceback" not in output


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("heal")
    model = tiny_model_dir(root / "model")
    write_text(root / "data" / "train.txt", austen_text("emma.txt", 0, 24_000))
    write_text(root / "data" / "heldout.txt", austen_text("persuasion.txt", 10_000, 6_000))
    (root / "spec.yaml").write_text(SPEC)
    code, output = run("apply", root / "spec.yaml", model, "-o", root / "out")
    assert code == 0, output
    return root


def tensors(path):
    return load_file(str(path))


def test_apply_heals_and_writes_everything(world):
    out = world / "out"
    heal = out / "heal"
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "metrics.jsonl", "loss.png",
                 "report.json", "config.json", "original.safetensors", "transfer.safetensors"):
        assert (heal / name).is_file(), name
    state = json.loads((heal / "state.json").read_text())
    assert state["status"] == "done"
    # the data fingerprint a resume checks: 24,000 characters of training text in 32-token blocks
    assert set(state["data"]) == {"train", "eval"} and state["data"]["train"]["tokens"] % 32 == 0
    assert len(state["data"]["train"]["sha256"]) == 64
    report = json.loads((heal / "report.json").read_text())
    assert set(report["stages"]) == {"transfer", "lora"}
    assert report["stages"]["lora"]["steps"] == 20 and report["stages"]["lora"]["tokens"] == 20 * 2 * 32
    assert "heal" in json.loads((out / "report.json").read_text())
    assert "heal:" in (out / "spec.yaml").read_text()  # the resolved spec keeps its heal: section
    assert sorted(p.name for p in (heal / "ckpt").iterdir()) == ["lora-0000020", "transfer-0000012"]
    assert not [p for p in heal.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_lora_loss_falls_over_20_steps(world):
    records = [json.loads(line) for line in (world / "out" / "heal" / "metrics.jsonl").read_text().splitlines()]
    lora = [r for r in records if r["stage"] == "lora" and "loss" in r]
    assert [r["step"] for r in lora] == list(range(1, 21))
    ce = [r["ce"] for r in lora]
    assert sum(ce[-5:]) / 5 < sum(ce[:5]) / 5 - 0.05, ce
    assert all("kl" in r and r["kl"] >= 0 for r in lora)  # distillation on (weight 0.3)
    evals = [r["eval"] for r in records if r["stage"] == "lora" and "eval" in r]
    assert [sorted(e) for e in evals] == [["acc", "loss", "ppl"]] * 3  # steps 0, 10, 20
    assert evals[-1]["loss"] < evals[0]["loss"]


def test_attention_transfer_lowers_every_layers_mse(world):
    stage = json.loads((world / "out" / "heal" / "report.json").read_text())["stages"]["transfer"]
    first, last = stage["eval_first"]["layers"], stage["eval_last"]["layers"]
    assert set(first) == {"model.layers.0.self_attn", "model.layers.1.self_attn"}
    for layer in first:
        assert last[layer] < 0.9 * first[layer], (layer, first[layer], last[layer])


def test_only_intended_parameters_change(world):
    out = world / "out"
    after, before = tensors(out / "model.safetensors"), tensors(out / "heal" / "original.safetensors")
    base = {**after, **before}
    changed = {k for k in after if not torch.equal(after[k], base[k])}
    targets = {f"lm.model.layers.{i}.self_attn.{p}_proj.weight" for i in (0, 1) for p in "qkvo"}
    ops = {k for k in after if k.startswith("ops.")}
    assert changed == targets | ops  # every other tensor is bit-identical to before the heal
    assert set(before) == targets | ops  # and exactly those were recorded as originals
    # Stage 2 trains LoRA only: the operators are exactly what attention transfer left.
    transfer = tensors(out / "heal" / "ckpt" / "transfer-0000012" / "trainable.safetensors")
    assert set(transfer) == ops and all(torch.equal(after[k], transfer[k]) for k in ops)
    lora = tensors(out / "heal" / "ckpt" / "lora-0000020" / "trainable.safetensors")
    assert lora and all("lora_A" in k or "lora_B" in k for k in lora)


@pytest.fixture(scope="module")
def merged(world):
    import lincompile

    return lincompile.load(world / "out")


def test_adapters_round_trip_through_peft_and_merge(world, merged):
    from peft import PeftModel

    from lincompile.heal import load_adapter
    from lincompile.heal.outdir import OutDir

    out = world / "out"
    cfg = json.loads((out / "heal" / "adapter" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["peft_type"]) == (4, 8, "LORA")
    expected = sorted(f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qkvo")
    assert sorted(cfg["target_modules"]) == expected
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(0))
    unmerged = load_adapter(out)
    with torch.no_grad():
        a, b = unmerged(ids), merged(ids)
    assert torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())
    # lincompile.load loads either form: the adapter directory itself gives the unmerged model too.
    import lincompile

    with torch.no_grad():
        c = lincompile.load(out / "heal" / "adapter")(ids)
    assert torch.allclose(c, a, atol=1e-6)
    # Plain peft on the original HF model: merging the adapter gives the merged weights OUT holds.
    outdir = OutDir(out)
    original = outdir.build_lm()
    hf = PeftModel.from_pretrained(original, str(out / "heal" / "adapter")).merge_and_unload()
    saved = tensors(out / "model.safetensors")
    for name, value in hf.state_dict().items():
        if f"lm.{name}" in saved:
            assert torch.allclose(value, saved[f"lm.{name}"], atol=1e-6), name


def test_eval_is_reproducible_and_side_by_side(world, merged):
    from lincompile.heal.data import read_documents, tokenize
    from lincompile.heal.outdir import OutDir

    out, text = world / "out", world / "data" / "heldout.txt"
    code, output = run("eval", out, "--data", text, "--context", "16", "32", "--max-tokens", "640", "--json")
    assert code == 0, output
    result = json.loads(output[output.index("{"):])
    assert set(result["context"]) == {"16", "32"}
    # Recomputed independently: the same windows, plain cross-entropy and argmax.
    outdir = OutDir(out)
    stream = tokenize(read_documents([str(text)]), outdir.tokenizer())[:640]
    original = outdir.build_lm()
    for ctx in (16, 32):
        ids = stream[: 640 // ctx * ctx].view(-1, ctx)
        for name, fwd in (("converted", merged), ("original", lambda x: original(input_ids=x).logits)):
            with torch.no_grad():
                logits = fwd(ids)[:, :-1]
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, 128), ids[:, 1:].reshape(-1))
            acc = float((logits.argmax(-1) == ids[:, 1:]).float().mean())
            row = result["context"][str(ctx)]
            got = row if name == "converted" else row["original"]
            assert got["ppl"] == pytest.approx(float(nll.exp()), rel=1e-5) and got["acc"] == pytest.approx(acc)
            assert got["tokens"] == ids.shape[0] * (ctx - 1)
        row = result["context"][str(ctx)]
        assert row["recovery"] == pytest.approx(row["acc"] / row["original"]["acc"])
        assert row["ppl_ratio"] == pytest.approx(row["ppl"] / row["original"]["ppl"])
    code, table = run("eval", out, "--data", text, "--context", "32", "--max-tokens", "320")
    header, row = table.strip().splitlines()[-2:]
    assert code == 0 and header.split()[:3] == ["context", "PPL", "acc"] and "recovery" in header
    assert row.split()[0] == "32" and row.split()[-2].endswith("%") and row.split()[-1] == "310"
    # A plain model (not an OUT dir) is the one scored: its own PPL and accuracy, no comparison columns.
    code, output = run("eval", world / "model", "--data", text, "--context", "32", "--max-tokens", "640", "--json")
    assert code == 0, output
    plain = json.loads(output[output.index("{"):])["context"]["32"]
    assert "original" not in plain and plain["ppl"] == pytest.approx(result["context"]["32"]["original"]["ppl"])
    code, table = run("eval", world / "model", "--data", text, "--context", "32", "--max-tokens", "640")
    header, row = table.strip().splitlines()[-2:]
    assert code == 0 and header.split() == ["context", "PPL", "acc", "tokens"], table
    assert row.split()[1] == f"{plain['ppl']:.2f}" and row.split()[-1] == "620"


def snapshot(root):
    """Every file under `root` with its size and modification time: what "left as it was" compares."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


def test_heal_and_eval_errors(world, tmp_path):
    out = world / "out"
    before = snapshot(out)
    one_line_error(*run("heal", tmp_path, "--data", "x.txt"), 2, "not a lincompile output directory")
    one_line_error(*run("heal", out, "--data", tmp_path / "missing.txt"), 2, "data not found")
    (tmp_path / "blob.txt").write_bytes(b"\x00\x01" * 200)
    one_line_error(*run("heal", out, "--data", tmp_path / "blob.txt"), 2, "binary file")
    one_line_error(*run("eval", out, "--data", tmp_path / "blob.txt"), 2, "binary file")
    one_line_error(*run("heal", out, "--resume", "--steps", "3"), 2, "remove --steps")
    limit = json.loads((out / "config.json").read_text())["max_position_embeddings"]
    one_line_error(*run("eval", out, "--data", world / "data" / "heldout.txt", "--context", limit + 1), 2,
                   f"--context {limit + 1} is longer than {out} takes ({limit} tokens")
    one_line_error(*run("heal", out, "--data", world / "data" / "heldout.txt", "--seq-len", limit + 1), 2,
                   f"heal.data.seq_len {limit + 1} is longer than {out} takes ({limit} tokens")
    fresh = tmp_path / "fresh"
    shutil.copytree(out, fresh, ignore=shutil.ignore_patterns("heal"))
    one_line_error(*run("heal", fresh, "--resume"), 2, "nothing to resume")
    # --config FILE must have its settings under heal: (a bare mapping is not taken for the defaults)
    bare = write_text(tmp_path / "bare.yaml", "data: {train: x.txt}\nlora: {steps: 3}\n")
    one_line_error(*run("heal", out, "--config", bare), 2, f"{bare}: no top-level heal: key (its top-level keys: "
                   "data, lora)")
    # A warm-up as long as the stage is refused before anything runs.
    one_line_error(*run("heal", out, "--data", world / "data" / "train.txt", "--steps", "3", "--warmup", "5"), 2,
                   "heal.lora.warmup (5 steps) must be shorter than the lora stage (3 steps)")
    # Nothing was written by the failed runs.
    assert snapshot(out) == before


def test_the_warmup_of_a_stage_that_does_not_run_is_not_checked(world, tmp_path):
    """liger_gla has no parameters, so attention transfer is skipped: --warmup is checked against LoRA only
    (checked against transfer's 2 steps too, this heal was refused)."""
    spec = write_text(tmp_path / "gla.yaml", "rules:\n  - op: liger_gla\n")
    out = tmp_path / "out"
    assert run("apply", spec, world / "model", "-o", out)[0] == 0
    code, output = run("heal", out, "--data", world / "data" / "train.txt", "--seq-len", "32", "--transfer-steps",
                       "2", "--steps", "3", "--warmup", "2")
    assert code == 0 and "attention transfer skipped" in output, output


def test_heal_help_shows_the_defaults():
    code, output = run("heal", "--help")
    assert code == 0, output
    flat = " ".join(output.split())
    for option, default in (("--steps", "100"), ("--lr", "0.001"), ("--transfer-steps", "100"), ("--r", "8"),
                            ("--seq-len", "512"), ("--batch-size", "1"), ("--clip", "1.0"), ("--eval-every", "50"),
                            ("--checkpoint-every", "25"), ("--tokenizer", "auto"), ("--stage", "all")):
        assert f"[default: {default}" in flat.split(f"{option} ", 1)[1].split("--", 1)[0], (option, flat)


def test_stages_healed_one_at_a_time_build_on_each_other(world, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(world / "out", out)
    leftovers = plant_temporaries(out)
    unhealed = tensors(out / "heal" / "original.safetensors")
    targets = [k for k in unhealed if k.startswith("lm.")]
    ops = [k for k in unhealed if k.startswith("ops.")]
    # Attention transfer again: from the unhealed weights, so the LoRA trained for the old operators is dropped.
    code, output = run("heal", out, "--stage", "transfer", "--transfer-steps", "3", "--no-progress")
    assert code == 0, output
    assert not [p for p in leftovers if p.exists()]
    assert "the LoRA of the earlier heal is dropped" in output and f"lincompile heal {out} --stage lora" in output
    transferred, model = tensors(out / "heal" / "transfer.safetensors"), tensors(out / "model.safetensors")
    assert sorted(transferred) == sorted(ops) and all(torch.equal(model[k], transferred[k]) for k in ops)
    assert not all(torch.equal(model[k], unhealed[k]) for k in ops)
    assert all(torch.equal(model[k], unhealed[k]) for k in targets) and not (out / "heal" / "adapter").exists()
    # LoRA alone: on top of that attention transfer, which stays as it was.
    lora = ["--stage", "lora", "--steps", "3", "--no-progress"]
    code, output = run("heal", out, *lora)
    assert code == 0, output
    assert "keeps the operator parameters of its attention transfer" in output
    model = tensors(out / "model.safetensors")
    assert all(torch.equal(model[k], transferred[k]) for k in ops)
    assert all(not torch.equal(model[k], unhealed[k]) for k in targets)
    assert (out / "heal" / "adapter" / "adapter_model.safetensors").is_file()
    report = json.loads((out / "heal" / "report.json").read_text())
    assert set(report["stages"]) == {"lora"} and report["kept"]["transfer"]["steps"] == 3
    assert json.loads((out / "report.json").read_text())["heal"]["kept"]["transfer"]["steps"] == 3
    # The same LoRA heal again gives the same model: it replaces the LoRA, it does not stack on it.
    code, output = run("heal", out, *lora)
    assert code == 0, output
    again = tensors(out / "model.safetensors")
    assert all(torch.equal(again[k], model[k]) for k in model)


LIGER = """\
name: tiny-liger
rules:
  - op: liger_gla
heal:
  data: {train: %s, seq_len: 32}
"""


def test_apply_checks_the_heal_data_before_converting(world, tmp_path):
    spec, out = tmp_path / "spec.yaml", tmp_path / "out"
    spec.write_text(LIGER % "missing.txt")
    one_line_error(*run("apply", spec, world / "model", "-o", out), 2, "data not found")
    assert not out.exists()  # refused before the conversion
    write_text(tmp_path / "short.txt", "hello world")  # readable, but shorter than one block of 32 tokens
    spec.write_text(LIGER % "short.txt")
    code, output = run("apply", spec, world / "model", "-o", out)
    one_line_error(code, output, 2, "text shorter than one block")
    assert f"{out} was written, converted but not healed" in output and f"run `lincompile heal {out}`" in output
    assert (out / "model.safetensors").is_file() and not (out / "heal").exists()


def test_a_heal_with_nothing_to_do_leaves_out_as_it_was(world, tmp_path):
    spec, out = tmp_path / "spec.yaml", tmp_path / "out"
    spec.write_text(LIGER % (world / "data" / "train.txt"))  # liger_gla: no operator parameters
    code, output = run("apply", spec, world / "model", "-o", out, "--no-heal")
    assert code == 0, output
    code, output = run("heal", out, "--stage", "lora", "--steps", "2", "--no-progress")
    assert code == 0, output
    assert (out / "heal" / "adapter" / "adapter_model.safetensors").is_file()
    before = snapshot(out)
    code, output = run("heal", out, "--stage", "transfer", "--no-progress")
    assert code == 0, output
    assert "attention transfer skipped" in output and "nothing to do" in output
    assert "matplotlib" not in output
    assert snapshot(out) == before


# --------------------------------------------------------------------------------------------------
# Resume after kill -9, and data parallelism: both must give what one uninterrupted process gives.


def _heal_copy(world, tmp_path_factory, args):
    ref = tmp_path_factory.mktemp("ref") / "out"
    shutil.copytree(world / "out", ref)
    code, output = run("heal", ref, *args)
    assert code == 0, output
    # A second heal starts again from the pre-heal weights, which stay recorded as they were, and says so.
    assert f"note: {ref} was healed before; this heal starts again from the unhealed weights" in output
    first = tensors(world / "out" / "heal" / "original.safetensors")
    again = tensors(ref / "heal" / "original.safetensors")
    assert set(first) == set(again) and all(torch.equal(first[k], again[k]) for k in first)
    return ref


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):
    return _heal_copy(world, tmp_path_factory, SINGLE)


@pytest.fixture(scope="module")
def long_reference(world, tmp_path_factory):
    return _heal_copy(world, tmp_path_factory, LONG)


def assert_same_result(a, b, atol=1e-6):
    for rel in ("model.safetensors", "heal/adapter/adapter_model.safetensors"):
        x, y = tensors(a / rel), tensors(b / rel)
        assert set(x) == set(y)
        for k in x:
            assert torch.allclose(x[k], y[k], atol=atol, rtol=1e-5), (rel, k, float((x[k] - y[k]).abs().max()))


def subprocess_env():
    # One intra-op thread as in this process (conftest), so both runs reduce in the same order.
    return {**os.environ, "OMP_NUM_THREADS": "1", "LINCOMPILE_TEST_THREADS": "1"}


def test_resume_after_kill_equals_uninterrupted(world, long_reference, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(world / "out", out)
    shutil.rmtree(out / "heal" / "ckpt", ignore_errors=True)  # an earlier heal's: this run's are watched for
    log = tmp_path / "heal.log"  # a file, not a pipe: nobody reads it until the end
    proc = subprocess.Popen([sys.executable, "-m", "lincompile", "heal", str(out), *LONG], cwd=tmp_path,
                            env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=log.open("w"))
    root = out / "heal" / "ckpt"

    def mid_stage_2():  # a LoRA checkpoint before the last step (16); each removes the one before
        return any(p.name in {f"lora-{s:07d}" for s in range(2, 16, 2)} for p in root.glob("lora-*"))

    deadline = time.time() + 240
    while not mid_stage_2() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    assert proc.poll() is None, f"the run ended before it could be killed: {log.read_text()[-2000:]}"
    assert mid_stage_2(), f"no LoRA checkpoint within 240 s: {log.read_text()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)  # mid-stage-2, whatever it is doing now
    proc.wait()
    assert json.loads((out / "heal" / "state.json").read_text())["status"] == "running"
    leftovers = plant_temporaries(out)  # as a kill during an atomic write leaves them
    # Gradient checkpointing changes memory, not results: a run that ran out of memory may resume with it.
    code, output = run("heal", out, "--resume", "--no-progress", "--gradient-checkpointing")
    assert code == 0, output
    assert not [p for p in leftovers if p.exists()] and "temporary file(s) an interrupted heal left" in output
    assert_same_result(out, long_reference)
    steps = [(r["stage"], r["step"]) for r in map(json.loads, (out / "heal" / "metrics.jsonl").read_text().splitlines())
             if "loss" in r]
    assert steps == [("transfer", s) for s in (1, 2, 3)] + [("lora", s) for s in range(1, 17)]  # none twice


def plant_temporaries(out):
    """The leftovers of atomic writes a kill interrupted: model, heal files, adapter and checkpoint directories."""
    made = [out / ".model.safetensors.k3j2.tmp", out / "heal" / ".config.json.x81.tmp",
            out / "heal" / ".original.safetensors.q.tmp", out / "heal" / ".loss.png.z9.png"]
    for p in made:
        p.write_bytes(b"partial")
    for d in (out / "heal" / ".adapter.tmp-ab", out / "heal" / "ckpt" / ".lora-0000004.tmp-cd"):
        d.mkdir(parents=True)
        (d / "adapter_model.safetensors").write_bytes(b"partial")
        made.append(d)
    return made


def test_gradient_checkpointing_heals_to_the_same_result(world, tmp_path):
    # Both stages recompute their layers in backward (tests/test_remat.py has the memory), LoRA dropout
    # included (its masks are drawn again in the recomputation): the same weights as without.
    plain, remat = tmp_path / "plain", tmp_path / "remat"
    args = [a for a in SINGLE if a != "--no-progress"] + ["--dropout", "0.2"]
    for out, extra in ((plain, []), (remat, ["--gradient-checkpointing"])):
        shutil.copytree(world / "out", out)
        code, output = run("heal", out, *args, *extra)
        assert code == 0, output
    assert "gradient checkpointing (transfer): 2 layers recompute" in output
    assert "gradient checkpointing (lora): 2 layers recompute" in output
    assert "the LM head (linear) and the loss run a chunk of tokens at a time" in output
    assert_same_result(remat, plain)
    saved = json.loads((remat / "heal" / "config.json").read_text())
    assert saved["transfer"]["gradient_checkpointing"] is saved["lora"]["gradient_checkpointing"] is True


def test_resume_on_other_data_is_refused(world, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(world / "out", out, ignore=shutil.ignore_patterns("ckpt"))
    config = json.loads((out / "heal" / "config.json").read_text())
    state = json.loads((out / "heal" / "state.json").read_text())
    # The same file, edited since the heal started: one word changed.
    text = (world / "data" / "train.txt").read_text().replace(" the ", " a ", 1)
    config["data"]["train"] = [str(write_text(tmp_path / "train.txt", text))]
    (out / "heal" / "config.json").write_text(json.dumps(config))
    (out / "heal" / "state.json").write_text(json.dumps({**state, "status": "running"}))
    before = snapshot(out)
    one_line_error(*run("heal", out, "--resume", "--no-progress"), 2,
                   "the healing data changed since this heal started")
    _, output = run("heal", out, "--resume", "--no-progress")
    assert "start over with --restart" in output and "then train" in output and "now train" in output
    assert snapshot(out) == before


def test_damaged_files_are_named_with_what_to_do(world, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(world / "out", out, ignore=shutil.ignore_patterns("ckpt"))
    data = ["--data", world / "data" / "train.txt", "--no-progress"]
    (out / "heal" / "config.json").write_text('{"data": {"train": [')  # cut short
    one_line_error(*run("heal", out, "--resume"), 1, f"{out}/heal/config.json is damaged")
    (out / "heal" / "state.json").write_text("\x00garbage")
    code, output = run("heal", out, *data)
    one_line_error(code, output, 1, f"{out}/heal/state.json is damaged")
    assert "--restart" in output
    model = out / "model.safetensors"
    whole = model.read_bytes()
    model.write_bytes(whole[: len(whole) // 2])  # truncated
    code, output = run("heal", out, *data, "--restart")
    one_line_error(code, output, 1, f"{model} is damaged")
    assert "lincompile apply" in output
    # Loaded before anything is written: the failed runs left the heal files as they were.
    assert (out / "heal" / "config.json").read_text() == '{"data": {"train": ['
    model.unlink()
    fresh = tmp_path / "fresh"
    shutil.copytree(out, fresh, ignore=shutil.ignore_patterns("heal"))
    one_line_error(*run("heal", fresh, *data), 1, f"{fresh}/model.safetensors is missing")
    assert not (fresh / "heal").exists()


def test_a_second_heal_of_the_same_out_is_refused(world, tmp_path):
    out = world / "out"
    before = snapshot(out)
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"
                               "fd = os.open(sys.argv[1], os.O_RDONLY)\nfcntl.flock(fd, fcntl.LOCK_EX)\n"
                               "print('locked', flush=True)\ntime.sleep(60)", str(out)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, output = run("heal", out, "--data", world / "data" / "train.txt", "--restart")
        one_line_error(code, output, 2, f"{out} is being healed by another process (pid {holder.pid})")
        one_line_error(*run("heal", out, "--resume"), 2, "is being healed by another process")
    finally:
        holder.kill()
        holder.wait()
    assert snapshot(out) == before


def test_two_gloo_processes_equal_one_process(world, reference, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(world / "out", out)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "lincompile", "heal", str(out), *RERUN, "--batch-size", "1"]
    done = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    # The gradient all-reduce sums in another order than one process does, and Adam's per-parameter
    # normalisation turns those last-bit differences into ~1e-5 parameter differences after a few steps.
    assert_same_result(out, reference, atol=1e-4)
    report = json.loads((out / "heal" / "report.json").read_text())
    assert report["stages"]["lora"]["tokens"] == 6 * 2 * 32  # global batch of 2 sequences


# --------------------------------------------------------------------------------------------------
# lm-evaluation-harness adapter, on a task defined from a file of the test suite

TOY_TASK = """\
task: lincompile_toy
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""


def test_lm_eval_adapter_on_a_local_task(world, merged, tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    from types import SimpleNamespace

    from lm_eval.tasks import TaskManager

    from lincompile.heal.lm_eval_adapter import LincompileLM

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    data = Path(__file__).parent / "data" / "lm_eval_toy.jsonl"
    write_text(tmp_path / "tasks" / "toy.yaml", TOY_TASK.format(data=data))
    manager = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
    lm = LincompileLM(model=merged)
    result = lm_eval.simple_evaluate(model=lm, tasks=["lincompile_toy"], task_manager=manager, bootstrap_iters=0)
    acc = result["results"]["lincompile_toy"]["acc,none"]
    # The harness's accuracy is the argmax over the adapter's choice log-likelihoods, checked by hand.
    docs = [json.loads(line) for line in data.read_text().splitlines()]
    hits = 0
    for doc in docs:
        scores = [s for s, _ in lm.loglikelihood([SimpleNamespace(args=(doc["context"], c)) for c in doc["choices"]])]
        hits += int(max(range(len(scores)), key=scores.__getitem__) == doc["answer"])
    assert acc == pytest.approx(hits / len(docs))
    # One log-likelihood recomputed from the model's logits.
    tok = merged.tokenizer
    ctx, cont = tok("Emma Woodhouse,")["input_ids"], tok("Emma Woodhouse, handsome")["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(merged(torch.tensor([cont]))[0, :-1], -1)
    manual = float(sum(logp[i - 1, cont[i]] for i in range(len(ctx), len(cont))))
    got, _ = lm.loglikelihood([SimpleNamespace(args=("Emma Woodhouse,", " handsome"))])[0]
    assert got == pytest.approx(manual, abs=1e-4)
    rolling = lm.loglikelihood_rolling([SimpleNamespace(args=("Emma Woodhouse, handsome",))])[0]
    ids = [lm.prefix_token] + cont
    with torch.no_grad():
        logp = torch.log_softmax(merged(torch.tensor([ids]))[0, :-1], -1)
    assert rolling == pytest.approx(float(sum(logp[i, ids[i + 1]] for i in range(len(cont)))), abs=1e-4)
    text = lm.generate_until([SimpleNamespace(args=("Emma", {"until": ["\n"], "max_gen_toks": 5}))])[0]
    assert isinstance(text, str) and "\n" not in text
    # The command line: the same task through `lincompile lm-eval` (it loads OUT itself).
    code, output = run("lm-eval", world / "out", "--tasks", "lincompile_toy", "--include-path", tmp_path / "tasks",
                       "--json")
    assert code == 0, output
    assert json.loads(output[output.index("{"):])["results"]["lincompile_toy"]["acc,none"] == pytest.approx(acc)
