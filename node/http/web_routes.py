"""The browser UI: `GET /` and the static files under `/web/`, straight from node/http/web/."""

from __future__ import annotations

import re
from pathlib import Path

from aiohttp import web

WEB_DIR = Path(__file__).resolve().parent / "web"

# Only these kinds of file are served, each with its exact type; anything else is a 404.
_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
# One plain file name: no folders, no leading dot, so no traversal and no hidden files.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")

# The page loads nothing but its own files and talks to nothing but its own node.
_PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def _file_response(name: str) -> web.FileResponse:
    """A file from node/http/web/ with its content type; 404 for anything that is not one of them."""
    path = WEB_DIR / name
    content_type = _CONTENT_TYPES.get(path.suffix)
    if not _NAME_RE.fullmatch(name) or content_type is None or not path.is_file() or path.is_symlink():
        raise web.HTTPNotFound()
    # Revalidate on every load (ETag / Last-Modified), so an upgraded node never serves a stale page.
    headers = {**_PAGE_HEADERS, "Content-Type": content_type, "Cache-Control": "no-cache"}
    return web.FileResponse(path, headers=headers)


async def index(request: web.Request) -> web.FileResponse:
    """`GET /`: the page."""
    return _file_response("index.html")


async def static_file(request: web.Request) -> web.FileResponse:
    """`GET /web/{name}`: a script, style sheet or icon of the page."""
    return _file_response(request.match_info["name"])


def add_routes(app: web.Application) -> None:
    """Mount the browser UI."""
    app.router.add_get("/", index)
    app.router.add_get("/web/{name}", static_file)
