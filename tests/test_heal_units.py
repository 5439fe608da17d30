"""Healing building blocks without a model: data reading and its errors, the heal: spec section, the block
order, the schedule, clipping, checkpoints. Each test runs in well under a second."""

from __future__ import annotations

import json

import pytest
import torch

from lincompile.errors import SpecError, UsageError
from lincompile.heal import checkpoint
from lincompile.heal.config import HealConfig, StageConfig, stage_steps
from lincompile.heal.data import BlockOrder, ByteTokenizer, DataError, get_tokenizer, load_split, read_documents
from lincompile.heal.trainer import _clip, lr_at

from conftest import make_spec


# --------------------------------------------------------------------------------------------------
# Data


def data_error(tmp_path, name, content) -> str:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_split([str(path)], [], ByteTokenizer(), seq_len=64, holdout=0.0)
    message = str(info.value)
    assert "\n" not in message and isinstance(info.value, UsageError)  # one line, exit code 2
    return message


def test_bad_data_inputs_give_one_line_errors(tmp_path):
    assert data_error(tmp_path, "empty.txt", "").endswith("empty.txt: empty file")
    assert data_error(tmp_path, "blank.txt", "  \n\n ").endswith("blank.txt: empty file")
    assert "binary file" in data_error(tmp_path, "model.txt", b"\x7fELF\x00\x01\x02" * 100)
    assert "not UTF-8 text" in data_error(tmp_path, "latin.txt", "caf\xe9 ".encode("latin-1") * 50)
    assert "shorter than one block (11 tokens < seq_len 64)" in data_error(tmp_path, "short.txt", "hello world")
    assert 'unknown data format ".parquet"' in data_error(tmp_path, "x.parquet", "PAR1")
    assert "JSON Lines" in data_error(tmp_path, "x.json", '{"text": "hi"}')
    assert "x.jsonl:2: not valid JSON" in data_error(tmp_path, "x.jsonl", '{"text": "a"}\n{oops\n')
    assert 'x.jsonl:1: each line must be an object with a string "text"' in \
        data_error(tmp_path, "x.jsonl", '{"content": "a"}\n')
    with pytest.raises(DataError, match="data not found: .*nope.txt"):
        read_documents([str(tmp_path / "nope.txt")])
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.csv").write_text("x,y\n")
    with pytest.raises(DataError, match="directory has no text files"):
        read_documents([str(tmp_path / "d")])
    with pytest.raises(DataError, match="no data given"):
        read_documents([])


def test_inputs_directory_jsonl_and_split(tmp_path):
    (tmp_path / "corpus" / "sub").mkdir(parents=True)
    (tmp_path / "corpus" / "b.txt").write_text("b" * 100)
    (tmp_path / "corpus" / "sub" / "a.md").write_text("a" * 100)
    (tmp_path / "corpus" / ".hidden.txt").write_text("h" * 100)
    (tmp_path / "corpus" / "notes.csv").write_text("ignored")
    (tmp_path / "x.jsonl").write_text(json.dumps({"text": "j" * 50}) + "\n\n" + json.dumps({"text": "k" * 50}) + "\n")
    docs = read_documents([str(tmp_path / "corpus"), str(tmp_path / "x.jsonl")])
    assert [d.text[0] for d in docs] == ["b", "a", "j", "k"]  # sorted paths, hidden skipped, csv ignored
    split = load_split([str(tmp_path / "corpus")], [], ByteTokenizer(), seq_len=10, holdout=0.25)
    assert split.train.shape == (15, 10) and split.eval.shape == (5, 10)
    # Held out = the end of the stream: the text of the last document.
    assert bytes(split.eval.flatten().tolist()) == b"a" * 50
    separate = load_split([str(tmp_path / "corpus")], [str(tmp_path / "x.jsonl")], ByteTokenizer(), 10, 0.25)
    assert separate.train.shape == (20, 10) and separate.eval.shape == (10, 10)


def test_tokenizer_fallback_is_explicit():
    with pytest.raises(DataError, match="--tokenizer bytes"):
        get_tokenizer(None, "auto", 1000)
    with pytest.raises(DataError, match="at least 256"):
        get_tokenizer(None, "bytes", 128)
    assert isinstance(get_tokenizer(None, "bytes", 256), ByteTokenizer)


