"""OpenAI / llama-cpp-python shaped responses, built from the engine's events.

One module shapes every answer, whoever asked: :class:`~loramux.AdapterPool`'s
``create_completion`` / ``create_chat_completion`` (whole or streamed) and the server's
``/v1/completions`` and ``/v1/chat/completions``. Every response and chunk carries ``"mix"``:
the validated mix that was used (zero weights dropped), and ``"path"``: ``"native"``
(per-sequence mix) or ``"context"`` (the mix set on the whole context).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from loramux.engine import Finished, TokenEvent

Piece = Callable[[int], str]  # token id -> its text (for logprobs)


@dataclass
class Shape:
    """What every response of one request shares."""

    chat: bool
    model: str
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. {"mix": ..., "routing": ...}
    id: str = ""
    created: int = 0

    def __post_init__(self) -> None:
        self.id = self.id or f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4()}"
        self.created = self.created or int(time.time())

    def head(self, *, chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}


def usage(fin: Finished) -> dict[str, Any]:
    return {
        "prompt_tokens": fin.prompt_tokens,
        "completion_tokens": fin.completion_tokens,
        "total_tokens": fin.prompt_tokens + fin.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": fin.cached_tokens},
    }


def completion_logprobs(events: list[TokenEvent], piece: Piece, offset: int = 0) -> dict[str, Any]:
    """llama-cpp-python's ``logprobs`` of a text completion (tokens, text_offset, token_logprobs, top_logprobs)."""
    out: dict[str, list] = {"tokens": [], "text_offset": [], "token_logprobs": [], "top_logprobs": []}
    for ev in events:
        text = piece(ev.token)
        out["tokens"].append(text)
        out["text_offset"].append(offset)
        out["token_logprobs"].append(ev.logprob)
        out["top_logprobs"].append({piece(t): lp for t, lp in (ev.top_logprobs or {}).items()} or None)
        offset += len(text)
    return out


def whole(shape: Shape, events: Iterable[TokenEvent | Finished], piece: Piece | None = None) -> dict[str, Any]:
    """The whole (non-streamed) response of one request."""
    tokens: list[TokenEvent] = []
    fin: Finished | None = None
    for ev in events:
        if isinstance(ev, Finished):
            fin = ev
        else:
            tokens.append(ev)
    assert fin is not None, "the event stream ended without Finished"
    choice: dict[str, Any] = {"index": 0, "finish_reason": fin.finish_reason, "logprobs": None}
    if piece is not None and tokens and tokens[0].logprob is not None:
        choice["logprobs"] = completion_logprobs(tokens, piece)
    if shape.chat:
        choice["message"] = {"role": "assistant", "content": fin.text}
    else:
        choice["text"] = fin.text
    return shape.head(chunk=False) | {"choices": [choice], "usage": usage(fin), "path": fin.path} | shape.extra


def _chunk(shape: Shape, text: str | None, finish: str | None, *, role: bool = False) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
    if shape.chat:
        delta: dict[str, Any] = {"role": "assistant"} if role else {}
        if text:
            delta["content"] = text
        choice["delta"] = delta
    else:
        choice["text"] = text or ""
    return shape.head(chunk=True) | {"choices": [choice]} | shape.extra


class StreamShaper:
    """The chunks of a streamed response, event by event (for threads and for asyncio alike):
    a first chunk (chat: the role), one chunk per released text, a last chunk with
    ``finish_reason`` (and ``usage`` when ``include_usage``, OpenAI's ``stream_options``)."""

    def __init__(self, shape: Shape, *, include_usage: bool = False, piece: Piece | None = None) -> None:
        self.shape, self.include_usage, self.piece = shape, include_usage, piece

    def first(self) -> list[dict[str, Any]]:
        return [_chunk(self.shape, None, None, role=True)] if self.shape.chat else []

    def on_event(self, ev: TokenEvent | Finished) -> list[dict[str, Any]]:
        if isinstance(ev, Finished):
            out = [_chunk(self.shape, ev.tail, None)] if ev.tail else []
            last = _chunk(self.shape, None, ev.finish_reason) | {"path": ev.path}
            if self.include_usage:
                last["usage"] = usage(ev)
            return out + [last]
        with_lp = self.piece is not None and ev.logprob is not None and not self.shape.chat
        if not ev.text and not with_lp:
            return []
        c = _chunk(self.shape, ev.text, None)
        if with_lp:
            c["choices"][0]["logprobs"] = completion_logprobs([ev], self.piece)
        return [c]


def chunks(
    shape: Shape, events: Iterable[TokenEvent | Finished], *, include_usage: bool = False, piece: Piece | None = None
) -> Iterator[dict[str, Any]]:
    """The streamed response of ``events`` (see :class:`StreamShaper`)."""
    shaper = StreamShaper(shape, include_usage=include_usage, piece=piece)
    yield from shaper.first()
    for ev in events:
        yield from shaper.on_event(ev)


__all__ = ["Shape", "StreamShaper", "chunks", "completion_logprobs", "usage", "whole"]
