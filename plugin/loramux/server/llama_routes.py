"""llama-server's own routes on the pool's engine: ``/completion``, ``/tokenize``, ``/detokenize``,
``/apply-template``, ``/props``, ``/slots``.

``POST /completion`` (and ``/completions``, as llama-server routes it) takes llama-server's body
(``prompt`` text or token ids, ``n_predict``, ``n_probs``, its sampling fields; see
:mod:`loramux.server.llama_fields`) through the same parser, mix selection and engine as
``/v1/completions``, and answers in llama-server's shape: ``content``, ``stop``, ``stop_type``
(``eos`` / ``limit`` / ``word``), ``tokens_predicted``, ``tokens_evaluated``, ``timings``, and
``completion_probabilities`` when ``n_probs`` is given; streamed as ``data: {...}`` events, one per
token, the last with ``"stop": true`` (no ``[DONE]``, as llama-server).
"""

from __future__ import annotations

import json
from typing import Any, AsyncIterator, Mapping

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from loramux import __version__, responses
from loramux.engine import Finished, RequestHandle, TokenEvent
from loramux.errors import LoramuxError
from loramux.server.bodies import RequestDefaults, text_field
from loramux.server.errors import APIError, from_loramux
from loramux.server.openai_routes import cancel_unfinished, collect, json_body, merged, sse_event, submit
from loramux.server.timings import AnswerClock

router = APIRouter()


@router.post("/completion")
@router.post("/completions")
async def completion(request: Request):
    state = request.app.state.loramux
    body = _with_defaults(await json_body(request), state.defaults)
    prompts = native_prompts(body.get("prompt"), state.pool.text)
    if len(prompts) > 1 and body.get("stream"):
        raise APIError(400, "stream one prompt per request (several prompts are answered whole, as a list)", param="prompt")
    subs = await _submit_all(request, [body | {"prompt": p} for p in prompts])  # queued together: they decode together
    results: list[dict[str, Any]] = []
    for sub in subs:  # several prompts: each with its choices, in order, in one list
        first = sub.handles[0].request
        shape = NativeShape(
            model=str(body.get("model") or state.settings.model_id),
            prompt=state.pool.text.detokenize(first.tokens),  # the prompt as read
            piece=state.pool.piece if sub.parsed.request.logprobs is not None else None,
            return_tokens=bool(body.get("return_tokens")),
            extra=sub.extra,
            settings=generation_settings(first),
            clock=AnswerClock(),
        )
        if sub.parsed.stream:
            return StreamingResponse(_native_sse(sub.handles, shape), media_type="text/event-stream", headers=sub.headers)
        events = await collect(sub.handles, request, on_token=shape.on_token)
        results += [picked(shape.result(evs, i), body.get("response_fields")) for i, evs in enumerate(events)]
    return JSONResponse(results[0] if len(results) == 1 else results, headers=subs[-1].headers)


async def _submit_all(request: Request, bodies: list[dict[str, Any]]) -> list:
    """Submit every body (each checked); a refused one cancels those already queued."""
    subs: list = []
    try:
        for one in bodies:
            subs.append(await submit(request, one, chat=False))
    except BaseException:
        for sub in subs:
            cancel_unfinished(sub.handles)
        raise
    return subs


def native_prompts(raw: Any, text) -> list[str | list[int]]:
    """llama-server's prompt shapes as prompts: a string, token ids, ``{"prompt_string"}``, one
    sequence mixing ids and strings (joined as tokens), or a list of such prompts (several)."""
    if isinstance(raw, dict):
        if raw.get("multimodal_data"):
            raise APIError(400, "multimodal_data: loramux serves text models only", param="prompt")
        return [raw.get("prompt_string", raw.get("prompt", ""))]
    if not isinstance(raw, list) or not raw or all(isinstance(x, int) and not isinstance(x, bool) for x in raw):
        return [raw]
    if any(isinstance(x, (list, dict)) for x in raw) or all(isinstance(x, str) for x in raw):
        return [p for x in raw for p in native_prompts(x, text)]
    tokens: list[int] = []  # one sequence of ids and strings
    for x in raw:
        tokens += text.tokenize(x, add_bos=False) if isinstance(x, str) else [x]
    return [tokens]


