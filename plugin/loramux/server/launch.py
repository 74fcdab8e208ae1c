"""Open the pool (and the router) that ``loramux serve`` serves, and build its app."""

from __future__ import annotations

import sys
import warnings
from typing import Sequence

from fastapi import FastAPI

from loramux.router.registry import RouterCache
from loramux.server.app import create_app, pool_state
from loramux.server.settings import ServeSettings, SettingsError


def open_router(settings: ServeSettings, pool):
    """The router of ``--router``, checked against the base model; its adapters must all be loaded."""
    if settings.router is None:
        return None
    from loramux.router.registry import is_router_spec, open_router

    spec = settings.router if is_router_spec(settings.router) else f"router:{settings.router}"
    router = open_router(spec, pool)
    missing = sorted(set(router.adapters) - set(pool.names))
    if missing:
        router.close()
        raise SettingsError(f"router {settings.router} routes to adapters that are not loaded: {', '.join(missing)}")
    return router


def open_trained_router(settings: ServeSettings, names: Sequence[str], where: str):
    """The trained router of ``--router`` (``router:PATH.onnx`` or a bare path) for a process that holds
    no model (``where``: "in front of a llama-server", "under --ray"); it must route among ``names``."""
    if settings.router is None:
        return None
    from loramux.router.runtime import Router

    prefix, sep, path = settings.router.partition(":")
    if sep and prefix != "router":
        raise SettingsError(
            f"--router {settings.router}: {where} only a trained router (router:PATH.onnx) can answer model 'auto' "
            "(retrieval and logo need the model in this process: name a data-free router per request, or serve without the front end)"
        )
    loaded = Router.load(path if sep else settings.router, base=settings.base)
    missing = sorted(set(loaded.adapters) - set(names))
    if missing:
        loaded.close()
        raise SettingsError(f"router {settings.router} routes to adapters that are not served {where}: {', '.join(missing)}")
    return loaded


def open_pool(settings: ServeSettings):
    """The engine of ``settings`` (an :class:`~loramux.AdapterPool` over the base model, no adapters yet), with
    its chat template when one is given: what ``loramux serve`` and each replica of ``--ray`` run."""
    from loramux import AdapterPool

    pool = AdapterPool(
        settings.base,
        n_ctx=settings.n_ctx,
        n_seq_max=settings.n_seq_max,
        n_threads=settings.threads,
        max_queue=settings.max_queue,
        max_active=settings.max_active,
        flash_attn=settings.flash_attn,
    )
    try:
        if settings.chat_template is not None:
            pool.text.use_template(settings.chat_template)
    except BaseException:
        pool.close()
        raise
    return pool


def build_pool_app(settings: ServeSettings) -> FastAPI:
    """Load the base model and adapters, then the app (``/health`` is 200 from then on)."""
    from loramux.adapters import AdapterSkippedWarning
    from loramux.progress import progress_bar

    pool = open_pool(settings)
    try:
        with warnings.catch_warnings(record=True) as caught, progress_bar(desc="load adapters", unit="adapter") as bar:
            warnings.simplefilter("always", AdapterSkippedWarning)
            pool.load_adapters(settings.adapters, skip_embeddings=settings.skip_embeddings, progress=bar.update_to)
        for w in caught:
            print(f"loramux serve: {w.message}", file=sys.stderr)
        router = open_router(settings, pool)
        spec_routers = RouterCache(pool)
        state = pool_state(settings, pool, router, spec_routers)
    except BaseException:
        pool.close()
        raise

    def close() -> None:
        if router is not None:
            router.close()
        spec_routers.close()
        pool.close()

    return create_app(state, on_close=close)


__all__ = ["build_pool_app", "open_pool", "open_router", "open_trained_router"]
