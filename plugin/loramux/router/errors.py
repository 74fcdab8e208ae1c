"""Typed errors of the router. Each message names the input and says what to do."""

from __future__ import annotations

from loramux.errors import LoramuxError


class RouterError(LoramuxError):
    """A router file cannot be read, or a router cannot be trained or used as asked."""


class RouterFileError(RouterError):
    """The file is missing, corrupt, not ONNX, or an ONNX model that is not a loramux router."""


class RouterMismatchError(RouterError):
    """The router was trained for another base model or another adapter pool."""


class RouterSettingsError(RouterError, ValueError):
    """A selection setting (top-k, top-p, temperature, ...) is out of range."""


__all__ = ["RouterError", "RouterFileError", "RouterMismatchError", "RouterSettingsError"]
