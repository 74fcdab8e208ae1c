"""CORS for ``loramux serve --cors ORIGINS``, answered as llama-server answers it.

Off unless ``--cors`` is given. Origins are exact (``https://app.example``), ``*`` (any origin), or
``localhost`` (any port of ``localhost``, ``127.0.0.1`` and ``[::1]`` over http or https, as
llama-server's ``--cors-origins localhost``). An allowed origin is reflected in
``Access-Control-Allow-Origin`` with ``Access-Control-Allow-Credentials: true``; a preflight
(``OPTIONS`` with ``Access-Control-Request-Method``) is answered 200 before authentication, with
the allowed methods and headers; an origin that is not allowed gets no CORS headers (the browser
then refuses the answer), never a different status.
"""

from __future__ import annotations

import re
from typing import Sequence

ALLOW_METHODS = "GET, POST, DELETE, OPTIONS"
LOOPBACK_ORIGIN = re.compile(r"https?://(localhost|127\.0\.0\.1|\[::1\])(:\d{1,5})?")


class OriginPolicy:
    """Which ``Origin`` values may call the API."""

    def __init__(self, origins: Sequence[str]) -> None:
        self.any = "*" in origins
        self.loopback = "localhost" in origins
        self.exact = {o.rstrip("/") for o in origins if o not in ("*", "localhost")}

    def allows(self, origin: str) -> bool:
        return self.any or origin in self.exact or bool(self.loopback and LOOPBACK_ORIGIN.fullmatch(origin))


class CORS:
    """Pure ASGI middleware: preflights answered here, CORS headers added to allowed origins' answers."""

    def __init__(self, app, origins: Sequence[str]) -> None:
        self.app, self.policy = app, OriginPolicy(origins)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        origin = headers.get("origin")
        allowed = origin is not None and self.policy.allows(origin)
        if scope["method"] == "OPTIONS" and "access-control-request-method" in headers:
            await self._preflight(send, origin if allowed else None)
            return
        if not allowed:
            await self.app(scope, receive, send)
            return

        async def send_with_cors(message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *_encoded(_origin_headers(origin))]
            await send(message)

        await self.app(scope, receive, send_with_cors)

    @staticmethod
    async def _preflight(send, origin: str | None) -> None:
        extra = {} if origin is None else _origin_headers(origin) | {"access-control-allow-methods": ALLOW_METHODS}
        extra |= {"access-control-allow-headers": "*", "access-control-max-age": "600"} if origin else {}
        out = {"content-length": "0", "vary": "Origin"} | extra
        await send({"type": "http.response.start", "status": 200, "headers": _encoded(out)})
        await send({"type": "http.response.body", "body": b""})


def _origin_headers(origin: str) -> dict[str, str]:
    return {"access-control-allow-origin": origin, "access-control-allow-credentials": "true", "vary": "Origin"}


def _encoded(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]


__all__ = ["CORS", "OriginPolicy"]
