"""Requests of the pool's front end: :class:`PoolRequest` in, :class:`PoolResult` out, sampling keywords.

:func:`sampling_from` turns llama-cpp-python's sampling keywords (with its defaults for
completions and for chat) into :class:`~loramux.engine.SamplingParams`, refusing keywords that
loramux does not compute. :func:`iter_results` runs many requests through an engine at once
(the engine batches them; a window of submitted requests keeps the queue bounded) and yields
the results as they end.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Mapping, Sequence

from loramux import responses
from loramux.base_text import NEW_TURN, ChatTurn
from loramux.engine import GREEDY, Finished, SamplingParams
from loramux.errors import LoramuxError, RequestError
from loramux.mix import MixLike
from loramux.structured import grammar_for
from loramux.tools import ToolUse, constrain
from loramux.tools import tool_use as tool_use_of

SAMPLING_KEYS = (
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "typical_p",
    "repeat_penalty",
    "frequency_penalty",
    "presence_penalty",
    "seed",
    "logit_bias",
    "grammar",  # GBNF text (llama.cpp's grammar sampler)
    "response_format",  # OpenAI's: text, json_object, json_schema (turned into a grammar)
)
COMPLETION_DEFAULTS = SamplingParams()  # llama_cpp.Llama.create_completion's defaults
CHAT_DEFAULTS = SamplingParams(temperature=0.2)  # ... and create_chat_completion's


def sampling_from(kwargs: Mapping[str, Any], *, chat: bool, default: SamplingParams | None = None) -> SamplingParams:
    """SamplingParams from llama-cpp-python keywords; a None value keeps the default."""
    unknown = sorted(set(kwargs) - set(SAMPLING_KEYS))
    if unknown:
        raise RequestError(f"unsupported keyword(s) {', '.join(unknown)}; loramux takes {', '.join(SAMPLING_KEYS)}")
    base = default or (CHAT_DEFAULTS if chat else COMPLETION_DEFAULTS)
    given = {k: v for k, v in kwargs.items() if v is not None}
    if "response_format" in given:
        if "grammar" in given:
            raise RequestError("give grammar or response_format, not both", param="grammar")
        grammar = grammar_for(given.pop("response_format"))
        if grammar is not None:
            given["grammar"] = grammar
    try:
        return replace(base, **given)
    except TypeError as exc:
        raise RequestError(f"bad sampling keywords {given}: {exc}") from None


@dataclass
class PoolRequest:
    """One request: ``prompt`` (text or token ids) or chat ``messages``, its mix, limits and sampling.

        ``max_tokens=None``: until an end-of-generation token or the end of the context. ``stop``
        strings end generation (the text is cut before them); the model's end-of-generation tokens
        always do. ``sampling`` defaults to greedy, as :class:`~loramux.engine.EngineRequest`'s; every
    field is checked once, by the engine's request types when the pool builds the engine request.
    ``tools`` / ``tool_choice`` (OpenAI's, chat only) are checked here (:func:`loramux.tools.tool_use`);
    ``tool_use`` is what they mean (None: a plain answer), and a required or named ``tool_choice``
    puts its call grammar into ``sampling.grammar`` here, as ``response_format`` does in :func:`sampling_from`.
    """

    prompt: str | Sequence[int] | None = None
    messages: Sequence[Mapping[str, Any]] | None = None
    mix: MixLike = None
    max_tokens: int | None = 16
    stop: Sequence[str] = ()
    sampling: SamplingParams = GREEDY
    logprobs: int | None = None
    request_id: Any = None
    tools: Sequence[Mapping[str, Any]] | None = None
    tool_choice: Any = None
    tool_use: ToolUse | None = field(default=None, init=False, repr=False)
    add_generation_prompt: bool | None = None  # None: open the assistant's turn unless a last assistant message is continued
    continue_final_message: bool | None = None  # None: continue a last assistant message (llama-server's prefill)
    turn: ChatTurn = field(default=NEW_TURN, init=False, repr=False)

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise LoramuxError("a PoolRequest takes exactly one of prompt= or messages=")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        if self.messages is not None:
            self.turn = chat_turn(self.messages, self.add_generation_prompt, self.continue_final_message)
        self.tool_use = tool_use_of(self.tools, self.tool_choice, chat=self.messages is not None)
        grammar = constrain(self.sampling.grammar, self.tool_use)
        if grammar != self.sampling.grammar:
            self.sampling = replace(self.sampling, grammar=grammar)


def chat_turn(messages: Sequence[Mapping[str, Any]], generation_prompt: Any, continue_final: Any) -> ChatTurn:
    """How ``messages`` end the prompt: a last assistant message is continued unless
    ``continue_final_message`` is false or ``add_generation_prompt`` true (then, as with other roles,
    the assistant's turn is opened unless ``add_generation_prompt`` is false). Continuing needs a
    last assistant message (one: two at the end are refused), and excludes ``add_generation_prompt``."""
    for name, value in (("add_generation_prompt", generation_prompt), ("continue_final_message", continue_final)):
        if value is not None and not isinstance(value, bool):
            raise RequestError(f"{name} must be true or false, got {value!r}", param=name)
    last_is_assistant = bool(messages) and messages[-1].get("role") == "assistant"
    if last_is_assistant and len(messages) > 1 and messages[-2].get("role") == "assistant":
        raise RequestError("two assistant messages end the conversation: one at most can be continued", param="messages")
    if continue_final and not last_is_assistant:
        raise RequestError("continue_final_message needs the last message to be the assistant's", param="continue_final_message")
    if continue_final and generation_prompt:
        raise RequestError("continue_final_message and add_generation_prompt exclude each other: give one", param="continue_final_message")
    go_on = (last_is_assistant and generation_prompt is None) if continue_final is None else continue_final
    return ChatTurn(generation_prompt=generation_prompt is not False and not go_on, continue_final=go_on)


@dataclass
class PoolResult:
    """What one request produced, and how its mix ran (``"native"``: per sequence; ``"context"``)."""

    text: str
    finish_reason: str  # "stop" or "length"
    mix: dict[str, Any]  # Mix.to_json(): {name: weight}, or {"mode", "k", "temperature"} for a routed mix
    prompt_tokens: int
    completion_tokens: int
    path: str
    tokens: list[int]
    cached_tokens: int = 0
    finished: Finished | None = field(default=None, repr=False)

    @classmethod
    def from_finished(cls, fin: Finished) -> "PoolResult":
        return cls(
            text=fin.text,
            finish_reason=fin.finish_reason,
            mix=fin.mix.to_json(),
            prompt_tokens=fin.prompt_tokens,
            completion_tokens=fin.completion_tokens,
            path=fin.path,
            tokens=list(fin.tokens),
            cached_tokens=fin.cached_tokens,
            finished=fin,
        )

    def as_dict(self, model: str, *, chat: bool, tool_use: ToolUse | None = None) -> dict[str, Any]:
        """An OpenAI-style (chat) completion dict, shaped as every other response (:mod:`loramux.responses`);
        ``tool_use``: the request's tools, whose calls are read out of the answer."""
        assert self.finished is not None
        shape = responses.Shape(chat=chat, model=model, extra={"mix": self.mix}, tool_use=tool_use)
        return responses.whole(shape, [self.finished])


def mixes_for(items: Sequence[Any], mixes: Sequence[MixLike] | None, mix: MixLike) -> list[MixLike]:
    if mixes is None:
        return [mix] * len(items)
    if mix is not None:
        raise LoramuxError("give either mixes= (one per request) or mix= (one for all), not both")
    if len(mixes) != len(items):
        raise LoramuxError(f"{len(items)} requests but {len(mixes)} mixes: give one mix per request")
    return list(mixes)


def iter_results(engine_requests: Sequence[Any], submit: Callable[[Any], Any], *, window: int) -> Iterator[tuple[int, PoolResult]]:
    """Submit ``engine_requests`` (already validated) with ``submit``; yield ``(index, result)`` as each ends.

    At most ``window`` are submitted at a time, so the rest wait here, not in the engine's
    bounded queue; ``window=1`` runs them one after another. Closing the iterator early cancels
    the rest."""
    todo = deque(enumerate(engine_requests))
    active: dict[int, Any] = {}
    done: queue.SimpleQueue = queue.SimpleQueue()
    try:
        while todo or active:
            while todo and len(active) < window:
                i, er = todo.popleft()
                active[i] = submit(er)
                threading.Thread(target=_wait, args=(i, active[i], done), daemon=True).start()
            i = done.get()
            handle = active.pop(i)
            yield i, PoolResult.from_finished(handle.result())
    finally:
        for handle in active.values():
            handle.cancel()


def _wait(i: int, handle: Any, done: queue.SimpleQueue) -> None:
    try:
        handle.result()
    except Exception:
        pass  # raised again by handle.result() in iter_results
    done.put(i)


__all__ = [
    "CHAT_DEFAULTS",
    "COMPLETION_DEFAULTS",
    "PoolRequest",
    "PoolResult",
    "SAMPLING_KEYS",
    "iter_results",
    "mixes_for",
    "sampling_from",
]
