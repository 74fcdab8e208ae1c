"""Typed errors of the converters. Each message names the input and says what to do."""

from __future__ import annotations


class LoramuxError(Exception):
    """Base class of every error loramux raises on purpose."""


class AdapterError(LoramuxError):
    """An adapter checkpoint cannot be read or cannot be expressed exactly."""


class UnsupportedAdapterError(AdapterError):
    """A valid PEFT checkpoint that uses a feature the target runtime cannot express."""


class BaseModelMismatchError(AdapterError):
    """The adapter does not fit the base model (names, shapes or architecture)."""


class BaseModelError(LoramuxError):
    """The base model file cannot be read."""
