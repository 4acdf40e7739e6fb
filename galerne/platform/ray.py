"""Fine-tuning workers as Ray Jobs (``--ray-address http://HEAD:8265``): the worker command
is a job's entrypoint, submitted through the cluster's job API (its dashboard address), so
that it runs on a node with the GPUs it asks for, and any server sharing the store can
tell how it is doing from its handle, ``ray:<address>:<submission id>``.

The nodes must see what a local worker sees: galerne installed (``python`` on their PATH
is the one the entrypoint runs), the data directory and the store at the same paths and
URLs (a shared file system, PostgreSQL rather than SQLite across hosts).

Stopping: Ray sends the entrypoint's processes SIGTERM, then SIGKILL after
``RAY_JOB_STOP_WAIT_TIME_S`` seconds (3 by default, read by the job's supervisor process,
which runs with the job's ``runtime_env``): each job is submitted with that variable set to
``stop_grace_s``, so that the trainer has time to save a checkpoint. A job still PENDING
(waiting for GPUs) cannot be stopped at once: Ray keeps the stop until the job starts, then
ends it before the worker has done anything (or fails it after the head's
``RAY_JOB_START_TIMEOUT_SECONDS``, 15 min by default). This launcher counts such a job as
exited as soon as it asked, so that a cancel does not wait for GPUs to free up.

``ray`` is imported here only, and this module only when a server is given a Ray address.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shlex

from galerne.errors import ConfigError
from galerne.platform.launcher import EXITED, RUNNING, UNKNOWN, WorkerSpec

log = logging.getLogger(__name__)

# Ray's job states, as a launcher's.
_STATES = {"PENDING": RUNNING, "RUNNING": RUNNING, "SUCCEEDED": EXITED, "FAILED": EXITED, "STOPPED": EXITED}


def _normalize(address: str) -> str:
    """The job API's URL: ``HEAD:8265`` -> ``http://HEAD:8265``; no trailing slash."""
    address = address.strip().rstrip("/")
    if "://" not in address:
        address = "http://" + address
    if not address.startswith(("http://", "https://")):
        raise ConfigError(f"ray_address: {address!r} is not a Ray dashboard address (http://HEAD:8265): galerne "
                          "submits jobs through the dashboard's job API, not through a GCS or Ray Client address")
    return address


