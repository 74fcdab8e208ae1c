"""The engine deployment: each replica is a whole loramux engine (an :class:`~loramux.AdapterPool`
and the app of ``loramux serve`` over it), its adapters loaded by affinity key on demand.

The ingress calls :meth:`EngineReplica.forward` with ``multiplexed_model_id`` set to the request's
key (:mod:`loramux.ray.affinity`): Serve routes it to a replica that holds the key when one does,
and the replica's LRU of keys (``--max-adapter-sets``) loads and evicts adapters through
:class:`~loramux.ray.adapter_sets.AdapterSets`. The request itself runs through the server's own
routes (:mod:`loramux.server.openai_routes`), with the mix the ingress selected: requests of every
key decode together in the replica's one batch (no ``@serve.batch``, which would split them by key).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import replace
from pathlib import Path
from typing import Any, AsyncIterator, Mapping

from loramux.ray.adapter_sets import AdapterSets, HeldKey
from loramux.ray.asgi_call import Forwarded, Start, asgi_stream
from loramux.ray.metrics import replica_families
from loramux.server.settings import ServeSettings

PUSH_EVERY_S = 0.5  # how often a replica sends its metrics to the board (when they changed)


def open_engine_app(settings: ServeSettings):
    """The pool (no adapters yet: keys load them) and the app of ``loramux serve`` over it."""
    from loramux.router.registry import RouterCache
    from loramux.server.app import create_app, pool_state
    from loramux.server.launch import open_pool

    pool = open_pool(settings)
    spec_routers = RouterCache(pool)
    # the ingress resolves named mixes, model "auto" and the API key; the replica runs what it selected
    state = pool_state(replace(settings, mixes={}, router=None, api_key=None, cors=[]), pool, None, spec_routers)

    def close() -> None:
        spec_routers.close()
        pool.close()

    return pool, state, create_app(state, on_close=close), close


class EngineReplica:
    """One replica: the engine, its adapter sets by key, and its metrics pushed to the board."""

    def __init__(self, settings: ServeSettings, sources: Mapping[str, Path], max_sets: int, board: Any = None) -> None:
        from ray import serve

        self.pool, self.state, self.app, self._close = open_engine_app(settings)
        self.sets = AdapterSets(self.pool, sources, skip_embeddings=settings.skip_embeddings)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.board = board
        self.hits = self.misses = 0
        self._pusher: asyncio.Task | None = None

        async def hold(key: str) -> HeldKey:
            return HeldKey(self.sets, key)

        self._hold = serve.multiplexed(max_num_models_per_replica=max_sets)(hold)
        with contextlib.suppress(RuntimeError):  # Serve builds replicas on its event loop: report at once
            self._pusher = asyncio.get_running_loop().create_task(self._push_loop()) if board is not None else None

    async def forward(self, req: Forwarded, key: str, adapters: tuple[str, ...]) -> AsyncIterator[dict[str, Any] | bytes]:
        """Run ``req`` under affinity ``key`` (held in this replica's LRU of keys whether or not Serve routed
        by it): first ``{"status", "headers", "replica", "hit"}``, then the answer's body pieces (server-sent
        events as they come)."""
        self._start_pusher()
        hit = self.sets.holds(key)
        await self._hold(key)
        self.hits, self.misses = self.hits + hit, self.misses + (not hit)
        names = await asyncio.to_thread(self.sets.acquire, key, adapters)
        try:
            async for item in asgi_stream(self.app, req):
                if isinstance(item, Start):
                    yield {"status": item.status, "headers": item.headers, "replica": self.replica_id, "hit": hit}
                else:
                    yield item
        finally:
            await asyncio.to_thread(self.sets.release, names)

    def metrics_text(self) -> str:
        """This replica's ``/metrics``: the engine's (as ``loramux serve``) and its adapter holdings."""
        from loramux.server import metrics

        return metrics.render(self.state, replica_families(self.sets.snapshot(), self.hits, self.misses)).decode()

    def replica(self) -> str:
        """This replica's id (as the ``X-Loramux-Replica`` header names it)."""
        return self.replica_id

    def _start_pusher(self) -> None:
        if self.board is not None and (self._pusher is None or self._pusher.done()):
            self._pusher = asyncio.create_task(self._push_loop())

    async def _push_loop(self) -> None:
        last = None
        while True:
            text = self.metrics_text()
            if text != last:
                with contextlib.suppress(Exception):  # the board restarting: the next push tells it
                    await self.board.put.remote(self.replica_id, text)
                    last = text
            await asyncio.sleep(PUSH_EVERY_S)

    def __del__(self) -> None:
        if self._pusher is not None:
            self._pusher.cancel()
        with contextlib.suppress(Exception):
            self._close()


__all__ = ["EngineReplica", "open_engine_app"]
