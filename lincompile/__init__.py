"""lincompile: compile pretrained softmax-attention causal LMs into linear-attention models.

    import lincompile
    spec = lincompile.Spec.from_yaml("my-spec.yaml")       # or Spec.builtin("liger-attention")
    converted = lincompile.convert(model, spec)             # capture → match → substitute → verify
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


def load(path, allow_code: bool = False, device: str = "cpu"):
    """Rebuild a converted model saved by `ConvertedModel.save` / `lincompile apply`."""
    from .emit import load as _load

    return _load(path, allow_code=allow_code, device=device)


__all__ = ["Spec", "convert", "load", "LincompileError", "SpecError", "UsageError", "__version__"]
