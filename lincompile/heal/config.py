"""The `heal:` section of a spec: what data to heal on and how each stage trains.

    heal:
      data: {train: ../shared/data/austen, eval: persuasion.txt, seq_len: 512, holdout: 0.05, seed: 0}
      transfer: {steps: 100, lr: 1.0e-2}                  # stage 1: attention transfer (new op params)
      lora:                                               # stage 2: LoRA through peft
        r: 8
        alpha: 16
        dropout: 0.0
        targets: default                                  # or [q_proj, v_proj] or a regex string
        steps: 150                                        # or tokens: 1000000
        lr: 1.0e-3
        warmup: 10                                        # default: 10 steps, at most a tenth of the stage
        schedule: cosine
        clip: 1.0
        batch_size: 1
        grad_accum: 1
        gradient_checkpointing: false                     # true: recompute layers in backward, LM head by chunks
        distill: {weight: 0.5, temperature: 2.0}
      eval_every: 50
      checkpoint_every: 25

Errors point at `file:line:col` through the spec's own Located positions. Relative data paths are taken
relative to the spec file (so a spec next to its data works from any directory) and stored absolute.
`HealConfig.resolved()` is the plain-dict form written to OUT/heal/config.json and to spec.yaml.
"""

from __future__ import annotations

import copy
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..spec import Located, _check_keys, _choice, _expect

SCHEDULES = ("cosine", "constant", "linear")
TOKENIZERS = ("auto", "bytes")


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=list)  # files, directories, or hf:NAME
    eval: list[str] = field(default_factory=list)  # held-out text; empty: split off the end of train
    seq_len: int = 512
    holdout: float = 0.05  # fraction of train blocks held out when `eval` is empty
    seed: int = 0
    tokenizer: str = "auto"  # auto: the converted model's own; bytes: UTF-8 bytes as ids (vocab >= 256)
    eval_blocks: int = 16  # held-out blocks scored at each periodic evaluation


@dataclass
class StageConfig:
    """What both stages share: the optimiser, schedule and budget."""

    enabled: bool = True
    steps: int | None = None  # exactly one of steps / tokens; steps = ceil(tokens / tokens per step)
    tokens: int | None = None
    lr: float = 1e-3
    warmup: int | None = None  # linear warm-up steps; None: 10, at most a tenth of the stage (warmup_steps)
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0  # where cosine/linear decay ends, as a fraction of lr
    clip: float | None = 1.0  # max global gradient norm (None: no clipping)
    batch_size: int = 1  # sequences per micro-batch per process
    grad_accum: int = 1
    weight_decay: float = 0.0
    # recompute each layer in backward, the LM head and loss by chunks of tokens: less memory, a second forward
    gradient_checkpointing: bool = False


@dataclass
class TransferConfig(StageConfig):
    steps: int | None = 100
    lr: float = 1e-2  # LoLCATs trains feature maps at 1e-2: they start far from softmax


@dataclass
class DistillConfig:
    weight: float = 0.0  # loss = (1 - weight)·CE + weight·T²·KL(original ‖ converted) at temperature T
    temperature: float = 1.0


@dataclass
class LoraStageConfig(StageConfig):
    steps: int | None = 100
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: Any = "default"  # "default" | [module names] (peft suffix match) | "regex" (peft fullmatch)
    train_ops: bool = False  # also train the operators' own parameters in this stage
    distill: DistillConfig = field(default_factory=DistillConfig)


