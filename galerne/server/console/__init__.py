"""The console: a web page served at ``/`` (off with ``--no-console``) to chat, compare two
models, upload data and fine-tune, over the API of the same server.

It is static files (``static/``: plain HTML, CSS and JavaScript, no build step, no library),
served without an API key, since they hold no data: every call the page makes goes to the
``/v1`` routes with the key the user types in (kept in the tab's ``sessionStorage``). Its
Content-Security-Policy lets the page load and connect to this server only: nothing is
fetched from elsewhere, no inline script runs. The files are read once, when the app is
made; only their names are served (no path from the request reaches the file system).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from starlette.responses import Response

from ..errors import NotFound

STATIC = Path(__file__).parent / "static"
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
# The page's own files and API only; no inline script or style, no frames, no plugins.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "X-Frame-Options": "DENY", "Cache-Control": "no-cache"}


def assets() -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, media type) of the console's files."""
    return {p.name: (p.read_bytes(), TYPES[p.suffix]) for p in sorted(STATIC.iterdir()) if p.suffix in TYPES}


def router() -> APIRouter:
    files = assets()
    api = APIRouter(include_in_schema=False)

    def answer(name: str) -> Response:
        if name not in files:
            raise NotFound(f"the console has no file {name!r}", "not_found", None)
        body, media_type = files[name]
        return Response(body, media_type=media_type, headers=HEADERS)

    @api.get("/")
    async def page() -> Response:
        return answer("index.html")

    @api.get("/console/{name}")
    async def asset(name: str) -> Response:
        return answer(name)

    return api
