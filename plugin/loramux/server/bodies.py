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

SAMPLING_FIELDS = SAMPLING_KEYS  # the pool's own list: a request means the same through either door
REFUSED = ("tools", "tool_choice", "functions", "function_call", "suffix")


@dataclass
class ParsedBody:
    request: PoolRequest
    stream: bool
    include_usage: bool


def _refuse_unsupported(body: Mapping[str, Any]) -> None:
    for key in REFUSED:
        if body.get(key) not in (None, [], {}):
            raise APIError(400, f"{key!r} is not supported by loramux", param=key)
    for key in ("n", "best_of"):
        if body.get(key) not in (None, 1):
            raise APIError(400, f"{key}={body.get(key)!r}: loramux answers one choice per request (n=1)", param=key)
    if body.get("echo"):
        raise APIError(400, "echo is not supported by loramux", param="echo")


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


def _common(body: Mapping[str, Any], *, chat: bool) -> dict[str, Any]:
    _refuse_unsupported(body)
    given: dict[str, Any] = {k: body[k] for k in SAMPLING_FIELDS if body.get(k) is not None}
    if body.get("json_schema") is not None:  # llama-server's field: a schema the answer must validate against
        if "response_format" in given:
            raise APIError(400, "give response_format or json_schema, not both", param="json_schema")
        given["response_format"] = {"type": "json_schema", "json_schema": {"schema": body["json_schema"]}}
    try:  # types and ranges are the engine's request checks (SamplingParams, EngineRequest), not copied here
        sampling = sampling_from(given, chat=chat)
    except LoramuxError as exc:
        raise from_loramux(exc) from None
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    return {"sampling": sampling, "stop": _stops(body), "max_tokens": max_tokens}


def _stream_flags(body: Mapping[str, Any]) -> tuple[bool, bool]:
    opts = body.get("stream_options") or {}
    return bool(body.get("stream")), bool(isinstance(opts, Mapping) and opts.get("include_usage"))


def completion_body(body: Mapping[str, Any]) -> ParsedBody:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    ok_tokens = isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    if not (isinstance(prompt, str) or ok_tokens):
        raise APIError(400, "prompt must be a string (or one list of token ids); one prompt per request", param="prompt")
    if isinstance(prompt, str):
        text_field(prompt, "prompt")
    common = _common(body, chat=False)
    if common["max_tokens"] is None:
        common["max_tokens"] = 16  # OpenAI's and llama-cpp-python's default for completions
    logprobs = body.get("logprobs")
    if logprobs is not None and (not isinstance(logprobs, int) or isinstance(logprobs, bool) or not 0 <= logprobs <= 20):
        raise APIError(400, "logprobs must be a whole number from 0 to 20", param="logprobs")
    stream, usage = _stream_flags(body)
    return ParsedBody(PoolRequest(prompt=prompt, logprobs=logprobs, **common), stream, usage)


def chat_body(body: Mapping[str, Any]) -> ParsedBody:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, Mapping) and "role" in m for m in messages):
        raise APIError(400, 'messages must be a non-empty list of {"role", "content"}', param="messages")
    for m in messages:
        text_field(m["role"], "messages[].role")
    if body.get("logprobs"):
        raise APIError(400, "logprobs on chat completions are not supported by loramux (use /v1/completions)", param="logprobs")
    msgs = [{"role": m["role"], "content": _text_content(m.get("content"))} for m in messages]
    stream, usage = _stream_flags(body)
    return ParsedBody(PoolRequest(messages=msgs, **_common(body, chat=True)), stream, usage)


def _text_content(content: Any) -> str:
    """A message's text (a string, or OpenAI's list of ``{"type": "text", "text"}`` parts)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return text_field(content, "messages[].content")
    if isinstance(content, list) and all(isinstance(p, Mapping) and p.get("type") == "text" for p in content):
        return text_field("".join(str(p.get("text", "")) for p in content), "messages[].content")
    raise APIError(400, "message content must be text (images and audio are not supported)", param="messages")


def prompt_text(req: PoolRequest) -> str:
    """The text a router reads: the last user message, or the prompt."""
    if req.messages is not None:
        users = [m["content"] for m in req.messages if m.get("role") == "user"]
        return users[-1] if users else str(req.messages[-1].get("content", ""))
    return req.prompt if isinstance(req.prompt, str) else ""


__all__ = ["ParsedBody", "chat_body", "completion_body", "prompt_text", "text_field"]
