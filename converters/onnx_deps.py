"""Imports of the optional ``onnx`` extra, with one clear message when it is missing."""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import LoramuxError


class MissingExtraError(LoramuxError, ImportError):
    """An optional dependency of loramux is not installed."""


_HINT = "pip install 'loramux[onnx]'"


def require(module: str, *, feature: str = "ONNX support") -> ModuleType:
    """Import ``module`` (``onnxruntime`` or ``onnx``) or raise MissingExtraError naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(f"{feature} needs the Python package {module!r}, which is not installed: {_HINT}") from exc


def onnxruntime() -> ModuleType:
    """The ``onnxruntime`` module (needs >= 1.20 for adapters)."""
    ort = require("onnxruntime")
    if not hasattr(ort, "AdapterFormat"):
        raise MissingExtraError(
            f"onnxruntime {getattr(ort, '__version__', '?')} has no AdapterFormat; LoRA adapters need onnxruntime >= 1.20: {_HINT}"
        )
    return ort


def onnx() -> ModuleType:
    """The ``onnx`` module (graph building)."""
    return require("onnx", feature="building the ONNX base model")
