"""Batch jobs: their records in the store, their input, and their journal, i.e. what a
runner needs to run a batch, to stop in the middle, and to go on after a restart. The
runner itself, which sends each line through the server's endpoints, is the server's
(``galerne/server/batch/runner.py``); nothing here knows HTTP.

A batch job is a row of the store's ``jobs`` table with kind "batch", its input files in
``input_file_ids`` (as a fine-tuning job's: the files API will not delete a file an
unfinished job reads). Its status is one of these, which each API shows in its own
words (``server/batch/protocol.py``)::

    QUEUED --> RUNNING --> FINALIZING --> SUCCESS
       |          |------> CANCELLATION_REQUESTED --> CANCELLED
       |          |------> TIMEOUT_EXCEEDED   (its window passed: what did not run is an error line)
       |          '------> FAILED             (its input could not be read)
       '--> CANCELLED

Input: the job's files (uploads of purpose "batch"; a Mistral job's inline ``requests``
are written to one when it is created), read as one sequence of JSON lines: blank lines
are skipped, and request ``i`` is the i-th other line across the files, in order.

Journal: ``DATA_DIR/jobs/<id>/journal.jsonl``, one line per request answered,
``{"i": i, "ok": true|false, "line": its output or error line}``, appended and flushed as
each answer comes. A server stopped mid-batch leaves it behind; the runner that takes
the job next reads it back and runs only the requests it lacks (a last line cut short
by a crash is dropped, and its request runs again). At the end the output file (the
"ok" lines) and the error file (the others) are written from it, in the order the
answers came (``custom_id`` says which request a line answers), and the folder goes.

Ownership: the runner that runs a job is its ``owner`` (a handle,
``batch:<host>:<pid>:<token>``) and refreshes its ``heartbeat`` as it goes. A clean stop
hands the job back (owner null, status unchanged); a job whose owner died (on this
host: its process is gone) or went silent (on another: no heartbeat for ``STALE_S``)
may be taken by any runner. Taking is a compare-and-set on the owner (``take``): of two
runners, one wins.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from galerne.platform.files import add_file
from galerne.platform.store import Store, jobs, new_id, now

KIND = "batch"
# Mistral's names, as the fine-tuning jobs' (platform/jobs.py), and one of ours: FINALIZING.
QUEUED, RUNNING, FINALIZING, SUCCEEDED = "QUEUED", "RUNNING", "FINALIZING", "SUCCESS"
FAILED, EXPIRED, CANCELLING, CANCELLED = "FAILED", "TIMEOUT_EXCEEDED", "CANCELLATION_REQUESTED", "CANCELLED"
STATUSES = (QUEUED, RUNNING, FINALIZING, SUCCEEDED, FAILED, EXPIRED, CANCELLING, CANCELLED)
OWNED = (RUNNING, FINALIZING, CANCELLING)  # a runner works on them
ENDED = (SUCCEEDED, FAILED, EXPIRED, CANCELLED)

MAX_REQUESTS = 100_000  # requests in one job (OpenAI takes 50,000)
STALE_S = 300.0  # a job's runner on another host counts as gone after this long without a heartbeat
MAX_ERROR_KINDS = 20  # distinct error messages counted one by one (the others together)
OTHER_ERRORS = "(other errors)"


def create(store: Store, *, job_id: str, dialect: str, endpoint: str, input_file_ids: list[str], total: int,
           base: str, model: str | None = None, metadata: dict | None = None, window_s: int = 24 * 3600,
           **doc: Any) -> dict[str, Any]:
    """Record a queued job of ``total`` requests, to end within ``window_s`` seconds.
    ``base``: the id of the base model a server must serve to run it."""
    t = now()
    return store.insert("jobs", {
        "id": job_id, "kind": KIND, "status": QUEUED, "model": model or "", "created_at": t, "modified_at": t,
        "owner": None, "heartbeat": None,
        "dialect": dialect, "endpoint": endpoint, "input_file_ids": list(input_file_ids), "metadata": metadata,
        "base": base, "expires_at": t + window_s, "total": total, **Progress().fields(),
        "errors": [], "output_file": None, "error_file": None, "started_at": None, "finalizing_at": None,
        "completed_at": None, "failed_at": None, "expired_at": None, "cancelling_at": None, "cancelled_at": None,
        **doc,
    })


def get(store: Store, job_id: str) -> dict[str, Any] | None:
    job = store.get("jobs", job_id)
    return job if job is not None and job["kind"] == KIND else None


# ------------------------------------------------------------------ input


def iter_requests(platform, file_ids: Sequence[str], max_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """(i, the line's bytes) for each request of the files, in order; None for a line
    longer than ``max_bytes`` (not read into memory: its request is refused as a body past
    the size limit would be)."""
    i = 0
    for file_id in file_ids:
        with open(platform.data.file(file_id), "rb") as f:
            while True:
                raw = f.readline(max_bytes + 1)
                if not raw:
                    break
                if len(raw) > max_bytes and not raw.endswith(b"\n"):
                    while raw and not raw.endswith(b"\n"):  # the rest of the line, by pieces
                        raw = f.readline(1 << 20)
                    yield i, None
                    i += 1
                elif raw.strip():
                    yield i, raw
                    i += 1


def scan(path: Path) -> tuple[int, str | None]:
    """(the requests of one input file, the model its first request's body names, if it
    reads as one)."""
    n, model = 0, None
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                if n == 0:
                    try:
                        model = json.loads(line)["body"]["model"]
                    except (ValueError, KeyError, TypeError):
                        pass
                n += 1
    return n, model if isinstance(model, str) else None


# ------------------------------------------------------------------ progress


@dataclass
class Progress:
    """A job's counters, made from its journal and kept up as answers come."""

    succeeded: int = 0
    failed: int = 0
    usage: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("input_tokens", "cached_tokens", "output_tokens", "reasoning_tokens"), 0))
    line_errors: dict[str, int] = field(default_factory=dict)  # error message -> requests
    done: set[int] = field(default_factory=set)  # the requests answered

    def add(self, i: int, ok: bool, line: dict) -> None:
        self.done.add(i)
        if ok:
            self.succeeded += 1
            usage = ((line.get("response") or {}).get("body") or {}).get("usage") or {}
            u = self.usage
            u["input_tokens"] += usage.get("prompt_tokens") or 0
            u["output_tokens"] += usage.get("completion_tokens") or 0
            u["cached_tokens"] += (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
            u["reasoning_tokens"] += (usage.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0
            return
        self.failed += 1
        message = str((line.get("error") or {}).get("message") or "error")
        if message not in self.line_errors and len(self.line_errors) >= MAX_ERROR_KINDS:
            message = OTHER_ERRORS
        self.line_errors[message] = self.line_errors.get(message, 0) + 1

    def fields(self) -> dict[str, Any]:
        """What the job's record shows of it."""
        return {"succeeded": self.succeeded, "failed": self.failed, "usage": dict(self.usage),
                "line_errors": dict(self.line_errors)}


class Journal:
    """A job's journal (see the module's doc): ``open`` reads it back, ``append`` adds an
    answer, ``results`` writes the output and error files of it."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.path = folder / "journal.jsonl"
        self._f = None

    def open(self) -> Progress:
        """The progress so far (a last line cut short is dropped from the file); then
        ready to append."""
        self.folder.mkdir(parents=True, exist_ok=True)
        progress, good = Progress(), 0
        if self.path.exists():
            with open(self.path, "rb") as f:
                for raw in f:
                    if not raw.endswith(b"\n"):
                        break
                    try:
                        entry = json.loads(raw)
                        progress.add(int(entry["i"]), bool(entry["ok"]), entry["line"])
                    except (ValueError, KeyError, TypeError):
                        break
                    good += len(raw)
            os.truncate(self.path, good)
        self._f = open(self.path, "ab")  # noqa: SIM115 (open until close())
        return progress

    def append(self, i: int, ok: bool, line: dict) -> None:
        # Flushed, not fsynced: a restarted server finds it in the page cache; a machine
        # that loses power loses at most the requests of the last seconds, run again.
        self._f.write(json.dumps({"i": i, "ok": ok, "line": line}, ensure_ascii=False, separators=(",", ":")).encode()
                      + b"\n")
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def results(self, platform, job_id: str) -> tuple[dict | None, dict | None]:
        """The job's output file (answers) and error file (errors), stored from the journal:
        their records, None for one that has no line."""
        self.close()
        tmp = {ok: platform.data.tmp(new_id("batch-")) for ok in (True, False)}
        counts = {True: 0, False: 0}
        try:
            with open(tmp[True], "wb") as out, open(tmp[False], "wb") as err:
                if self.path.exists():
                    with open(self.path, "rb") as f:
                        for raw in f:
                            entry = json.loads(raw)
                            (out if entry["ok"] else err).write(
                                json.dumps(entry["line"], ensure_ascii=False, separators=(",", ":")).encode() + b"\n")
                            counts[entry["ok"]] += 1
                for f in (out, err):
                    f.flush()
                    os.fsync(f.fileno())
            records = []
            for ok, name, kind in ((True, "output", "batch_result"), (False, "error", "batch_error")):
                if counts[ok]:
                    records.append(add_file(platform, tmp[ok], filename=f"{job_id}_{name}.jsonl", purpose="batch_output",
                                            sample_type=kind, num_lines=counts[ok], mimetype="application/jsonl"))
                else:
                    records.append(None)
            return records[0], records[1]
        finally:
            for path in tmp.values():
                path.unlink(missing_ok=True)

    def remove(self, platform) -> None:
        self.close()
        platform.data.remove_tree(self.folder)


# ------------------------------------------------------------------ ownership


def owner_handle() -> str:
    """A runner's handle: ``batch:<host>:<pid>:<token>`` (the token tells two runners of
    one process apart)."""
    return f"batch:{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def orphaned(job: dict[str, Any], at: float | None = None) -> bool:
    """Whether no live runner holds ``job``: none ever did or one handed it back, its
    process on this host is gone, or it sent no heartbeat for STALE_S."""
    owner = job.get("owner")
    if not owner:
        return True
    _, host, pid, _ = (owner.split(":") + ["", "", "", ""])[:4]
    if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
        return True
    return (job.get("heartbeat") or 0.0) < (time.time() if at is None else at) - STALE_S


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def take(store: Store, job_id: str, *, owner: str | None, previous: str | None,
         statuses: Sequence[str] = OWNED) -> bool:
    """Set the owner of ``job_id`` from ``previous`` to ``owner`` (None: hand it back), if
    its status is one of ``statuses`` and its owner is still ``previous``: one UPDATE, so
    that of two runners taking a job, one wins."""
    t = jobs
    where = (t.c.id == job_id) & t.c.status.in_(list(statuses))
    where &= t.c.owner.is_(None) if previous is None else t.c.owner == previous
    with store.engine.connect() as c, c.begin():
        done = c.execute(t.update().where(where).values(owner=owner, heartbeat=time.time(), modified_at=now()))
        return done.rowcount == 1


def claim_queued(store: Store, job_id: str, owner: str) -> dict[str, Any] | None:
    """A queued job, now running under ``owner``; None when another runner took it first
    (or it was cancelled)."""
    return store.transition(job_id, [QUEUED], RUNNING, owner=owner, heartbeat=time.time(), started_at=now())


def next_job(store: Store, owner: str, base: str) -> dict[str, Any] | None:
    """The job a runner of ``base`` should run next, now taken by ``owner``: one already
    running whose runner is gone, oldest first, else the oldest queued one."""
    for job in store.jobs_where(KIND, OWNED):
        if job.get("base") == base and (job.get("owner") == owner or (
                orphaned(job) and take(store, job["id"], owner=owner, previous=job.get("owner")))):
            return get(store, job["id"])
    for job in store.jobs_where(KIND, [QUEUED]):
        if job.get("base") == base:
            taken = claim_queued(store, job["id"], owner)
            if taken is not None:
                return taken
    return None
