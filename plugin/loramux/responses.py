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
from typing import Any, Callable, Iterable, Iterator, Sequence

from loramux.engine import Finished, TokenEvent
from loramux.tools import ToolUse

Piece = Callable[[int], str]  # token id -> its text (for logprobs)


@dataclass
class Shape:
    """What every response of one request shares."""

    chat: bool
    model: str
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. {"mix": ..., "routing": ...}
    tool_use: ToolUse | None = None  # chat: tool calls are parsed out of the answer (loramux.tools)
    id: str = ""
    created: int = 0

    def __post_init__(self) -> None:
        self.id = self.id or f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4()}"
        self.created = self.created or int(time.time())

    def head(self, *, chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}


def usage(fin: Finished, *more: Finished) -> dict[str, Any]:
    """OpenAI's usage of a request whose choices ended with ``fin`` and ``more`` (one prompt, read once)."""
    completion = fin.completion_tokens + sum(f.completion_tokens for f in more)
    return {
        "prompt_tokens": fin.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": fin.prompt_tokens + completion,
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


def chat_logprobs(events: list[TokenEvent], piece: Piece) -> dict[str, Any]:
    """OpenAI's chat ``logprobs``: ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}``."""

    def entry(token: int, logprob: float) -> dict[str, Any]:
        text = piece(token)
        return {"id": token, "token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {
        "content": [
            entry(ev.token, ev.logprob) | {"top_logprobs": [entry(t, lp) for t, lp in (ev.top_logprobs or {}).items()]} for ev in events
        ]
    }


def _logprobs(shape: Shape, events: list[TokenEvent], piece: Piece | None) -> dict[str, Any] | None:
    if piece is None or not events or events[0].logprob is None:
        return None
    return chat_logprobs(events, piece) if shape.chat else completion_logprobs(events, piece)


def _choice(shape: Shape, events: Iterable[TokenEvent | Finished], piece: Piece | None, index: int) -> tuple[dict[str, Any], Finished]:
    """One whole choice of a response, and how it ended."""
    tokens: list[TokenEvent] = []
    fin: Finished | None = None
    for ev in events:
        if isinstance(ev, Finished):
            fin = ev
        else:
            tokens.append(ev)
    assert fin is not None, "the event stream ended without Finished"
    choice: dict[str, Any] = {"index": index, "finish_reason": fin.finish_reason, "logprobs": _logprobs(shape, tokens, piece)}
    if shape.chat:
        choice["message"] = {"role": "assistant", "content": fin.text}
        if shape.tool_use is not None and (called := shape.tool_use.parse(fin.text)) is not None:
            choice["message"] |= {"content": called[0], "tool_calls": called[1]}
            choice["finish_reason"] = "tool_calls"
    else:
        choice["text"] = fin.text
    return choice, fin


def whole(shape: Shape, events: Iterable[TokenEvent | Finished], piece: Piece | None = None) -> dict[str, Any]:
    """The whole (non-streamed) response of one request."""
    return whole_choices(shape, [events], piece)


def whole_choices(shape: Shape, choices: Sequence[Iterable[TokenEvent | Finished]], piece: Piece | None = None) -> dict[str, Any]:
    """The whole response of a request with several choices (OpenAI's ``n``): one event stream each."""
    made = [_choice(shape, events, piece, i) for i, events in enumerate(choices)]
    fins = [fin for _, fin in made]
    return shape.head(chunk=False) | {"choices": [c for c, _ in made], "usage": usage(*fins), "path": fins[0].path} | shape.extra


def _chunk(shape: Shape, text: str | None, finish: str | None, *, role: bool = False, index: int = 0) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": index, "finish_reason": finish, "logprobs": None}
    if shape.chat:
        delta: dict[str, Any] = {"role": "assistant", "content": None} if role else {}  # OpenAI's and llama-server's first delta
        if text:
            delta["content"] = text
        choice["delta"] = delta
    else:
        choice["text"] = text or ""
    return shape.head(chunk=True) | {"choices": [choice]} | shape.extra


def usage_chunk(shape: Shape, fins: Sequence[Finished]) -> dict[str, Any]:
    """OpenAI's ``stream_options.include_usage``: the usage in a chunk of its own, with no choices."""
    return shape.head(chunk=True) | {"choices": [], "usage": usage(*fins)} | shape.extra


class StreamShaper:
    """The chunks of a streamed response, event by event (for threads and for asyncio alike):
    a first chunk (chat: the role), one chunk per released text, a last chunk with
    ``finish_reason``, then, when ``include_usage`` (OpenAI's ``stream_options``), a chunk with
    ``usage`` and no choices. ``index``: the choice these chunks belong to (OpenAI's ``n``)."""

    def __init__(self, shape: Shape, *, include_usage: bool = False, piece: Piece | None = None, index: int = 0) -> None:
        self.shape, self.include_usage, self.piece, self.index = shape, include_usage, piece, index
        self.held = shape.tool_use.holder() if shape.chat and shape.tool_use is not None else None  # text that may be a call

    def first(self) -> list[dict[str, Any]]:
        return [_chunk(self.shape, None, None, role=True, index=self.index)] if self.shape.chat else []

    def on_event(self, ev: TokenEvent | Finished) -> list[dict[str, Any]]:
        if isinstance(ev, Finished):
            tail, calls = self.held.finish(ev.tail) if self.held is not None else (ev.tail, [])
            out = [_chunk(self.shape, tail, None, index=self.index)] if tail else []
            if calls:  # the tool calls, whole, in one delta
                out.append(_chunk(self.shape, None, None, index=self.index))
                out[-1]["choices"][0]["delta"]["tool_calls"] = calls
            last = _chunk(self.shape, None, "tool_calls" if calls else ev.finish_reason, index=self.index) | {"path": ev.path}
            return out + [last] + ([usage_chunk(self.shape, [ev])] if self.include_usage else [])
        logprobs = _logprobs(self.shape, [ev], self.piece)
        text = self.held.feed(ev.text) if self.held is not None else ev.text
        if not text and logprobs is None:
            return []
        c = _chunk(self.shape, text, None, index=self.index)
        c["choices"][0]["logprobs"] = logprobs
        return [c]


def chunks(
    shape: Shape, events: Iterable[TokenEvent | Finished], *, include_usage: bool = False, piece: Piece | None = None
) -> Iterator[dict[str, Any]]:
    """The streamed response of ``events`` (see :class:`StreamShaper`)."""
    shaper = StreamShaper(shape, include_usage=include_usage, piece=piece)
    yield from shaper.first()
    for ev in events:
        yield from shaper.on_event(ev)


__all__ = ["Shape", "StreamShaper", "chat_logprobs", "chunks", "completion_logprobs", "usage", "usage_chunk", "whole", "whole_choices"]
