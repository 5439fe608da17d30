"""`heal(OUT, config)`: attention transfer, then LoRA, then the healed model written back into OUT.

OUT/heal/
  config.json             the heal configuration as run (what --resume continues)
  state.json              {"status": "running" | "done", "data": fingerprint of the token blocks}
  original.safetensors    pre-heal values of every tensor healing changes (heal/outdir.py)
  transfer.safetensors    the operator parameters the last attention transfer trained
  ckpt/<stage>-<step>/    checkpoints (heal/checkpoint.py)
  metrics.jsonl           one record per step and per evaluation
  adapter/                LoRA adapters in peft format
  loss.png                the loss curves (when matplotlib is installed)
  report.json             what ran, and the first/last losses and evaluations of each stage
OUT/model.safetensors     merged weights and trained operator parameters: `lincompile.load(OUT)` is healed

Stages build on each other: LoRA is trained on top of the operator parameters attention transfer left. A
heal that runs attention transfer starts from the unhealed weights (and so drops an earlier LoRA: it was
trained for other operator parameters); a heal that runs LoRA only (`--stage lora`) starts from the unhealed
weights with the operator parameters of the last attention transfer. A heal with no stage to run leaves OUT
as it was.

Everything that determines the result is in config.json, the checkpoints and the files heal started from,
so a run killed at any moment and resumed with --resume ends with the result of an uninterrupted run; the
data are fingerprinted so that a resume on other data is refused. Everything is checked and loaded before
anything is written, and one heal at a time holds OUT (a lock, heal/outdir.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from ..emit import read_json, write_text_atomic
from ..errors import LincompileError, UsageError
from ..models import text_config
from . import checkpoint
from .config import HealConfig, stage_steps
from .data import BlockOrder, describe, get_tokenizer, load_split
from .distributed import Dist, init, shutdown
from .outdir import OutDir, lock, sweep_temporaries
from .trainer import Metrics, RunContext, run_stage

CONFIG, STATE, REPORT = "config.json", "state.json", "report.json"
STAGES = ("transfer", "lora")
_RESTART = "start the heal over with --restart"


def saved_config(out) -> HealConfig | None:
    path = Path(out) / "heal" / CONFIG
    if not path.exists():
        return None
    return HealConfig.from_resolved(read_json(path, _RESTART), str(path))


def saved_state(out) -> dict:
    path = Path(out) / "heal" / STATE
    if not path.exists():
        return {}
    data = read_json(path, _RESTART)
    if not isinstance(data, dict):
        raise LincompileError(f"{path} is damaged (not a JSON object): {_RESTART}")
    return data


def status(out) -> str | None:
    return saved_state(out).get("status")


def heal(out, cfg: HealConfig | None = None, *, resume: bool = False, restart: bool = False, device: str = "cpu",
         allow_code: bool = False, progress: bool = True, log=print,
         gradient_checkpointing: bool | None = None) -> dict:
    """Heal the converted model in OUT. With `resume`, `cfg` is ignored: the saved configuration continues, except
    that `gradient_checkpointing` (when not None) replaces both stages' (it changes memory, not results)."""
    if cfg is None and not resume:
        raise UsageError("no heal configuration given")
    outdir = OutDir(out)
    # Rank 0 holds OUT for the whole heal (the other ranks of a torchrun heal only read it).
    main_rank = int(os.environ.get("WORLD_SIZE", "1")) <= 1 or os.environ.get("RANK", "0") == "0"  # as init() reads
    with lock(outdir.root) if main_rank else nullcontext():
        d = init(device)
        try:
            return _heal(outdir, cfg, d, resume, restart, allow_code, progress, log if d.main else (lambda s: None),
                         gradient_checkpointing)
        finally:
            shutdown(d)


