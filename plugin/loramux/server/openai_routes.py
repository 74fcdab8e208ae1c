"""``/v1/completions`` and ``/v1/chat/completions`` on the pool's engine (and ``/v1/models``).

A request is parsed into the same :class:`~loramux.pool_requests.PoolRequest` the Python API
makes, its mix selected (:mod:`loramux.server.selection`), submitted to the engine from the
event loop, and answered with the same shapes (:mod:`loramux.responses`): whole, or streamed as
server-sent events (``data: {chunk}`` ... ``data: [DONE]``, through starlette's StreamingResponse). A client that goes away cancels
its request at once (streamed: the stream is closed; whole: a watcher sees the disconnect).
"""

from __future__ import annotations

import asyncio
import json
import time
import traceback
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from loramux import responses
from loramux.engine import Finished, RequestHandle
from loramux.errors import LoramuxError
from loramux.server import schema
from loramux.server.bodies import ParsedBody, chat_body, completion_body, prompt_text
from loramux.server.errors import APIError, from_loramux, request_id_of
from loramux.server.llama_fields import token_bias
from loramux.server.selection import Selection
from loramux.server.timings import AnswerClock

router = APIRouter()
PRESELECTED = "loramux.selection"  # ASGI scope key: the Selection an ingress in front made (loramux.ray)
UNKNOWN_MODEL_HEADER = "X-Loramux-Unknown-Model"  # the model name a request gave that names nothing here (answered as no model)


