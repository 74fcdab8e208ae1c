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


class RequestError(LoramuxError, ValueError):
    """A request cannot run as given (bad sampling parameters, empty prompt); the message says which field,
    and ``param`` names it where one field is at fault (the server's 400 reports it)."""

    def __init__(self, message: str = "", *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ContextLengthError(RequestError):
    """The prompt (plus the tokens asked for) does not fit the context of one sequence:
    ``n_prompt_tokens`` asked for a sequence of ``n_ctx`` tokens (llama-server reports both)."""

    def __init__(self, message: str = "", *, n_prompt_tokens: int = 0, n_ctx: int = 0, param: str | None = None) -> None:
        super().__init__(message, param=param)
        self.n_prompt_tokens, self.n_ctx = n_prompt_tokens, n_ctx


class QueueFullError(LoramuxError):
    """The engine's queue of waiting requests is full: retry later (the server answers 429 with Retry-After)."""


class RequestCancelled(LoramuxError):
    """The request was cancelled (by its caller, a client going away, or the engine closing)."""


__all__ = [
    "AdapterError",
    "BaseModelError",
    "ContextLengthError",
    "QueueFullError",
    "RequestCancelled",
    "RequestError",
    "BaseModelMismatchError",
    "LoramuxError",
    "MixError",
    "RuntimeLoadError",
    "UnsupportedAdapterError",
]
