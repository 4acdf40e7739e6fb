"""A server killed (SIGKILL) in the middle of a fine-tuning job, then started again over the
same data directory and store: its files, jobs and fine-tuned models are all there, and the
job goes on from its last checkpoint to the end. On SQLite (the default store) and on
PostgreSQL (a throwaway cluster, when the binaries are installed)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from test_platform import CONVERSATIONS, jsonl, wait_for

pytestmark = pytest.mark.slow

MODEL = "tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``galerne serve`` in its own process (so that it can be SIGKILLed)."""

    def __init__(self, folder, data, database_url: str, log):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "galerne.cli", "serve", str(folder), "--port", str(self.port), "--device", "cpu",
               "--served-model-name", MODEL, "--data-dir", str(data), "--kv-cache-gb", "0.05"]
        if database_url:
            cmd += ["--database-url", database_url]
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start (exit {self.proc.poll()})")
            time.sleep(0.2)
        self.http = httpx.Client(base_url=self.url, timeout=30)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.kill()


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
def test_server_killed_mid_job_resumes_it(store, request, tiny_factory, tmp_path):
    database_url = request.getfixturevalue("postgres_url") if store == "postgresql" else ""
    folder, _ = tiny_factory("mistral")
    data = tmp_path / "data"
    log = open(tmp_path / "server.log", "ab")
    server = ServerProcess(folder, data, database_url, log)
    try:
        up = server.http.post("/v1/files", files={"file": ("train.jsonl", jsonl(CONVERSATIONS))},
                              data={"purpose": "fine-tune"}).json()
        steps = 240
        job = server.http.post("/v1/fine_tuning/jobs", json={
            "model": MODEL, "training_files": [{"file_id": up["id"]}], "suffix": "kill",
            "hyperparameters": {"training_steps": steps, "seq_len": 128, "lora_rank": 4}}).json()
        assert job["status"] == "QUEUED", job
        first = wait_for(lambda: server.http.get(f"/v1/fine_tuning/jobs/{job['id']}").json(),
                         lambda j: j["checkpoints"], timeout=120)
        assert first["status"] == "RUNNING"
        owner = server.http.get(f"/v1/fine_tuning/jobs/{job['id']}").json()  # the worker's pid is in the store
        server.kill()
        worker_pid = _worker_pid(data, job["id"], database_url)
        wait_for(lambda: pid_alive(worker_pid), lambda alive: not alive, timeout=30)  # it died with its server
        assert owner["status"] == "RUNNING"

        server = ServerProcess(folder, data, database_url, log)
        files = server.http.get("/v1/files").json()["data"]
        assert [f["id"] for f in files] == [up["id"]]
        done = wait_for(lambda: server.http.get(f"/v1/fine_tuning/jobs/{job['id']}").json(),
                        lambda j: j["status"] in ("SUCCESS", "FAILED", "CANCELLED"), timeout=300)
        assert done["status"] == "SUCCESS", done
        messages = [e for e in done["events"] if e["name"] == "status-updated"]
        assert [e["data"]["status"] for e in messages] == ["VALIDATING", "QUEUED", "RUNNING", "QUEUED", "RUNNING",
                                                           "SUCCESS"]
        resumed = server.http.get(f"/v1/fine_tuning/jobs/{job['id']}/events", params={"limit": 10000}).json()["data"]
        text = [e["message"] for e in resumed]
        assert any("resuming from its checkpoint at step" in t for t in text), text
        assert f"Training {steps} steps of 128 tokens, resuming from its last checkpoint" in text
        model = done["fine_tuned_model"]
        assert model in [m["id"] for m in server.http.get("/v1/models").json()["data"]]
        r = server.http.post("/v1/chat/completions", json={"model": model, "max_tokens": 3,
                                                           "messages": [{"role": "user", "content": "What is item 2?"}]})
        assert r.status_code == 200, r.text

        # killed again with the model served: it is served again after the restart
        server.kill()
        server = ServerProcess(folder, data, database_url, log)
        wait_for(lambda: [m["id"] for m in server.http.get("/v1/models").json()["data"]], lambda ids: model in ids,
                 timeout=30)
    finally:
        server.stop()
        log.close()


def _worker_pid(data, job_id: str, database_url: str) -> int:
    owner = _job(data, job_id, database_url)["owner"]
    assert owner.startswith("local:"), owner
    return int(owner.split(":")[2])