@dataclass
class HealConfig:
    data: DataConfig = field(default_factory=DataConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    lora: LoraStageConfig = field(default_factory=LoraStageConfig)
    eval_every: int = 50
    checkpoint_every: int = 25
    log_every: int = 10
    seed: int = 0

    def resolved(self) -> dict:
        return copy.deepcopy(asdict(self))

    @classmethod
    def from_resolved(cls, data: dict, file: str = "<heal config>") -> "HealConfig":
        return parse_heal(data, Located(file), base_dir=None, path=())


# --------------------------------------------------------------------------------------------------

_STAGE_KEYS = ("enabled", "steps", "tokens", "lr", "warmup", "schedule", "min_lr_ratio", "clip", "batch_size",
               "grad_accum", "weight_decay", "gradient_checkpointing")
_LORA_KEYS = _STAGE_KEYS + ("r", "alpha", "dropout", "targets", "train_ops", "distill")
_DATA_KEYS = ("train", "eval", "seq_len", "holdout", "seed", "tokenizer", "eval_blocks")


def parse_heal(raw, loc: Located, base_dir: Path | str | None = "auto", path: tuple = ("heal",)) -> HealConfig:
    """Validate a `heal:` mapping. `base_dir`: where relative data paths start; "auto": the directory of the
    spec file when `loc.file` is one, else they stay as given (relative to the working directory)."""
    if base_dir == "auto":
        base_dir = Path(loc.file).resolve().parent if Path(loc.file).is_file() else None
    raw = {} if raw is None else _expect(raw, dict, path, loc, "heal")
    _check_keys(raw, ("data", "transfer", "lora", "eval_every", "checkpoint_every", "log_every", "seed"), path, loc,
                "heal")
    cfg = HealConfig()
    cfg.data = _parse_data(raw.get("data", {}), loc, path + ("data",), base_dir)
    cfg.transfer = _parse_stage(TransferConfig(), raw.get("transfer", {}), loc, path + ("transfer",), _STAGE_KEYS)
    cfg.lora = _parse_lora(raw.get("lora", {}), loc, path + ("lora",))
    for key in ("eval_every", "checkpoint_every", "log_every"):
        if key in raw:
            setattr(cfg, key, _int(raw[key], loc, path + (key,), minimum=1))
    if "seed" in raw:
        cfg.seed = _int(raw["seed"], loc, path + ("seed",), minimum=0)
    return cfg


def _int(value, loc, path, minimum=None) -> int:
    _expect(value, int, path, loc, ".".join(map(str, path)))
    if minimum is not None and value < minimum:
        raise loc.error(path, f"{'.'.join(map(str, path))} must be at least {minimum}, got {value}")
    return value


def _num(value, loc, path, low=None, high=None, low_open=False) -> float:
    _expect(value, (int, float), path, loc, ".".join(map(str, path)))
    value = float(value)
    name = ".".join(map(str, path))
    if low is not None and (value < low or (low_open and value == low)):
        raise loc.error(path, f"{name} must be {'>' if low_open else '>='} {low:g}, got {value:g}")
    if high is not None and value > high:
        raise loc.error(path, f"{name} must be <= {high:g}, got {value:g}")
    return value


def _paths(value, loc, path, base_dir) -> list[str]:
    items = value if isinstance(value, list) else [value]
    out = []
    for i, item in enumerate(items):
        where = path + ((i,) if isinstance(value, list) else ())
        _expect(item, str, where, loc, ".".join(map(str, path)))
        if base_dir is not None and not item.startswith("hf:") and not Path(item).expanduser().is_absolute():
            item = str((base_dir / item).resolve())
        out.append(item)
    return out


def _parse_data(raw, loc, path, base_dir) -> DataConfig:
    raw = _expect(raw, dict, path, loc, "heal.data")
    _check_keys(raw, _DATA_KEYS, path, loc, "heal.data")
    d = DataConfig()
    for key in ("train", "eval"):
        if raw.get(key) is not None:
            setattr(d, key, _paths(raw[key], loc, path + (key,), base_dir))
    if "seq_len" in raw:
        d.seq_len = _int(raw["seq_len"], loc, path + ("seq_len",), minimum=2)
    if "holdout" in raw:
        d.holdout = _num(raw["holdout"], loc, path + ("holdout",), 0.0, 0.5)
    if "seed" in raw:
        d.seed = _int(raw["seed"], loc, path + ("seed",), minimum=0)
    if "tokenizer" in raw:
        d.tokenizer = _choice(raw["tokenizer"], TOKENIZERS, path + ("tokenizer",), loc, "heal.data.tokenizer")
    if "eval_blocks" in raw:
        d.eval_blocks = _int(raw["eval_blocks"], loc, path + ("eval_blocks",), minimum=1)
    return d


def _parse_stage(stage: StageConfig, raw, loc, path, keys) -> StageConfig:
    name = ".".join(map(str, path))
    raw = _expect(raw, dict, path, loc, name)
    _check_keys(raw, keys, path, loc, name)
    if "enabled" in raw:
        stage.enabled = _expect(raw["enabled"], bool, path + ("enabled",), loc, f"{name}.enabled")
    if raw.get("steps") is not None and raw.get("tokens") is not None:
        raise loc.error(path + ("tokens",), f"{name}: give steps or tokens, not both")
    if raw.get("tokens") is not None:
        stage.tokens, stage.steps = _int(raw["tokens"], loc, path + ("tokens",), minimum=1), None
    if raw.get("steps") is not None:
        stage.steps, stage.tokens = _int(raw["steps"], loc, path + ("steps",), minimum=1), None
    if "lr" in raw:
        stage.lr = _num(raw["lr"], loc, path + ("lr",), 0.0, low_open=True)
    if raw.get("warmup") is not None:  # null (as resolved() writes the default) is the default
        stage.warmup = _int(raw["warmup"], loc, path + ("warmup",), minimum=0)
    if "schedule" in raw:
        stage.schedule = _choice(raw["schedule"], SCHEDULES, path + ("schedule",), loc, f"{name}.schedule")
    if "min_lr_ratio" in raw:
        stage.min_lr_ratio = _num(raw["min_lr_ratio"], loc, path + ("min_lr_ratio",), 0.0, 1.0)
    if "clip" in raw:
        stage.clip = None if raw["clip"] is None else _num(raw["clip"], loc, path + ("clip",), 0.0, low_open=True)
    for key in ("batch_size", "grad_accum"):
        if key in raw:
            setattr(stage, key, _int(raw[key], loc, path + (key,), minimum=1))
    if "weight_decay" in raw:
        stage.weight_decay = _num(raw["weight_decay"], loc, path + ("weight_decay",), 0.0)
    if "gradient_checkpointing" in raw:
        stage.gradient_checkpointing = _expect(raw["gradient_checkpointing"], bool, path + ("gradient_checkpointing",),
                                               loc, f"{name}.gradient_checkpointing")
    return stage


def _parse_lora(raw, loc, path) -> LoraStageConfig:
    raw = _expect(raw, dict, path, loc, "heal.lora")
    lora = _parse_stage(LoraStageConfig(), raw, loc, path, _LORA_KEYS)
    if "r" in raw:
        lora.r = _int(raw["r"], loc, path + ("r",), minimum=1)
    if "alpha" in raw:
        lora.alpha = _num(raw["alpha"], loc, path + ("alpha",), 0.0, low_open=True)
    if "dropout" in raw:
        lora.dropout = _num(raw["dropout"], loc, path + ("dropout",), 0.0, 0.99)
    if "train_ops" in raw:
        lora.train_ops = _expect(raw["train_ops"], bool, path + ("train_ops",), loc, "heal.lora.train_ops")
    if "targets" in raw:
        lora.targets = _parse_targets(raw["targets"], loc, path + ("targets",))
    if "distill" in raw:
        d = _expect(raw["distill"], dict, path + ("distill",), loc, "heal.lora.distill")
        _check_keys(d, ("weight", "temperature"), path + ("distill",), loc, "heal.lora.distill")
        lora.distill = DistillConfig(
            weight=_num(d.get("weight", 0.0), loc, path + ("distill", "weight"), 0.0, 1.0),
            temperature=_num(d.get("temperature", 1.0), loc, path + ("distill", "temperature"), 0.0, low_open=True))
    return lora


def _parse_targets(value, loc, path):
    if value == "default":
        return value
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as err:
            raise loc.error(path, f"heal.lora.targets is not a valid regular expression: {err}") from None
        return value
    items = _expect(value, list, path, loc, 'heal.lora.targets ("default", a list of module names or a regex)')
    if not items:
        raise loc.error(path, "heal.lora.targets is empty: LoRA would train nothing")
    for i, item in enumerate(items):
        _expect(item, str, path + (i,), loc, "heal.lora.targets item")
    return list(items)


def stage_steps(stage: StageConfig, tokens_per_step: int) -> int:
    """Optimizer steps for a stage: its `steps`, or its token budget rounded up to whole steps."""
    if stage.steps is not None:
        return stage.steps
    return max(1, -(-stage.tokens // tokens_per_step))