def generation_settings(req) -> dict[str, Any]:
    """The settings a request ran with, under llama-server's names."""
    p = req.sampling
    return {
        "n_predict": -1 if req.max_tokens is None else req.max_tokens,
        "seed": p.seed,
        "temperature": p.temperature,
        "top_k": p.top_k,
        "top_p": p.top_p,
        "min_p": p.min_p,
        "typical_p": p.typical_p,
        "repeat_penalty": p.repeat_penalty,
        "repeat_last_n": p.penalty_last_n,
        "presence_penalty": p.presence_penalty,
        "frequency_penalty": p.frequency_penalty,
        "n_probs": req.logprobs or 0,
        "stop": list(req.stop),
        "grammar": p.grammar or "",
    }


def picked(result: dict[str, Any], fields: Any) -> dict[str, Any]:
    """llama-server's ``response_fields``: only those fields; ``a/b`` is ``result[a][b]`` under the key ``a/b``."""
    if not fields:
        return result
    if not isinstance(fields, list) or not all(isinstance(f, str) for f in fields):
        raise APIError(400, "response_fields must be a list of field names", param="response_fields")
    out = {}
    for name in fields:
        value: Any = result
        for part in name.split("/"):
            value = value.get(part) if isinstance(value, dict) else None
        if value is not None:
            out[name] = value
    return out


def _with_defaults(body: Mapping[str, Any], defaults: RequestDefaults) -> dict[str, Any]:
    """llama-server's default length: until the end of the context (``n_predict`` -1), or ``--n-predict``."""
    out = dict(body)
    if not any(k in out for k in ("n_predict", "max_tokens", "max_completion_tokens")):
        out["n_predict"] = -1 if defaults.max_tokens is None else defaults.max_tokens
    return out


class NativeShape:
    """What llama-server's answers of one /completion request share, and how each is built."""

    def __init__(
        self, *, model: str, prompt: str, piece, return_tokens: bool, extra: dict[str, Any], settings: dict[str, Any], clock: AnswerClock
    ) -> None:
        self.model, self.prompt, self.piece, self.return_tokens = model, prompt, piece, return_tokens
        self.extra, self.settings, self.clock = extra, settings, clock  # settings: generation_settings of the answer

    def on_token(self) -> None:
        self.clock.on_token()

    def partial(self, ev: TokenEvent, index: int) -> dict[str, Any]:
        """One streamed token, as llama-server streams it."""
        self.on_token()
        out = {"index": index, "content": ev.text, "tokens": [ev.token], "stop": False, "id_slot": -1} | self.extra
        if self.piece is not None and ev.logprob is not None:
            out["completion_probabilities"] = responses.chat_logprobs([ev], self.piece)["content"]
        return out

    def result(self, events: list, index: int) -> dict[str, Any]:
        """The whole answer of one choice (streamed: the last event, with what no token event carried)."""
        fin = next(ev for ev in events if isinstance(ev, Finished))
        tokens = [ev for ev in events if isinstance(ev, TokenEvent)]
        out = {
            "index": index,
            "content": fin.text,
            "tokens": list(fin.tokens) if self.return_tokens else [],
            "id_slot": -1,
            "stop": True,
            "model": self.model,
            "tokens_predicted": fin.completion_tokens,
            "tokens_evaluated": fin.prompt_tokens,
            "generation_settings": self.settings,
            "prompt": self.prompt,
            "has_new_line": "\n" in fin.text,
            "truncated": False,
            "stop_type": "limit" if fin.finish_reason == "length" else "word" if fin.stop_word else "eos",
            "stopping_word": fin.stop_word,
            "tokens_cached": fin.prompt_tokens + fin.completion_tokens,
            "timings": self.clock.timings(fin),
        }
        if self.piece is not None and tokens and tokens[0].logprob is not None:
            out["completion_probabilities"] = responses.chat_logprobs(tokens, self.piece)["content"]
        return out | {"path": fin.path} | self.extra


async def _native_sse(handles: list[RequestHandle], shape: NativeShape) -> AsyncIterator[bytes]:
    events: list[list] = [[] for _ in handles]
    try:
        async for i, ev in merged(handles):
            events[i].append(ev)
            if isinstance(ev, TokenEvent):
                if ev.text or shape.piece is not None:
                    yield sse_event(json.dumps(shape.partial(ev, i)))
            else:
                yield sse_event(json.dumps(shape.result(events[i], i) | {"content": ev.tail}))
    except LoramuxError as exc:  # after the headers went out: the error is the stream's last event
        yield sse_event(json.dumps(from_loramux(exc).body()))
    finally:
        cancel_unfinished(handles)


