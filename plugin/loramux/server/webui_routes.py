"""The playground page of ``loramux serve`` (``/``): static files shipped in the package, no build step.

``GET /`` answers ``webui/index.html``; ``GET /webui/NAME`` its script and style sheet (a fixed
list: nothing else in the package is served). The page calls the server's public API only, as
any client does (docs/playground.md). ``--no-webui`` leaves these routes out (``/`` is then a 404,
as with llama-server's ``--no-webui``). The page itself needs no API key (it holds no data); the
API calls it makes do, and the page asks for the key when the server has one.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from loramux.server.errors import APIError

WEBUI_DIR = Path(__file__).resolve().parent / "webui"
PAGE = "index.html"
ASSETS = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
PUBLIC_PATHS = ("/", *(f"/webui/{name}" for name in ASSETS))  # served without the API key: no data in them
NO_CACHE = {"Cache-Control": "no-cache"}  # a new version of the package is picked up on reload

router = APIRouter(include_in_schema=False)


@router.get("/")
async def page() -> FileResponse:
    """The playground (``webui/index.html``)."""
    return FileResponse(WEBUI_DIR / PAGE, media_type="text/html; charset=utf-8", headers=NO_CACHE)


@router.get("/webui/{name}")
async def asset(name: str) -> FileResponse:
    """One of the page's files (``app.js``, ``style.css``); any other name is a 404."""
    if name not in ASSETS:
        raise APIError(404, f"no playground file {name!r} (there are {', '.join(sorted(ASSETS))})", code="not_found")
    return FileResponse(WEBUI_DIR / name, media_type=ASSETS[name], headers=NO_CACHE)


__all__ = ["ASSETS", "PUBLIC_PATHS", "WEBUI_DIR", "router"]
