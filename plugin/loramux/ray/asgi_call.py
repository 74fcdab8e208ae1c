"""Run one HTTP request through an in-process ASGI app and stream what it answers.

An engine replica serves the very app of ``loramux serve`` (:func:`loramux.server.app.create_app`):
the ingress hands it the request (method, path, headers, body) and gets back the answer's start
(status and headers) and then its body, piece by piece, as the app sends it (server-sent events
stay a stream). Closing the iterator tells the app the client went away (``http.disconnect``),
which cancels the request in the engine, as a closed connection does in ``loramux serve``.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Mapping


@dataclass
class Forwarded:
    """One HTTP request as the ingress forwards it to a replica."""

    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes
    scope_extra: dict[str, Any] = field(default_factory=dict)  # e.g. the ingress's selection of the mix

    def scope(self) -> dict[str, Any]:
        """The ASGI scope of this request (loopback client, no query string)."""
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": self.method,
            "scheme": "http",
            "path": self.path,
            "raw_path": self.path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in self.headers],
            "client": ("127.0.0.1", 0),
            "server": ("127.0.0.1", 0),
        } | self.scope_extra


@dataclass
class Start:
    """The first thing an answer says: its status and headers."""

    status: int
    headers: dict[str, str]


async def asgi_stream(app: Any, req: Forwarded) -> AsyncIterator[Start | bytes]:
    """A :class:`Start`, then the answer's body pieces, as ``app`` sends them; closing this
    iterator early disconnects the (virtual) client."""
    out: asyncio.Queue = asyncio.Queue()
    gone = asyncio.Event()
    sent_body = False

    async def receive() -> Mapping[str, Any]:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": req.body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Mapping[str, Any]) -> None:
        await out.put(message)

    async def run() -> None:
        try:
            await app(req.scope(), receive, send)
        finally:
            await out.put(None)

    task = asyncio.create_task(run())
    try:
        while True:
            message = await out.get()
            if message is None:
                break
            if message["type"] == "http.response.start":
                yield Start(message["status"], {k.decode("latin-1"): v.decode("latin-1") for k, v in message.get("headers", [])})
            elif message["type"] == "http.response.body" and message.get("body"):
                yield bytes(message["body"])
        await task  # the app's own exception, if it raised one
    finally:
        gone.set()
        if not task.done():
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, timeout=5)


__all__ = ["Forwarded", "Start", "asgi_stream"]
