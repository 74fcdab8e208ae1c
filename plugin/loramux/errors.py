"""Errors of the Python side; the converters' errors share the same base class."""
from __future__ import annotations

from loramux.converters.errors import (
    AdapterError,
    BaseModelError,
    BaseModelMismatchError,
    LoramuxError,
    UnsupportedAdapterError,
)


class MixError(LoramuxError, ValueError):
    """A mix names unknown adapters or has weights that are not finite."""


class RuntimeLoadError(LoramuxError):
    """llama.cpp refused to load a model or an adapter."""


__all__ = [
    "AdapterError",
    "BaseModelError",
    "BaseModelMismatchError",
    "LoramuxError",
    "MixError",
    "RuntimeLoadError",
    "UnsupportedAdapterError",
]
