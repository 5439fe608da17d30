"""`heal(OUT, config)`: attention transfer, then LoRA, then the healed model written back into OUT.

OUT/heal/
  config.json             the heal configuration as run (what --resume continues)
  state.json              {"status": "running" | "done"}
  original.safetensors    pre-heal values of every tensor healing changes (heal/outdir.py)
  ckpt/<stage>-<step>/    checkpoints (heal/checkpoint.py)
  metrics.jsonl           one record per step and per evaluation
  adapter/                LoRA adapters in peft format
  loss.png                the loss curves (when matplotlib is installed)
  report.json             what ran, and the first/last losses and evaluations of each stage
OUT/model.safetensors     merged weights and trained operator parameters: `lincompile.load(OUT)` is healed

Everything that determines the result is in config.json, the checkpoints and the files heal started from,
so a run killed at any moment and resumed with --resume ends with the result of an uninterrupted run.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from ..emit import write_text_atomic
from ..errors import UsageError
from . import checkpoint
from .config import HealConfig
from .data import BlockOrder, describe, get_tokenizer, load_split
from .distributed import Dist, init, shutdown
from .outdir import OutDir
from .trainer import Metrics, RunContext, run_stage

CONFIG, STATE, REPORT = "config.json", "state.json", "report.json"
STAGES = ("transfer", "lora")


def saved_config(out) -> HealConfig | None:
    path = Path(out) / "heal" / CONFIG
    if not path.exists():
        return None
    return HealConfig.from_resolved(json.loads(path.read_text(encoding="utf-8")), str(path))


def status(out) -> str | None:
    path = Path(out) / "heal" / STATE
    return json.loads(path.read_text(encoding="utf-8")).get("status") if path.exists() else None


def heal(out, cfg: HealConfig | None = None, *, resume: bool = False, restart: bool = False, device: str = "cpu",
         allow_code: bool = False, progress: bool = True, log=print) -> dict:
    """Heal the converted model in OUT. With `resume`, `cfg` is ignored: the saved configuration continues."""
    if cfg is None and not resume:
        raise UsageError("no heal configuration given")
    d = init(device)
    try:
        return _heal(OutDir(out), cfg, d, resume, restart, allow_code, progress, log if d.main else (lambda s: None))
    finally:
        shutdown(d)


def _heal(outdir: OutDir, cfg, d: Dist, resume, restart, allow_code, progress, log) -> dict:
    heal_dir = outdir.heal_dir
    t_start = time.perf_counter()
    if resume:
        cfg = _start(outdir, cfg, d, resume, restart)
    elif cfg is not None and not cfg.data.train:
        raise UsageError("no healing data: pass --data PATH or set heal.data.train in the spec")
    # Data errors are found before anything is written into OUT.
    from ..passes.capture import check_length

    check_length("heal.data.seq_len", cfg.data.seq_len, outdir.root, outdir.config, outdir.spec.capture)
    tokenizer = get_tokenizer(outdir.tokenizer(), cfg.data.tokenizer, outdir.config.vocab_size)
    split = load_split(cfg.data.train, cfg.data.eval, tokenizer, cfg.data.seq_len, cfg.data.holdout)
    if not resume:
        healed_before = status(outdir.root) == "done"
        cfg = _start(outdir, cfg, d, resume, restart)
        if healed_before:
            # Every heal starts from the converted model's unhealed weights (heal/original.safetensors), so that
            # its result depends only on its own config; say so rather than surprise with a worse step 0.
            log(f"note: {outdir.root} was healed before; this heal starts again from the unhealed weights and "
                "replaces that result")
    log(f"data: {describe(split, cfg.data.seq_len)}")
    torch.manual_seed(cfg.seed)  # LoRA A matrices are drawn at build: the same on every run and rank
    for note in split.notes:
        log(f"note: {note}")
    eval_blocks = split.eval[: cfg.data.eval_blocks]

    from .build import build
    from .finetune import lora_stage
    from .lora import ADAPTER_DIR, lora_config, merged_tensors, save_adapter, target_weight_names
    from .transfer import transfer_stage

    base = outdir.base_tensors()
    lm = outdir.build_lm(base, device=d.device)
    graphs = build(lm, outdir.spec, lora_config=lora_config(cfg.lora, outdir) if cfg.lora.enabled else None,
                   with_teacher=cfg.transfer.enabled, allow_code=allow_code, op_state=base)
    log(f"built the converted graph{' with LoRA' if cfg.lora.enabled else ''} in {graphs.seconds:.1f} s")

    ctx = RunContext(heal_dir=heal_dir, dist=d, seq_len=cfg.data.seq_len, eval_every=cfg.eval_every,
                     checkpoint_every=cfg.checkpoint_every, log_every=cfg.log_every, seed=cfg.seed, resume=resume,
                     progress=progress, log=log)
    metrics = Metrics(heal_dir, d.main)
    order = BlockOrder(len(split.train), cfg.data.seed)
    notes, stages_run = list(split.notes), {}
    if cfg.transfer.enabled:
        stage = transfer_stage(graphs, cfg.transfer, eval_blocks, d.device)
        if stage is None:
            note = f"attention transfer skipped: the operators of spec {outdir.spec.name} have no parameters"
            log(f"note: {note}")
            notes.append(note)
        else:
            stages_run["transfer"] = run_stage(stage, split.train, order, ctx, metrics)
    if cfg.lora.enabled:
        stages_run["lora"] = run_stage(lora_stage(graphs, cfg.lora, eval_blocks, d.device), split.train, order, ctx,
                                       metrics)

    if d.main:
        updates = {k: p.detach() for k, p in graphs.op_parameters().items()}
        if graphs.peft_model is not None:
            save_adapter(graphs.peft_model, heal_dir, str(outdir.root.resolve()))
            updates.update(merged_tensors(graphs.lm))
        outdir.keep_originals(list(updates))
        # A previous heal's changes that this one does not make are undone: OUT = base + this heal.
        outdir.write_tensors({**outdir.originals(), **updates})
        if graphs.peft_model is None:
            shutil.rmtree(heal_dir / ADAPTER_DIR, ignore_errors=True)  # a previous heal's, now stale
        report = _report(outdir, cfg, stages_run, notes, split, time.perf_counter() - t_start,
                         target_weight_names(graphs.lm))
        write_text_atomic(heal_dir / REPORT, json.dumps(report, indent=2))
        _attach_to_model_report(outdir, report)
        from .plot import plot_metrics

        png = plot_metrics(metrics.records(), heal_dir / "loss.png")
        if png is None:
            log("note: matplotlib is not installed: no loss.png (pip install matplotlib)")
        write_text_atomic(heal_dir / STATE, json.dumps({"status": "done"}))
        log(f"healed {outdir.root}: {', '.join(f'{k} {v} steps' for k, v in stages_run.items()) or 'nothing to do'}")
    d.barrier()
    return json.loads((heal_dir / REPORT).read_text(encoding="utf-8"))


def _start(outdir: OutDir, cfg: HealConfig | None, d: Dist, resume: bool, restart: bool) -> HealConfig:
    """Fresh start (config written, old checkpoints cleared) or resume (saved config, metrics trimmed)."""
    heal_dir = outdir.heal_dir
    saved = saved_config(outdir.root)
    if resume:
        if saved is None:
            raise UsageError(f"nothing to resume in {heal_dir} (no heal was started there): run without --resume")
        if d.main:
            kept = {s: (c.step if c else -1) for s in STAGES for c in [checkpoint.latest(heal_dir, s)]}
            Metrics(heal_dir, True).trim(kept)
            write_text_atomic(heal_dir / STATE, json.dumps({"status": "running"}))
        d.barrier()
        return saved
    unfinished = saved is not None and status(outdir.root) == "running" and checkpoint.ckpt_root(heal_dir).exists()
    if unfinished and not restart:
        raise UsageError(f"{heal_dir} holds an unfinished heal: pass --resume to continue it or --restart to start "
                         "over")
    if d.main:
        heal_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.clear(heal_dir)
        (heal_dir / "metrics.jsonl").unlink(missing_ok=True)
        write_text_atomic(heal_dir / CONFIG, json.dumps(cfg.resolved(), indent=2))
        write_text_atomic(heal_dir / STATE, json.dumps({"status": "running"}))
    d.barrier()
    return cfg


def _report(outdir, cfg: HealConfig, stages_run: dict, notes, split, seconds: float, targets) -> dict:
    records = Metrics(outdir.heal_dir, True).records()
    stages = {}
    for name, steps in stages_run.items():
        train = [r for r in records if r.get("stage") == name and "loss" in r]
        evals = [r for r in records if r.get("stage") == name and "eval" in r]
        stages[name] = {"steps": steps, "tokens": train[-1]["tokens"] if train else 0,
                        "seconds": train[-1]["elapsed"] if train else 0.0,
                        "loss_first": train[0]["loss"] if train else None,
                        "loss_last": train[-1]["loss"] if train else None,
                        "eval_first": evals[0]["eval"] if evals else None,
                        "eval_last": evals[-1]["eval"] if evals else None}
    return {"config": cfg.resolved(), "stages": stages, "notes": notes, "lora_targets": targets,
            "train_blocks": len(split.train), "eval_blocks": len(split.eval), "wall_seconds": round(seconds, 2)}


def _attach_to_model_report(outdir: OutDir, report: dict) -> None:
    """OUT/report.json gets a `heal` summary (the conversion report stays as it was otherwise)."""
    path = outdir.root / "report.json"
    data = outdir.report
    data["heal"] = {k: report[k] for k in ("stages", "notes", "wall_seconds")}
    write_text_atomic(path, json.dumps(data, indent=2, default=str))
