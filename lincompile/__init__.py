"""lincompile: compile pretrained softmax-attention causal LMs into linear-attention models.

    import lincompile
    spec = lincompile.Spec.from_yaml("my-spec.yaml")       # or Spec.builtin("liger-attention")
    converted = lincompile.convert(model, spec)             # capture → match → substitute → fuse → verify
    converted.save("out/")
    again = lincompile.load("out/")
"""

__version__ = "0.1.0"

from .errors import LincompileError, SpecError, UsageError  # noqa: E402
from .spec import Spec  # noqa: E402


def convert(model, spec, **kwargs):
    """See `lincompile.pipeline.convert`."""
    from .pipeline import convert as _convert

    return _convert(model, spec, **kwargs)


def load(path, allow_code: bool = False, device: str = "cpu", adapter: bool = False):
    """Rebuild a converted model saved by `ConvertedModel.save` / `lincompile apply`.

    A healed OUT loads with its LoRA merged; `adapter=True` (or the path of an adapter directory) loads the
    peft adapters unmerged on top of the pre-heal weights.
    """
    from pathlib import Path

    if adapter or (Path(path) / "adapter_config.json").is_file():
        from .heal.lora import load_adapter

        return load_adapter(path, allow_code=allow_code, device=device)
    from .emit import load as _load

    return _load(path, allow_code=allow_code, device=device)


__all__ = ["Spec", "convert", "load", "LincompileError", "SpecError", "UsageError", "__version__"]
