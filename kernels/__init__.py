"""Operators that replace softmax attention (installed as `lincompile.kernels`)."""

from . import registry
from .base import Operator

__all__ = ["Operator", "registry"]
