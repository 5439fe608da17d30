"""Emit: write a converted model to a directory atomically, and load it back.

OUT/
  model.safetensors     every tensor of the converted graph module (operators' new parameters included)
  spec.yaml             the spec as applied, defaults filled in, versions in the header
  config.json           the original model's config (architecture to rebuild from)
  tokenizer files, generation_config.json (when the model has them)
  report.json / report.md
  lincompile.json       format version, source model, how it was captured

The directory is written next to its destination under a temporary name and renamed into place, so an
interrupted run leaves nothing half-written. `load` rebuilds the graph from config + spec (capture, match,
substitute on a randomly initialised model of the same architecture) and then loads the saved tensors:
no original weights and no network needed, and nothing is unpickled.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path

import yaml

from .errors import LincompileError, UsageError

FORMAT_VERSION = 1


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: Path, text: str) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; outputs are ordinary files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def scratch_dir(parent: Path, name: str) -> Path:
    """A new hidden folder `.NAME.tmp-PID@HOST-…` in PARENT to write NAME in, after removing those that runs of
    this machine which no longer exist left (killed with SIGKILL, or the machine went down). A live run's scratch
    is never touched, nor another machine's (a shared filesystem: its pids mean nothing here)."""
    host = socket.gethostname()
    for old in Path(parent).glob(f".{glob.escape(name)}.tmp-*@*"):
        pid, _, rest = old.name[len(name) + 6:].partition("@")
        if (old.is_dir() and pid.isdigit() and rest.rpartition("-")[0] == host and int(pid) != os.getpid()
                and not _alive(int(pid))):
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(dir=parent, prefix=f".{name}.tmp-{os.getpid()}@{host}-"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, but another user's
        return True
    return True


def publish_dir(tmp: Path, dest: Path) -> None:
    """Make a fully written temporary directory `dest` in one rename (replacing an old one)."""
    for f in tmp.iterdir():
        os.chmod(f, 0o666 & ~_umask())
    os.chmod(tmp, 0o777 & ~_umask())
    if dest.exists():
        old = dest.with_name(f".{dest.name}.tmp-{os.getpid()}@{socket.gethostname()}-old")  # swept like scratch
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)


