"""A converted model directory (OUT, as `lincompile apply` writes it) seen from healing and evaluation.

OUT/model.safetensors holds `lm.<HF name>` (the original weights) and `ops.<site>.<param>` (operator
parameters). Healing changes some of them (merged LoRA weights, trained operator parameters); before the
first change it copies their pre-heal values to OUT/heal/original.safetensors, once. So the directory always
knows two models:
- the *unhealed* model: model.safetensors overlaid with original.safetensors (a second heal replaces the
  first instead of stacking on it; a resumed heal rebuilds exactly what it started from);
- the *original* softmax model: the unhealed `lm.*` tensors loaded into the architecture of config.json.
The operator parameters an attention transfer trained are also kept apart, in OUT/heal/transfer.safetensors,
so that a heal which does not run attention transfer (`--stage lora`) builds on them (heal/run.py).

Every load names the file that is missing or damaged and what to do, in one line. `lock` keeps a second heal
off an OUT that is being healed; `sweep_temporaries` removes what an interrupted heal's atomic writes left.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from ..emit import FORMAT_VERSION, REDO, _umask, load_tensors, read_json, read_meta
from ..errors import LincompileError, UsageError

ORIGINAL = "original.safetensors"
TRANSFER = "transfer.safetensors"  # the operator parameters the last attention transfer trained
LM, OPS = "lm.", "ops."


class OutDir:
    def __init__(self, root):
        self.root = Path(root)
        self.meta = read_meta(self.root)
        self.heal_dir = self.root / "heal"

    # ----------------------------------------------------------------------------------------------
    @property
    def spec(self):
        from ..spec import Spec

        return Spec.from_output(self.root / "spec.yaml")

    @property
    def config(self):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(self.root))

    @property
    def report(self) -> dict:
        path = self.root / "report.json"
        return read_json(path, REDO) if path.exists() else {}

    def tokenizer(self):
        if not any((self.root / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            return None
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.root))

    def tensors(self) -> dict[str, torch.Tensor]:
        """model.safetensors as written (aliases of tied weights resolved)."""
        path = self.root / "model.safetensors"
        if not path.is_file():
            raise LincompileError(f"{path} is missing: {REDO}")
        state = load_tensors(path, REDO)
        for alias, name in self.meta.get("aliases", {}).items():
            state[alias] = state[name]
        return state

    def originals(self) -> dict[str, torch.Tensor]:
        path = self.heal_dir / ORIGINAL
        if not path.exists():
            return {}
        return load_tensors(path, "the unhealed weights are lost: convert the model again with `lincompile apply`")

    def transferred(self) -> dict[str, torch.Tensor]:
        """The operator parameters the last attention transfer trained ({} when none ran)."""
        path = self.heal_dir / TRANSFER
        if not path.exists():
            return {}
        return load_tensors(path, "heal again with attention transfer (--stage all or --stage transfer)")

    def base_tensors(self) -> dict[str, torch.Tensor]:
        """The unhealed model (a heal that does not run attention transfer overlays `transferred()` on it)."""
        return {**self.tensors(), **self.originals()}

    def save_transferred(self, params: dict[str, torch.Tensor] | None) -> None:
        """Record (or, with None, forget) the operator parameters an attention transfer trained."""
        path = self.heal_dir / TRANSFER
        if params:
            save_tensors_atomic(path, params)
        else:
            path.unlink(missing_ok=True)

    def keep_originals(self, keys) -> None:
        """Record the pre-heal value of each of `keys` not recorded yet (atomically, before anything changes)."""
        current, have = self.tensors(), self.originals()
        missing = [k for k in keys if k not in have]
        if not missing:
            return
        unknown = [k for k in missing if k not in current]
        if unknown:
            raise LincompileError(f"{self.root}/model.safetensors has no tensor {unknown[0]}")
        self.heal_dir.mkdir(parents=True, exist_ok=True)
        save_tensors_atomic(self.heal_dir / ORIGINAL, {**have, **{k: current[k] for k in missing}})

    def write_tensors(self, updates: dict[str, torch.Tensor]) -> None:
        """Replace some tensors of model.safetensors (same names and shapes), atomically."""
        state = self.tensors()
        aliases = self.meta.get("aliases", {})
        for name, value in updates.items():
            name = aliases.get(name, name)
            if name not in state:
                raise LincompileError(f"{self.root}/model.safetensors has no tensor {name}")
            if tuple(state[name].shape) != tuple(value.shape):
                raise LincompileError(f"{name}: shape {tuple(value.shape)} does not fit {tuple(state[name].shape)}")
            state[name] = value.detach().to(state[name].dtype).cpu()
        for alias in aliases:
            state.pop(alias, None)
        save_tensors_atomic(self.root / "model.safetensors", state,
                            metadata={"format": "pt", "lincompile": str(FORMAT_VERSION)})

    # ----------------------------------------------------------------------------------------------
    def site_projections(self) -> list[str]:
        """Module paths of the q/k/v/o projections of every converted (not kept) site, from report.json."""
        details = self.report.get("site_details")
        if not details:
            raise LincompileError(f"{self.root}/report.json has no site_details: cannot tell the converted layers' "
                                  "projections; give heal.lora.targets explicitly")
        out = []
        for site in details:
            if site.get("op") == "keep":
                continue
            for key in ("q_proj", "k_proj", "v_proj", "o_proj"):
                path = site.get(key)
                if path and path not in out:
                    out.append(path)
        if not out:
            raise LincompileError(f"{self.root}: no q/k/v/o projection was found at the converted sites; give "
                                  "heal.lora.targets explicitly")
        return out

    def build_lm(self, state: dict[str, torch.Tensor] | None = None, device: str = "cpu"):
        """The HF model of config.json with the `lm.*` tensors of `state` (default: the base) loaded."""
        from ..models import build_from_config

        state = self.base_tensors() if state is None else state
        model = build_from_config(self.config, dtype=self.meta.get("dtype", "float32"),
                                  attn_implementation=self.meta.get("attn_implementation", "sdpa"))
        lm_state = {k[len(LM):]: v for k, v in state.items() if k.startswith(LM)}
        missing, _ = model.load_state_dict(lm_state, strict=False)
        if missing:
            raise LincompileError(f"{self.root}/model.safetensors does not fit config.json: missing lm.{missing[0]}")
        return model.to(device).eval()


@contextmanager
def lock(root: Path):
    """Hold an exclusive lock on the directory OUT (nothing is written for it) while a heal runs; a second heal
    of the same OUT fails at once instead of deleting the first one's files (and `apply --overwrite` will not
    replace it). A flock is seen by processes of this machine only: on a shared filesystem, heal an OUT from
    one machine at a time."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system: no lock
        yield
        return
    root = Path(root)
    fd = os.open(root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = lock_holder(root)
            raise UsageError(f"{root} is being healed by another process{f' (pid {pid})' if pid else ''}") from None
        yield
    finally:
        os.close(fd)  # releases the lock


def lock_holder(root: Path) -> int | None:
    """The pid holding the flock on `root`, from /proc/locks (Linux); None when it cannot be told."""
    try:
        st = os.stat(root)
        key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            if "FLOCK" in fields and key in fields:
                return int(fields[fields.index(key) - 1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def sweep_temporaries(root: Path) -> list[Path]:
    """Remove the temporaries an interrupted heal's atomic writes left in OUT (hold `lock` first: a running
    heal's temporaries look the same). Returns what was removed."""
    root = Path(root)
    heal = root / "heal"
    found = [*root.glob(".model.safetensors.*.tmp"), *root.glob(".report.json.*.tmp")]
    if heal.is_dir():
        found += [p for p in heal.iterdir() if p.name.startswith(".") and
                  (p.name.endswith(".tmp") or ".tmp-" in p.name or ".old-" in p.name or
                   (p.name.startswith(".loss.png.") and p.name.endswith(".png")))]
        ckpt = heal / "ckpt"
        if ckpt.is_dir():
            found += [p for p in ckpt.iterdir() if p.name.startswith(".") and ".tmp-" in p.name]
    for p in found:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return found


def save_tensors_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
