"""OpenAI request bodies to :class:`~loramux.pool_requests.PoolRequest` (the same request the Python API makes).

Sampling fields keep llama-cpp-python's / llama-server's meanings and defaults (``top_k``,
``min_p``, ``repeat_penalty`` are accepted beside OpenAI's own). Fields that would change what
is computed and that loramux does not compute are refused with 400, never ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from loramux.errors import LoramuxError
from loramux.pool_requests import SAMPLING_KEYS, PoolRequest, sampling_from
from loramux.server.errors import APIError, from_loramux
from loramux.server.llama_fields import translate

SAMPLING_FIELDS = SAMPLING_KEYS  # the pool's own list: a request means the same through either door
REFUSED = ("functions", "function_call", "suffix")  # functions / function_call: OpenAI's old names of tools
TOOL_MESSAGE_FIELDS = ("tool_calls", "tool_call_id", "name")  # kept on messages, rendered by loramux.tools
MAX_TOP_LOGPROBS = 20  # OpenAI's limit
CHAT_TURN_FIELDS = ("add_generation_prompt", "continue_final_message")  # vLLM's and llama-server's
TEXT_PART_JOIN = "\n\n"  # between the text parts of one message (llama-server's join)


MAX_N = 16  # choices of one request (each takes a sequence of the engine)


@dataclass
class ParsedBody:
    request: PoolRequest
    stream: bool
    include_usage: bool
    n: int = 1  # choices, decoded together from one prompt under one mix


@dataclass(frozen=True)
class RequestDefaults:
    """What a request that leaves a field out gets (the server's --n-predict, --temp, --seed)."""

    max_tokens: int | None = None  # -1: until the end of the context; None: OpenAI's defaults
    temperature: float | None = None
    seed: int | None = None


def _refuse_unsupported(body: Mapping[str, Any]) -> None:
    for key in REFUSED:
        if body.get(key) not in (None, [], {}):
            hint = " (use tools and tool_choice)" if key.startswith("function") else ""
            raise APIError(400, f"{key!r} is not supported by loramux{hint}", param=key)
    if body.get("best_of") not in (None, 1, body.get("n")):
        raise APIError(400, f"best_of={body.get('best_of')!r}: loramux returns every choice it generates (give n)", param="best_of")
    if body.get("echo"):
        raise APIError(400, "echo is not supported by loramux", param="echo")


def _choices(body: Mapping[str, Any]) -> int:
    n = body.get("n", 1)
    if n is None:
        return 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
        raise APIError(400, f"n must be a whole number from 1 to {MAX_N}, got {n!r}", param="n")
    return n


def text_field(value: Any, param: str) -> str:
    """``value`` if it is a string that UTF-8 can encode (a lone surrogate cannot), else a 400 naming ``param``."""
    if not isinstance(value, str):
        raise APIError(400, f"{param} must be a string, got {type(value).__name__}", param=param)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise APIError(400, f"{param} is not valid Unicode text ({exc.reason} at {exc.start})", param=param) from None
    return value


def _stops(body: Mapping[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop") or ()
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise APIError(400, "stop must be a string or a list of strings", param="stop")
    return tuple(text_field(s, "stop") for s in stop)


def _max_tokens(body: Mapping[str, Any], default: int | None, *, chat: bool) -> int | None:
    """OpenAI's max_completion_tokens / max_tokens (llama-server's n_predict); -1: until the end of the context."""
    given = body.get("max_completion_tokens", body.get("max_tokens"))
    if given is None:  # the server's default, else OpenAI's: 16 for completions, no limit for chat
        given = default if default is not None else (-1 if chat else 16)
    if given == -1 and not isinstance(given, bool):
        return None
    return given  # its type and range: EngineRequest's checks


def _common(body: Mapping[str, Any], *, chat: bool, defaults: RequestDefaults) -> dict[str, Any]:
    _refuse_unsupported(body)
    given: dict[str, Any] = {k: body[k] for k in SAMPLING_FIELDS if body.get(k) is not None}
    for key in ("temperature", "seed"):
        if key not in given and getattr(defaults, key) is not None:
            given[key] = getattr(defaults, key)
    if body.get("json_schema") is not None:  # llama-server's field: a schema the answer must validate against
        if "response_format" in given:
            raise APIError(400, "give response_format or json_schema, not both", param="json_schema")
        given["response_format"] = {"type": "json_schema", "json_schema": {"schema": body["json_schema"]}}
    try:  # types and ranges are the engine's request checks (SamplingParams, EngineRequest), not copied here
        sampling = sampling_from(given, chat=chat)
    except LoramuxError as exc:
        raise from_loramux(exc) from None
    return {"sampling": sampling, "stop": _stops(body), "max_tokens": _max_tokens(body, defaults.max_tokens, chat=chat)}


def _stream_flags(body: Mapping[str, Any]) -> tuple[bool, bool]:
    opts = body.get("stream_options") or {}
    return bool(body.get("stream")), bool(isinstance(opts, Mapping) and opts.get("include_usage"))


def completion_body(body: Mapping[str, Any], defaults: RequestDefaults = RequestDefaults()) -> ParsedBody:
    """A (llama-server or OpenAI) completion body as the request the Python API makes."""
    body = translate(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    ok_tokens = isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    if not (isinstance(prompt, str) or ok_tokens):
        raise APIError(400, "prompt must be a string (or one list of token ids); one prompt per request", param="prompt")
    if isinstance(prompt, str):
        text_field(prompt, "prompt")
    common = _common(body, chat=False, defaults=defaults)
    logprobs = _top_count(body.get("logprobs", body.get("n_probs")), "logprobs" if "logprobs" in body else "n_probs")
    stream, usage = _stream_flags(body)
    tools = {"tools": body.get("tools"), "tool_choice": body.get("tool_choice")}  # refused by PoolRequest: tools take messages
    return ParsedBody(PoolRequest(prompt=prompt, logprobs=logprobs, **tools, **common), stream, usage, _choices(body))


def _top_count(value: Any, param: str) -> int | None:
    """How many most likely tokens to report beside each token (None: no log-probabilities)."""
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_TOP_LOGPROBS:
        raise APIError(400, f"{param} must be a whole number from 0 to {MAX_TOP_LOGPROBS}", param=param)
    return value


def _chat_logprobs(body: Mapping[str, Any]) -> int | None:
    """OpenAI's chat ``logprobs`` (bool) and ``top_logprobs`` (0..20), or llama-server's ``n_probs``."""
    wanted, top = body.get("logprobs"), body.get("top_logprobs")
    if wanted is not None and not isinstance(wanted, bool):
        raise APIError(400, "logprobs must be true or false on chat completions (top_logprobs gives how many)", param="logprobs")
    if top is not None and not wanted:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    if wanted:
        return _top_count(0 if top is None else top, "top_logprobs")
    return _top_count(body.get("n_probs"), "n_probs")


def chat_body(body: Mapping[str, Any], defaults: RequestDefaults = RequestDefaults()) -> ParsedBody:
    """A chat completion body as the request the Python API makes."""
    body = translate(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, Mapping) and "role" in m for m in messages):
        raise APIError(400, 'messages must be a non-empty list of {"role", "content"}', param="messages")
    for m in messages:
        text_field(m["role"], "messages[].role")
    msgs = [{"role": m["role"], "content": _text_content(m.get("content"))} | _tool_fields(m) for m in messages]
    stream, usage = _stream_flags(body)
    common = _common(body, chat=True, defaults=defaults)
    tools = {"tools": body.get("tools"), "tool_choice": body.get("tool_choice")}  # checked by PoolRequest (loramux.tools)
    turn = {k: body[k] for k in CHAT_TURN_FIELDS if body.get(k) is not None}  # checked by PoolRequest (chat_turn)
    req = PoolRequest(messages=msgs, logprobs=_chat_logprobs(body), **tools, **turn, **common)
    return ParsedBody(req, stream, usage, _choices(body))


def _tool_fields(m: Mapping[str, Any]) -> dict[str, Any]:
    """A message's tool fields (an assistant's ``tool_calls``, a tool result's ``tool_call_id``), checked where rendered."""
    return {k: m[k] for k in TOOL_MESSAGE_FIELDS if m.get(k) is not None}


def _text_content(content: Any) -> str:
    """A message's text (a string, or OpenAI's list of ``{"type": "text", "text"}`` parts, joined by a
    blank line as llama-server joins them)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return text_field(content, "messages[].content")
    if isinstance(content, list) and all(isinstance(p, Mapping) and p.get("type") == "text" for p in content):
        return text_field(TEXT_PART_JOIN.join(str(p.get("text", "")) for p in content), "messages[].content")
    raise APIError(400, "message content must be text (images and audio are not supported)", param="messages")


def prompt_text(req: PoolRequest) -> str:
    """The text a router reads: the last user message, or the prompt."""
    if req.messages is not None:
        users = [m["content"] for m in req.messages if m.get("role") == "user"]
        return users[-1] if users else str(req.messages[-1].get("content", ""))
    return req.prompt if isinstance(req.prompt, str) else ""


__all__ = ["ParsedBody", "RequestDefaults", "chat_body", "completion_body", "prompt_text", "text_field"]