class RayLauncher:
    """Workers as Ray Jobs on the cluster whose dashboard is at ``address``.

    ``python``: the interpreter the entrypoint names (found on the node's PATH).
    ``gpus``: whether a job asks for GPUs (one per process) or CPUs; None: GPUs when the
    cluster has any, asked at each start (a cluster grows and shrinks).
    ``stop_grace_s``: seconds between SIGTERM and SIGKILL when a job is stopped."""

    name = "ray"

    def __init__(self, address: str, *, python: str = "python", gpus: bool | None = None, stop_grace_s: int = 60):
        self.address = _normalize(address)
        self.python = python
        self.gpus = gpus
        self.stop_grace_s = stop_grace_s
        self._stopped_pending: set[str] = set()  # submission ids asked to stop while PENDING
        for var in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
            if os.environ.get(var):
                # Ray's client takes these over the address it is given.
                log.warning("%s=%s is set: Ray's job client uses it instead of --ray-address %s",
                            var, os.environ[var], self.address)
        try:
            import requests
            from ray.job_submission import JobSubmissionClient
        except ImportError as e:
            raise ConfigError(f"ray_address: Ray Jobs need ray's job client: pip install 'ray[default]' ({e})") from None
        # Ray's client has no timeout: an address that drops packets would hang it for
        # minutes. One request with a timeout first says whether anything answers.
        try:
            requests.get(self.address + "/api/version", timeout=10).raise_for_status()
            self.client = JobSubmissionClient(self.address)
        except Exception as e:  # noqa: BLE001 - requests', ray's and the socket's errors alike
            raise self._unreachable(e) from None

    def _unreachable(self, e: BaseException) -> ConfigError:
        return ConfigError(f"ray_address: no Ray job API answers at {self.address} ({type(e).__name__}: {e}); "
                           "give the head node's dashboard address, e.g. http://HEAD:8265")

    # ------------------------------------------------------------------ handles

    def _handle(self, submission_id: str) -> str:
        return f"ray:{self.address}:{submission_id}"

    def _parse(self, handle: str) -> str | None:
        """The submission id of a handle of this cluster, else None. The address has ':'s
        of its own (``http://head:8265``), a submission id has none: the id is after the
        last one."""
        kind, _, rest = handle.partition(":")
        address, _, submission_id = rest.rpartition(":")
        if kind != "ray" or address != self.address or not submission_id:
            return None
        return submission_id

    # ------------------------------------------------------------------ the Launcher protocol

    def _cluster_has_gpus(self) -> bool:
        from ray.util.state import list_nodes

        try:
            nodes = list_nodes(address=self.address, filters=[("state", "=", "ALIVE")], timeout=30)
        except Exception as e:  # noqa: BLE001 - whatever the state API raises, say where
            raise self._unreachable(e) from None
        return any(n.resources_total.get("GPU", 0) > 0 for n in nodes)

    def start(self, spec: WorkerSpec) -> str:
        gpus = self._cluster_has_gpus() if self.gpus is None else self.gpus
        args = spec.args
        job = args[args.index("--job") + 1] if "--job" in args[:-1] else "worker"
        # Unique on the cluster even when a job is started again (resumed after a restart).
        submission_id = f"galerne-{re.sub(r'[^A-Za-z0-9_-]', '-', job)}-{secrets.token_hex(4)}"
        env = {k: str(v) for k, v in spec.env.items()}
        env["RAY_JOB_STOP_WAIT_TIME_S"] = str(int(self.stop_grace_s))
        resources = {"entrypoint_num_gpus": spec.nproc} if gpus else {"entrypoint_num_cpus": spec.nproc}
        try:
            self.client.submit_job(entrypoint=shlex.join(spec.command(python=self.python)), submission_id=submission_id,
                                   runtime_env={"env_vars": env}, metadata={"galerne_job": job}, **resources)
        except (OSError, RuntimeError) as e:  # requests' errors are OSErrors; Ray's answers RuntimeErrors
            raise ConfigError(f"ray_address: the Ray cluster at {self.address} did not take job {job} "
                              f"({type(e).__name__}: {e})") from None
        log.info("job %s submitted to Ray at %s as %s (%s %d)", job, self.address, submission_id,
                 "GPUs" if gpus else "CPUs", spec.nproc)
        return self._handle(submission_id)

    def state(self, handle: str) -> str:
        submission_id = self._parse(handle)
        if submission_id is None:
            return UNKNOWN
        try:
            status = self.client.get_job_status(submission_id)
        except RuntimeError:  # 404: no such job on this cluster (a restarted head forgets its jobs)
            return UNKNOWN
        except OSError as e:  # the head is down or unreachable: not for us to say the job ended
            log.warning("cannot ask Ray at %s about %s: %s", self.address, submission_id, e)
            return UNKNOWN
        if str(status) == "PENDING" and submission_id in self._stopped_pending:
            return EXITED
        return _STATES.get(str(status), UNKNOWN)

    def exit_message(self, handle: str) -> str:
        submission_id = self._parse(handle)
        if submission_id is None:
            return "unknown worker"
        try:
            info = self.client.get_job_info(submission_id)
            logs = self.client.get_job_logs(submission_id)
        except (OSError, RuntimeError) as e:
            return f"Ray job {submission_id} at {self.address}: cannot tell how it ended ({e})"
        # Ray's message of a failed job goes on with the job's last logs: its first clause only.
        message = (info.message or "").split("\n")[0].split(", last available logs")[0].strip().rstrip(".")
        if str(info.status) == "PENDING" and submission_id in self._stopped_pending:
            return f"Ray job {submission_id} stopped while PENDING, before it started (Ray ends it when it starts)"
        what = f"Ray job {submission_id} {info.status}" + (f" ({message})" if message else "")
        lines = [ln.strip() for ln in logs.splitlines() if ln.strip()]
        return f"{what}: {lines[-1][:500]}" if lines else what

    def stop(self, handle: str) -> None:
        submission_id = self._parse(handle)
        if submission_id is None:
            return
        try:
            pending = str(self.client.get_job_status(submission_id)) == "PENDING"
            self.client.stop_job(submission_id)  # False when it had already ended
        except RuntimeError:  # no such job: gone already
            return
        except OSError as e:
            raise self._unreachable(e) from None
        if pending:
            self._stopped_pending.add(submission_id)
