"""Errors as OpenAI shapes them: ``{"error": {"message", "type", "param", "code"}}`` with the right status."""

from __future__ import annotations

import re
from typing import Any

from loramux.errors import (
    AdapterError,
    ContextLengthError,
    LoramuxError,
    MixError,
    QueueFullError,
    RequestCancelled,
    RequestError,
)

RETRY_AFTER_S = 1
CONTEXT_ERROR_TYPE = "exceed_context_size_error"  # llama-server's error type for a prompt over the context
REQUEST_ID_HEADER = "X-Request-Id"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")


class APIError(Exception):
    """An error answered to the client as-is."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        fields: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers or {}
        self.fields = fields or {}  # more members of "error" (llama-server's n_prompt_tokens, n_ctx)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code} | self.fields}


def model_not_found(model: str, known: list[str]) -> APIError:
    return APIError(404, f"model {model!r} does not exist; known models: {', '.join(known)}", code="model_not_found", param="model")


def request_id_of(request: Any) -> str | None:
    """The client's ``X-Request-Id`` header (up to 128 characters of ``[A-Za-z0-9._:/+=-]``), else None.

    The server echoes it on the response and names the request by it in engine errors, so a
    client can match every answer to what it sent."""
    given = request.headers.get(REQUEST_ID_HEADER)
    return given if given is not None and _REQUEST_ID.fullmatch(given) else None


def from_loramux(exc: LoramuxError, *, param: str | None = None) -> APIError:
    """The API error for a library error (the library's message names the input); ``param``: the
    request field a context-length error points at (default ``messages``)."""
    if isinstance(exc, QueueFullError):
        return APIError(429, str(exc), type="rate_limit_error", code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(exc, ContextLengthError):  # llama-server's type and fields, OpenAI's code
        return APIError(
            400,
            str(exc),
            type=CONTEXT_ERROR_TYPE,
            code="context_length_exceeded",
            param=param or "messages",
            fields={"n_prompt_tokens": exc.n_prompt_tokens, "n_ctx": exc.n_ctx},
        )
    if isinstance(exc, MixError):
        return APIError(400, str(exc), code="invalid_mix", param="mix")
    if isinstance(exc, RequestError):
        return APIError(400, str(exc), param=exc.param)
    if isinstance(exc, AdapterError):
        return APIError(400, str(exc))
    if isinstance(exc, RequestCancelled):
        return APIError(503, str(exc), type="server_error", code="cancelled", headers={"Retry-After": str(RETRY_AFTER_S)})
    return APIError(500, str(exc), type="server_error")


__all__ = ["APIError", "REQUEST_ID_HEADER", "RETRY_AFTER_S", "from_loramux", "model_not_found", "request_id_of"]
