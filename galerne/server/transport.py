"""Connections: how ``galerne serve`` runs uvicorn, and what it adds to uvicorn.

uvicorn bounds some of it: request headers past 16 KiB (h11's limit) are a 400, and
a keep-alive connection idle after a response is closed after ``KEEP_ALIVE`` seconds.
It has no timeout for a connection that sends no request, or only part of its
headers, and no connection cap that spares busy clients (``limit_concurrency``
answers 503 to new requests once that many connections are open, whoever holds
them: silent sockets would lock everyone out). ``guarded_protocol`` adds both to
uvicorn's own HTTP protocol class (h11's, or httptools' when it is installed), as
a subclass:

* **Header timeout.** A connection with no request running (just opened, or
  between two requests) must complete a request's headers within
  ``--header-timeout`` seconds of connecting or of its first byte after a
  response; else it is closed. The clock is not reset by each byte: one byte a
  second (slowloris) is closed as surely as silence.
* **Lingering close.** A client sends its whole body before it reads the answer:
  closing a connection with its bytes unread would reset it, and the client could
  lose the 413 it had not read yet. When uvicorn closes a connection whose request
  body is not all in (after a 413 or a 408, which say ``Connection: close``), the
  server shuts its side instead (the answer is all sent), drops what comes without
  parsing it, and closes when the client does or after ``LINGER`` seconds, as
  nginx does. A connection idle (no request running) that receives more than
  ``--max-body-mb`` (plus room for headers), the rest of a body no route read,
  lingers the same way.
* **Connection cap.** Past ``--max-connections`` open connections, a new one
  closes the connection idle the longest (no request running: a silent socket,
  or a keep-alive client between requests, which reconnects); when every
  connection runs a request, the new one gets a 503. Busy clients (streams) are
  never dropped for idle ones.
* The cap, and how many connections asyncio accepts in one go, are lowered to
  what the open-file limit allows (after raising its soft limit to the hard one),
  so that ``accept()`` does not fail for lack of descriptors (``Server`` keeps the
  kernel's queue of connections 2048 long all the same).
"""

from __future__ import annotations

import json
import logging
import os
import socket

import uvicorn

from ..config import ServerSettings
from .metrics import Metrics

log = logging.getLogger(__name__)

KEEP_ALIVE = 5  # seconds: uvicorn's default timeout_keep_alive
HEADER_ROOM = 64 * 1024  # bytes of headers counted with the idle-bytes budget
LINGER = 5.0  # seconds a lingering connection drops what comes before it is closed
BACKLOG = 2048  # uvicorn's default listen backlog
FD_RESERVE = 32  # descriptors kept for the rest of the process (listening socket, logs, the engine's files)


