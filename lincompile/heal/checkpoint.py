"""Checkpoints of a healing stage, written atomically, in safetensors + JSON only (nothing is unpickled).

OUT/heal/ckpt/<stage>-<step:07d>/
  trainable.safetensors   the stage's trainable parameters by name
  optimizer.safetensors   AdamW tensors (exp_avg, exp_avg_sq, step) keyed "<param index>.<key>", and the RNG
                          state of every rank ("rng.<rank>")
  state.json              step, samples and tokens seen, elapsed time, the optimizer's param_groups and
                          non-tensor state

A checkpoint is written into a hidden temporary directory and renamed into place (a directory rename is
atomic), and only then are older checkpoints of the stage deleted. A kill at any moment leaves either the
new checkpoint or the previous one complete; hidden leftovers are ignored and cleaned up. The data
position is the step itself (the order of samples is a pure function of the sample index, heal/data.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..emit import _umask
from ..errors import LincompileError

CKPT = "ckpt"


@dataclass
class Checkpoint:
    stage: str
    step: int
    path: Path


def ckpt_root(heal_dir: Path) -> Path:
    return Path(heal_dir) / CKPT


def latest(heal_dir: Path, stage: str) -> Checkpoint | None:
    root = ckpt_root(heal_dir)
    if not root.is_dir():
        return None
    found = []
    for p in root.iterdir():
        m = re.fullmatch(rf"{re.escape(stage)}-(\d+)", p.name)
        if m and p.is_dir() and (p / "state.json").is_file():
            found.append(Checkpoint(stage, int(m.group(1)), p))
    return max(found, key=lambda c: c.step) if found else None


def save(heal_dir: Path, stage: str, step: int, params: dict[str, torch.Tensor], optimizer,
         rng: dict[str, torch.Tensor], info: dict) -> Path:
    from safetensors.torch import save_file

    root = ckpt_root(heal_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{stage}-{step:07d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}.tmp-"))
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in params.items()}, str(tmp / "trainable.safetensors"))
        opt_tensors, opt_json = _split_optimizer(optimizer.state_dict())
        opt_tensors.update({f"rng.{k}": v.contiguous().cpu() for k, v in rng.items()})
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"stage": stage, "step": step, **info, "optimizer": opt_json},
                                                   indent=1), encoding="utf-8")
        for f in tmp.iterdir():
            os.chmod(f, 0o666 & ~_umask())
        os.chmod(tmp, 0o777 & ~_umask())
        if final.exists():  # only when a finished stage is saved again; the previous step's checkpoint remains
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for p in root.iterdir():  # older checkpoints of this stage, and temporaries a kill left behind
        m = re.fullmatch(rf"{re.escape(stage)}-(\d+)", p.name)
        if (m and int(m.group(1)) < step) or (p.name.startswith(f".{stage}-") and ".tmp-" in p.name and p != tmp):
            shutil.rmtree(p, ignore_errors=True)
    return final


def load(ckpt: Checkpoint) -> tuple[dict, dict, dict, dict]:
    """(params, optimizer state_dict, rng by rank, info). A damaged checkpoint (a file truncated or edited
    outside lincompile: the writes themselves are atomic) is one line that says to start over."""
    from ..emit import load_tensors, read_json

    fix = "start the heal over with --restart"
    try:
        info = read_json(ckpt.path / "state.json", fix)
        params = load_tensors(ckpt.path / "trainable.safetensors", fix)
        tensors = load_tensors(ckpt.path / "optimizer.safetensors", fix)
    except FileNotFoundError as err:
        raise LincompileError(f"checkpoint {ckpt.path} is damaged (no {Path(err.filename).name}): {fix}") from None
    except LincompileError as err:
        raise LincompileError(f"checkpoint {err}") from None
    try:
        rng = {k[len("rng."):]: v for k, v in tensors.items() if k.startswith("rng.")}
        opt = _join_optimizer({k: v for k, v in tensors.items() if not k.startswith("rng.")}, info.pop("optimizer"))
    except (KeyError, ValueError, TypeError, AttributeError) as err:
        raise LincompileError(f"checkpoint {ckpt.path} is damaged (bad optimizer state: {err!r}): {fix}") from None
    return params, opt, rng, info


def _split_optimizer(sd: dict) -> tuple[dict, dict]:
    tensors, plain = {}, {}
    for index, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value
            else:
                plain.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "state": plain}


def _join_optimizer(tensors: dict, data: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    for index, values in data.get("state", {}).items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": data["param_groups"]}


def clear(heal_dir: Path) -> None:
    shutil.rmtree(ckpt_root(heal_dir), ignore_errors=True)
