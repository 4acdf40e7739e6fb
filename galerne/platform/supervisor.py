"""The server's side of fine-tuning jobs: a task on the server's event loop that, every
second,

1. starts queued jobs of the served base model in worker processes (through the
   launcher), at most ``--max-running-jobs`` at once; a job is claimed by an atomic
   QUEUED -> RUNNING, so that servers sharing a store never start it twice;
2. watches the jobs a worker holds: a worker that is gone while its job still says it runs
   (it crashed, was killed, or died with a server killed mid-job) gets its job back: the
   job resumes from its last checkpoint (or restarts, before its first), up to
   ``MAX_ATTEMPTS`` times, then fails with the reason. A worker another server started is
   judged by its heartbeat alone;
3. keeps the fine-tuned models of the store served: each model of this base that is not
   archived is loaded into the engine's adapters, under its id; one deleted or archived
   is unloaded. At start, that loads every model fine-tuned before.

The store and the launcher are touched in worker threads; the launcher starts workers on
the event loop's thread, because a worker is tied to the thread that started it (it dies
with it: see launcher.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

from galerne.platform import jobs as J
from galerne.platform.launcher import EXITED, RUNNING, UNKNOWN, WorkerSpec, make_launcher

log = logging.getLogger(__name__)

TICK_S = 1.0
LEASE_S = 30.0  # a worker's heartbeat older than this: its job is taken back
STOP_GRACE_S = 60.0  # a cancel or pause the worker has not acted on by then: the launcher stops it
RETRY_LOAD_S = 60.0


class Supervisor:
    def __init__(self, platform, *, max_running: int = 1, nproc: int = 1,
                 load: Callable[[str, str], Awaitable[None]], unload: Callable[[str], Awaitable[None]],
                 served: Callable[[], set[str]], fine_tunable: bool = True):
        self.platform = platform
        self.store = platform.store
        self.max_running, self.nproc = max_running, nproc
        self.load, self.unload, self.served = load, unload, served
        self.fine_tunable = fine_tunable
        self.launcher = platform.launcher or make_launcher(getattr(platform.settings, "ray_address", "") or None)
        platform.launcher = self.launcher
        self.me = f"claim:{socket.gethostname()}:{os.getpid()}"
        self.mine: set[str] = set()  # job ids whose worker this server started
        self.models: set[str] = set()  # fine-tuned models this server loaded
        self._load_failed: dict[str, float] = {}
        self._sync_lock = asyncio.Lock()
        self._task: asyncio.Task | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="galerne-jobs")

    async def stop(self, grace: float = 30.0) -> None:
        """Stop supervising; ask this server's workers to stop (each saves a checkpoint at the
        end of its current step and puts its job back in the queue, for the next start to
        resume) and wait up to ``grace`` seconds for them. A worker still running then dies
        with the server, and its job resumes from its last periodic checkpoint."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        owners = []
        for job_id in list(self.mine):
            job = await asyncio.to_thread(self.store.get, "jobs", job_id)
            owner = (job or {}).get("owner") or ""
            if owner and not owner.startswith("claim:"):
                await asyncio.to_thread(self.launcher.stop, owner)
                owners.append(owner)
        deadline = time.monotonic() + grace
        while owners and time.monotonic() < deadline:
            owners = [o for o in owners if self.launcher.state(o) == RUNNING]
            await asyncio.sleep(0.2)
        if owners:
            log.warning("%d worker(s) did not stop within %.0f s: their jobs resume from their last checkpoint",
                        len(owners), grace)

    async def _run(self) -> None:
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # a database hiccup: log it, try again next tick
                log.exception("job supervisor: tick failed")
            await asyncio.sleep(TICK_S)

    async def tick(self) -> None:
        jobs = await asyncio.to_thread(self.store.select, "jobs",
                                       where={"kind": "fine_tune", "status": [J.QUEUED, *J.WORKING]}, descending=False)
        self.mine &= {j["id"] for j in jobs if j["status"] in J.WORKING}  # the others finished
        reap = getattr(self.launcher, "reap", None)
        if reap is not None:
            reap()
        for job in jobs:
            if job["status"] in J.WORKING:
                await self._watch(job)
        if self.fine_tunable:
            queued = [j for j in jobs if j["status"] == J.QUEUED and j["model"] == self.platform.base_id]
            for job in queued:
                if len(self.mine) >= self.max_running:
                    break
                await self._start(job)
        await self.sync_models()

    # ------------------------------------------------------------------ workers

    async def _start(self, job: dict[str, Any]) -> None:
        claimed = await asyncio.to_thread(
            J.move, self.platform, job["id"], (J.QUEUED,), J.RUNNING, None, owner=self.me, heartbeat=time.time(),
            started_at=job.get("started_at") or int(time.time()), attempts=(job.get("attempts") or 0) + 1)
        if claimed is None:
            return  # another server took it, or it was cancelled meanwhile
        data = self.platform.data
        spec = WorkerSpec(args=["--job", job["id"], "--database-url", self.store.url, "--data-dir", str(data.root)],
                          env={"PYTHONUNBUFFERED": "1"}, log_path=data.job(job["id"]) / "worker.log", nproc=self.nproc)
        try:
            if self.launcher.name == "local":
                handle = self.launcher.start(spec)  # on this thread: see the module's docstring
            else:  # a request to a cluster: not on the event loop
                handle = await asyncio.to_thread(self.launcher.start, spec)
        except Exception as e:
            log.exception("job %s: the worker did not start", job["id"])
            await asyncio.to_thread(J.move, self.platform, job["id"], J.WORKING, J.FAILED, f"the worker did not start: {e}",
                                    error={"code": "worker_start_failed", "message": str(e), "param": None})
            return
        self.mine.add(job["id"])
        await asyncio.to_thread(self.store.update, "jobs", job["id"], owner=handle)
        log.info("job %s: worker started (%s)", job["id"], handle)

    async def _watch(self, job: dict[str, Any]) -> None:
        owner = job.get("owner") or ""
        age = J.heartbeat_age(job)
        if owner.startswith("claim:"):  # claimed, its worker not (yet) recorded
            state = UNKNOWN if owner != self.me else RUNNING
        else:
            state = await asyncio.to_thread(self.launcher.state, owner) if owner else UNKNOWN
        if state == RUNNING:
            if job["status"] != J.RUNNING and time.time() - job["modified_at"] > STOP_GRACE_S:
                await asyncio.to_thread(self.launcher.stop, owner)
            return
        if state == EXITED:
            reason = await asyncio.to_thread(self.launcher.exit_message, owner)
        elif age > LEASE_S:
            reason = f"its worker sent no heartbeat for {age:.0f} s (the server or machine running it stopped)"
        else:
            return
        self.mine.discard(job["id"])
        await asyncio.to_thread(self._recover, job["id"], reason)

    def _recover(self, job_id: str, reason: str) -> None:
        """The job of a worker that is gone, back to where it can go on (a thread)."""
        job = self.store.get("jobs", job_id)
        if job is None or job["status"] not in J.WORKING:
            return  # the worker finished it before it went
        p = self.platform
        if job["status"] == J.CANCELLATION_REQUESTED:
            J.move(p, job_id, (J.CANCELLATION_REQUESTED,), J.CANCELLED, reason)
        elif job["status"] == J.PAUSE_REQUESTED:
            J.move(p, job_id, (J.PAUSE_REQUESTED,), J.PAUSED, reason)
        elif (job.get("attempts") or 0) >= J.MAX_ATTEMPTS:
            message = f"{reason} (attempt {job['attempts']} of {J.MAX_ATTEMPTS})"
            J.move(p, job_id, (J.RUNNING,), J.FAILED, message,
                   error={"code": "worker_failed", "message": message, "param": None}, owner=None)
        else:
            ckpts = self.store.checkpoints(job_id)
            how = f"resuming from its checkpoint at step {ckpts[0]['step']}" if ckpts else \
                "restarting from the beginning (no checkpoint yet)"
            J.move(p, job_id, (J.RUNNING,), J.QUEUED, f"{reason}; {how}", owner=None)
        log.warning("job %s: %s", job_id, reason)

    def stop_worker(self, job: dict[str, Any]) -> None:
        """Ask a job's worker to stop now (a cancel that should not wait for the next step's
        heartbeat)."""
        owner = job.get("owner") or ""
        if owner and not owner.startswith("claim:"):
            self.launcher.stop(owner)

    # ------------------------------------------------------------------ fine-tuned models

    async def sync_models(self) -> None:
        """Serve every fine-tuned model of this base that is not archived; stop serving the
        ones deleted or archived."""
        async with self._sync_lock:
            rows = await asyncio.to_thread(self.store.select, "models",
                                           where={"base": self.platform.base_id, "archived": False})
            wanted = {r["id"]: r for r in rows}
            served = self.served()
            for model_id in sorted(self.models - set(wanted)):
                if model_id in served:
                    await self.unload(model_id)
                self.models.discard(model_id)
            for model_id, row in wanted.items():
                if model_id in served:
                    self.models.add(model_id)
                    continue
                if time.time() - self._load_failed.get(model_id, 0) < RETRY_LOAD_S:
                    continue
                try:
                    await self.load(model_id, row["path"])
                except Exception as e:
                    self._load_failed[model_id] = time.time()
                    log.warning("fine-tuned model %s: cannot load %s: %s", model_id, row["path"], e)
                    continue
                self.models.add(model_id)
                log.info("serving fine-tuned model %s", model_id)