def _heal(outdir: OutDir, cfg, d: Dist, resume, restart, allow_code, progress, log, gradient_checkpointing) -> dict:
    heal_dir = outdir.heal_dir
    t_start = time.perf_counter()
    if d.main:
        swept = sweep_temporaries(outdir.root)
        if swept:
            log(f"note: removed {len(swept)} temporary file(s) an interrupted heal left in {outdir.root}")
    # Everything is checked and loaded before anything is written into OUT.
    healed_before, saved = False, {}
    if resume:
        cfg = saved_config(outdir.root)
        if cfg is None:
            raise UsageError(f"nothing to resume in {heal_dir} (no heal was started there): run without --resume")
        saved = saved_state(outdir.root)
        if gradient_checkpointing is not None:
            cfg.transfer.gradient_checkpointing = cfg.lora.gradient_checkpointing = gradient_checkpointing
    else:
        if not cfg.data.train:
            raise UsageError("no healing data: pass --data PATH or set heal.data.train in the spec")
        healed_before = _check_fresh_start(outdir, restart)
    check_warmup(cfg, d.world, ("lora",))
    from ..passes.capture import check_length

    check_length("heal.data.seq_len", cfg.data.seq_len, outdir.root, outdir.config, outdir.spec.capture)
    tokenizer = get_tokenizer(outdir.tokenizer(), cfg.data.tokenizer, text_config(outdir.config).vocab_size)
    split = load_split(cfg.data.train, cfg.data.eval, tokenizer, cfg.data.seq_len, cfg.data.holdout)
    fingerprint = data_fingerprint(split)
    if resume:
        _check_same_data(saved.get("data"), fingerprint)
    outdir.report  # noqa: B018 - a damaged OUT/report.json is found now, not after the heal
    # A heal that does not run attention transfer builds on the last one's operator parameters.
    transferred = outdir.transferred() if not cfg.transfer.enabled else {}
    kept_transfer = _previous_stage(heal_dir, "transfer") if transferred else None
    base = {**outdir.base_tensors(), **transferred}
    torch.manual_seed(cfg.seed)  # LoRA A matrices are drawn at build: the same on every run and rank
    eval_blocks = split.eval[: cfg.data.eval_blocks]

    from .build import build
    from .finetune import lora_stage
    from .lora import ADAPTER_DIR, lora_config, merged_tensors, save_adapter, target_weight_names
    from .transfer import transfer_stage

    lm = outdir.build_lm(base, device=d.device)
    graphs = build(lm, outdir.spec, lora_config=lora_config(cfg.lora, outdir) if cfg.lora.enabled else None,
                   with_teacher=cfg.transfer.enabled, allow_code=allow_code, op_state=base)
    log(f"built the converted graph{' with LoRA' if cfg.lora.enabled else ''} in {graphs.seconds:.1f} s")
    if cfg.lora.enabled and cfg.lora.gradient_checkpointing:
        _checkpoint_layers("lora", graphs.converted.graph_module, log)
        graphs.loss_head = _chunk_head(graphs.converted.graph_module, log)
    notes, transfer = list(split.notes), None
    if cfg.transfer.enabled:
        transfer = transfer_stage(graphs, cfg.transfer, eval_blocks, d.device)
        if transfer is not None and cfg.transfer.gradient_checkpointing:
            _checkpoint_layers("transfer", graphs.teacher, log)
        if transfer is None:
            note = f"attention transfer skipped: the operators of spec {outdir.spec.name} have no parameters"
            log(f"note: {note}")
            notes.append(note)
    if transfer is not None:
        check_warmup(cfg, d.world, ("transfer",))
    if transfer is None and not cfg.lora.enabled:
        log(f"{outdir.root}: nothing to do (no stage to run); it is left as it was")
        return {"config": cfg.resolved(), "stages": {}, "notes": notes}

    # From here on OUT changes.
    (_resume_start if resume else _fresh_start)(outdir, cfg, d, fingerprint)
    log(f"data: {describe(split, cfg.data.seq_len)}")
    for note in split.notes:
        log(f"note: {note}")
    if healed_before:
        if transferred:
            log(f"note: {outdir.root} was healed before; this heal keeps the operator parameters of its attention "
                "transfer and trains LoRA again from the unhealed weights")
        else:
            # so that the result depends only on this heal's config; say so rather than surprise with a worse step 0
            log(f"note: {outdir.root} was healed before; this heal starts again from the unhealed weights and "
                "replaces that result")
    if transfer is not None and not cfg.lora.enabled and (heal_dir / ADAPTER_DIR).exists():
        note = (f"the LoRA of the earlier heal is dropped (it was trained for the old operator parameters): run "
                f"`lincompile heal {outdir.root} --stage lora` to train it again")
        log(f"note: {note}")
        notes.append(note)

    ctx = RunContext(heal_dir=heal_dir, dist=d, seq_len=cfg.data.seq_len, eval_every=cfg.eval_every,
                     checkpoint_every=cfg.checkpoint_every, log_every=cfg.log_every, seed=cfg.seed, resume=resume,
                     progress=progress, log=log)
    metrics = Metrics(heal_dir, d.main)
    order = BlockOrder(len(split.train), cfg.data.seed)
    stages_run, transfer_result = {}, None
    if transfer is not None:
        stages_run["transfer"] = run_stage(transfer, split.train, order, ctx, metrics)
        transfer_result = {k: p.detach().clone() for k, p in transfer.params.items()}
    if cfg.lora.enabled:
        stages_run["lora"] = run_stage(lora_stage(graphs, cfg.lora, eval_blocks, d.device), split.train, order, ctx,
                                       metrics)

    if d.main:
        if cfg.transfer.enabled:
            outdir.save_transferred(transfer_result)  # None (skipped): a stale one is forgotten
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
        if kept_transfer is not None:
            report["kept"] = {"transfer": kept_transfer}
        write_text_atomic(heal_dir / REPORT, json.dumps(report, indent=2))
        _attach_to_model_report(outdir, report)
        write_plot(metrics.records(), heal_dir / "loss.png", log)
        write_text_atomic(heal_dir / STATE, json.dumps({"status": "done", "data": fingerprint}))
        ran = ", ".join(f"{k} {v} steps" for k, v in stages_run.items())
        log(f"healed {outdir.root}: {ran}{' (on the attention transfer of an earlier heal)' if transferred else ''}")
    d.barrier()
    return json.loads((heal_dir / REPORT).read_text(encoding="utf-8"))


