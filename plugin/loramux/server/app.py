"""The FastAPI application of ``loramux serve``: state, authentication, health, metrics, errors.

:func:`create_app` takes an open :class:`~loramux.AdapterPool` (the engine every request goes
through) and the settings; routes come from :mod:`~loramux.server.openai_routes` and
:mod:`~loramux.server.adapter_routes`. ``/health`` answers 200 once the model and adapters are
loaded (the app exists only then) and needs no API key, nor does the playground page at ``/``
(:mod:`~loramux.server.webui_routes`; its API calls do); every other route does when
``--api-key`` is set (``Authorization: Bearer KEY``).
"""

from __future__ import annotations

import contextlib
import hmac
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from loramux import __version__
from loramux.errors import LoramuxError
from loramux.router.registry import RouterCache
from loramux.server import metrics
from loramux.server.bodies import RequestDefaults
from loramux.server.cors import CORS
from loramux.server.errors import REQUEST_ID_HEADER, APIError, from_loramux, request_id_of
from loramux.server.selection import LoraTable, MixSelector
from loramux.server.settings import ServeSettings
from loramux.token_routing import ROUTING_MODES

OPEN_PATHS = ("/health", "/v1/health")


@dataclass
class ServerState:
    """What the routes share."""

    settings: ServeSettings
    pool: Any  # AdapterPool (None for the hook in front of a llama-server)
    selector: MixSelector
    lora: LoraTable
    http: metrics.HttpCounter = field(default_factory=metrics.HttpCounter)
    upstream: Any = None  # the hook's UpstreamClient
    upstream_pool: dict[str, Any] | None = None  # the hook: /props "loramux" of a patched upstream, None for stock
    public_paths: tuple[str, ...] = OPEN_PATHS  # answered without the API key (/health; the playground's static files)

    @property
    def defaults(self) -> RequestDefaults:
        """What requests that leave a field out get (--n-predict, --temp, --seed)."""
        s = self.settings
        return RequestDefaults(max_tokens=s.n_predict, temperature=s.temperature, seed=s.seed)


POOLED_SPECS = tuple(f"pooled:{mode}" for mode in ROUTING_MODES)  # the data-free routers /v1/models lists


def pool_state(settings: ServeSettings, pool, router=None, spec_routers: RouterCache | None = None) -> ServerState:
    """The routes' state over ``pool``: ``router`` answers ``model: "auto"``; ``spec_routers`` opens the
    data-free routers a request names (``mix``/``model``: ``pooled:arrow``, ``logo``)."""
    for name, mix in settings.mixes.items():
        pool.resolve_mix(mix)  # a named mix must name loaded adapters
    selector = mix_selector(
        settings,
        lambda: pool.names,
        pool.base_path,
        route=router.route if router is not None else None,
        native=pool.native,
        spec_router=spec_routers.get if spec_routers is not None else None,
    )
    return ServerState(settings=settings, pool=pool, selector=selector, lora=selector.lora)


def mix_selector(
    settings: ServeSettings, adapters: Callable[[], list[str]], base_path: Path, *, route=None, native: bool, spec_router=None
) -> MixSelector:
    """How a request's mix is selected (:class:`~loramux.server.selection.MixSelector`) among ``adapters()``
    (their llama-server lora ids in the order given now), the named mixes of ``settings`` and the base model at
    ``base_path``; ``route`` answers ``model: "auto"``, ``spec_router`` opens a data-free router a request
    names; ``native``: the per-token routing modes and data-free routers run here (the patched library)."""
    lora = LoraTable()
    for name in adapters():
        lora.add(name)
    return MixSelector(
        model_id=settings.model_id,
        adapters=adapters,
        mixes=settings.mixes,
        lora=lora,
        route=route,
        base_names=("base", base_path.name, base_path.stem, *settings.aliases),
        routing_modes=ROUTING_MODES if native else (),
        unknown_model=settings.unknown_model,
        spec_router=spec_router,
        router_specs=POOLED_SPECS if native else (),
    )