def test_worker_killed_is_resumed_then_fails_after_its_attempts(tiny_factory, tmp_path):
    """A worker that dies (OOM killer, SIGKILL) while its server runs: the job is resumed,
    and after MAX_ATTEMPTS deaths it fails with the reason."""
    from galerne.platform.jobs import MAX_ATTEMPTS

    folder, _ = tiny_factory("mistral")
    log = open(tmp_path / "server.log", "ab")
    server = ServerProcess(folder, tmp_path / "data", "", log)
    try:
        up = server.http.post("/v1/files", files={"file": ("t.jsonl", jsonl(CONVERSATIONS))},
                              data={"purpose": "fine-tune"}).json()
        job = server.http.post("/v1/fine_tuning/jobs", json={
            "model": MODEL, "training_file": up["id"],
            "hyperparameters": {"training_steps": 100000, "seq_len": 128, "lora_rank": 4}}).json()
        seen = set()
        for _ in range(MAX_ATTEMPTS):
            pid = wait_for(lambda: _running_pid(tmp_path / "data", job["id"]), lambda p: p and p not in seen, timeout=60)
            seen.add(pid)
            os.kill(pid, signal.SIGKILL)
        done = wait_for(lambda: server.http.get(f"/v1/fine_tuning/jobs/{job['id']}").json(),
                        lambda j: j["status"] == "failed", timeout=60)
        assert done["error"]["code"] == "worker_failed" and "SIGKILL" in done["error"]["message"]
        assert f"attempt {MAX_ATTEMPTS} of {MAX_ATTEMPTS}" in done["error"]["message"]
    finally:
        server.stop()
        log.close()


def _running_pid(data, job_id: str) -> int | None:
    job = _job(data, job_id)
    owner = job.get("owner") or ""
    if job["status"] != "RUNNING" or not owner.startswith("local:"):
        return None
    return int(owner.split(":")[2])


def test_server_stopped_gracefully_checkpoints_its_job_and_the_next_resumes_it(tiny_factory, tmp_path):
    """SIGTERM: the server asks its worker to stop; the worker saves a checkpoint at the end of
    its step and puts the job back in the queue; the next server resumes it from exactly there."""
    folder, _ = tiny_factory("mistral")
    data = tmp_path / "data"
    log = open(tmp_path / "server.log", "ab")
    server = ServerProcess(folder, data, "", log)
    try:
        up = server.http.post("/v1/files", files={"file": ("t.jsonl", jsonl(CONVERSATIONS))},
                              data={"purpose": "fine-tune"}).json()
        steps = 400  # a checkpoint every 40 steps: the stop comes between two
        job = server.http.post("/v1/fine_tuning/jobs", json={
            "model": MODEL, "training_file": up["id"],
            "hyperparameters": {"training_steps": steps, "seq_len": 128, "lora_rank": 4}}).json()
        events = f"/v1/fine_tuning/jobs/{job['id']}/events"
        wait_for(lambda: [e for e in server.http.get(events).json()["data"] if e["type"] == "metrics"],
                 lambda m: m and m[0]["data"]["step"] >= 5, timeout=120)
        server.stop()
        assert server.proc.returncode in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it drained
        stopped = _job(data, job["id"])
        assert stopped["status"] == "QUEUED" and stopped["owner"] is None
        ckpt = max(c["step"] for c in _checkpoints(data, job["id"]))
        assert ckpt % 40 != 0  # saved at the stop, not one of the periodic ones

        server = ServerProcess(folder, data, "", log)
        done = wait_for(lambda: server.http.get(f"/v1/fine_tuning/jobs/{job['id']}").json(),
                        lambda j: j["status"] in ("succeeded", "failed", "cancelled"), timeout=300)
        assert done["status"] == "succeeded", done
        steps_seen = [e["data"]["step"] for e in server.http.get(events, params={"limit": 10000}).json()["data"]
                      if e["type"] == "metrics"]
        assert sorted(steps_seen) == list(range(1, steps + 1))  # none lost, none trained twice
    finally:
        server.stop()
        log.close()


def _read(data, fn, database_url: str = ""):
    """``fn(store)`` on the store a server over ``data`` uses (opened and closed here)."""
    from galerne.platform.store import Store, default_url

    store = Store(database_url or default_url(data))
    try:
        return fn(store)
    finally:
        store.close()


def _job(data, job_id: str, database_url: str = "") -> dict:
    return _read(data, lambda store: store.get("jobs", job_id), database_url)


def _checkpoints(data, job_id: str) -> list[dict]:
    return _read(data, lambda store: store.checkpoints(job_id))
