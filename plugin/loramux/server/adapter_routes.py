"""Adapter management without restart, and llama-server's ``/lora-adapters``.

- ``GET /v1/adapters``: the loaded adapters; ``POST /v1/adapters {"path", "name"?}``: load a GGUF
  file or a PEFT folder (converted on the fly, into the cache); ``DELETE /v1/adapters/{name}``:
  unload (running requests that use it finish first).
- ``GET /lora-adapters``: ``[{"id", "path", "scale"}]`` as llama-server lists them (ids for the
  ``lora`` field); ``POST /lora-adapters [{"id", "scale"}]``: default scales of requests that name
  no mix.

Loading reads only inside the directories the server was started with: the path (relative to
one of them, or absolute) is resolved with symlinks followed and refused with 403 when it leaves
them (``../``, a symlink out, an absolute path elsewhere).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from loramux.errors import AdapterError, LoramuxError, RuntimeLoadError
from loramux.server import schema
from loramux.server.bodies import text_field
from loramux.server.errors import APIError, from_loramux
from loramux.server.openai_routes import json_body

router = APIRouter()


def allowed_path(raw: Any, roots: list[Path]) -> Path:
    """The adapter path ``raw`` resolved inside one of ``roots``, or a 403/404 APIError."""
    if not isinstance(raw, str) or not raw or "\0" in raw:
        raise APIError(400, "path must be a non-empty string", param="path")
    text_field(raw, "path")
    given = Path(raw)
    candidates = [given] if given.is_absolute() else [root / given for root in roots]
    for cand in candidates:
        try:
            real = cand.resolve(strict=True)
        except (OSError, RuntimeError):
            continue
        if any(real == root or real.is_relative_to(root) for root in roots):
            return real
        raise APIError(
            403,
            f"{raw!r} is outside the adapter directories the server was started with ({', '.join(map(str, roots))})",
            type="permission_error",
            param="path",
        )
    raise APIError(404, f"no adapter at {raw!r} in the adapter directories ({', '.join(map(str, roots))})", param="path")


def _describe(state, name: str) -> dict[str, Any]:
    a = state.pool.adapters[name]
    return {
        "id": name,
        "object": "adapter",
        "lora_id": state.lora.names.index(name),
        "source": str(a.source),
        "from_peft": a.from_peft,
        "ranks": list(a.ranks),
        "n_modules": a.n_modules,
    }


@router.get("/v1/adapters")
async def list_adapters(request: Request) -> dict[str, Any]:
    state = request.app.state.loramux
    return {"object": "list", "data": [_describe(state, n) for n in state.pool.names]}


@router.post("/v1/adapters", status_code=201, **schema.LOAD)
async def load_adapter(request: Request) -> dict[str, Any]:
    state = request.app.state.loramux
    body = await json_body(request)
    path = allowed_path(body.get("path"), state.settings.adapter_dirs())
    name = body.get("name")
    if name is not None:
        text_field(name, "name")
    try:
        info = await run_in_threadpool(state.pool.load, path, name=name, skip_embeddings=state.settings.skip_embeddings)
    except (LoramuxError, OSError, ValueError) as exc:
        raise load_refused(exc, body.get("path"), path) from None
    state.lora.add(info.name)
    return _describe(state, info.name)


def load_refused(exc: Exception, given: str, path: Path) -> APIError:
    """The 400 for an adapter that cannot be loaded, naming the file as the client gave it.

    Whatever fails while reading a client's file (a truncated or garbage GGUF, a PEFT folder the
    converter refuses, llama.cpp refusing the file) is the file's fault, not the server's."""
    if isinstance(exc, LoramuxError) and not isinstance(exc, (AdapterError, RuntimeLoadError)):
        return from_loramux(exc)
    message = str(exc) or type(exc).__name__
    if given not in message and str(path) not in message:
        message = f"{given}: {message}"
    return APIError(400, f"cannot load adapter {given!r}: {message}", param="path", code="invalid_adapter")


@router.delete("/v1/adapters/{name}", responses=schema.errors(*schema.COMMON_ERRORS, 404))
async def unload_adapter(name: str, request: Request) -> dict[str, Any]:
    state = request.app.state.loramux
    if name not in state.pool.names:
        raise APIError(
            404, f"adapter {name!r} is not loaded (loaded: {', '.join(state.pool.names) or 'none'})", param="name", code="adapter_not_found"
        )
    try:
        await run_in_threadpool(state.pool.unload, name)
    except LoramuxError as exc:
        raise from_loramux(exc) from None
    state.lora.remove(name)
    return {"id": name, "object": "adapter", "deleted": True}


@router.get("/lora-adapters")
async def lora_adapters(request: Request) -> list[dict[str, Any]]:
    state = request.app.state.loramux
    return state.lora.listing({n: str(a.gguf_path) for n, a in state.pool.adapters.items()})


@router.post("/lora-adapters", **schema.SCALES)
async def set_lora_scales(request: Request) -> dict[str, Any]:
    """llama-server's: the default scales of requests that name no mix; answers ``{"success": true}``."""
    state = request.app.state.loramux
    try:
        body = await request.json()
    except ValueError:
        raise APIError(400, "the request body is not valid JSON") from None
    mix = state.lora.mix_of(body, field_name="body")
    state.lora.default_scales = mix.to_dict()
    return {"success": True}


__all__ = ["allowed_path", "load_refused", "router"]
