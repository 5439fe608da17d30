"""The training loop both healing stages share: AdamW, warm-up + decay, clipping, accumulation, DDP, resume.

One optimizer step = `grad_accum` micro-batches of `batch_size` blocks per rank; the loss of each micro-batch
is a mean over its tokens divided by `grad_accum`, and DDP averages over ranks, so the update equals one
process with batch_size · world sequences (same blocks, see data.BlockOrder). Gradient norms are clipped
per group (per operator in attention transfer, so layers stay independent; one group for LoRA) and the
pre-clip global norm is logged. The learning rate is a pure function of the step (no scheduler object to
save). Rank 0 writes metrics (OUT/heal/metrics.jsonl), checkpoints and evaluations.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..errors import UsageError
from . import checkpoint
from .config import StageConfig, stage_steps
from .data import BlockOrder
from .distributed import Dist

METRICS = "metrics.jsonl"


def warmup_steps(cfg: StageConfig, total: int) -> int:
    """The warm-up length: as configured, else 10 steps but never more than a tenth of the stage (a short heal
    that spent all its steps warming up would never train at its learning rate)."""
    return cfg.warmup if cfg.warmup is not None else min(10, total // 10)


def lr_at(cfg: StageConfig, step: int, total: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up, then cosine/linear/constant."""
    warmup = warmup_steps(cfg, total)
    if warmup and step < warmup:
        return cfg.lr * (step + 1) / (warmup + 1)
    if cfg.schedule == "constant" or total <= warmup:
        return cfg.lr
    progress = (step - warmup) / max(1, total - warmup)
    low = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "linear":
        return low + (cfg.lr - low) * (1 - progress)
    return low + (cfg.lr - low) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class StageRun:
    name: str
    module: nn.Module  # forward(input_ids) -> scalar loss; sets `.last` (dict of floats) for the log
    params: dict[str, nn.Parameter]  # trainable, by the names checkpoints use
    cfg: StageConfig
    clip_groups: list[list[nn.Parameter]] = field(default_factory=list)
    evaluate: Callable[[], dict] | None = None  # held-out metrics (rank 0, eval mode, no grad)
    index: int = 0  # the stage's position (seeds differ per stage)


@dataclass
class RunContext:
    heal_dir: Path
    dist: Dist
    seq_len: int
    eval_every: int = 50
    checkpoint_every: int = 25
    log_every: int = 10
    seed: int = 0
    resume: bool = False
    progress: bool = True
    log: Callable[[str], None] = print


class Metrics:
    """Append-only JSON lines (rank 0); `trim` drops records a resumed run will write again."""

    def __init__(self, heal_dir: Path, enabled: bool):
        self.path, self.enabled = Path(heal_dir) / METRICS, enabled

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def records(self) -> list[dict]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill: it is written again after resuming
                continue
        return out

    def trim(self, kept_step: dict[str, int]) -> None:
        """Keep, per stage, the records up to its last checkpoint (none for a stage without one)."""
        if not self.enabled or not self.path.exists():
            return
        from ..emit import write_text_atomic

        keep = [r for r in self.records() if r.get("step", 0) <= kept_step.get(r.get("stage"), -1)]
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in keep))


