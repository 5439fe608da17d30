"""Healing and evaluation of converted models: attention transfer, LoRA (peft), perplexity/accuracy.

    from lincompile.heal import HealConfig, heal, load_adapter
    heal("out/", HealConfig(...))           # OUT/model.safetensors becomes the healed (merged) model
    lincompile.load("out/")                  # merged weights
    load_adapter("out/")                     # the same model with the peft adapters unmerged

See run.py for what a heal writes, config.py for the `heal:` section of a spec.
"""

from .config import HealConfig, parse_heal


def heal(out, cfg=None, **kwargs):
    """See `lincompile.heal.run.heal`."""
    from .run import heal as _heal

    return _heal(out, cfg, **kwargs)


def load_adapter(path, allow_code: bool = False, device: str = "cpu"):
    """See `lincompile.heal.lora.load_adapter`."""
    from .lora import load_adapter as _load

    return _load(path, allow_code=allow_code, device=device)


__all__ = ["HealConfig", "parse_heal", "heal", "load_adapter"]
