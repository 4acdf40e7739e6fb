"""What the server checks before a route runs: pure ASGI middleware.

* ``BodyGuard``: a body past ``--max-body-mb`` is a 413, told by ``Content-Length``
  before a byte of it is read (no ``100 Continue`` goes out), else as soon as the
  bytes that came pass the limit; a body not all in within ``--body-timeout`` is
  a 408. Both are raised from ``receive()``, inside the route: its error handling
  answers them in the dialect's envelope and counts them by route.
"""

from __future__ import annotations

import asyncio

from starlette.datastructures import Headers

from .errors import BodyTooLarge, RequestTimeout


class BodyGuard:
    def __init__(self, app, max_bytes: int, timeout: float):
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        limit, received, started, done = self.max_bytes, 0, False, False

        async def guarded_receive():
            nonlocal received, started, done
            if done:  # the body is in: what comes now is the disconnect, whenever it comes
                return await receive()
            if not started:
                started = True
                length = Headers(scope=scope).get("content-length")
                if length is not None and length.isdigit() and int(length) > limit:
                    raise BodyTooLarge(f"the request body is {int(length):,} bytes; this server takes at most "
                                       f"{limit:,} (--max-body-mb)")
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0))
            except TimeoutError:
                raise RequestTimeout(f"the request body did not all come within {self.timeout:g} s "
                                     "(--body-timeout)") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(f"the request body is past {limit:,} bytes, the most this server takes "
                                       "(--max-body-mb)")
                done = not message.get("more_body", False)
            else:
                done = True
            return message

        await self.app(scope, guarded_receive, send)
