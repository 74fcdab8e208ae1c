"""``loramux serve --upstream URL``: the router in front of a running llama-server.

At start the hook reads the upstream's ``GET /lora-adapters`` (ids and paths; an adapter is
named by its file's stem, as loramux names GGUF files) and ``GET /props``. Each request's mix is
selected as by ``loramux serve`` (body ``mix``, ``lora``, ``model``: ``auto`` / adapter / named mix /
base), then forwarded with llama-server's ``lora`` field filled with an explicit scale for *every*
upstream adapter (upstream treats ``"lora": []`` as no field, ggml-org/llama.cpp #28674). Streams
are passed through as they come; the mix used is in the ``X-Loramux-Mix`` header (and, when not
streamed, in the body).

Two kinds of upstream, told apart by ``/props``:

- **loramux's patched llama-server** (``loramux llama-server build``; ``/props`` has ``"loramux"``
  with ``per_sequence``): requests with different mixes decode together, and its prompt cache is
  keyed by (mix, tokens), so the client's ``cache_prompt`` is passed as it is. Per-token routing
  (``arrow``, ``spectr``) is forwarded as ``lora_routing``, and ``/v1/models`` lists the modes.
- **stock llama-server**: ``cache_prompt: false`` is sent, because stock llama-server reuses a
  slot's cached prefix across different LoRA settings (#26207), which would give one mix the K/V
  of another; a routed mix is refused with a 400 (never forwarded as some fixed mix or as the
  base model), since stock applies one set of LoRA scales to a whole request.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from loramux.mix import Mix
from loramux.server.app import ServerState, create_app
from loramux.server.bodies import chat_body, completion_body, prompt_text
from loramux.server.errors import APIError
from loramux.server.launch import open_trained_router
from loramux.server.llama_fields import token_bias
from loramux.server.openai_routes import UNKNOWN_MODEL_HEADER, json_body
from loramux.server.selection import LoraTable, MixSelector, Selection
from loramux.server.settings import ServeSettings

router = APIRouter()
MIX_HEADER = "X-Loramux-Mix"

UPSTREAM_ROUTING_MODES = ("arrow", "spectr")  # the routing modes the patched llama-server takes (native/patches/0002)


def read_upstream_adapters(url: str) -> list[dict[str, Any]]:
    try:
        r = httpx.get(f"{url.rstrip('/')}/lora-adapters", timeout=30)
        r.raise_for_status()
        listing = r.json()
    except (httpx.HTTPError, ValueError) as exc:
        raise APIError(502, f"cannot read the upstream's adapters at {url}/lora-adapters: {exc}") from None
    if not isinstance(listing, list):
        raise APIError(502, f"{url}/lora-adapters did not answer a list of adapters")
    return listing


def read_upstream_pool(url: str) -> dict[str, Any] | None:
    """The upstream's ``/props`` "loramux" object when it is loramux's patched llama-server with its
    per-sequence pool on, else None (stock llama-server, or the pool refused: see its status)."""
    try:
        r = httpx.get(f"{url.rstrip('/')}/props", timeout=30)
        props = r.json() if r.status_code == 200 else {}
    except (httpx.HTTPError, ValueError):
        props = {}
    pool = props.get("loramux") if isinstance(props, dict) else None
    return pool if isinstance(pool, dict) and pool.get("per_sequence") else None


def upstream_table(listing: list[dict[str, Any]]) -> LoraTable:
    """A table whose ids are the upstream's ids and whose names are the adapters' file stems."""
    table = LoraTable()
    by_id = {int(a["id"]): Path(str(a["path"])).stem for a in listing}
    for i in range(max(by_id, default=-1) + 1):
        table.names.append(by_id.get(i))
    return table


def refuse_routed(selection: Selection) -> None:
    """A 400 for a per-token routed mix: a stock llama-server cannot run one."""
    if selection.mix.token_routing is not None:
        raise APIError(
            400,
            f"mix {selection.mix} routes every token inside loramux's own graph; a stock llama-server behind "
            "loramux serve --upstream applies one set of LoRA scales per request and cannot route per token: use a fixed "
            "mix, an adapter, a named mix or auto here, or serve the adapters with loramux serve --adapters",
            param="model" if selection.source == "routed" else "mix",
            code="invalid_mix",
        )


def lora_field(table: LoraTable, mix: Mix) -> list[dict[str, Any]]:
    """Every upstream adapter with an explicit scale (0 for those not in the mix)."""
    return [{"id": i, "scale": float(mix.get(n, 0.0))} for i, n in enumerate(table.names) if n is not None]


def upstream_fields(table: LoraTable, mix: Mix, *, patched: bool) -> dict[str, Any]:
    """The llama-server fields that carry ``mix`` upstream (see the module docstring)."""
    fields: dict[str, Any] = {"lora": lora_field(table, mix)}
    if mix.token_routing is not None:
        mode, k, temperature = mix.token_routing.native_args()
        fields["lora_routing"] = {"mode": mode, "k": k, "temperature": temperature}
    if not patched:
        fields["cache_prompt"] = False
    return fields


def build_hook_app(settings: ServeSettings) -> FastAPI:
    listing = read_upstream_adapters(settings.upstream)
    pool = read_upstream_pool(settings.upstream)
    table = upstream_table(listing)
    names = [n for n in table.names if n is not None]
    trained = open_trained_router(settings, names, "in front of a llama-server")
    route = trained.route if trained is not None else None
    for name, mix in settings.mixes.items():
        Mix.coerce(mix).check_known(names)
    selector = MixSelector(
        model_id=settings.model_id,
        adapters=lambda: names,
        mixes=settings.mixes,
        lora=table,
        route=route,
        routing_modes=UPSTREAM_ROUTING_MODES if pool is not None else (),
        unknown_model=settings.unknown_model,
    )
    state = ServerState(
        settings=settings,
        pool=None,
        selector=selector,
        lora=table,
        upstream=httpx.AsyncClient(base_url=settings.upstream.rstrip("/"), timeout=None),
        upstream_pool=pool,
    )
    return create_app(state, routers=[router])


@router.get("/v1/models")
@router.get("/models")
async def models(request: Request) -> dict[str, Any]:
    state = request.app.state.loramux
    return {"object": "list", "data": [{"id": m, "object": "model", "owned_by": "loramux"} for m in state.selector.models()]}


@router.post("/v1/completions")
async def completions(request: Request):
    return await _forward(request, "/v1/completions", chat=False)


@router.post("/v1/chat/completions")
@router.post("/chat/completions")
async def chat_completions(request: Request):
    return await _forward(request, "/v1/chat/completions", chat=True)


@router.post("/completion")
@router.post("/completions")
async def native_completion(request: Request):
    """llama-server's own completion route, its mix selected as every other request's."""
    return await _forward(request, "/completion", chat=False)


@router.post("/tokenize")
@router.post("/detokenize")
@router.post("/apply-template")
@router.post("/chat/completions/input_tokens")
@router.get("/props")
@router.get("/slots")
@router.get("/lora-adapters")
async def passed_through(request: Request) -> Response:
    """llama-server's routes that involve no mix, answered by the upstream as they are."""
    state = request.app.state.loramux
    r = await state.upstream.request(
        request.method, request.url.path, content=await request.body(), headers={"content-type": "application/json"}
    )
    return Response(r.content, status_code=r.status_code, media_type=r.headers.get("content-type", "application/json"))


