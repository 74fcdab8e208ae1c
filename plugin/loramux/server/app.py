"""The FastAPI application of ``loramux serve``: state, authentication, health, metrics, errors.

:func:`create_app` takes an open :class:`~loramux.AdapterPool` (the engine every request goes
through) and the settings; routes come from :mod:`~loramux.server.openai_routes` and
:mod:`~loramux.server.adapter_routes`. ``/health`` answers 200 once the model and adapters are
loaded (the app exists only then) and needs no API key; every other route does when
``--api-key`` is set (``Authorization: Bearer KEY``).
"""
from __future__ import annotations

import contextlib
import hmac
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from loramux import __version__
from loramux.errors import LoramuxError
from loramux.server import metrics
from loramux.server.errors import APIError, from_loramux
from loramux.server.selection import LoraTable, MixSelector
from loramux.server.settings import ServeSettings

OPEN_PATHS = ("/health",)


@dataclass
class ServerState:
    """What the routes share."""

    settings: ServeSettings
    pool: Any                          # AdapterPool (None for the hook in front of a llama-server)
    selector: MixSelector
    lora: LoraTable
    http: metrics.HttpCounter = field(default_factory=metrics.HttpCounter)
    upstream: Any = None               # the hook's UpstreamClient


def pool_state(settings: ServeSettings, pool, router=None) -> ServerState:
    lora = LoraTable()
    for name in pool.names:
        lora.add(name)
    for name, mix in settings.mixes.items():
        pool.resolve_mix(mix)  # a named mix must name loaded adapters
    selector = MixSelector(model_id=settings.model_id, adapters=lambda: pool.names, mixes=settings.mixes, lora=lora,
                           route=router.route if router is not None else None,
                           base_names=("base", pool.base_path.name, pool.base_path.stem))
    return ServerState(settings=settings, pool=pool, selector=selector, lora=lora)


def create_app(state: ServerState, *, routers=None, on_close=None) -> FastAPI:
    """The application over ``state``; ``on_close`` runs at shutdown (e.g. closing the pool)."""
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        if on_close is not None:
            on_close()

    app = FastAPI(title="loramux", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible server: every request under its own mix of LoRA adapters, batched.")
    app.state.loramux = state
    _install_handlers(app, state)
    if routers is None:
        from loramux.server import adapter_routes, openai_routes

        routers = [openai_routes.router, adapter_routes.router]
    for r in routers:
        app.include_router(r)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(state), media_type=metrics.CONTENT_TYPE)

    return app


def _install_handlers(app: FastAPI, state: ServerState) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(LoramuxError)
    async def library_error(request: Request, exc: LoramuxError):
        err = from_loramux(exc)
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.middleware("http")
    async def auth_and_count(request: Request, call_next):
        key = state.settings.api_key
        if key and request.url.path not in OPEN_PATHS:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
                err = APIError(401, "invalid or missing API key (Authorization: Bearer KEY)", type="authentication_error",
                               code="invalid_api_key")
                state.http.count(request.url.path, 401)
                return JSONResponse(err.body(), status_code=401)
        response = await call_next(request)
        state.http.count(request.url.path, response.status_code)
        return response


__all__ = ["ServerState", "create_app", "pool_state"]
