"""The ingress's side of a forwarded request: open the replica's answer stream (``stream=True``),
send it on whole or as server-sent events, and say clearly when a replica fails.

A replica that fails before its answer began is retried (up to :data:`TRIES`
calls; Serve routes the next one to a live replica). A whole answer is only sent once complete, so
a failure midway is retried too. A streamed answer that already began cannot be: its last event is
then an error in OpenAI's shape (``code: "replica_failed"``), with no ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator

from fastapi.responses import Response, StreamingResponse

from loramux.ray.affinity import NO_AFFINITY, AffinityKey
from loramux.ray.asgi_call import Forwarded
from loramux.server.errors import APIError
from loramux.server.openai_routes import sse_event

REPLICA_HEADER = "X-Loramux-Replica"  # which engine replica answered
KEY_HEADER = "X-Loramux-Affinity-Key"  # the request's affinity key (Serve's multiplexed model id)
TRIES = 3  # a request whose replica fails before it answers is sent again (Serve routes it to a live one)
DROPPED_HEADERS = ("content-length", "host", "transfer-encoding", "connection")


def replica_failed(exc: BaseException, when: str) -> APIError:
    """The error a client gets when its replica failed (``when``: before answering / mid-answer)."""
    return APIError(
        503,
        f"the engine replica failed {when} ({type(exc).__name__}: {str(exc)[:300]}); send the request again",
        type="server_error",
        code="replica_failed",
    )


def _headers(head: dict[str, Any], key: AffinityKey) -> dict[str, str]:
    kept = {k: v for k, v in head["headers"].items() if k.lower() not in (*DROPPED_HEADERS, "x-request-id")}  # the ingress echoes the id
    return kept | {REPLICA_HEADER: head["replica"], KEY_HEADER: key.id}


async def _open(ing: Any, fwd: Forwarded, key: AffinityKey) -> tuple[dict[str, Any], Any]:
    """The replica's first message and the rest of its stream; retried while replicas fail before answering."""
    last: BaseException | None = None
    for attempt in range(TRIES):
        handle = ing.engine.options(stream=True)
        if ing.affinity != NO_AFFINITY:
            handle = handle.options(multiplexed_model_id=key.id)
        gen = handle.forward.remote(fwd, key.id, key.adapters)
        try:
            return await gen.__anext__(), gen
        except asyncio.CancelledError:
            gen.cancel()
            raise
        except Exception as exc:  # the replica died (RayActorError), or its call failed: try another
            gen.cancel()
            last = exc
            ing.counters.count("error")
            await asyncio.sleep(0.5 * (attempt + 1))
    raise replica_failed(last, f"before answering, {TRIES} times")


async def _whole(ing: Any, fwd: Forwarded, key: AffinityKey) -> Response:
    last: BaseException | None = None
    for _ in range(TRIES):
        head, gen = await _open(ing, fwd, key)
        try:
            body = b"".join([piece async for piece in gen])
        except Exception as exc:  # failed midway: nothing was sent to the client yet, so run it again
            last = exc
            ing.counters.count("error")
            continue
        finally:
            gen.cancel()
        ing.counters.count("hit" if head["hit"] else "miss")
        return Response(body, status_code=head["status"], headers=_headers(head, key))
    raise replica_failed(last, f"mid-answer, {TRIES} times")


async def _relay(ing: Any, gen: Any) -> AsyncIterator[bytes]:
    try:
        async for piece in gen:
            yield piece
    except Exception as exc:  # the answer began: the client learns it was cut short, in the stream
        ing.counters.count("error")
        yield sse_event(json.dumps(replica_failed(exc, "mid-answer (the answer is cut short)").body()))
    finally:
        gen.cancel()


async def answer(ing: Any, fwd: Forwarded, key: AffinityKey, *, stream: bool) -> Response:
    """The replica's answer to ``fwd``: whole, or streamed as it comes."""
    if not stream:
        return await _whole(ing, fwd, key)
    head, gen = await _open(ing, fwd, key)
    ing.counters.count("hit" if head["hit"] else "miss")
    return StreamingResponse(_relay(ing, gen), status_code=head["status"], headers=_headers(head, key))


__all__ = ["DROPPED_HEADERS", "KEY_HEADER", "REPLICA_HEADER", "TRIES", "answer", "replica_failed"]
