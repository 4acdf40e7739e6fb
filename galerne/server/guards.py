"""What the server checks before a route runs: pure ASGI middleware, in app.py's order.

* ``HeadAsGet``: ``HEAD`` answers where ``GET`` does, without the body. FastAPI's
  routes take only the methods they declare (Starlette's own add HEAD to GET), and
  declaring HEAD on each route would put HEAD operations in the OpenAPI spec.
* ``LocalGuard`` (only without an API key, when anyone who can reach the port may
  use the model): a request must name a loopback host (``localhost``,
  ``127.0.0.1``, ``[::1]``), ``--host`` or an ``--allowed-host`` in its ``Host``,
  and come from no web page (no ``Origin``), one of the server's own (``/docs``)
  or an ``--allowed-origin``; else 403. A web page cannot drive a local server:
  a cross-site request is refused by its ``Origin``, a DNS-rebinding one by its
  ``Host``. (Starlette's TrustedHostMiddleware answers a plain-text 400 and knows
  nothing of ``Origin``: errors here come in the dialect's envelope.)
* ``BodyGuard``: a body past ``--max-body-mb`` is a 413, told by ``Content-Length``
  before a byte of it is read (no ``100 Continue`` goes out), else as soon as the
  bytes that came pass the limit; a body not all in within ``--body-timeout`` is
  a 408. Both are raised from ``receive()``, inside the route: its error handling
  answers them in the dialect's envelope and counts them by route.
"""

from __future__ import annotations

import asyncio

from starlette.datastructures import Headers
from starlette.requests import Request

from ..config import ServerSettings
from . import dialect as dialects
from . import errors
from .errors import BodyTooLarge, Forbidden, RequestTimeout

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


class HeadAsGet:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "HEAD":
            return await self.app(scope, receive, send)

        async def without_body(message):
            if message["type"] == "http.response.body" and message.get("body"):
                message = {**message, "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, without_body)


def host_name(host: str) -> str:
    """The name in a ``Host`` header: ``[::1]:8000`` -> ``::1``, ``LocalHost.:80`` -> ``localhost``."""
    h = host.strip().lower()
    if h.startswith("["):
        return h[1:h.index("]")] if "]" in h else h
    if h.count(":") == 1:
        name, _, port = h.partition(":")
        if port.isdigit() or not port:
            h = name
    return h.rstrip(".")


class LocalGuard:
    def __init__(self, app, settings: ServerSettings):
        self.app = app
        names = [*LOOPBACK_NAMES, settings.host, *settings.allowed_host]
        self.hosts = None if "*" in settings.allowed_host else {host_name(n) for n in names}
        self.shown = ", ".join(dict.fromkeys(["localhost", "127.0.0.1", "[::1]", settings.host, *settings.allowed_host]))
        self.origins = set(settings.allowed_origin)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        host, origin = headers.get("host"), headers.get("origin")
        error = None
        if self.hosts is not None and host is not None and host_name(host) not in self.hosts:
            error = Forbidden(f"Host {host!r} is not allowed: without an API key this server answers only to "
                              f"{self.shown} (another name: --allowed-host NAME)", "host_not_allowed")
        elif origin is not None and not self._origin_ok(origin, host):
            error = Forbidden(f"cross-origin request from {origin!r} refused: without an API key, web pages of other "
                              f"origins may not call this server (to allow this one: --allowed-origin {origin})",
                              "origin_not_allowed")
        if error is None:
            return await self.app(scope, receive, send)
        await errors.error_response(error, dialects.of(Request(scope)))(scope, receive, send)

    def _origin_ok(self, origin: str, host: str | None) -> bool:
        if "*" in self.origins or origin in self.origins:
            return True
        # The server's own pages (/docs): the origin's host[:port] is the Host asked for.
        # The scheme is not compared: behind a TLS proxy the page is https, the server sees http.
        _, sep, netloc = origin.partition("://")
        return bool(sep) and host is not None and netloc.lower() == host.strip().lower()


class BodyGuard:
    """``uploads``: path -> the larger limit of a file upload there (``POST /v1/files``:
    ``--max-upload-mb``). An upload's time is bounded per chunk, not in all: each part of
    the body must come within ``--body-timeout`` of the last (a large file on a slow link
    takes minutes; a stalled one is still cut off)."""

    def __init__(self, app, max_bytes: int, timeout: float, uploads: dict[str, int] | None = None):
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout
        self.uploads = uploads or {}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        limit, received, started, done = self.max_bytes, 0, False, False
        upload = scope.get("method") == "POST" and scope.get("path", "").rstrip("/") in self.uploads
        if upload:
            limit = self.uploads[scope["path"].rstrip("/")]
        what = "--max-upload-mb" if upload else "--max-body-mb"

        async def guarded_receive():
            nonlocal received, started, done, deadline
            if done:  # the body is in: what comes now is the disconnect, whenever it comes
                return await receive()
            if not started:
                started = True
                length = Headers(scope=scope).get("content-length")
                if length is not None and length.isdigit() and int(length) > limit:
                    raise BodyTooLarge(f"the request body is {int(length):,} bytes; this server takes at most "
                                       f"{limit:,} ({what})")
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0))
            except TimeoutError:
                raise RequestTimeout(f"the request body did not all come within {self.timeout:g} s "
                                     "(--body-timeout)" if not upload else
                                     f"the upload stalled: no data for {self.timeout:g} s (--body-timeout)") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(f"the request body is past {limit:,} bytes, the most this server takes "
                                       f"({what})")
                if upload:
                    deadline = loop.time() + self.timeout
                done = not message.get("more_body", False)
            else:
                done = True
            return message

        await self.app(scope, guarded_receive, send)