class _Guarded:
    """Mixed into uvicorn's HTTP protocol class by ``guarded_protocol`` (which sets the
    class attributes below). Works on the state both of uvicorn's implementations keep:
    ``cycle`` (the request running, or the last one), ``connections`` (the server's set),
    ``transport``, ``loop``."""

    header_timeout: float
    idle_bytes: int
    max_connections: int
    metrics: Metrics | None

    def connection_made(self, transport) -> None:
        super().connection_made(_LingeringClose(transport, self))
        self._timer = None
        self._idle_since = self.loop.time()
        self._idle_received = 0
        self._lingering = False
        if self.metrics is not None:
            self.metrics.connections.inc()
        self._arm()
        self._cap()

    def connection_lost(self, exc) -> None:
        self._disarm()
        if self.metrics is not None:
            self.metrics.connections.dec()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return  # dropped unparsed
        super().data_received(data)
        if self.transport.is_closing():
            return
        if self._idle():  # part of a request's headers, or the rest of a body no one reads
            self._idle_received += len(data)
            if self._idle_received > self.idle_bytes:
                if self.metrics is not None:
                    self.metrics.connection_closed("idle_bytes")
                self._linger()
            elif self._timer is None:
                self._arm()
        else:  # a request runs: its body is the route's business (guards.BodyGuard)
            self._disarm()
            self._idle_received = 0

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._idle_since = self.loop.time()  # idle again: uvicorn's keep-alive timer runs

    # ---

    def _idle(self) -> bool:
        cycle = self.cycle
        return cycle is None or cycle.response_complete

    def _arm(self) -> None:
        self._disarm()
        self._timer = self.loop.call_later(self.header_timeout, self._expire)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        if self._idle() and not self.transport.is_closing():
            self._close("header_timeout")

    def _unread_body(self) -> bool:
        conn = getattr(self, "conn", None)  # h11's state machine
        if conn is not None:
            import h11

            return conn.their_state is h11.SEND_BODY
        return self.cycle is not None and self.cycle.more_body  # httptools

    def _linger(self) -> None:
        transport = self.transport.transport
        self._lingering = True
        self._disarm()
        self._timer = self.loop.call_later(LINGER, transport.close)
        self.flow.resume_reading()
        try:
            transport.write_eof()  # once what is buffered is sent; the client's close then closes ours
        except (OSError, RuntimeError, NotImplementedError):  # a TLS transport cannot half-close
            transport.close()

    def _close(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.connection_closed(reason)
        self._disarm()
        self.transport.close()

    def _cap(self) -> None:
        if len(self.connections) <= self.max_connections:
            return
        live = [c for c in self.connections if not c.transport.is_closing()]
        if len(live) <= self.max_connections:
            return
        idle = [c for c in live if c is not self and isinstance(c, _Guarded) and c._idle()]
        if idle:
            min(idle, key=lambda c: c._idle_since)._close("evicted")
            return
        body = json.dumps({"error": {"message": f"too many connections (at most {self.max_connections}, all "
                                     "running requests); retry later", "type": "server_error", "param": None,
                                     "code": "too_many_connections"}}).encode()
        self.transport.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
                             b"retry-after: 1\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        self._close("refused")


class _LingeringClose:
    """The transport uvicorn's protocol sees: ``close()`` lingers while the request's
    body is not all in; the rest is the asyncio transport's."""

    def __init__(self, transport, protocol: _Guarded):
        self.transport, self.protocol = transport, protocol

    def __getattr__(self, name):
        return getattr(self.transport, name)

    def close(self) -> None:
        p = self.protocol
        if p._lingering or self.transport.is_closing() or not p._unread_body():
            self.transport.close()
        else:
            p._linger()


def guarded_protocol(settings: ServerSettings, metrics: Metrics | None = None,
                     max_connections: int | None = None) -> type:
    """uvicorn's HTTP protocol class (``auto``: httptools if installed, else h11) with
    the header timeout, the idle-bytes budget and the connection cap of ``settings``."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    return type("GuardedHTTPProtocol", (_Guarded, AutoHTTPProtocol), {
        "header_timeout": settings.header_timeout,
        "idle_bytes": settings.max_body_bytes + HEADER_ROOM,
        "max_connections": max_connections or settings.max_connections,
        "metrics": metrics,
    })


def connection_limits(wanted: int) -> tuple[int, int]:
    """(connection cap, accept burst): ``wanted`` and 2048 when the open-file limit allows
    them, once its soft limit is raised as far as the hard one allows; else what it
    leaves. asyncio accepts up to a burst of connections in one go (its ``backlog``)
    before the protocol sees any of them (and can close an idle one), a few times over
    before the closes are done: the descriptors for four bursts are kept free."""
    backlog = BACKLOG
    try:
        import resource
    except ImportError:  # not on a POSIX system
        return wanted, backlog
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        in_use = len(os.listdir("/proc/self/fd"))
    except OSError:
        in_use = 64
    need = wanted + 4 * backlog + in_use + FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < need:
        new = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY or soft >= need:
        return wanted, backlog
    budget = max(soft - in_use - FD_RESERVE, 16)
    backlog = max(4, min(BACKLOG, budget // 16))
    cap = max(1, min(wanted, budget - 4 * backlog))
    if cap < wanted:
        log.warning("the open-file limit (%d) allows %d connections, not %d (--max-connections): raise it with "
                    "`ulimit -n`", soft, cap, wanted)
    return cap, backlog


class Server(uvicorn.Server):
    """uvicorn's server, whose listening sockets keep a kernel queue of ``BACKLOG``
    connections whatever the config's ``backlog``, which asyncio also takes as how many
    it accepts in one go (``connection_limits`` makes that small when descriptors are
    short). A short kernel queue would drop connections (their SYN) during a burst, and
    each would wait a second for its retry."""

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.config.backlog < BACKLOG:
            for server in self.servers:
                for sock in server.sockets:
                    with socket.socket(fileno=os.dup(sock.fileno())) as s:  # closing the copy keeps the socket
                        s.listen(BACKLOG)


def uvicorn_config(app, settings: ServerSettings, **overrides) -> uvicorn.Config:
    """The uvicorn configuration ``galerne serve`` runs ``app`` (``create_app``'s) with,
    in a ``Server``."""
    server = getattr(app.state, "server", None)
    cap, backlog = connection_limits(settings.max_connections)
    protocol = guarded_protocol(settings, server.metrics if server is not None else None, cap)
    kwargs = dict(host=settings.host, port=settings.port, log_level="warning", access_log=False, lifespan="on",
                  timeout_graceful_shutdown=settings.drain_timeout, timeout_keep_alive=KEEP_ALIVE, http=protocol,
                  backlog=backlog)
    kwargs.update(overrides)
    return uvicorn.Config(app, **kwargs)
