"""The batch runner: this server's batch jobs, run by its own engine beside interactive
traffic, at low priority.

One asyncio task in the server's event loop, started and stopped by the app's lifespan.
It takes one job at a time (``batches.next_job``: a job whose runner is gone, else the
oldest queued one for this server's base model) and sends its requests through the
endpoints (``endpoints.answer``: the route's own checks and answer) at BATCH priority,
at most ``batch_concurrency`` at once. The engine's scheduler serves interactive
requests first (engine/scheduler.py); a 10,000-line batch never has more than that
many requests in the engine, and never counts against ``max_queued_requests``.

Each answer goes to the job's journal as it comes (``batches.Journal``). A watcher
refreshes the job's record twice a second (counters, heartbeat) and notices a cancel,
from this server or another sharing the store, and the end of the job's window.

Stopping the server stops the runner first: the requests in flight are aborted (they
are not in the journal: they run again), and the job is handed back as it is, running,
for the next runner (this server restarted, or another) to go on with.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time

from ...engine.request import BATCH
from ...errors import EngineDeadError, GalerneError, InvalidParameter
from ...platform import batches as b
from ...platform.store import now
from ..dialect import Dialect
from ..endpoints import answer
from ..errors import BodyTooLarge, ShuttingDown, error_body
from ..serving import THREAD_MIN_BYTES, parse_json, validate
from ..state import ServerState
from .protocol import LINE_WIRE, output_line, unanswered_line

log = logging.getLogger(__name__)

POLL_S = 2.0  # how often an idle runner looks for work (jobs of other servers, jobs left behind)
TICK_S = 0.5  # how often the record of the job running is refreshed
READ_AHEAD = 64  # input lines read per trip to a worker thread

# Why a run stops before its last request: cancelled, its window passed, its input
# unreadable; or HALT, the server cannot run it now (stopping, engine gone, job taken).
CANCEL, EXPIRE, FAIL, HALT = "cancel", "expire", "fail", "halt"
ENDING = {None: (b.SUCCEEDED, "completed_at"), CANCEL: (b.CANCELLED, "cancelled_at"),
          EXPIRE: (b.EXPIRED, "expired_at"), FAIL: (b.FAILED, "failed_at")}


class BatchRunner:
    def __init__(self, server: ServerState):
        self.server = server
        self.owner = b.owner_handle()
        self._task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self._current: _Run | None = None

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._loop(), name="galerne-batch")

    async def stop(self) -> None:
        """Stop now: the requests in flight are aborted, the job is handed back."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def wake(self) -> None:
        """A job was created: look now rather than at the next poll."""
        if self._wake is not None:
            self._wake.set()

    def cancel(self, job_id: str) -> None:
        """``job_id`` was set cancelling: if it runs here, stop its requests now."""
        run = self._current
        if run is not None and run.id == job_id:
            run.halt(CANCEL)

    async def _loop(self) -> None:
        platform = self.server.platform
        while True:
            self._wake.clear()
            try:
                job = await asyncio.to_thread(b.next_job, platform.store, self.owner, platform.base_id)
            except Exception:
                log.exception("batch: cannot look for jobs in the store")
                job = None
            if job is None:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), POLL_S)
                continue
            run = self._current = _Run(self.server, job, self.owner)
            try:
                await run.run()
            except asyncio.CancelledError:
                self._hand_back(run)
                raise
            except Exception:
                log.exception("batch job %s: the runner failed; it will try again", run.id)
                self._hand_back(run)
                await asyncio.sleep(POLL_S)
            else:
                if run.reason == HALT:
                    self._hand_back(run)
                    await asyncio.sleep(POLL_S)  # e.g. the engine failed: do not spin
            finally:
                self._current = None

    def _hand_back(self, run: _Run) -> None:
        """Leave ``run``'s job to the next runner, its counters saved. Synchronous: it runs
        while the task is being cancelled, and takes a few milliseconds."""
        run.journal.close()
        store = self.server.platform.store
        try:
            if run.progress is not None:
                store.update("jobs", run.id, expect=b.OWNED, **run.progress.fields())
            b.take(store, run.id, owner=None, previous=self.owner)
        except Exception:
            log.exception("batch job %s: cannot hand it back (another runner takes it after %.0f s)", run.id, b.STALE_S)


