"""AsyncEngine: the engine behind an asyncio server.

The engine loop runs in its own thread (the forward releases the GIL), so the
event loop stays free to accept requests and stream tokens. Requests are added
and aborted between steps, under one lock; outputs are handed to each request's
asyncio queue. A consumer that stops iterating (a client that disconnected)
aborts its request, which frees its KV blocks before the next step.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from .engine import Engine, StepOutput
from .request import EngineRequest

log = logging.getLogger(__name__)


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopping = False
        self._error: BaseException | None = None
        self._adders = ThreadPoolExecutor(max_workers=4, thread_name_prefix="galerne-add")
        self._thread = threading.Thread(target=self._loop, name="galerne-engine", daemon=True)
        self._thread.start()

    # ----------------------------------------------------------------- public

    async def generate(self, request: EngineRequest) -> AsyncIterator[StepOutput]:
        """Stream the outputs of one validated request (all its n completions interleaved)."""
        rid = request.request_id
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        # The engine's refusal (a request the KV cache can never hold) raises here, before
        # any output. The add runs in a thread (it waits for the step in progress); a caller
        # cancelled meanwhile (client gone) must not leave the request running once it lands.
        added = self._adders.submit(self._add, request, loop, queue)
        try:
            await asyncio.wrap_future(added)
        except asyncio.CancelledError:
            added.add_done_callback(lambda f: f.cancelled() or f.exception() or self.abort(rid))
            raise
        remaining = request.params.n
        try:
            while remaining:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    remaining -= 1
        finally:
            if remaining:
                self.abort(rid)
            self._queues.pop(rid, None)

    def abort(self, request_id: str) -> None:
        with self._lock:
            self.engine.abort(request_id)
            self._queues.pop(request_id, None)

    def stats(self) -> dict:
        return self.engine.stats()

    def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=30)
        self._adders.shutdown(wait=False, cancel_futures=True)

    @property
    def num_requests(self) -> int:
        return len(self._queues)

    # ---------------------------------------------------------------- private

    def _add(self, request, loop, queue) -> None:
        if self._error is not None:
            raise RuntimeError(f"the engine loop stopped: {self._error!r}")
        with self._lock:
            self.engine.add_request(request)
            self._queues[request.request_id] = (loop, queue)
        self._wake.set()

    def _loop(self) -> None:
        while not self._stopping:
            with self._lock:
                busy = self.engine.has_unfinished()
                if busy:
                    try:
                        outputs = self.engine.step()
                    except BaseException as e:  # fail every waiting request, loudly, once
                        log.exception("engine step failed")
                        self._error = e
                        self._fail_all(e)
                        return
                    for out in outputs:
                        target = self._queues.get(out.request_id)
                        if target is not None:
                            target[0].call_soon_threadsafe(target[1].put_nowait, out)
            if not busy:
                self._wake.wait(timeout=0.5)
                self._wake.clear()

    def _fail_all(self, error: BaseException) -> None:
        for rid, (loop, queue) in list(self._queues.items()):
            loop.call_soon_threadsafe(queue.put_nowait, RuntimeError(f"engine failure: {error!r}"))
            self.engine.abort(rid)