@router.post("/tokenize")
async def tokenize(request: Request) -> dict[str, Any]:
    """llama-server's ``{"content", "add_special"?, "with_pieces"?}`` -> ``{"tokens": [...]}``."""
    state = request.app.state.loramux
    body = await json_body(request)
    content = text_field(body.get("content", ""), "content")
    text = state.pool.text
    tokens = text.tokenize(content, add_bos=bool(body.get("add_special", False)), special=bool(body.get("parse_special", True)))
    if not body.get("with_pieces"):
        return {"tokens": tokens}
    return {"tokens": [{"id": t, "piece": _piece_json(text.token_bytes(t))} for t in tokens]}


def _piece_json(piece: bytes) -> str | list[int]:
    """A token's text, or its bytes when they are not whole UTF-8 (as llama-server answers)."""
    try:
        return piece.decode("utf-8")
    except UnicodeDecodeError:
        return list(piece)


@router.post("/detokenize")
async def detokenize(request: Request) -> dict[str, Any]:
    state = request.app.state.loramux
    body = await json_body(request)
    tokens = body.get("tokens", [])
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise APIError(400, "tokens must be a list of token ids", param="tokens")
    n_vocab = state.pool.text.n_vocab
    bad = [t for t in tokens if not 0 <= t < n_vocab]
    if bad:
        raise APIError(400, f"tokens holds ids outside the vocabulary (0..{n_vocab - 1}): {bad[:5]}", param="tokens")
    return {"content": state.pool.text.detokenize(tokens)}


@router.post("/apply-template")
async def apply_template(request: Request) -> dict[str, Any]:
    """The prompt the chat template makes of a chat body's messages (and tools), as the engine reads it."""
    from loramux.server.bodies import chat_body

    state = request.app.state.loramux
    parsed = chat_body(await json_body(request), state.defaults)
    try:
        req = parsed.request
        return {"prompt": state.pool.text.chat_format(req.messages, req.tool_use, req.turn).prompt}
    except LoramuxError as exc:
        raise from_loramux(exc) from None


@router.get("/props")
async def props(request: Request) -> dict[str, Any]:
    """llama-server's ``/props``: slots, the context of one, the model, its chat template, defaults."""
    state = request.app.state.loramux
    pool, s, text = state.pool, state.settings, state.pool.text
    params = {"seed": s.seed if s.seed is not None else -1, "n_predict": s.n_predict if s.n_predict is not None else -1}
    if s.temperature is not None:
        params["temperature"] = s.temperature
    return {
        "default_generation_settings": {"n_ctx": pool.n_ctx, "params": params},
        "total_slots": pool.batch_slots,
        "model_alias": s.model_id,
        "model_path": str(pool.base_path),
        "modalities": {"vision": False, "video": False, "audio": False},
        "chat_template": text.chat_template,
        "bos_token": text.detokenize([text.model.token_bos()]),
        "eos_token": text.detokenize([text.model.token_eos()]),
        "build_info": f"loramux {__version__}",
        "endpoint_slots": False,
        "endpoint_props": False,
        "endpoint_metrics": True,
    }


@router.get("/slots", include_in_schema=False)
async def slots(request: Request) -> list[dict[str, Any]]:
    """llama-server's slot listing with ``--slots`` (the engine's sequences); else 501, as llama-server."""
    state = request.app.state.loramux
    if not state.settings.slots:
        raise APIError(501, "GET /slots is off: start loramux serve with --slots", type="not_supported_error")
    n_ctx = state.pool.n_ctx
    return [{"id": i, "id_task": -1, "n_ctx": n_ctx, "is_processing": busy} for i, busy in enumerate(state.pool.busy_slots)]


@router.post("/chat/completions/input_tokens")
@router.post("/v1/chat/completions/input_tokens")
async def input_tokens(request: Request) -> dict[str, int]:
    """The number of prompt tokens a chat body makes (llama-server's and OpenAI's token count)."""
    from loramux.server.bodies import chat_body

    state = request.app.state.loramux
    req = chat_body(await json_body(request), state.defaults).request
    try:
        tokens, _ = state.pool.text.prompt_of(None, req.messages, req.tool_use, req.turn)
    except LoramuxError as exc:
        raise from_loramux(exc) from None
    return {"input_tokens": len(tokens)}


__all__ = ["router"]
