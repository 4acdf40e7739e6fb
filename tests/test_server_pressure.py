"""The server under pressure: a full queue, SIGTERM mid-stream, an open address
without a key."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from test_server import USER, LiveServer, wait_idle

from galerne import LLM
from galerne.cli import main
from galerne.config import ServerSettings
from galerne.server import create_app

LONG = {"model": "m", "messages": USER, "max_tokens": 400, "ignore_eos": True, "stream": True}


def test_full_queue_gets_429_with_retry_after(tiny_factory):
    folder, _ = tiny_factory("mistral")
    llm = LLM(folder, device="cpu", kv_cache_gb=0.02, max_num_seqs=1)
    step = llm.engine.step

    def slow_step():  # a slow model: A runs for seconds, whatever this machine's speed
        time.sleep(0.01)
        return step()

    llm.engine.step = slow_step
    app = create_app(llm, ServerSettings(max_queued_requests=1, served_model_name=["m"]))
    with LiveServer(app) as live, httpx.Client(base_url=live.url, timeout=60) as client:
        state = live.state
        with client.stream("POST", "/v1/chat/completions", json=LONG) as running:
            assert running.status_code == 200
            next(running.iter_lines())  # A runs: the only slot is taken
            waiting = {}

            def second():  # B waits for the slot (its response starts with its first token)
                waiting["status"] = httpx.post(live.url + "/v1/chat/completions", timeout=60,
                                               json={**LONG, "stream": False, "max_tokens": 2}).status_code

            t = threading.Thread(target=second)
            t.start()
            deadline = time.monotonic() + 10
            while state.queued != 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert state.queued == 1
            r = client.post("/v1/chat/completions", json={**LONG, "stream": False})
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["code"] == "queue_full"
            r = client.post("/v1/chat/completions", json={**LONG, "random_seed": 1, "stream": False})
            assert r.status_code == 429 and r.json()["object"] == "error"  # Mistral's envelope
        t.join(timeout=60)  # A's client left: B gets the slot and finishes
        assert waiting["status"] == 200
        wait_idle(state)
        assert 'galerne_requests_total{endpoint="/v1/chat/completions",model="m",status="429"} 2.0' in \
            client.get("/metrics").text


def test_sigterm_drains_streams_in_flight(tiny_factory):
    folder, _ = tiny_factory("mistral")
    env = {**os.environ, "GALERNE_API_KEY": "k1,k2"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "galerne.cli", "serve", str(folder), "--port", "0", "--kv-cache-gb", "0.02",
         "--served-model-name", "m"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env,
    )
    try:
        line = proc.stderr.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)/v1 \(API key required \(2 key\(s\)\)", line)
        assert match, line
        url = f"http://127.0.0.1:{match.group(1)}"
        headers = {"Authorization": "Bearer k2"}
        body = {**LONG, "max_tokens": 450, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers=headers, timeout=60) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            proc.send_signal(signal.SIGTERM)
            events = [ln[6:] for ln in lines if ln.startswith("data: ")]
            assert proc.poll() is None  # still up while the stream runs
        assert events[-1] == "[DONE]"
        assert json.loads(events[-3])["choices"][0]["finish_reason"] == "length"
        assert json.loads(events[-2])["usage"]["completion_tokens"] == 450
        # uvicorn re-raises the signal once drained, so the status says "ended by SIGTERM".
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
        with pytest.raises(httpx.ConnectError):  # and then gone
            httpx.get(url + "/health")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_open_address_needs_a_key(tiny_factory, capsys, monkeypatch):
    monkeypatch.delenv("GALERNE_API_KEY", raising=False)
    folder, _ = tiny_factory("mistral")
    assert main(["serve", str(folder), "--host", "0.0.0.0"]) == 2
    assert "without an API key" in capsys.readouterr().err


def test_api_keys_from_env_and_flags(monkeypatch):
    import argparse

    from galerne.config import add_arguments, from_args

    p = argparse.ArgumentParser()
    add_arguments(p, ServerSettings)
    monkeypatch.setenv("GALERNE_API_KEY", " a, b ,")
    assert from_args(ServerSettings, p.parse_args([])).api_key == ["a", "b"]
    assert from_args(ServerSettings, p.parse_args(["--api-key", "c", "--api-key", "d"])).api_key == ["c", "d"]
    monkeypatch.delenv("GALERNE_API_KEY")
    assert from_args(ServerSettings, p.parse_args([])).api_key == []
    with pytest.raises(Exception, match="max_queued_requests"):
        ServerSettings(max_queued_requests=0)