def run_stage(stage: StageRun, blocks: torch.Tensor, order: BlockOrder, ctx: RunContext, metrics: Metrics) -> int:
    """Train one stage to its last step (or resume it); returns the number of steps."""
    cfg, d = stage.cfg, ctx.dist
    tokens_per_step = cfg.batch_size * cfg.grad_accum * d.world * ctx.seq_len
    total = stage_steps(cfg, tokens_per_step)
    params = list(stage.params.values())
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    torch.manual_seed(ctx.seed * 7919 + stage.index * 104729 + d.rank)  # dropout masks: per stage and rank
    start, elapsed0 = 0, 0.0
    ckpt = checkpoint.latest(ctx.heal_dir, stage.name) if ctx.resume else None
    if ckpt is not None:
        start, elapsed0 = _restore(ckpt, stage, optimizer, d, total)
        ctx.log(f"{stage.name}: resumed at step {start}/{total}")
    if start >= total:
        _freeze(params)
        return total
    model = d.wrap(stage.module)
    stage.module.train(True)
    from tqdm import tqdm

    bar = tqdm(total=total, initial=start, desc=f"heal {stage.name}", unit="step", file=sys.stderr,
               disable=not (ctx.progress and d.main), mininterval=1.0, dynamic_ncols=True)
    tty = sys.stderr.isatty()
    if start == 0:
        _evaluate(stage, ctx, metrics, 0)
    t0, session_tokens = time.perf_counter(), 0
    try:
        for step in range(start, total):
            lr = lr_at(cfg, step, total)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = 0.0
            for a in range(cfg.grad_accum):
                batch = order.micro_batch(blocks, step * cfg.grad_accum + a, cfg.batch_size, d.rank, d.world)
                with d.no_sync(model, skip=a < cfg.grad_accum - 1):
                    loss = model(batch.to(d.device)) / cfg.grad_accum
                    loss.backward()
                loss_sum += float(loss.detach())
            norm = _clip(stage.clip_groups or [params], cfg.clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            session_tokens += tokens_per_step
            elapsed = time.perf_counter() - t0
            record = {"stage": stage.name, "step": step + 1, "loss": d.mean(loss_sum), "lr": lr, "grad_norm": norm,
                      "tokens": (step + 1) * tokens_per_step, "tok_s": session_tokens / max(elapsed, 1e-9),
                      "elapsed": round(elapsed0 + elapsed, 3),
                      **{k: d.mean(v) for k, v in getattr(stage.module, "last", {}).items()}}
            metrics.write(record)
            bar.set_postfix(loss=f"{record['loss']:.4g}", tok_s=f"{record['tok_s']:.0f}", refresh=False)
            bar.update(1)
            if d.main and not tty and ctx.progress and ((step + 1) % ctx.log_every == 0 or step + 1 == total):
                ctx.log(f"{stage.name} step {step + 1}/{total} loss {record['loss']:.4g} "
                        f"{record['tok_s']:.0f} tok/s")
            done = step + 1 == total
            if (step + 1) % ctx.eval_every == 0 or done:
                _evaluate(stage, ctx, metrics, step + 1)
            if (step + 1) % ctx.checkpoint_every == 0 or done:
                rng = d.gather_rng()
                if d.main:
                    info = {"total": total, "world": d.world, "tokens": (step + 1) * tokens_per_step,
                            "elapsed": elapsed0 + elapsed}
                    checkpoint.save(ctx.heal_dir, stage.name, step + 1, stage.params, optimizer, rng, info)
                d.barrier()
    finally:
        bar.close()
    stage.module.train(False)
    _freeze(params)
    return total


def _restore(ckpt, stage: StageRun, optimizer, d: Dist, total: int) -> tuple[int, float]:
    params, opt_state, rng, info = checkpoint.load(ckpt)
    if info.get("world", 1) != d.world:
        raise UsageError(f"the checkpoint of {stage.name} was written by {info.get('world')} process(es); resume "
                         f"with the same number (got {d.world}) so that the data order is the same")
    if info.get("total") != total:
        raise UsageError(f"{stage.name}: the checkpoint is of a {info.get('total')}-step run, this one has {total} "
                         "steps; resume with the saved settings")
    missing = [n for n in stage.params if n not in params]
    if missing:
        raise UsageError(f"the checkpoint of {stage.name} lacks {missing[0]}: it is from another configuration")
    with torch.no_grad():
        for name, p in stage.params.items():
            p.copy_(params[name])
    optimizer.load_state_dict(opt_state)
    if str(d.rank) in rng:
        torch.set_rng_state(rng[str(d.rank)])
    return ckpt.step, float(info.get("elapsed", 0.0))


def _clip(groups: list[list[nn.Parameter]], max_norm: float | None) -> float:
    """Clip each group to max_norm; return the global pre-clip norm (what the log shows)."""
    total_sq = 0.0
    for group in groups:
        grads = [p for p in group if p.grad is not None]
        if not grads:
            continue
        if max_norm is not None:
            norm = float(torch.nn.utils.clip_grad_norm_(grads, max_norm))
        else:
            norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in grads])))
        total_sq += norm ** 2
    return math.sqrt(total_sq)


def _evaluate(stage: StageRun, ctx: RunContext, metrics: Metrics, step: int) -> None:
    if stage.evaluate is None:
        return
    if ctx.dist.main:
        stage.module.train(False)
        result = stage.evaluate()
        stage.module.train(True)
        metrics.write({"stage": stage.name, "step": step, "eval": result})
        summary = ", ".join(f"{k} {v:.4g}" for k, v in result.items() if isinstance(v, (int, float)))
        ctx.log(f"{stage.name} eval @ {step}: {summary}")
    ctx.dist.barrier()


def _freeze(params) -> None:
    for p in params:
        p.requires_grad_(False)
        p.grad = None
