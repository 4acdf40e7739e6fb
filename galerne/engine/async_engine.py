"""AsyncEngine: the engine behind an asyncio server.

One thread owns the Engine: it alone ever calls it (the forward releases the
GIL, so the event loop keeps running meanwhile). The event loop never waits
for it: ``generate`` puts the request in an input queue and awaits the
request's own asyncio queue; a consumer that stops early (a client gone) puts
an abort in the same input queue. Between two steps the engine thread applies
the inputs in the order they came (an add, then its abort: a request
cancelled before its add was applied never runs), runs a step, publishes a
stats snapshot, and hands the step's outputs to the requests' queues with one
``call_soon_threadsafe`` per event loop. An add the engine refuses (a request
its KV cache can never hold) comes back the same way, as that request's error.
The shape is vLLM v1's EngineCore busy loop.

``call`` runs a function of the engine on its thread, between two steps, through
the same queue (the server loads and unloads adapters so: the adapter registry is
the engine thread's alone); its result or exception comes back to the awaiting
coroutine. After each batch of inputs the thread publishes, besides the stats, the
list of adapters loaded (``adapters``): what the routes check a request's model
against without touching the engine.

A step that raises stops the loop for good: the requests it was running and
every later one get an ``EngineDeadError``, and ``error`` says what happened.
``shutdown`` stops the loop too (after the server drained its requests).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from ..errors import EngineDeadError, GalerneError
from .adapters import AdapterInfo
from .engine import Engine, StepOutput
from .request import EngineRequest

log = logging.getLogger(__name__)


@dataclass
class _Add:
    request: EngineRequest
    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue


@dataclass
class _Abort:
    request_id: str


@dataclass
class _Call:
    fn: Callable[[Engine], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue
    remaining: int  # completions not finished


_STOP = object()


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._inputs: queue.SimpleQueue = queue.SimpleQueue()
        # Held only to queue an add or to close the front (never across a step): an add
        # is either queued before the engine thread's last look at the queue, or refused.
        self._gate = threading.Lock()
        self._closed: str | None = None  # why adds are refused
        self._error: BaseException | None = None  # what stopped the loop, if a step raised
        self._stats = engine.stats()  # the thread has not started: nothing else touches the engine
        self._adapters: tuple[AdapterInfo, ...] = tuple(engine.list_adapters())
        self._streams: dict[str, _Stream] = {}  # the engine thread's alone
        self._thread = threading.Thread(target=self._run, name="galerne-engine", daemon=True)
        self._thread.start()

    # ----------------------------------------------------------------- public

    async def generate(self, request: EngineRequest) -> AsyncIterator[StepOutput]:
        """Stream the outputs of one validated request (all its n completions
        interleaved). The engine's refusal, or its failure, is raised here."""
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()
        with self._gate:
            if self._closed is not None:
                raise EngineDeadError(self._closed)
            self._inputs.put(_Add(request, loop, outputs))
        remaining = request.params.n
        try:
            while remaining:
                item = await outputs.get()
                if isinstance(item, BaseException):
                    remaining = 0  # refused, or the engine stopped: nothing of it runs
                    raise item
                yield item
                if item.finish_reason is not None:
                    remaining -= 1
        finally:
            if remaining:  # cancelled, or the consumer stopped early: free its blocks
                self._inputs.put(_Abort(request.request_id))

    async def call(self, fn: Callable[[Engine], Any]) -> Any:
        """``fn(engine)`` on the engine thread, between two steps (after the inputs queued
        before it); its result, or its exception, here. A ``fn`` must be quick: every
        request waits for it (read files in a worker thread first). Cancelling the
        awaiting coroutine does not undo a call already queued: it still runs."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._gate:
            if self._closed is not None:
                raise EngineDeadError(self._closed)
            self._inputs.put(_Call(fn, loop, future))
        return await future  # cancelled: the answer is dropped (_put_all)

    def adapters(self) -> tuple[AdapterInfo, ...]:
        """The adapters loaded, as the engine thread published them after its last inputs
        (a call's changes are in it by the time the call returns)."""
        return self._adapters

    @property
    def error(self) -> BaseException | None:
        """The exception that stopped the engine loop, or None while it runs (or after a
        plain shutdown)."""
        return self._error

    @property
    def errored(self) -> bool:
        return self._error is not None

    def stats(self) -> dict:
        """The scheduler's figures as the engine thread published them after its last
        step (or its last inputs): never read from the engine itself."""
        return dict(self._stats)

    def shutdown(self, timeout: float = 30) -> None:
        """Stop the loop: requests still running end with an EngineDeadError and are
        aborted (their blocks freed), later ones are refused. Blocks until the thread ends."""
        self._inputs.put(_STOP)
        self._thread.join(timeout=timeout)

    # ------------------------------------------------------- the engine thread

    def _run(self) -> None:
        engine = self.engine
        try:
            while self._apply_inputs(wait=not engine.has_unfinished()):
                outputs = engine.step() if engine.has_unfinished() else []
                self._stats = engine.stats()
                self._deliver(outputs)
        except BaseException as e:  # fail every request, loudly, once
            log.exception("engine step failed: the engine stops")
            self._error = e
            self._close(f"the engine stopped after an error ({type(e).__name__}); see the server log")
            return
        self._close("the engine was shut down")

    def _apply_inputs(self, wait: bool) -> bool:
        """Apply the inputs that came (idle: wait for one); False once told to stop."""
        try:
            item = self._inputs.get() if wait else self._inputs.get_nowait()
        except queue.Empty:
            return True
        while item is not _STOP:
            if isinstance(item, _Add):
                self._add(item)
            elif isinstance(item, _Call):
                self._call(item)
            else:
                self.engine.abort(item.request_id)
                self._streams.pop(item.request_id, None)
            try:
                item = self._inputs.get_nowait()
            except queue.Empty:
                self._stats = self.engine.stats()
                return True
        return False

    def _add(self, add: _Add) -> None:
        rid = add.request.request_id
        try:
            self.engine.add_request(add.request)
        except Exception as e:  # a refusal (too big for the KV cache, a bad grammar): that request's error
            if not isinstance(e, GalerneError):
                log.exception("request %s: add failed", rid)
            _send(add.loop, [(add.outputs, e)])
        else:
            self._streams[rid] = _Stream(add.loop, add.outputs, add.request.params.n)

    def _call(self, call: _Call) -> None:
        try:
            result: Any = call.fn(self.engine)
        except Exception as e:  # the caller's to handle; the engine goes on
            if not isinstance(e, GalerneError):
                log.exception("engine call %r failed", call.fn)
            result = e
        self._adapters = tuple(self.engine.list_adapters())  # before the caller sees the result
        _send(call.loop, [(call.future, result)])

    def _deliver(self, outputs: list[StepOutput]) -> None:
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            batches.setdefault(stream.loop, []).append((stream.outputs, out))
            if out.finish_reason is not None:
                stream.remaining -= 1
                if stream.remaining == 0:
                    del self._streams[out.request_id]
        for loop, batch in batches.items():
            _send(loop, batch)

    def _close(self, reason: str) -> None:
        """Refuse new adds; end every request queued or running with EngineDeadError and
        abort it in the engine (a shut-down engine is left clean for another front)."""
        with self._gate:
            self._closed = reason
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        while True:  # adds queued before the gate closed
            try:
                item = self._inputs.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Add):
                batches.setdefault(item.loop, []).append((item.outputs, EngineDeadError(reason)))
            elif isinstance(item, _Call):
                batches.setdefault(item.loop, []).append((item.future, EngineDeadError(reason)))
        for rid, stream in self._streams.items():
            batches.setdefault(stream.loop, []).append((stream.outputs, EngineDeadError(reason)))
            try:
                self.engine.abort(rid)
            except Exception:  # a failed engine may not even abort; the requests end anyway
                log.debug("abort of %s failed", rid, exc_info=True)
        self._streams.clear()
        for loop, batch in batches.items():
            _send(loop, batch)


def _send(loop: asyncio.AbstractEventLoop, batch: list[tuple[asyncio.Queue | asyncio.Future, object]]) -> None:
    """Hand items to queues of ``loop``, in one call into it."""
    try:
        loop.call_soon_threadsafe(_put_all, batch)
    except RuntimeError:  # the loop is closed: nobody is left to read
        pass


def _put_all(batch: list[tuple[asyncio.Queue | asyncio.Future, object]]) -> None:
    for q, item in batch:
        if isinstance(q, asyncio.Future):  # a call's answer
            if q.done():  # cancelled: nobody waits for it
                continue
            if isinstance(item, BaseException):
                q.set_exception(item)
            else:
                q.set_result(item)
        else:
            q.put_nowait(item)
