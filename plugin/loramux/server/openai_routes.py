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
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from loramux import responses
from loramux.engine import RequestHandle
from loramux.errors import LoramuxError
from loramux.server import schema
from loramux.server.bodies import chat_body, completion_body, prompt_text
from loramux.server.errors import APIError, from_loramux, request_id_of

router = APIRouter()


async def json_body(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise APIError(400, "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body


@router.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    state = request.app.state.loramux
    now = int(time.time())
    return {
        "object": "list",
        "data": [{"id": m, "object": "model", "created": now, "owned_by": "loramux"} for m in state.selector.models()],
    }


@router.post("/v1/completions", **schema.GENERATION)
async def completions(request: Request):
    return await _answer(request, chat=False)


@router.post("/v1/chat/completions", **schema.CHAT_GENERATION)
async def chat_completions(request: Request):
    return await _answer(request, chat=True)


async def _answer(request: Request, *, chat: bool):
    state = request.app.state.loramux
    body = await json_body(request)
    parsed = (chat_body if chat else completion_body)(body)
    parsed.request.request_id = request_id_of(request)
    # a router may run a forward pass (LoGo, hidden-state retrieval): off the event loop, so streams go on
    selection = await run_in_threadpool(state.selector.select, body, lambda: prompt_text(parsed.request))
    parsed.request.mix = selection.mix
    try:
        handle = state.pool.submit(parsed.request, loop=asyncio.get_running_loop())
    except LoramuxError as exc:
        raise from_loramux(exc, param=None if chat else "prompt") from None
    extra: dict[str, Any] = {"mix": handle.request.mix.to_json(), "mix_source": selection.source}
    if selection.routing is not None:
        extra["routing"] = selection.routing
    shape = responses.Shape(chat=chat, model=str(body.get("model") or state.settings.model_id), extra=extra)
    piece = state.pool.piece if parsed.request.logprobs is not None else None
    if parsed.stream:
        shaper = responses.StreamShaper(shape, include_usage=parsed.include_usage, piece=piece)
        # starlette's StreamingResponse watches for the client's disconnect and then closes _sse
        return StreamingResponse(
            _sse(handle, shaper), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
    events = await _collect(handle, request)
    return responses.whole(shape, events, piece)


async def _collect(handle: RequestHandle, request: Request) -> list:
    watcher = asyncio.create_task(_watch_disconnect(handle, request))
    events = []
    try:
        async for ev in handle:
            events.append(ev)
    except LoramuxError as exc:
        raise from_loramux(exc) from None
    finally:
        watcher.cancel()
    return events


async def _watch_disconnect(handle: RequestHandle, request: Request) -> None:
    while not handle.done:
        if await request.is_disconnected():
            handle.cancel()
            return
        await asyncio.sleep(0.05)


def sse_event(data: str) -> bytes:
    """One server-sent event (``data: ...`` and a blank line), as OpenAI streams them."""
    return f"data: {data}\n\n".encode()


async def _sse(handle: RequestHandle, shaper: responses.StreamShaper) -> AsyncIterator[bytes]:
    try:
        for chunk in shaper.first():
            yield sse_event(json.dumps(chunk))
        async for ev in handle:
            for chunk in shaper.on_event(ev):
                yield sse_event(json.dumps(chunk))
        yield sse_event("[DONE]")
    except LoramuxError as exc:  # after the headers went out: the error is the stream's last event
        yield sse_event(json.dumps(from_loramux(exc).body()))
    except Exception as exc:  # a bug: the same, as a server_error, with the traceback in the server's log
        traceback.print_exc()
        yield sse_event(json.dumps(APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error").body()))
    finally:
        if not handle.done:  # the client went away (or the task was cancelled): free its sequence now
            handle.cancel()


__all__ = ["json_body", "router"]