async def _forward(request: Request, path: str, *, chat: bool):
    state = request.app.state.loramux
    body = await json_body(request)
    checked = body if body.get("logit_bias") is None else body | {"logit_bias": token_bias(body["logit_bias"], _upstream_tokenizes)}
    parsed = (chat_body if chat else completion_body)(checked)  # the same checks as loramux serve (the body goes as sent)
    # a router may run a forward pass (LoGo, hidden-state retrieval): off the event loop, so streams go on
    selection = await run_in_threadpool(state.selector.select, body, lambda: prompt_text(parsed.request))
    patched = state.upstream_pool is not None
    if not patched:
        refuse_routed(selection)
    unknown = sorted(set(selection.mix) - {n for n in state.lora.names if n is not None})
    if unknown:
        raise APIError(
            400,
            f"mix names adapters the upstream does not serve: {', '.join(unknown)} "
            f"(it serves: {', '.join(n for n in state.lora.names if n)})",
            param="mix",
            code="invalid_mix",
        )
    out = {k: v for k, v in body.items() if k not in ("mix",)}
    out.update(upstream_fields(state.lora, selection.mix, patched=patched))
    headers = {MIX_HEADER: json.dumps(selection.mix.to_json())}
    if selection.source == "unknown_model":
        headers[UNKNOWN_MODEL_HEADER] = str(body.get("model"))
    client: httpx.AsyncClient = state.upstream
    if parsed.stream:
        upstream = await client.send(client.build_request("POST", path, json=out), stream=True)
        return StreamingResponse(
            _relay(upstream),
            status_code=upstream.status_code,
            headers=headers,
            media_type=upstream.headers.get("content-type", "text/event-stream"),
        )
    r = await client.post(path, json=out)
    try:
        answer = r.json()
    except ValueError:
        return Response(r.content, status_code=r.status_code, headers=headers)
    if r.status_code == 200 and isinstance(answer, dict):
        answer["mix"] = selection.mix.to_json()
        answer["mix_source"] = selection.source
        if selection.routing is not None:
            answer["routing"] = selection.routing
    return JSONResponse(answer, status_code=r.status_code, headers=headers)


def _upstream_tokenizes(text: str) -> list[int]:
    """llama-server turns logit_bias texts into tokens itself: checked here as a valid id."""
    return [0]


async def _relay(upstream: httpx.Response):
    try:
        async for chunk in upstream.aiter_raw():
            yield chunk
    finally:
        await upstream.aclose()  # a client gone away closes the upstream stream too


__all__ = ["MIX_HEADER", "build_hook_app", "lora_field", "read_upstream_pool", "refuse_routed", "upstream_fields", "upstream_table"]