def create_app(state: ServerState, *, routers=None, on_close=None) -> FastAPI:
    """The application over ``state``; ``on_close`` runs at shutdown (e.g. closing the pool)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        if on_close is not None:
            on_close()

    app = FastAPI(
        title="loramux",
        version=__version__,
        lifespan=lifespan,
        description="OpenAI-compatible server: every request under its own mix of LoRA adapters, batched.",
    )
    app.state.loramux = state
    _install_handlers(app, state)
    if routers is None:
        from loramux.server import adapter_routes, llama_routes, openai_routes, routing_routes, webui_routes

        routers = [openai_routes.router, llama_routes.router, adapter_routes.router, routing_routes.router]
        if state.settings.webui:  # the playground at / (--no-webui: off)
            routers.append(webui_routes.router)
            state.public_paths = (*OPEN_PATHS, *webui_routes.PUBLIC_PATHS)
    for r in routers:
        app.include_router(r)

    @app.get("/health")
    @app.get("/v1/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(state), media_type=metrics.CONTENT_TYPE)

    return app


def _install_handlers(app: FastAPI, state: ServerState) -> None:
    """Errors in OpenAI's shape (the library's, FastAPI's own 404/405/422, and unexpected ones), API
    keys, the HTTP counters, and the client's ``X-Request-Id`` echoed on every answer."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(LoramuxError)
    async def library_error(request: Request, exc: LoramuxError):
        err = from_loramux(exc)
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        err = APIError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None)
        return JSONResponse(err.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()))
        err = APIError(400, f"{where}: {first.get('msg', 'invalid request')}", param=where or None)
        return JSONResponse(err.body(), status_code=400)

    app.add_middleware(AuthAndCount, state=state)
    if state.settings.cors:  # outermost: preflights are answered before the API key is asked for
        app.add_middleware(CORS, origins=state.settings.cors)


def route_label(app, scope) -> str:
    """The path template of the route ``scope`` matches (``/v1/adapters/{name}``), else ``unmatched``:
    metric labels come from the route table, so clients cannot add label values at will."""
    for route in app.router.routes:
        match, _ = route.matches(scope)
        if match == Match.FULL:
            return getattr(route, "path", "unmatched")
    return "unmatched"


class AuthAndCount:
    """Pure ASGI middleware: the API key (401), the HTTP counters, the client's ``X-Request-Id``
    echoed, and an unexpected error answered as a 500 in OpenAI's shape (traceback logged).

    Pure ASGI, not ``@app.middleware("http")``: Starlette's BaseHTTPMiddleware hides the client's
    ``http.disconnect`` from the endpoint, so a non-streamed request went on generating for a
    client that had gone away (``Request.is_disconnected`` never turned true)."""

    def __init__(self, app, state: ServerState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        rid = request_id_of(request)
        status: list[int] = []

        async def send_counted(message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
                if rid is not None:
                    message["headers"] = [*message.get("headers", []), (REQUEST_ID_HEADER.lower().encode(), rid.encode())]
            await send(message)

        if not self._authorized(request):
            err = APIError(
                401, "invalid or missing API key (Authorization: Bearer KEY)", type="authentication_error", code="invalid_api_key"
            )
            await JSONResponse(err.body(), status_code=401)(scope, receive, send_counted)
        else:
            try:
                await self.app(scope, receive, send_counted)
            except Exception as exc:  # a bug: answered in OpenAI's shape, with the traceback in the server's log
                print(f"loramux serve: {request.method} {request.url.path} failed:", file=sys.stderr)
                traceback.print_exc()
                if status:  # the answer had begun: nothing more can be said to this client
                    raise
                err = APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")
                await JSONResponse(err.body(), status_code=500)(scope, receive, send_counted)
        self.state.http.count(route_label(scope["app"], scope), status[0] if status else 500)

    def _authorized(self, request: Request) -> bool:
        key = self.state.settings.api_key
        if not key or request.url.path in self.state.public_paths:
            return True
        given = request.headers.get("authorization", "").encode()
        bare = request.headers.get("x-api-key", "").encode()  # Anthropic's header, which llama-server takes too
        return hmac.compare_digest(given, f"Bearer {key}".encode()) or hmac.compare_digest(bare, key.encode())


__all__ = ["ServerState", "create_app", "pool_state"]