def _checkpoint_layers(stage: str, gm, log) -> None:
    """heal.<stage>.gradient_checkpointing: the stage's graph recomputes its layers in backward."""
    from .remat import checkpoint_layers, found_layers

    found = found_layers(gm.graph)
    done = checkpoint_layers(gm)
    if not done:
        log(f"note: gradient checkpointing ({stage}) found no layers (no module path with a layer number): it is off")
        return
    inline = sorted(set(found) - set(done))
    rest = f"; layer(s) {', '.join(map(str, inline))} run as they are (no single call can hold them)" if inline else ""
    log(f"gradient checkpointing ({stage}): {len(done)} layers recompute their activations in backward{rest}")


def _chunk_head(gm, log):
    """The LoRA loss's part of gradient checkpointing: the LM head runs a chunk of tokens at a time."""
    from .head import lm_head

    head = lm_head(gm)
    if head is None:
        log(f"note: gradient checkpointing (lora) keeps the whole logits for the loss: {gm.meta['no_loss_head']}")
    else:
        log(f"gradient checkpointing (lora): the LM head ({head.describe()}) and the loss run a chunk of tokens "
            "at a time")
    return head


def write_plot(records: list[dict], path: Path, log) -> Path | None:
    """loss.png, or a note when matplotlib is missing (an old loss.png is removed: it is another run's)."""
    from .plot import plot_metrics

    try:
        return plot_metrics(records, path)
    except ImportError:
        Path(path).unlink(missing_ok=True)
        log("note: matplotlib is not installed: no loss.png (pip install matplotlib)")
        return None