def test_block_order_is_deterministic_and_rank_split():
    blocks = torch.arange(10).view(10, 1)
    order = BlockOrder(10, seed=3)
    first_epoch = order.indices(0, 10)
    assert sorted(first_epoch) == list(range(10)) and first_epoch != list(range(10))
    assert order.indices(10, 10) != first_epoch and sorted(order.indices(10, 10)) == list(range(10))
    assert BlockOrder(10, seed=3).indices(7, 6) == order.indices(7, 6)  # resumable from an index alone
    # One process with batch 4 == two ranks with batch 2, micro-batch by micro-batch.
    for micro in range(5):
        whole = order.micro_batch(blocks, micro, 4)
        halves = [order.micro_batch(blocks, micro, 2, rank=r, world=2) for r in (0, 1)]
        assert torch.equal(whole, torch.cat(halves))


# --------------------------------------------------------------------------------------------------
# The heal: section


HEAL = """
heal:
  data: {train: corpus.txt, seq_len: 128}
  transfer: {steps: 5}
  lora:
    r: 4
    tokens: 4096
    targets: [q_proj, v_proj]
    distill: {weight: 0.5, temperature: 2}
"""


def test_heal_section_parses_resolves_and_round_trips(tmp_path):
    spec_file = tmp_path / "s.yaml"
    spec_file.write_text("rules:\n  - op: lolcats\n" + HEAL)
    from lincompile.spec import Spec

    spec = Spec.from_yaml(spec_file)
    h = spec.heal
    assert h.data.train == [str(tmp_path / "corpus.txt")]  # relative to the spec file
    assert (h.data.seq_len, h.transfer.steps, h.lora.r, h.lora.tokens, h.lora.steps) == (128, 5, 4, 4096, None)
    assert h.lora.targets == ["q_proj", "v_proj"] and h.lora.distill.temperature == 2.0
    resolved = spec.resolved()["heal"]
    again = HealConfig.from_resolved(json.loads(json.dumps(resolved)))
    assert again == h
    assert stage_steps(h.lora, tokens_per_step=1000) == 5  # token budget rounded up to whole steps


@pytest.mark.parametrize("body, where, needle", [
    ("heal:\n  lora: {rank: 4}\n", "4:10", 'unknown key "rank"'),
    ("heal:\n  lora: {r: 0}\n", "4:13", "heal.lora.r must be at least 1"),
    ("heal:\n  lora: {steps: 5, tokens: 9}\n", "4:28", "give steps or tokens, not both"),
    ("heal:\n  lora: {distill: {weight: 2}}\n", "4:28", "must be <= 1"),
    ("heal:\n  lora: {targets: '(q'}\n", "4:19", "not a valid regular expression"),
    ("heal:\n  data: {seq_len: x}\n", "4:19", "must be an integer"),
    ("heal:\n  transfer: {schedule: cosin}\n", "4:24", 'did you mean "cosine"'),
    ("heal:\n  evals_every: 3\n", "4:3", 'did you mean "eval_every"'),
])
def test_heal_section_errors_point_at_file_line_col(body, where, needle):
    with pytest.raises(SpecError) as info:
        make_spec("rules:\n  - op: lolcats\n" + body, "h.yaml")
    msg = str(info.value)
    assert msg.startswith(f"h.yaml:{where}:") and needle in msg, msg


# --------------------------------------------------------------------------------------------------
# Schedule, clipping, checkpoints


def test_warmup_then_cosine():
    cfg = StageConfig(lr=1.0, warmup=4, schedule="cosine", min_lr_ratio=0.1)
    lrs = [lr_at(cfg, s, 20) for s in range(20)]
    assert lrs[:4] == [0.2, 0.4, 0.6, 0.8] and lrs[4] == 1.0
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:])) and lrs[-1] > 0.1
    assert lr_at(StageConfig(lr=0.5, warmup=0, schedule="constant"), 7, 10) == 0.5


def test_default_warmup_is_at_most_a_tenth_of_the_stage():
    cfg = StageConfig(lr=1.0, schedule="constant")  # warmup not given
    assert [lr_at(cfg, s, 4) for s in range(4)] == [1.0] * 4  # a 4-step heal trains at its lr from the start
    assert [lr_at(cfg, s, 30) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]  # 3 steps of warm-up
    assert lr_at(cfg, 9, 500) == pytest.approx(10 / 11) and lr_at(cfg, 10, 500) == 1.0  # capped at 10
    assert lr_at(StageConfig(lr=1.0, warmup=8, schedule="constant"), 0, 4) == pytest.approx(1 / 9)  # as given


def test_clipping_is_applied_per_group():
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(4))
    a.grad, b.grad = torch.full((3,), 4.0), torch.full((4,), 0.1)
    norm = _clip([[a], [b]], max_norm=1.0)
    assert norm == pytest.approx((48 + 0.04) ** 0.5, rel=1e-5)  # the logged norm is the pre-clip norm
    assert float(a.grad.norm()) == pytest.approx(1.0, rel=1e-5)
    assert torch.equal(b.grad, torch.full((4,), 0.1))  # under the limit: untouched


