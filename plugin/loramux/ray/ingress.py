"""The ingress deployment: the server's request parsing and mix selection, then the request
forwarded to an engine replica chosen by its affinity key (Ray Serve's model multiplexing).

The ingress runs the same code as ``loramux serve`` for everything before the engine: the body is
parsed by :mod:`loramux.server.bodies`, the mix selected by :class:`~loramux.server.selection.MixSelector`
(``model: "auto"`` runs the trained router here, so the key is known before a replica is chosen),
and errors, the API key, CORS, ``/health`` and ``/v1/models`` come from :func:`loramux.server.app.create_app`.
A bad request gets the same 400 as from ``loramux serve``. The replica answers with the server's
own routes, under the mix selected here; its answer streams back unchanged, with the headers
``X-Loramux-Replica`` (which replica answered) and ``X-Loramux-Affinity-Key``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Sequence

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from loramux.errors import LoramuxError
from loramux.ray.affinity import AffinityKey, affinity_key
from loramux.ray.asgi_call import Forwarded
from loramux.ray.metrics import IngressCounters, merge_texts, with_label
from loramux.ray.streaming import DROPPED_HEADERS, KEY_HEADER, REPLICA_HEADER, answer
from loramux.server.errors import from_loramux
from loramux.server.openai_routes import PRESELECTED, json_body, models, parse_and_select
from loramux.server.settings import ServeSettings

router = APIRouter()


class RouteOnReplica(Exception):
    """The request names a router that needs the model (``pooled:arrow``, ``logo``): it runs on the replica."""


class _ReplicaRouted:
    def route(self, prompt: str) -> Any:
        raise RouteOnReplica()


def ingress_state(settings: ServeSettings, names: Sequence[str]):
    """The server's state in the ingress: no pool; a selector over the adapters the replicas may load."""
    from loramux.base_model import default_base_model
    from loramux.native import available
    from loramux.server.app import ServerState, mix_selector
    from loramux.server.launch import open_trained_router

    for name, mix in settings.mixes.items():
        mix.check_known(names)
    base = Path(settings.base) if settings.base is not None else default_base_model()
    prompt_router = open_trained_router(settings, names, "under --ray")
    selector = mix_selector(
        settings,
        lambda: sorted(names),
        base,
        route=prompt_router.route if prompt_router is not None else None,
        native=available(),
        spec_router=lambda spec: _ReplicaRouted(),
    )
    return ServerState(settings=settings, pool=None, selector=selector, lora=selector.lora), prompt_router


class Ingress:
    """The ingress replica: the server's front half and a handle on the engine deployment."""

    def __init__(self, settings: ServeSettings, names: Sequence[str], engine: Any, board: Any, affinity: str = "set") -> None:
        self.settings, self.names, self.engine, self.board, self.affinity = settings, sorted(names), engine, board, affinity
        self.state, self.prompt_router = ingress_state(settings, self.names)
        self.counters = IngressCounters()

    def __serve_build_asgi_app__(self):
        from loramux.server.app import create_app

        app = create_app(self.state, routers=[router], on_close=self.prompt_router.close if self.prompt_router else None)
        app.state.ray_ingress = self
        return OneRequestId(app)

    def key_of(self, selection) -> AffinityKey:
        """The affinity key of a selection (None: the replica selects the mix)."""
        return affinity_key(selection.mix if selection is not None else None, self.affinity, self.names)


class OneRequestId:
    """ASGI wrapper: Serve's proxy gives every request an ``X-Request-Id`` (the client's, or a new one) and
    echoes it on the answer, so the server's own echo is left out (one header, not two)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        async def send_one(message) -> None:
            if message["type"] == "http.response.start":
                message = dict(message, headers=[(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"])
            await send(message)

        await self.app(scope, receive, send_one)


router.add_api_route("/v1/models", models, methods=["GET"])
router.add_api_route("/models", models, methods=["GET"], include_in_schema=False)


@router.post("/v1/completions")
async def completions(request: Request):
    return await forward(request, chat=False)


@router.post("/v1/chat/completions")
@router.post("/chat/completions", include_in_schema=False)
async def chat_completions(request: Request):
    return await forward(request, chat=True)


@router.get("/metrics", response_class=PlainTextResponse)
async def prometheus(request: Request) -> PlainTextResponse:
    """The ingress's counters and affinity hit rate, and every live replica's metrics (label ``replica``)."""
    from loramux.server import metrics

    ing: Ingress = request.app.state.ray_ingress
    texts = [metrics.render(ing.state, ing.counters.families()).decode()]
    if ing.board is not None:
        replicas = await asyncio.wait_for(_board_texts(ing.board), timeout=10)
        texts += [with_label(text, "replica", rid) for rid, text in replicas.items()]
    return PlainTextResponse(merge_texts(texts), media_type=metrics.CONTENT_TYPE)


async def _board_texts(board: Any) -> dict[str, str]:
    return await board.texts.remote()


async def select(request: Request, body: dict[str, Any], *, chat: bool):
    """The request's mix as ``loramux serve`` selects it (None: a router that runs on the replica)."""
    state = request.app.state.loramux
    checked = {k: v for k, v in body.items() if k != "logit_bias"}  # texts in logit_bias need the tokenizer: the replica reads it
    try:
        _, selection = await parse_and_select(request, checked, chat=chat)
    except RouteOnReplica:
        return None
    try:  # as the pool would refuse it: naming every adapter a replica may load, not those it holds now
        selection.mix.check_known(state.selector.adapters())
    except LoramuxError as exc:
        raise from_loramux(exc, param=None if chat else "prompt") from None
    return selection


async def forward(request: Request, *, chat: bool):
    """Select the mix here, then answer from the replica that holds its key (streamed or whole)."""
    ing: Ingress = request.app.state.ray_ingress
    body = await json_body(request)
    selection = await select(request, body, chat=chat)
    key = ing.key_of(selection)
    headers = [(k, v) for k, v in request.headers.items() if k.lower() not in DROPPED_HEADERS]
    fwd = Forwarded("POST", request.url.path, headers, await request.body(), {PRESELECTED: selection} if selection is not None else {})
    return await answer(ing, fwd, key, stream=bool(body.get("stream")))


__all__ = ["KEY_HEADER", "REPLICA_HEADER", "Ingress", "RouteOnReplica", "forward", "ingress_state", "router"]