def check_warmup(cfg: HealConfig, world: int = 1, stages=STAGES) -> None:
    """A warm-up as long as its stage would never reach the learning rate: refused up front. Only `stages`
    are checked: attention transfer only once it is known to run (operators with parameters)."""
    for name, stage in (("transfer", cfg.transfer), ("lora", cfg.lora)):
        if name not in stages or not stage.enabled or stage.warmup is None:
            continue
        total = stage_steps(stage, stage.batch_size * stage.grad_accum * world * cfg.data.seq_len)
        if stage.warmup >= total:
            raise UsageError(f"heal.{name}.warmup ({stage.warmup} steps) must be shorter than the {name} stage "
                             f"({total} steps): lower --warmup (or heal.{name}.warmup)")


def data_fingerprint(split) -> dict:
    """Token count and SHA-256 of the training and held-out blocks: what a resume must find again."""
    return {name: {"tokens": int(blocks.numel()), "sha256": _sha256(blocks)}
            for name, blocks in (("train", split.train), ("eval", split.eval))}


def _sha256(t: torch.Tensor) -> str:
    """Hashed from the tensor's own memory (no copy: a billion-token corpus is 8 GB of int64)."""
    digest = hashlib.sha256()
    if t.numel():  # (an empty view cannot be cast to bytes)
        digest.update(memoryview(t.contiguous().cpu().reshape(-1).numpy()).cast("B"))
    return digest.hexdigest()


def _check_same_data(saved, now: dict) -> None:
    if saved is None or saved == now:  # None: a heal started before fingerprints were recorded
        return

    def show(fp) -> str:
        try:
            return ", ".join(f"{k} {v['tokens']:,} tokens sha256 {v['sha256'][:12]}" for k, v in fp.items())
        except (AttributeError, KeyError, TypeError, ValueError):
            return "unreadable"

    raise UsageError(f"the healing data changed since this heal started (then {show(saved)}; now {show(now)}): "
                     "--resume needs the same data; to heal on these, start over with --restart")


def _check_fresh_start(outdir: OutDir, restart: bool) -> bool:
    """Refuse to start over an unfinished heal without --restart; True when OUT was healed before."""
    heal_dir = outdir.heal_dir
    if restart:
        try:
            return status(outdir.root) == "done"
        except LincompileError:  # a damaged state.json: --restart starts over anyway
            return False
    state = status(outdir.root)
    unfinished = (heal_dir / CONFIG).exists() and state == "running" and checkpoint.ckpt_root(heal_dir).exists()
    if unfinished:
        raise UsageError(f"{heal_dir} holds an unfinished heal: pass --resume to continue it or --restart to start "
                         "over")
    return state == "done"


def _fresh_start(outdir: OutDir, cfg: HealConfig, d: Dist, fingerprint: dict) -> None:
    """Config written, old checkpoints and metrics cleared."""
    heal_dir = outdir.heal_dir
    if d.main:
        heal_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.clear(heal_dir)
        (heal_dir / "metrics.jsonl").unlink(missing_ok=True)
        write_text_atomic(heal_dir / CONFIG, json.dumps(cfg.resolved(), indent=2))
        write_text_atomic(heal_dir / STATE, json.dumps({"status": "running", "data": fingerprint}))
    d.barrier()


def _resume_start(outdir: OutDir, cfg: HealConfig, d: Dist, fingerprint: dict) -> None:
    """Metrics trimmed to the checkpoints the stages continue from."""
    heal_dir = outdir.heal_dir
    if d.main:
        kept = {s: (c.step if c else -1) for s in STAGES for c in [checkpoint.latest(heal_dir, s)]}
        Metrics(heal_dir, True).trim(kept)
        write_text_atomic(heal_dir / STATE, json.dumps({"status": "running", "data": fingerprint}))
    d.barrier()


def _previous_stage(heal_dir: Path, stage: str) -> dict | None:
    """The summary of `stage` in the last heal's report (kept, not run again), when it can be read."""
    try:
        report = json.loads((heal_dir / REPORT).read_text(encoding="utf-8"))
        return report.get("stages", {}).get(stage) or report.get("kept", {}).get(stage)
    except (OSError, ValueError, AttributeError):
        return None


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
    data["heal"] = {k: report[k] for k in ("stages", "kept", "notes", "wall_seconds") if k in report}
    write_text_atomic(path, json.dumps(data, indent=2, default=str))