def test_checkpoint_round_trip_and_leftovers_ignored(tmp_path):
    p = torch.nn.Parameter(torch.randn(5))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.grad = torch.randn(5)
    opt.step()
    rng = {"0": torch.get_rng_state()}
    checkpoint.save(tmp_path, "lora", 3, {"w": p}, opt, rng, {"total": 9, "world": 1})
    (tmp_path / "ckpt" / ".lora-0000006.tmp-x").mkdir()  # what a kill during a write leaves
    found = checkpoint.latest(tmp_path, "lora")
    assert found.step == 3
    params, opt_state, rng2, info = checkpoint.load(found)
    assert torch.equal(params["w"], p.detach()) and torch.equal(rng2["0"], rng["0"]) and info["total"] == 9
    fresh = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(5))], lr=0.1)
    fresh.load_state_dict(opt_state)
    saved = opt.state_dict()["state"][0]
    assert all(torch.equal(fresh.state_dict()["state"][0][k], saved[k]) for k in saved)
    checkpoint.save(tmp_path, "lora", 6, {"w": p}, opt, rng, {"total": 9, "world": 1})
    names = sorted(x.name for x in (tmp_path / "ckpt").iterdir())
    assert names == ["lora-0000006"]  # the older one and the leftover are gone


def test_transfer_is_skipped_for_operators_without_parameters():
    from types import SimpleNamespace

    from lincompile.heal.transfer import transfer_stage

    graphs = SimpleNamespace(teacher=object(), teacher_sites=[SimpleNamespace(module="model.layers.0.self_attn")],
                             ops={"ops.model.layers.0.self_attn": torch.nn.Module()})  # e.g. liger_gla
    assert transfer_stage(graphs, StageConfig(), torch.zeros(0, 4, dtype=torch.long)) is None


