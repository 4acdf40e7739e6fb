"""API keys: ``Authorization: Bearer KEY``, as both official clients send it.

Only the API (``/v1/...``) is protected; ``/health``, ``/metrics`` and the
OpenAPI docs are open (they show no data). Without any key configured, the
server takes every request (and the CLI then refuses a non-loopback address
unless told ``--allow-no-auth``).
"""

from __future__ import annotations

import hmac

from starlette.requests import Request

from .errors import Unauthorized


def require_api_key(request: Request) -> None:
    """FastAPI dependency of the ``/v1`` routes."""
    keys: tuple[bytes, ...] = request.app.state.api_keys
    if not keys:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("missing API key: send 'Authorization: Bearer YOUR_KEY'")
    given = token.strip().encode()
    # Compare with every key, in constant time, so that timing tells nothing.
    if not any([hmac.compare_digest(given, key) for key in keys]):
        raise Unauthorized("invalid API key")
