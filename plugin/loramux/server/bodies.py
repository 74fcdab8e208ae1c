"""OpenAI request bodies to :class:`~loramux.pool_requests.PoolRequest` (the same request the Python API makes).

Sampling fields keep llama-cpp-python's / llama-server's meanings and defaults (``top_k``,
``min_p``, ``repeat_penalty`` are accepted beside OpenAI's own). Fields that would change what
is computed and that loramux does not compute are refused with 400, never ignored.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from loramux.errors import LoramuxError
from loramux.pool_requests import PoolRequest, sampling_from
from loramux.server.errors import APIError

SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "min_p", "typical_p", "repeat_penalty", "frequency_penalty",
                   "presence_penalty", "seed", "logit_bias")
REFUSED = ("tools", "tool_choice", "functions", "function_call", "grammar", "json_schema", "suffix")


@dataclass
class ParsedBody:
    request: PoolRequest
    stream: bool
    include_usage: bool


def _refuse_unsupported(body: Mapping[str, Any]) -> None:
    for key in REFUSED:
        if body.get(key) not in (None, [], {}):
            raise APIError(400, f"{key!r} is not supported by loramux", param=key)
    rf = body.get("response_format")
    if rf not in (None, {}) and not (isinstance(rf, Mapping) and rf.get("type") == "text"):
        raise APIError(400, "response_format other than text is not supported by loramux", param="response_format")
    for key in ("n", "best_of"):
        if body.get(key) not in (None, 1):
            raise APIError(400, f"{key}={body.get(key)!r}: loramux answers one choice per request (n=1)", param=key)
    if body.get("echo"):
        raise APIError(400, "echo is not supported by loramux", param="echo")


def _common(body: Mapping[str, Any], *, chat: bool) -> dict[str, Any]:
    _refuse_unsupported(body)
    given = {k: body[k] for k in SAMPLING_FIELDS if body.get(k) is not None}
    if isinstance(given.get("logit_bias"), Mapping):
        try:
            given["logit_bias"] = {int(k): float(v) for k, v in given["logit_bias"].items()}
        except (TypeError, ValueError):
            raise APIError(400, "logit_bias maps token ids to numbers", param="logit_bias") from None
    try:
        sampling = sampling_from(given, chat=chat)
    except LoramuxError as exc:
        raise APIError(400, str(exc)) from None
    stop = body.get("stop") or ()
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise APIError(400, "stop must be a string or a list of strings", param="stop")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1):
        raise APIError(400, f"max_tokens must be a whole number >= 1, got {max_tokens!r}", param="max_tokens")
    return {"sampling": sampling, "stop": tuple(stop), "max_tokens": max_tokens}


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
        raise APIError(400, "messages must be a non-empty list of {\"role\", \"content\"}", param="messages")
    if body.get("logprobs"):
        raise APIError(400, "logprobs on chat completions are not supported by loramux (use /v1/completions)", param="logprobs")
    msgs = [{"role": m["role"], "content": _text_content(m.get("content"))} for m in messages]
    stream, usage = _stream_flags(body)
    return ParsedBody(PoolRequest(messages=msgs, **_common(body, chat=True)), stream, usage)


def _text_content(content: Any) -> str:
    """A message's text (a string, or OpenAI's list of ``{"type": "text", "text"}`` parts)."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(isinstance(p, Mapping) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise APIError(400, "message content must be text (images and audio are not supported)", param="messages")


def prompt_text(req: PoolRequest) -> str:
    """The text a router reads: the last user message, or the prompt."""
    if req.messages is not None:
        users = [m["content"] for m in req.messages if m.get("role") == "user"]
        return users[-1] if users else str(req.messages[-1].get("content", ""))
    return req.prompt if isinstance(req.prompt, str) else ""


__all__ = ["ParsedBody", "chat_body", "completion_body", "prompt_text"]