class _Run:
    """One job, from being taken to its end, or to a halt."""

    def __init__(self, server: ServerState, job: dict, owner: str):
        self.server, self.job, self.id, self.owner = server, job, job["id"], owner
        self.dialect = Dialect(job["dialect"])
        self.platform = server.platform
        self.journal = b.Journal(self.platform.data.job(self.id))
        self.progress: b.Progress | None = None
        self.reason: str | None = None
        self.failure: str | None = None  # why it failed (FAIL)
        self.stopped = asyncio.Event()

    def halt(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
        self.stopped.set()

    async def run(self) -> None:
        self.progress = await asyncio.to_thread(self.journal.open)
        status = self.job["status"]
        if status == b.CANCELLING:
            self.halt(CANCEL)
        elif status == b.RUNNING:
            if time.time() >= self.job["expires_at"]:
                self.halt(EXPIRE)
            else:
                await self._requests()
        if self.reason != HALT:
            await asyncio.to_thread(self._finish)

    # --- the requests

    async def _requests(self) -> None:
        """Every request the journal lacks, at most ``batch_concurrency`` at once, until the
        last is answered or the run stops."""
        limit = self.server.settings.batch_concurrency
        reader = b.iter_requests(self.platform, self.job["input_file_ids"], self.server.settings.max_body_bytes)
        tasks: set[asyncio.Task] = set()
        stop = asyncio.ensure_future(self.stopped.wait())
        watch = asyncio.create_task(self._watch())
        try:
            while not stop.done():
                try:
                    chunk = await asyncio.to_thread(list, itertools.islice(reader, READ_AHEAD))
                except OSError as e:
                    self.failure = f"cannot read the input files: {e.strerror or e}"
                    self.halt(FAIL)
                    break
                if not chunk:
                    break
                for i, raw in chunk:
                    if i in self.progress.done:
                        continue
                    while len(tasks) >= limit and not stop.done():
                        await asyncio.wait(tasks | {stop}, return_when=asyncio.FIRST_COMPLETED)
                        tasks = {t for t in tasks if not t.done()}
                    if stop.done():
                        break
                    tasks.add(asyncio.create_task(self._request(i, raw)))
            while tasks and not stop.done():
                await asyncio.wait(tasks | {stop}, return_when=asyncio.FIRST_COMPLETED)
                tasks = {t for t in tasks if not t.done()}
        finally:
            for t in (*tasks, stop, watch):
                t.cancel()  # the requests in flight are aborted: not in the journal, they run again
            await asyncio.gather(*tasks, watch, return_exceptions=True)
            with contextlib.suppress(ValueError):  # still in a worker thread: the file closes with it
                reader.close()

    async def _request(self, i: int, raw: bytes | None) -> None:
        """Answer request ``i`` (its line ``raw``) and journal the answer."""
        custom_id = None
        try:
            # Parsed and checked on the loop when small, as read_json does a body.
            small = raw is not None and len(raw) < THREAD_MIN_BYTES
            custom_id, body = self._read_line(raw) if small else await asyncio.to_thread(self._read_line, raw)
            if isinstance(body, GalerneError):
                status, out, _ = error_body(body, self.dialect)
            else:
                status, out = await answer(self.server, self.dialect, self.job["endpoint"], body, priority=BATCH,
                                           body_bytes=len(raw))
            ok, line = output_line(self.dialect, custom_id, status, out)
        except (ShuttingDown, EngineDeadError) as e:
            log.warning("batch job %s: stops: %s", self.id, e)
            self.halt(HALT)
            return
        except Exception as e:  # a bug: this request's error line, never a lost request
            log.exception("batch job %s: request %d failed", self.id, i)
            ok, line = output_line(self.dialect, custom_id, *error_body(e, self.dialect)[:2])
        self.journal.append(i, ok, line)
        self.progress.add(i, ok, line)

    def _read_line(self, raw: bytes | None) -> tuple[str | None, dict | GalerneError]:
        """(custom_id, the request's body) of an input line, or the error its route would
        answer for it (malformed JSON, too long, a bad envelope). The custom_id is known
        as soon as the line parses, so that an error line still names its request."""
        custom_id = None
        try:
            if raw is None:
                raise BodyTooLarge(f"the line is longer than a request body may be ({self.server.settings.max_body_mb:g} "
                                   "MiB, --max-body-mb)")
            obj = parse_json(raw, self.server.max_model_len)
            if isinstance(obj, dict) and isinstance(obj.get("custom_id"), str):
                custom_id = obj["custom_id"]
            line = validate(LINE_WIRE[self.dialect], obj)
            endpoint, body = self.job["endpoint"], line.body
            if self.dialect is Dialect.OPENAI and line.url != endpoint:
                raise InvalidParameter("url", f"must be the batch's endpoint {endpoint!r}, got {line.url!r}")
            if self.dialect is Dialect.MISTRAL and self.job.get("model") and "model" not in body:
                body = {**body, "model": self.job["model"]}  # the job's model, for the lines that name none
            return custom_id, body
        except GalerneError as e:
            return custom_id, e

    async def _watch(self) -> None:
        """The record's counters and heartbeat; a cancel from anywhere; the window's end."""
        while True:
            await asyncio.sleep(TICK_S)
            job = await asyncio.to_thread(self.platform.store.update, "jobs", self.id, expect=b.OWNED,
                                          heartbeat=time.time(), **self.progress.fields())
            if job is None or job.get("owner") != self.owner:
                self.halt(HALT)  # ended or taken elsewhere (its record changed under it)
            elif job["status"] == b.CANCELLING:
                self.halt(CANCEL)
            elif time.time() >= job["expires_at"]:
                self.halt(EXPIRE)

    # --- the end

    def _finish(self) -> None:
        """Write the job's files from its journal and end it. Synchronous, in one worker
        thread: a server stopping meanwhile does not cut it in the middle (its loop waits
        for the thread), so a job never ends without its files nor keeps two sets."""
        store = self.platform.store
        if self.reason == EXPIRE:
            self._expire_the_rest()
        elif (self.reason is None and self.job["status"] != b.FINALIZING
              and store.transition(self.id, [b.RUNNING], b.FINALIZING, finalizing_at=now()) is None):
            self.reason = CANCEL  # cancelled meanwhile: every request ran all the same
        status, stamp = ENDING[self.reason]
        output, errors = self.journal.results(self.platform, self.id)
        values = {"output_file": output and output["id"], "error_file": errors and errors["id"], stamp: now(),
                  "owner": None, **self.progress.fields()}
        if self.failure is not None:
            values["errors"] = [*self.job.get("errors", []), {"code": "input_unreadable", "message": self.failure}]
        if store.transition(self.id, b.OWNED, status, **values) is None:
            log.warning("batch job %s: its record changed while it ended; its files: %s, %s", self.id,
                        values["output_file"], values["error_file"])
        self.journal.remove(self.platform)
        log.info("batch job %s: %s (%d succeeded, %d failed)", self.id, status, self.progress.succeeded,
                 self.progress.failed)

    def _expire_the_rest(self) -> None:
        """An error line (``batch_expired``) for every request that did not run."""
        with contextlib.suppress(OSError):
            for i, raw in b.iter_requests(self.platform, self.job["input_file_ids"], self.server.settings.max_body_bytes):
                if i in self.progress.done:
                    continue
                custom_id = None
                with contextlib.suppress(ValueError, AttributeError):
                    custom_id = json.loads(raw).get("custom_id") if raw else None
                line = unanswered_line(self.dialect, custom_id if isinstance(custom_id, str) else None, "batch_expired",
                                       "the batch's window ended before this request ran")
                self.journal.append(i, False, line)
                self.progress.add(i, False, line)