def _unique_tensors(state: dict) -> dict:
    """safetensors refuses aliased tensors (tied embeddings): keep one name per storage, record the rest."""
    out, seen, aliases = {}, {}, {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        out[name] = t.detach().contiguous()
    return out, aliases


def check_destination(path, overwrite: bool = False) -> Path:
    """OUT as an absolute path, if it may be written: new, or (with overwrite) an earlier output or empty folder.

    `--overwrite` replaces a whole directory, so it is only allowed on what lincompile wrote (or an empty
    folder): a mistyped -o must not delete someone's files.
    """
    out = Path(path).expanduser().absolute()
    if out.name in ("", ".", "..") or Path.cwd().resolve().is_relative_to(out.resolve()):
        raise UsageError(f"{path}: give a new directory for the output, not the current directory or one above it")
    if not out.exists() and not out.is_symlink():
        return out
    if not overwrite:
        raise UsageError(f"{path} already exists: pass --overwrite to replace it")
    if out.is_symlink():
        raise UsageError(f"{path} is a symbolic link: --overwrite replaces only a directory itself (give the "
                         "directory it points to)")
    if not out.is_dir():
        raise UsageError(f"{path} exists and is not a directory: --overwrite only replaces a lincompile output "
                         "directory")
    if not (out / "lincompile.json").is_file() and any(out.iterdir()):
        raise UsageError(f"{path} is not a lincompile output directory (no lincompile.json): --overwrite will not "
                         "replace it; choose another output directory")
    if (out / "lincompile.json").is_file():
        from .heal.outdir import lock

        with lock(out):  # a heal running on it holds the lock: refused rather than deleted under it
            pass
    return out


def save(converted, path, overwrite: bool = False) -> Path:
    from safetensors.torch import save_file

    out = check_destination(path, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = scratch_dir(out.parent, out.name)
    try:
        tensors, aliases = _unique_tensors(converted.graph_module.state_dict())
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt", "lincompile": str(FORMAT_VERSION)})
        versions = converted.report.get("versions", {})
        header = "".join(f"# {k} {v}\n" for k, v in versions.items())
        (tmp / "spec.yaml").write_text(f"# spec as applied by lincompile\n{header}" +
                                       yaml.safe_dump(converted.spec.resolved(), sort_keys=False), encoding="utf-8")
        converted.config.to_json_file(str(tmp / "config.json"))
        if converted.tokenizer is not None:
            converted.tokenizer.save_pretrained(str(tmp))
        generation = getattr(converted, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(str(tmp))
        meta = {"format_version": FORMAT_VERSION, "model": converted.report.get("model"),
                "architecture": converted.report.get("architecture"),
                "attn_implementation": converted.spec.capture.attn_implementation,
                "dtype": str(next(iter(tensors.values())).dtype).replace("torch.", "") if tensors else "float32",
                "aliases": aliases, "versions": versions}
        (tmp / "lincompile.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
        from .report import render_markdown

        (tmp / "report.json").write_text(json.dumps(converted.report, indent=2, default=str), encoding="utf-8")
        (tmp / "report.md").write_text(render_markdown(converted.report), encoding="utf-8")
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_json(path: Path, fix: str):
    """A JSON file, or one line naming it and `fix` (what to do) when it is damaged."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        reason = err.msg if isinstance(err, json.JSONDecodeError) else "not UTF-8 text"
        raise LincompileError(f"{path} is damaged ({reason}): {fix}") from None


def load_tensors(path: Path, fix: str, device: str = "cpu") -> dict:
    """A safetensors file, or one line naming it and `fix` when it is truncated or not safetensors at all."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=device)
    except SafetensorError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LincompileError(f"{path} is damaged ({first}): {fix}") from None


REDO = "convert the model again with `lincompile apply`"


def read_meta(root: Path) -> dict:
    """OUT/lincompile.json, checked: there (else OUT is no lincompile output), an object, this format."""
    meta_file = Path(root) / "lincompile.json"
    if not meta_file.is_file():
        raise UsageError(f"{root} is not a lincompile output directory (no lincompile.json)")
    meta = read_json(meta_file, REDO)
    if not isinstance(meta, dict):
        raise LincompileError(f"{meta_file} is damaged (not a JSON object): {REDO}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise LincompileError(f"{root}: output format {meta.get('format_version')} is not supported by this version")
    return meta


def read_outdir(path):
    """(root, meta, spec, config) of an output directory, with clear errors for anything else."""
    from transformers import AutoConfig

    from .spec import Spec

    root = Path(path)
    meta = read_meta(root)
    for needed in ("model.safetensors", "spec.yaml", "config.json"):
        if not (root / needed).is_file():
            raise LincompileError(f"{root / needed} is missing: {REDO}")
    spec = Spec.from_output(root / "spec.yaml")
    config = AutoConfig.from_pretrained(str(root))
    return root, meta, spec, config


def architecture(root: Path, meta: dict) -> str | None:
    """The converted model's transformers class (lincompile.json; report.json in outputs written before it)."""
    if meta.get("architecture"):
        return meta["architecture"]
    try:
        return json.loads((Path(root) / "report.json").read_text(encoding="utf-8")).get("architecture")
    except (OSError, ValueError, AttributeError):
        return None


def load_weights(gm, root: Path, meta: dict, device: str = "cpu") -> None:
    """Load OUT/model.safetensors into a rebuilt graph module (aliases restored, every tensor must fit)."""
    state = load_tensors(root / "model.safetensors", "convert (and heal) the model again, or restore the file", device)
    for alias, name in meta.get("aliases", {}).items():
        state[alias] = state[name]
    missing, unexpected = gm.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise LincompileError(f"{root}/model.safetensors does not fit the rebuilt graph: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
    gm.to(device)


def has_tokenizer(root: Path) -> bool:
    return any((Path(root) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def load_tokenizer(root: Path):
    if has_tokenizer(root):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(root))
    return None


def load(path, allow_code: bool = False, device: str = "cpu"):
    from .models import build_from_config
    from .pipeline import ConvertedModel, convert

    root, meta, spec, config = read_outdir(path)
    model = build_from_config(config, dtype=meta.get("dtype", "float32"),
                              attn_implementation=meta["attn_implementation"], architecture=architecture(root, meta))
    # Rebuilt on the target device: tensors the graph creates itself (positions, masks) are placed at capture.
    rebuilt = convert(model.to(device), spec, allow_code=allow_code, source=meta.get("model"), verify=False)
    gm = rebuilt.graph_module
    load_weights(gm, root, meta, device)
    tokenizer = load_tokenizer(root)
    report = json.loads((root / "report.json").read_text(encoding="utf-8")) if (root / "report.json").exists() else {}
    return ConvertedModel(gm, spec, rebuilt.sites, config, tokenizer=tokenizer, report=report,
                          history=rebuilt.history, allow_code=allow_code)
