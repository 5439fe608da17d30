"""Operator registry: name -> Operator class. Built-in operators register themselves on import."""

from __future__ import annotations

import importlib

from lincompile.errors import UsageError, did_you_mean

_OPS: dict[str, type] = {}
# Modules holding the built-in operators; imported on first use so `lincompile --help` stays light.
_BUILTIN_MODULES = ("softmax", "liger_gla", "liger_attention")
_loaded = False


def register(cls):
    """Class decorator: make an Operator available to specs as `op: <cls.name>`."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _OPS[cls.name] = cls
    return cls


def _load_builtins():
    global _loaded
    if not _loaded:
        _loaded = True
        for mod in _BUILTIN_MODULES:
            importlib.import_module(f"lincompile.kernels.{mod}")


def names() -> list[str]:
    _load_builtins()
    return sorted(_OPS)


def get(name: str):
    _load_builtins()
    if name not in _OPS:
        raise UsageError(f'unknown op "{name}"{did_you_mean(name, _OPS)}; known ops: {", ".join(sorted(_OPS))}')
    return _OPS[name]


def load_user_op(ref: str, allow_code: bool):
    """`package.module:ClassName` -> the class; user code runs only with the explicit opt-in."""
    from .base import Operator

    if not allow_code:
        raise UsageError(f'op "{ref}" is user Python code: pass --allow-code (or allow_code=True) to load it')
    module_name, _, attr = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise UsageError(f'cannot import module "{module_name}" for op "{ref}": {err}') from None
    cls = getattr(module, attr, None)
    if cls is None:
        raise UsageError(f'module "{module_name}" has no "{attr}" (op "{ref}")')
    if not (isinstance(cls, type) and issubclass(cls, Operator)):
        raise UsageError(f'op "{ref}" must be a subclass of lincompile.kernels.base.Operator')
    return cls