async def json_body(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise APIError(400, "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body


@router.get("/v1/models")
@router.get("/models")
async def models(request: Request) -> dict[str, Any]:
    state = request.app.state.loramux
    now = int(time.time())
    s = state.settings
    base = {"aliases": s.aliases or [s.model_id], "tags": s.tags}  # llama-server's fields of its model
    return {
        "object": "list",
        "data": [
            {"id": m, "object": "model", "created": now, "owned_by": "loramux"} | (base if m == s.model_id else {})
            for m in state.selector.models()
        ],
    }


@router.post("/v1/completions", **schema.GENERATION)
async def completions(request: Request):
    return await _answer(request, chat=False)


@router.post("/v1/chat/completions", **schema.CHAT_GENERATION)
@router.post("/chat/completions", include_in_schema=False)
async def chat_completions(request: Request):
    return await _answer(request, chat=True)


@dataclass
class Submitted:
    """A request the engine runs: its parsed body, its handles (one per choice), and what its answers share."""

    parsed: ParsedBody
    handles: list[RequestHandle]
    extra: dict[str, Any]  # mix, mix_source, routing: every answer and chunk carries them
    headers: dict[str, str]


async def parse_and_select(request: Request, body: dict[str, Any], *, chat: bool) -> tuple[ParsedBody, Selection]:
    """``body`` parsed as a chat or completion request and its mix selected, set on the parsed request:
    the one path every route that runs a request takes (generation, the routing record, loramux.ray's
    ingress); errors as 4xx naming the field."""
    state = request.app.state.loramux
    parsed = (chat_body if chat else completion_body)(body, state.defaults)
    parsed.request.request_id = request_id_of(request)
    selection = request.scope.get(PRESELECTED)  # chosen by loramux.ray's ingress (never by a client: not a header)
    if selection is None:  # a router may run a forward pass (LoGo, retrieval): off the event loop, so streams go on
        selection = await run_in_threadpool(state.selector.select, body, lambda: prompt_text(parsed.request))
    parsed.request.mix = selection.mix
    return parsed, selection


async def submit(request: Request, body: dict[str, Any], *, chat: bool) -> Submitted:
    """Parse ``body``, select its mix and submit it (``n`` handles for ``n`` choices); errors as 4xx."""
    state = request.app.state.loramux
    if body.get("logit_bias") is not None:  # llama-server's shapes (pairs, texts) as token ids
        body = body | {"logit_bias": token_bias(body["logit_bias"], lambda t: state.pool.text.tokenize(t, add_bos=False))}
    parsed, selection = await parse_and_select(request, body, chat=chat)
    try:
        handles = state.pool.submit_choices(parsed.request, parsed.n, loop=asyncio.get_running_loop())
    except LoramuxError as exc:
        raise from_loramux(exc, param=None if chat else "prompt") from None
    extra: dict[str, Any] = {"mix": handles[0].request.mix.to_json(), "mix_source": selection.source}
    if selection.routing is not None:
        extra["routing"] = selection.routing
    headers = {UNKNOWN_MODEL_HEADER: str(body.get("model"))} if selection.source == "unknown_model" else {}
    return Submitted(parsed, handles, extra, headers)


async def _answer(request: Request, *, chat: bool):
    state = request.app.state.loramux
    body = await json_body(request)
    clock = AnswerClock()
    sub = await submit(request, body, chat=chat)
    parsed = sub.parsed
    shape = responses.Shape(
        chat=chat, model=str(body.get("model") or state.settings.model_id), extra=sub.extra, tool_use=parsed.request.tool_use
    )
    piece = state.pool.piece if parsed.request.logprobs is not None else None
    if parsed.stream:
        shapers = [responses.StreamShaper(shape, piece=piece, index=i) for i in range(len(sub.handles))]
        # starlette's StreamingResponse watches for the client's disconnect and then closes _sse
        timed = clock if body.get("timings_per_token") else None  # llama-server's timings in the last chunks
        return StreamingResponse(
            _sse(sub.handles, shapers, shape if parsed.include_usage else None, timed),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"} | sub.headers,
        )
    events = await collect(sub.handles, request, on_token=clock.on_token)
    out = responses.whole_choices(shape, events, piece)
    out["timings"] = clock.timings(*(ev for evs in events for ev in evs if isinstance(ev, Finished)))
    if body.get("verbose") or state.settings.verbose:  # llama-server's debugging aid: the prompt as the model read it
        out["__verbose"] = {"prompt": state.pool.text.detokenize(sub.handles[0].request.tokens)}
    return JSONResponse(out, headers=sub.headers)


async def collect(handles: list[RequestHandle], request: Request, on_token: Callable[[], None] | None = None) -> list[list]:
    """The events of every choice, whole (``on_token`` is called as each token comes); the client
    going away cancels them all."""
    watcher = asyncio.create_task(_watch_disconnect(handles, request))
    events: list[list] = [[] for _ in handles]
    try:
        async for i, ev in merged(handles):
            events[i].append(ev)
            if on_token is not None and not isinstance(ev, Finished):
                on_token()
    except LoramuxError as exc:
        raise from_loramux(exc) from None
    finally:
        watcher.cancel()
        cancel_unfinished(handles)
    return events


def cancel_unfinished(handles: list[RequestHandle]) -> None:
    for handle in handles:
        if not handle.done:  # the client went away (or the task was cancelled): free its sequence now
            handle.cancel()


async def merged(handles: list[RequestHandle]) -> AsyncIterator[tuple[int, Any]]:
    """``(choice index, event)`` of every handle as they come; the first error is raised."""
    if len(handles) == 1:
        async for ev in handles[0]:
            yield 0, ev
        return
    inbox: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, handle: RequestHandle) -> None:
        try:
            async for ev in handle:
                await inbox.put((i, ev))
            await inbox.put((i, None))
        except Exception as exc:
            await inbox.put((i, exc))

    tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
    try:
        left = len(handles)
        while left:
            i, ev = await inbox.get()
            if isinstance(ev, Exception):
                raise ev
            if ev is None:
                left -= 1
            else:
                yield i, ev
    finally:
        for task in tasks:
            task.cancel()


async def _watch_disconnect(handles: list[RequestHandle], request: Request) -> None:
    while not all(h.done for h in handles):
        if await request.is_disconnected():
            cancel_unfinished(handles)
            return
        await asyncio.sleep(0.05)


def sse_event(data: str) -> bytes:
    """One server-sent event (``data: ...`` and a blank line), as OpenAI streams them."""
    return f"data: {data}\n\n".encode()


async def _sse(
    handles: list[RequestHandle],
    shapers: list[responses.StreamShaper],
    usage_shape: responses.Shape | None,
    clock: AnswerClock | None = None,
) -> AsyncIterator[bytes]:
    fins: dict[int, Finished] = {}
    try:
        for shaper in shapers:
            for chunk in shaper.first():
                yield sse_event(json.dumps(chunk))
        async for i, ev in merged(handles):
            if isinstance(ev, Finished):
                fins[i] = ev
            elif clock is not None:
                clock.on_token()
            for chunk in shapers[i].on_event(ev):
                yield sse_event(json.dumps(chunk))
        done = [fins[i] for i in sorted(fins)]
        if usage_shape is not None:
            usage = responses.usage_chunk(usage_shape, done)
            yield sse_event(json.dumps(usage | ({"timings": clock.timings(*done)} if clock is not None else {})))
        yield sse_event("[DONE]")
    except LoramuxError as exc:  # after the headers went out: the error is the stream's last event
        yield sse_event(json.dumps(from_loramux(exc).body()))
    except Exception as exc:  # a bug: the same, as a server_error, with the traceback in the server's log
        traceback.print_exc()
        yield sse_event(json.dumps(APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error").body()))
    finally:
        cancel_unfinished(handles)


__all__ = [
    "PRESELECTED",
    "UNKNOWN_MODEL_HEADER",
    "Submitted",
    "collect",
    "json_body",
    "merged",
    "parse_and_select",
    "router",
    "sse_event",
    "submit",
]
