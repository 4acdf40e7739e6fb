"""The Ray launcher against a real one-node Ray cluster started here (``ray start --head
--block``, in its own process group, on free ports and a temporary folder), with tiny
programs in place of the worker: one stopped while it runs (it takes longer to save than
Ray's default grace), one that fails with a last log line. Skipped where ray is not
installed."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from galerne.errors import ConfigError
from galerne.platform.launcher import (
    EXITED,
    RUNNING,
    UNKNOWN,
    WorkerSpec,
    make_launcher,
)
from galerne.platform.ray import RayLauncher  # imports ray only when a launcher is made

pytest.importorskip("ray.job_submission", reason="ray[default] is not installed (pip install 'ray[default]')")

# In place of the worker: writes a file (with an environment variable the launcher was
# given), then sleeps; on SIGTERM "saves a checkpoint" for 4 s, past Ray's default grace
# of 3 s, so that a stop only ends well when the launcher's grace period holds.
PROGRAM = """
import os, signal, sys, time
path, mode = sys.argv[1], sys.argv[2]
def on_term(*_):
    print("SIGTERM: saving a checkpoint", flush=True)
    time.sleep(4)
    open(path + ".saved", "w").write("saved")
    print("checkpoint saved", flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
open(path, "w").write(os.environ.get("GALERNE_TEST_VAR", ""))
print("started", flush=True)
if mode == "fail":
    print("the last words", flush=True)
    sys.exit(3)
time.sleep(120)
"""


class TinySpec(WorkerSpec):
    def __init__(self, marker: Path, mode: str, **kw):
        super().__init__(args=["--job", f"ftjob-{mode}"], env={"GALERNE_TEST_VAR": "from the launcher"},
                         log_path=marker.with_suffix(".log"), **kw)
        self.marker, self.mode = marker, mode

    def command(self, python: str = sys.executable) -> list[str]:
        return [python, "-c", PROGRAM, str(self.marker), self.mode]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what, timeout: float, step: float = 0.25):
    end = time.monotonic() + timeout
    while True:
        value = what()
        if value or time.monotonic() > end:
            return value
        time.sleep(step)


def _group_and_session(pid: int) -> tuple[int, int] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return None
    return int(fields[2]), int(fields[3])  # pgrp, session


def _ours(leader: int, temp: str) -> list[int]:
    """Live processes of the head: in its process group, or naming its temporary folder
    (the job's entrypoints and Ray's watchers start sessions of their own)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        pid = int(entry)
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().decode(errors="replace")
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rpartition(")")[2].split()[0]
        except OSError:
            continue
        if state == "Z":  # exited, waiting for its parent (or init) to reap it
            continue
        if leader in (_group_and_session(pid) or ()) or temp in cmdline:
            found.append(pid)
    return found


@pytest.fixture(scope="module")
def ray_address():
    """A one-node Ray cluster of this module; its dashboard address. Stopped by SIGTERM to
    ``ray start --block`` (which stops what it started), not by ``ray stop``, which stops
    every Ray process of the machine, other people's too; then no process of it may be left."""
    ray_cli = Path(sys.executable).with_name("ray")
    if not ray_cli.exists():
        pytest.skip(f"no ray command beside {sys.executable}")
    temp = tempfile.mkdtemp(prefix="gr-")  # short: Ray's socket paths live under it
    dashboard = free_port()
    ports = {"--port": free_port(), "--dashboard-port": dashboard, "--ray-client-server-port": free_port(),
             "--dashboard-agent-listen-port": free_port(), "--dashboard-agent-grpc-port": free_port(),
             "--metrics-export-port": free_port(), "--node-manager-port": free_port(),
             "--object-manager-port": free_port(), "--runtime-env-agent-port": free_port()}
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    # The entrypoint's "python" is this one; its "import galerne" finds this checkout.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "5"  # a job left running would hold the stop 30 s
    cmd = [str(ray_cli), "start", "--head", "--block", "--num-cpus=1", "--include-dashboard=true",
           "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", f"--temp-dir={temp}",
           "--object-store-memory=80000000", "--disable-usage-stats", *(f"{k}={v}" for k, v in ports.items())]
    log = open(Path(temp) / "ray-start.log", "wb")  # noqa: SIM115 - open for the head's life
    head = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        import requests

        def up() -> bool:
            if head.poll() is not None:
                return True
            try:
                return requests.get(address + "/api/version", timeout=2).ok
            except requests.RequestException:
                return False

        if not wait_for(up, 60, 0.5) or head.poll() is not None:
            pytest.skip(f"the Ray head did not start: {(Path(temp) / 'ray-start.log').read_text(errors='replace')[-800:]}")
        yield address
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(30)
        except subprocess.TimeoutExpired:
            pass
        left = wait_for(lambda: not _ours(head.pid, temp), 15, 0.5)
        leftovers = [] if left else _ours(head.pid, temp)
        for pid in leftovers:  # ours by group or folder: clean up before failing
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()
        subprocess.run(["rm", "-rf", temp], check=False)
        assert not leftovers, f"the Ray head left processes behind: {leftovers}"


@pytest.fixture
def launcher(ray_address):
    return RayLauncher(ray_address, stop_grace_s=20)


@pytest.mark.slow
def test_stop_a_running_job(launcher, ray_address, tmp_path):
    spec = TinySpec(tmp_path / "started", "sleep")
    submitted, submit = [], launcher.client.submit_job
    launcher.client.submit_job = lambda **kw: submitted.append(kw) or submit(**kw)
    handle = launcher.start(spec)
    assert handle.startswith(f"ray:{ray_address}:galerne-ftjob-sleep-")
    assert wait_for(spec.marker.exists, 60), launcher.exit_message(handle)
    assert spec.marker.read_text() == "from the launcher"  # the spec's environment reached it
    assert launcher.state(handle) == RUNNING
    info = launcher.client.get_job_info(handle.rpartition(":")[2])
    assert info.entrypoint == shlex.join(spec.command("python"))
    assert info.runtime_env["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"] == "20"
    assert info.metadata["galerne_job"] == "ftjob-sleep"
    # The job API does not give back the resources asked for: the submission's arguments do.
    assert {k: v for k, v in submitted[0].items() if k.startswith("entrypoint_num")} == {"entrypoint_num_cpus": 1}

    launcher.stop(handle)
    assert wait_for(lambda: launcher.state(handle) == EXITED, 30)
    # It took 4 s to save, past Ray's default grace of 3 s: the launcher's grace held.
    assert (tmp_path / "started.saved").exists()
    message = launcher.exit_message(handle)
    assert "STOPPED" in message and "stopped" in message and message.endswith(": checkpoint saved"), message
    launcher.stop(handle)  # already gone: nothing to do, no error


@pytest.mark.slow
def test_failing_job_says_why(launcher, tmp_path):
    spec = TinySpec(tmp_path / "started", "fail")
    handle = launcher.start(spec)
    assert wait_for(lambda: launcher.state(handle) == EXITED, 60), launcher.exit_message(handle)
    message = launcher.exit_message(handle)
    assert "FAILED" in message and "exit code 3" in message and message.endswith(": the last words"), message
    assert "\n" not in message


@pytest.mark.slow
def test_job_waiting_for_gpus_is_running_until_stopped(ray_address, tmp_path):
    """A job that asks for GPUs the cluster does not have (yet) waits, PENDING: for the
    server it runs (it holds its slot). Ray keeps a stop until the job starts (never, here),
    the launcher counts it as exited at once: a cancel does not wait for GPUs."""
    launcher = RayLauncher(ray_address, gpus=True)
    handle = launcher.start(TinySpec(tmp_path / "started", "sleep"))
    submission_id = handle.rpartition(":")[2]
    time.sleep(2)
    assert str(launcher.client.get_job_status(submission_id)) == "PENDING"
    assert launcher.state(handle) == RUNNING and not (tmp_path / "started").exists()
    launcher.stop(handle)
    assert launcher.state(handle) == EXITED
    assert "stopped while PENDING" in launcher.exit_message(handle)
    assert str(launcher.client.get_job_status(submission_id)) == "PENDING"  # Ray's side of it


@pytest.mark.slow
def test_handles_of_others(launcher, ray_address):
    other = f"ray:http://127.0.0.1:{free_port()}:galerne-ftjob-x-0000"
    unknown = f"ray:{ray_address}:galerne-no-such-job"
    for handle in (other, unknown, "local:somehost:123:456:/tmp/log"):
        assert launcher.state(handle) == UNKNOWN
        launcher.stop(handle)  # not ours, or gone: no error
    assert launcher.exit_message("local:somehost:123:456:/tmp/log") == "unknown worker"
    assert "galerne-no-such-job" in launcher.exit_message(unknown)
    # The same cluster, written another way, is the same cluster.
    assert RayLauncher(ray_address.removeprefix("http://") + "/").address == ray_address
    assert isinstance(make_launcher(ray_address), RayLauncher)


@pytest.mark.parametrize("address", ["127.0.0.1:{port}", "http://127.0.0.1:{port}", "ray://127.0.0.1:{port}"])
def test_bad_address_is_config_error(address):
    address = address.format(port=free_port())  # nothing listens there
    with pytest.raises(ConfigError) as e:
        RayLauncher(address)
    assert address.split("://")[-1] in str(e.value)


@pytest.mark.slow
def test_real_job_through_ray(ray_address, tiny_factory, tmp_path):
    """A server whose --ray-address is the test's cluster: a fine-tuning job is trained by
    the real worker as a Ray Job, and its model is served."""
    import openai
    from test_platform import CONVERSATIONS, jsonl
    from test_server import LiveServer

    from galerne import LLM
    from galerne.config import ServerSettings
    from galerne.server.app import create_app

    folder, _ = tiny_factory("mistral")
    llm = LLM(folder, device="cpu", kv_cache_gb=0.02, block_size=16)
    settings = ServerSettings(api_key=["k"], served_model_name=["tiny"], data_dir=str(tmp_path / "data"),
                              ray_address=ray_address)
    with LiveServer(create_app(llm, settings)) as server:
        oai = openai.OpenAI(base_url=server.url + "/v1", api_key="k", max_retries=0, timeout=60)
        file = oai.files.create(file=("train.jsonl", jsonl(CONVERSATIONS)), purpose="fine-tune")
        job = oai.fine_tuning.jobs.create(model="tiny", training_file=file.id, suffix="ray", extra_body={
            "hyperparameters": {"training_steps": 2, "seq_len": 128, "lora_rank": 4}})
        store = server.app.state.server.platform.store
        owner = wait_for(lambda: ((store.get("jobs", job.id) or {}).get("owner") or "").startswith("ray:")
                         and store.get("jobs", job.id)["owner"], 30)
        assert owner, store.get("jobs", job.id)
        job = wait_for(lambda: (j := oai.fine_tuning.jobs.retrieve(job.id)).status in ("succeeded", "failed",
                                                                                     "cancelled") and j, 120, 0.5)
        assert job and job.status == "succeeded", (job, RayLauncher(ray_address).exit_message(owner))
        assert owner.startswith(f"ray:{ray_address}:galerne-{job.id}-"), owner
        ray = RayLauncher(ray_address)
        assert wait_for(lambda: ray.state(owner) == EXITED, 30)  # the job's record says done before it exits
        assert "SUCCEEDED" in ray.exit_message(owner)
        r = oai.chat.completions.create(model=job.fine_tuned_model, messages=[{"role": "user", "content": "Item 1?"}],
                                        max_tokens=2, temperature=0)
        assert r.choices[0].message.content
