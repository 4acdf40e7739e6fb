"""Where a fine-tuning job's worker runs: a process on this machine (:class:`LocalLauncher`,
the default), or a Ray Job on a cluster (``galerne.platform.ray.RayLauncher``,
``--ray-address``).

A launcher starts the worker command (``python -m galerne.platform.worker ...``, under
``torchrun`` when a job uses several processes) and names it by a *handle*, a string kept
in the job's record (its ``owner``): ``local:<host>:<pid>:<start time>`` or
``ray:<address>:<submission id>``. From a handle, any server sharing the store can tell
whether the worker still runs (when it is its to tell: a local worker of another host is
``unknown``) and ask it to stop (SIGTERM: the trainer saves a checkpoint, then exits).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

RUNNING, EXITED, UNKNOWN = "running", "exited", "unknown"


@dataclass
class WorkerSpec:
    """What to run: the worker's arguments (after ``-m galerne.platform.worker``), its
    environment additions, where its output goes, and how many processes (torchrun)."""

    args: list[str]
    env: dict[str, str]
    log_path: Path
    nproc: int = 1

    def command(self, python: str = sys.executable) -> list[str]:
        if self.nproc > 1:
            return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={self.nproc}",
                    "-m", "galerne.platform.worker", *self.args]
        return [python, "-m", "galerne.platform.worker", *self.args]


class Launcher(Protocol):
    name: str

    def start(self, spec: WorkerSpec) -> str:
        """Start the worker; its handle."""

    def state(self, handle: str) -> str:
        """RUNNING, EXITED, or UNKNOWN (not this launcher's to tell)."""

    def exit_message(self, handle: str) -> str:
        """Why an exited worker ended, in a line (its exit status, the end of its log)."""

    def stop(self, handle: str) -> None:
        """Ask the worker to stop (it saves a checkpoint first). No error if it is gone."""


_PR_SET_PDEATHSIG = 1
WORKER_NICENESS = 10


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """In the worker, before exec: the kernel sends it SIGKILL when the server dies, so that
    a killed server leaves no orphan training (the next start resumes it from its checkpoint)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    os.setsid()  # its own process group: a Ctrl-C at the server's terminal is the server's
    with contextlib.suppress(OSError):
        os.nice(WORKER_NICENESS)  # training is background work: the server's requests go first on a shared CPU


def _proc_start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot), which tells a pid reused by another
    process from the worker's; None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return None


class LocalLauncher:
    """The worker as a child process of the server, on this host."""

    name = "local"

    def __init__(self) -> None:
        self.host = socket.gethostname()
        self._children: dict[int, subprocess.Popen] = {}

    def start(self, spec: WorkerSpec) -> str:
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **spec.env}
        with open(spec.log_path, "ab") as out:
            proc = subprocess.Popen(spec.command(), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    env=env, preexec_fn=_die_with_parent if sys.platform == "linux" else None,
                                    start_new_session=sys.platform != "linux")
        self._children[proc.pid] = proc
        return f"local:{self.host}:{proc.pid}:{_proc_start_time(proc.pid) or 0}:{spec.log_path}"

    def reap(self) -> None:
        """Collect the exit status of the workers that ended (no zombie processes), keeping
        their Popen for ``exit_message`` until a later reap."""
        for pid, child in list(self._children.items()):
            if child.poll() is not None and getattr(child, "_galerne_seen", False):
                del self._children[pid]
            elif child.returncode is not None:
                child._galerne_seen = True

    def _parse(self, handle: str) -> tuple[str, int, str, Path] | None:
        kind, _, rest = handle.partition(":")
        if kind != "local":
            return None
        host, pid, started, log_path = rest.split(":", 3)
        return host, int(pid), started, Path(log_path)

    def state(self, handle: str) -> str:
        parsed = self._parse(handle)
        if parsed is None or parsed[0] != self.host:
            return UNKNOWN
        _, pid, started, _ = parsed
        child = self._children.get(pid)
        if child is not None:
            if child.poll() is None:
                return RUNNING
            return EXITED
        return RUNNING if _proc_start_time(pid) == started else EXITED

    def exit_message(self, handle: str) -> str:
        parsed = self._parse(handle)
        if parsed is None:
            return "unknown worker"
        _, pid, _, log_path = parsed
        child = self._children.pop(pid, None)
        code = child.returncode if child is not None else None
        if code is None:
            what = "the worker process is gone (the server that started it stopped)"
        elif code < 0:
            what = f"the worker process was killed by signal {signal.Signals(-code).name}"
        else:
            what = f"the worker process exited with status {code}"
        tail = last_line(log_path)
        return f"{what}: {tail}" if tail else what

    def stop(self, handle: str) -> None:
        parsed = self._parse(handle)
        if parsed is None or parsed[0] != self.host or self.state(handle) != RUNNING:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(parsed[1], signal.SIGTERM) if sys.platform == "linux" else os.kill(parsed[1], signal.SIGTERM)


def last_line(path: Path, limit: int = 4096) -> str:
    """The last non-empty line of a log file (of its last ``limit`` bytes), or ''."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            lines = [ln.strip() for ln in f.read().decode("utf-8", "replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:500] if lines else ""


def make_launcher(ray_address: str | None) -> Launcher:
    if ray_address:
        from galerne.platform.ray import RayLauncher

        return RayLauncher(ray_address)
    return LocalLauncher()