def test_hf_dataset_input(tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ("one", "", "two")))
    docs = read_documents([f"hf:{tmp_path / 'ds'}"])
    assert [d.text for d in docs] == ["one", "two"]  # empty texts skipped
    with pytest.raises(DataError, match='no "text" column'):
        (tmp_path / "ds2").mkdir()
        (tmp_path / "ds2" / "train.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
        read_documents([f"hf:{tmp_path / 'ds2'}"])


# --------------------------------------------------------------------------------------------------
# Damaged files, the data fingerprint, the warm-up check, the lock, leftovers, the loss plot


def test_a_damaged_checkpoint_is_one_line_that_says_restart(tmp_path):
    from lincompile.errors import LincompileError

    p = torch.nn.Parameter(torch.randn(5))
    opt = torch.optim.AdamW([p], lr=0.1)
    path = checkpoint.save(tmp_path, "lora", 4, {"w": p}, opt, {"0": torch.get_rng_state()}, {"total": 9, "world": 1})
    for name, damage in (("trainable.safetensors", lambda b: b[: len(b) // 2]),
                         ("optimizer.safetensors", lambda b: b[:6]), ("state.json", lambda b: b[:-3])):
        whole = (path / name).read_bytes()
        (path / name).write_bytes(damage(whole))
        with pytest.raises(LincompileError) as info:
            checkpoint.load(checkpoint.latest(tmp_path, "lora"))
        message = str(info.value)
        assert message.startswith(f"checkpoint {path / name} is damaged") and message.endswith("--restart"), message
        assert "\n" not in message
        (path / name).write_bytes(whole)
    checkpoint.load(checkpoint.latest(tmp_path, "lora"))  # whole again


def test_damaged_out_files_name_the_file(tmp_path):
    from lincompile.emit import FORMAT_VERSION
    from lincompile.errors import LincompileError
    from lincompile.heal.outdir import OutDir
    from lincompile.heal.run import saved_config, status
    from safetensors.torch import save_file

    (tmp_path / "lincompile.json").write_text(json.dumps({"format_version": FORMAT_VERSION}))
    out = OutDir(tmp_path)
    with pytest.raises(LincompileError, match=f"{tmp_path}/model.safetensors is missing: convert the model again"):
        out.tensors()
    save_file({"lm.w": torch.zeros(64)}, str(tmp_path / "model.safetensors"))
    whole = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(whole[:-40])
    with pytest.raises(LincompileError, match=r"model.safetensors is damaged \(.*\): convert the model again"):
        out.tensors()
    (tmp_path / "heal").mkdir()
    (tmp_path / "heal" / "state.json").write_text("{")
    (tmp_path / "heal" / "config.json").write_text("[1, 2")
    for read in (status, saved_config):
        with pytest.raises(LincompileError, match=r"heal/(state|config)\.json is damaged .*--restart$"):
            read(tmp_path)
    (tmp_path / "lincompile.json").write_text("{oops")
    with pytest.raises(LincompileError, match="lincompile.json is damaged"):
        OutDir(tmp_path)


def test_the_data_fingerprint_catches_a_changed_token():
    from lincompile.heal.data import Split
    from lincompile.heal.run import _check_same_data, data_fingerprint

    blocks = torch.arange(64).view(4, 16)
    first = data_fingerprint(Split(blocks[:3], blocks[3:], 64, []))
    assert first["train"]["tokens"] == 48 and first["eval"]["tokens"] == 16
    assert data_fingerprint(Split(blocks[:3].clone(), blocks[3:].clone(), 64, [])) == first
    _check_same_data(first, first)
    _check_same_data(None, first)  # a heal started before fingerprints were recorded
    changed = blocks.clone()
    changed[1, 5] = 0
    other = data_fingerprint(Split(changed[:3], changed[3:], 64, []))
    assert other["train"] != first["train"] and other["eval"] == first["eval"]
    with pytest.raises(UsageError) as info:
        _check_same_data(first, other)
    message = str(info.value)
    assert "the healing data changed" in message and "with --restart" in message and "\n" not in message
    with pytest.raises(UsageError, match="then unreadable"):
        _check_same_data({"train": 3}, first)


def test_warmup_must_be_shorter_than_its_stage():
    from lincompile.heal.run import check_warmup

    cfg = HealConfig()
    cfg.lora.steps, cfg.lora.warmup = 10, 9
    check_warmup(cfg)
    cfg.lora.warmup = 10
    with pytest.raises(UsageError, match=r"heal.lora.warmup \(10 steps\) must be shorter than the lora stage \(10"):
        check_warmup(cfg)
    cfg.lora.enabled = False  # a stage that does not run is not checked
    check_warmup(cfg)
    cfg.data.seq_len, cfg.transfer.steps, cfg.transfer.tokens, cfg.transfer.warmup = 512, None, 2048, 4
    with pytest.raises(UsageError, match=r"transfer stage \(4 steps\)"):  # 2048 tokens = 4 steps of 512
        check_warmup(cfg)
    cfg.transfer.warmup = 3
    check_warmup(cfg)


def test_a_second_heal_cannot_take_the_lock(tmp_path):
    import os

    from lincompile.heal.outdir import lock

    with lock(tmp_path):
        with pytest.raises(UsageError) as info:
            with lock(tmp_path):
                pass
        assert str(info.value) == f"{tmp_path} is being healed by another process (pid {os.getpid()})"
    with lock(tmp_path):  # released
        pass
    assert list(tmp_path.iterdir()) == []  # the lock is on the directory itself: no file is written


def test_sweep_removes_only_what_interrupted_writes_leave(tmp_path):
    from lincompile.heal.outdir import sweep_temporaries

    keep = [tmp_path / "model.safetensors", tmp_path / ".gitignore", tmp_path / "heal" / "config.json",
            tmp_path / "heal" / "loss.png", tmp_path / "heal" / "ckpt" / "lora-0000004" / "state.json"]
    gone = [tmp_path / ".model.safetensors.a1.tmp", tmp_path / ".report.json.b2.tmp",
            tmp_path / "heal" / ".state.json.c3.tmp", tmp_path / "heal" / ".transfer.safetensors.d4.tmp",
            tmp_path / "heal" / ".loss.png.e5.png", tmp_path / "heal" / ".adapter.tmp-f6" / "x",
            tmp_path / "heal" / ".adapter.old-77" / "x", tmp_path / "heal" / "ckpt" / ".lora-0000006.tmp-g8" / "x"]
    for p in keep + gone:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("x")
    removed = sweep_temporaries(tmp_path)
    assert len(removed) == len(gone)
    assert all(p.exists() for p in keep) and not any(p.exists() for p in gone)
    assert sweep_temporaries(tmp_path / "nothing-here") == []


def test_loss_plot_notes_a_missing_matplotlib_only(tmp_path, monkeypatch):
    import sys

    from lincompile.heal.run import write_plot

    png, logged = tmp_path / "loss.png", []
    png.write_bytes(b"an earlier heal's curve")
    assert write_plot([], png, logged.append) is None  # nothing ran: nothing to plot, and no false note
    assert logged == [] and not png.exists()
    records = [{"stage": "lora", "step": s, "loss": 3.0 - s / 10} for s in (1, 2, 3)]
    pytest.importorskip("matplotlib")
    assert write_plot(records, png, logged.append) == png and png.stat().st_size > 0 and logged == []
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert write_plot(records, png, logged.append) is None
    assert logged == ["note: matplotlib is not installed: no loss.png (pip install matplotlib)"] and not png.exists()
