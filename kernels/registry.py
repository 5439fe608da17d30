"""Operator registry: name -> Operator class. Built-in operators register themselves on import."""

from __future__ import annotations

import importlib
import pkgutil

from lincompile.errors import UsageError, did_you_mean

_OPS: dict[str, type] = {}
# Every module of this package is imported on first use (operators register themselves on import), so
# adding an operator is adding a file; `lincompile --help` stays light because nothing is imported before.
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
        from lincompile import kernels

        for info in pkgutil.iter_modules(kernels.__path__):
            if info.name.startswith("triton_"):
                continue  # Triton kernels hold no operators (and triton is an optional dependency)
            importlib.import_module(f"lincompile.kernels.{info.name}")
        _loaded = True  # only now: a module that failed to import (a bad LINCOMPILE_GLA_TUNING) fails again


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
