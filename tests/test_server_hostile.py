"""Hostile and careless clients: bodies cut short, too big, too slow, too wordy;
sockets that say nothing; more connections than file descriptors; web pages that
try to drive a local server. Each gets a clear 4xx (or a closed socket), none a
500 or a hang, and the other clients keep being served.

The server runs as ``galerne serve`` runs it (``transport.uvicorn_config``), in a
thread, or in a subprocess where a limit of the process is the point.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import resource
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from starlette.testclient import TestClient
from test_server import USER, LiveServer, wait_idle

from galerne import LLM
from galerne.config import ServerSettings
from galerne.server import create_app
from galerne.server.serving import CHARS_PER_TOKEN, text_chars
from galerne.server.transport import Server, uvicorn_config

MODEL = "m"
CHAT = "/v1/chat/completions"


class GuardedServer(LiveServer):
    """LiveServer, configured as ``galerne serve`` configures uvicorn."""

    def __init__(self, app, settings: ServerSettings):
        self.server = Server(uvicorn_config(app, settings, port=0))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.app = app

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)

    def metric(self, name: str, **labels) -> float:
        """The sum of the samples of /metrics with these labels (0 when none)."""
        text = httpx.get(self.url + "/metrics").text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()))


@pytest.fixture(scope="module")
def tiny(tiny_factory):
    folder, _ = tiny_factory("mistral")
    return folder


def serve(tiny, slow: bool = False, **settings) -> GuardedServer:
    """``slow``: each engine step takes 10 ms more (a stream lasts, whatever this machine's speed)."""
    llm = LLM(tiny, device="cpu", kv_cache_gb=0.02, block_size=16)
    if slow:
        step = llm.engine.step
        llm.engine.step = lambda: (time.sleep(0.01), step())[1]
    s = ServerSettings(served_model_name=[MODEL], **settings)
    return GuardedServer(create_app(llm, s), s)


@contextlib.contextmanager
def errors_logged():
    """Records at ERROR and above from galerne's and uvicorn's loggers (uvicorn's do
    not propagate to the root)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = records.append
    loggers = [logging.getLogger(n) for n in ("", "galerne", "uvicorn", "uvicorn.error")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        yield records
    finally:
        for lg in loggers:
            lg.removeHandler(handler)


def read_response(sock: socket.socket, timeout: float = 10) -> tuple[int, dict, bytes]:
    """One HTTP response from a raw socket: (status, headers, body)."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    while len(body) < int(headers.get("content-length", 0)):
        body += sock.recv(65536)
    return int(lines[0].split()[1]), headers, body


def closed_by_server(sock: socket.socket, timeout: float) -> bool:
    """Whether the server closes ``sock`` within ``timeout`` seconds (what it sent is skipped)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


# ------------------------------------------------------------------ bodies


def test_a_client_gone_while_sending_its_body_is_a_499_not_a_500(tiny):
    with serve(tiny) as live, errors_logged() as logged:
        for path in (CHAT, "/v1/completions", "/v1/fim/completions"):
            sock = live.connect()
            sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         "Content-Length: 1000\r\n\r\n{\"model\": ".encode())
            time.sleep(0.2)  # the route waits for the rest
            sock.close()
        deadline = time.monotonic() + 10
        while live.metric("galerne_requests_total", status="499") < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        for path in (CHAT, "/v1/completions", "/v1/fim/completions"):
            assert live.metric("galerne_requests_total", endpoint=path, status="499") == 1
        assert live.metric("galerne_requests_total", status="500") == 0
        while live.state.in_flight and time.monotonic() < deadline:  # (the last /metrics, until its end)
            time.sleep(0.05)
        assert live.state.in_flight == 0
    assert not logged, [r.getMessage() for r in logged]


def test_a_body_past_the_limit_is_a_413_before_it_is_read(tiny):
    with serve(tiny, max_body_mb=0.25) as live:
        limit = 256 * 1024
        # Content-Length says it: refused at once, though no byte of the body came.
        sock = live.connect()
        sock.sendall(f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {100 * 2**20}\r\nExpect: 100-continue\r\n\r\n".encode())
        status, headers, body = read_response(sock)
        assert status == 413 and headers["connection"] == "close"  # and no 100 Continue before it
        error = json.loads(body)["error"]
        assert error["code"] == "request_too_large" and f"{limit:,}" in error["message"]
        assert "104,857,600 bytes" in error["message"]
        sock.close()
        # No Content-Length (chunked): refused once the bytes that came pass the limit.
        # The client sends all of its body before it reads: it still gets its 413.
        big = b'{"model": "m", "messages": [{"role": "user", "content": "' + b"x" * (4 * limit) + b'"}]}'
        chunks = (big[i:i + 65536] for i in range(0, len(big), 65536))
        r = httpx.post(live.url + CHAT, content=chunks, timeout=30)
        assert r.status_code == 413 and "past 262,144 bytes" in r.json()["error"]["message"]
        r = httpx.post(live.url + "/v1/fim/completions", content=big, timeout=30)  # Mistral's envelope
        assert r.status_code == 413 and r.json()["object"] == "error" and r.json()["code"] == "request_too_large"
        for size in (limit + 1000, 3 * limit, 40 * limit):  # and its 413 however much it sends
            r = httpx.post(live.url + CHAT, content=b"x" * size, timeout=30)
            assert r.status_code == 413, size
        # A body within the limit is read as before.
        r = httpx.post(live.url + CHAT, json={"model": MODEL, "messages": USER, "max_tokens": 2}, timeout=30)
        assert r.status_code == 200
        assert live.metric("galerne_requests_total", endpoint=CHAT, status="413") == 5


def test_a_body_too_slow_is_a_408_and_the_connection_closes(tiny):
    with serve(tiny, body_timeout=1.0) as live:
        sock = live.connect()
        sock.sendall(f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     "Content-Length: 100\r\n\r\n{\"mo".encode())
        t0 = time.monotonic()
        for _ in range(3):  # a byte now and then does not reset the clock
            time.sleep(0.3)
            sock.sendall(b" ")
        status, headers, body = read_response(sock)
        assert status == 408 and headers["connection"] == "close" and time.monotonic() - t0 < 5
        error = json.loads(body)["error"]
        assert error["code"] == "request_timeout" and "1 s" in error["message"]
        assert closed_by_server(sock, timeout=10)
        assert live.metric("galerne_requests_total", endpoint=CHAT, status="408") == 1


def test_text_longer_than_the_context_is_refused_before_tokenizing(tiny):
    llm = LLM(tiny, device="cpu", kv_cache_gb=0.02, block_size=16)
    app = create_app(llm, ServerSettings(served_model_name=[MODEL]))
    context = llm.max_model_len
    limit = context * CHARS_PER_TOKEN
    calls = []
    for name in ("encode_chat_with_images", "encode", "encode_fim"):
        original = getattr(llm.tokenizer, name)
        setattr(llm.tokenizer, name, lambda *a, _f=original, _n=name, **k: (calls.append(_n), _f(*a, **k))[1])
    with LiveServer(app) as live, httpx.Client(base_url=live.url, timeout=60) as client:
        r = client.post(CHAT, json={"model": MODEL, "messages": [{"role": "user", "content": "x" * (limit + 1)}]})
        error = r.json()["error"]
        assert r.status_code == 400 and error["code"] == "context_length_exceeded"
        assert f"{context:,} tokens" in error["message"] and f"at most {limit:,} characters" in error["message"]
        r = client.post("/v1/fim/completions", json={"model": MODEL, "prompt": "def", "suffix": "y" * limit})
        assert r.status_code == 400 and r.json()["object"] == "error" and "characters of text" in r.json()["message"]
        assert calls == []  # refused before the tokenizer saw them
        # Within the bound, the tokenizer decides (this text is still too long, by its tokens).
        r = client.post(CHAT, json={"model": MODEL, "messages": [{"role": "user", "content": "hello " * 600}]})
        assert r.status_code == 400 and "characters" not in r.json()["error"]["message"]
        assert calls == ["encode_chat_with_images"]
        # Each prompt of a batch is a prompt of its own: three within the bound are not one past it.
        prompts = ["hello " * (limit // 12)] * 3
        assert len("".join(prompts)) > limit
        r = client.post("/v1/completions", json={"model": MODEL, "prompt": prompts, "max_tokens": 1})
        assert r.status_code == 400 and "characters of text" not in r.text and "encode" in calls
        wait_idle(live.state)


def test_text_chars_counts_strings_and_keys_and_prompts_apart():
    assert text_chars({"messages": [{"role": "user", "content": "abc"}]}) == 8 + 4 + 4 + 7 + 3
    assert text_chars({"prompt": ["aaaa", "bb"], "suffix": "c"}) == 6 + 6 + 1 + 4
    assert text_chars({"prompt": [[1, 2], [3]]}) == 6
    assert text_chars([1, 2.0, None, True, {"k": ["v" * 5]}]) == 6


def test_big_bodies_do_not_stall_other_clients(tiny):
    """Eight 10 MiB bodies (413) and eight bodies just under the limit, all text (400:
    longer than the context), at once: /health keeps answering. Before the limits, the
    text was tokenized: eight 10 MB bodies stalled every other client for 40 s."""
    with serve(tiny) as live:
        limit = ServerSettings().max_body_bytes
        huge = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * (10 * 2**20)}]}).encode()
        near = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * (limit - 100)}]}).encode()
        statuses: list[int] = []

        def post(body: bytes) -> None:
            statuses.append(httpx.post(live.url + CHAT, content=body, timeout=120).status_code)

        latencies, done = [], threading.Event()

        def poll() -> None:
            with httpx.Client(base_url=live.url, timeout=120) as client:
                while not done.is_set():
                    t0 = time.monotonic()
                    assert client.get("/health").status_code == 200
                    latencies.append(time.monotonic() - t0)
                    time.sleep(0.02)

        poller = threading.Thread(target=poll)
        poller.start()
        time.sleep(0.2)
        senders = [threading.Thread(target=post, args=(b,)) for b in [huge] * 8 + [near] * 8]
        for t in senders:
            t.start()
        for t in senders:
            t.join(timeout=120)
        done.set()
        poller.join(timeout=120)
        assert sorted(statuses) == [400] * 8 + [413] * 8
        assert len(latencies) > 10 and max(latencies) < 1.0, sorted(latencies)[-5:]


# ------------------------------------------------------------------ connections


def test_silent_and_slow_header_connections_are_closed(tiny):
    with serve(tiny, header_timeout=1.0) as live:
        silent = [live.connect() for _ in range(20)]
        slow = live.connect()  # slowloris: a byte of headers now and then
        t0 = time.monotonic()
        with contextlib.suppress(OSError):  # until the server closes it
            for byte in b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n":
                if time.monotonic() - t0 > 1.5:
                    break
                slow.sendall(bytes([byte]))
                time.sleep(0.1)
        # a keep-alive client is not one of them: its requests come in time
        with httpx.Client(base_url=live.url) as client:
            assert client.get("/health").status_code == 200
            assert all(closed_by_server(s, timeout=3) for s in [*silent, slow])
            assert client.get("/health").status_code == 200
        assert live.metric("galerne_http_connections_closed_total", reason="header_timeout") == 21
        deadline = time.monotonic() + 5
        while live.metric("galerne_http_connections") != 1:  # the one asking for /metrics
            assert time.monotonic() < deadline
            time.sleep(0.05)


@pytest.mark.slow  # about 7 s: streams that outlast the idle ones
def test_the_connection_cap_closes_idle_connections_not_busy_ones(tiny):
    with serve(tiny, slow=True, max_connections=8) as live:
        body = {"model": MODEL, "messages": USER, "max_tokens": 300, "ignore_eos": True, "stream": True}
        streams: list[list[str]] = [[], []]
        started = threading.Barrier(3)

        def stream(lines: list[str]) -> None:
            with httpx.stream("POST", live.url + CHAT, json=body, timeout=60) as r:
                for k, line in enumerate(r.iter_lines()):
                    lines.append(line)
                    if k == 0:
                        started.wait()

        threads = [threading.Thread(target=stream, args=(s,)) for s in streams]
        for t in threads:
            t.start()
        started.wait(timeout=30)
        silent = [live.connect() for _ in range(30)]  # past the cap: each closes an idle one
        time.sleep(0.2)
        for _ in range(3):  # a real client still gets in, by closing the idlest silent socket
            assert httpx.get(live.url + "/health", timeout=10).status_code == 200
        for t in threads:
            t.join(timeout=60)
        for lines in streams:  # neither stream was dropped
            events = [ln for ln in lines if ln]
            assert events[-1] == "data: [DONE]" and sum('"finish_reason":"length"' in ln for ln in events) == 1
        evicted = live.metric("galerne_http_connections_closed_total", reason="evicted")
        assert evicted >= 30 - 8 + 2
        assert sum(closed_by_server(s, timeout=0.5) for s in silent) >= 30 - 8


def test_connections_past_the_open_file_limit_do_not_lock_clients_out(tiny):
    """``galerne serve`` with 256 file descriptors, 500 silent sockets: a real client is
    still served (before, accept() failed for lack of descriptors and it hung)."""

    def low_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    env = {k: v for k, v in os.environ.items() if k != "GALERNE_API_KEY"}
    proc = subprocess.Popen([sys.executable, "-m", "galerne.cli", "serve", str(tiny), "--port", "0",
                             "--kv-cache-gb", "0.02", "--served-model-name", MODEL], preexec_fn=low_limit,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    sockets, lines, started = [], [], threading.Event()

    def read_stderr():  # all of it: a full pipe would block the server
        for line in proc.stderr:
            lines.append(line)
            if "serving" in line:
                started.set()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        assert started.wait(timeout=60), lines
        assert any("open-file limit (256) allows" in line for line in lines), lines
        serving = next(line for line in lines if "serving" in line)
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)/v1", serving).group(1))
        for _ in range(500):
            sockets.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        for _ in range(3):
            r = httpx.post(f"http://127.0.0.1:{port}{CHAT}", timeout=20,
                           json={"model": MODEL, "messages": USER, "max_tokens": 2})
            assert r.status_code == 200
    finally:
        for s in sockets:
            s.close()
        proc.terminate()
        proc.wait(timeout=30)
        reader.join(timeout=10)
    assert not any("out of system resource" in line or "Traceback" in line for line in lines), "".join(lines)


def test_the_bounds_are_settings_checked_once():
    import argparse

    from galerne.config import add_arguments, from_args

    p = argparse.ArgumentParser()
    add_arguments(p, ServerSettings)
    s = from_args(ServerSettings, p.parse_args(["--max-body-mb", "0.5", "--header-timeout", "3", "--body-timeout", "4",
                                                "--max-connections", "64"]))
    assert (s.max_body_bytes, s.header_timeout, s.body_timeout, s.max_connections) == (2**19, 3.0, 4.0, 64)
    for field, value in [("max_body_mb", 0), ("header_timeout", -1), ("body_timeout", 0), ("max_connections", 0)]:
        with pytest.raises(Exception, match=field):
            ServerSettings(**{field: value})


# ------------------------------------------------------------------ browsers and local networks


def client_for(tiny, **settings) -> TestClient:
    """The app in-process, no lifespan (the engine is not started: /health says 503)."""
    llm = LLM(tiny, device="cpu", kv_cache_gb=0.02)
    return TestClient(create_app(llm, ServerSettings(served_model_name=[MODEL], **settings)),
                      base_url="http://127.0.0.1:8000")


def test_without_a_key_only_loopback_host_names_are_answered(tiny):
    client = client_for(tiny, allowed_host=["gpu-box.lan"])
    for host in ("localhost", "localhost:8000", "127.0.0.1:8000", "[::1]:8000", "LOCALHOST.", "gpu-box.lan:80"):
        assert client.get("/v1/models", headers={"Host": host}).status_code == 200, host
    for host in ("evil.example", "evil.example:8000", "localhost.evil.example", "127.0.0.1.nip.io"):
        r = client.post(CHAT, headers={"Host": host}, json={"model": MODEL, "messages": USER})
        error = r.json()["error"]
        assert r.status_code == 403 and error["code"] == "host_not_allowed" and repr(host) in error["message"]
        assert "localhost, 127.0.0.1, [::1], gpu-box.lan" in error["message"]
    r = client.get("/health", headers={"Host": "evil.example", "User-Agent": "mistral-client-python/1.0"})
    assert r.status_code == 403 and r.json()["object"] == "error"  # the dialect's envelope
    anyhost = client_for(tiny, allowed_host=["*"])
    assert anyhost.get("/v1/models", headers={"Host": "evil.example"}).status_code == 200
    keyed = client_for(tiny, api_key=["k"])  # with a key, the key decides
    assert keyed.get("/v1/models", headers={"Host": "evil.example"}).status_code == 401
    assert keyed.get("/v1/models", headers={"Host": "api.example", "Authorization": "Bearer k"}).status_code == 200


def test_without_a_key_cross_origin_requests_are_refused(tiny):
    client = client_for(tiny)
    body = {"model": MODEL, "messages": USER, "max_tokens": 1}
    r = client.post(CHAT, json=body, headers={"Origin": "http://evil.example"})
    error = r.json()["error"]
    assert r.status_code == 403 and error["code"] == "origin_not_allowed"
    assert "--allowed-origin http://evil.example" in error["message"]
    for origin in ("http://localhost:8000", "null", "http://127.0.0.1:9999"):
        assert client.get("/v1/models", headers={"Origin": origin}).status_code == 403, origin
    # The server's own pages (/docs) are of its own origin.
    assert client.get("/v1/models", headers={"Origin": "http://127.0.0.1:8000"}).status_code == 200
    assert client.get("/v1/models").status_code == 200  # no Origin: not a web page


def test_allowed_origins_get_cors(tiny):
    web = "http://localhost:3000"
    preflight = {"Origin": web, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type, x-stainless-lang"}
    for settings in (dict(allowed_origin=[web]), dict(allowed_origin=[web], api_key=["k"])):
        client = client_for(tiny, **settings)
        r = client.options(CHAT, headers=preflight)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == web
        assert "POST" in r.headers["access-control-allow-methods"]
        assert "authorization" in r.headers["access-control-allow-headers"].lower()
        r = client.get("/v1/models", headers={"Origin": web, "Authorization": "Bearer k"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == web
        r = client.get("/v1/models", headers={"Origin": "http://evil.example", "Authorization": "Bearer k"})
        assert "access-control-allow-origin" not in r.headers
        if "api_key" not in settings:
            assert r.status_code == 403
    keyed = client_for(tiny, api_key=["k"])  # a key and no allowed origin: no CORS at all
    r = keyed.options(CHAT, headers=preflight)
    assert "access-control-allow-origin" not in r.headers and r.status_code == 405


def test_head_answers_where_get_does(tiny):
    client = client_for(tiny)
    for path in ("/health", "/metrics", "/v1/models", f"/v1/models/{MODEL}", "/docs", "/openapi.json"):
        get, head = client.get(path), client.head(path)
        assert head.status_code == get.status_code, path
        assert head.content == b"" and head.headers["content-type"] == get.headers["content-type"], path
    assert client.head(CHAT).status_code == 405
    spec = client.get("/openapi.json").json()
    assert not any("head" in ops for ops in spec["paths"].values())


def test_allowed_origins_and_hosts_are_checked_once():
    assert ServerSettings(allowed_origin=["http://localhost:3000", "https://app.example", "*", "null"])
    assert ServerSettings(allowed_host=["gpu-box.lan", "10.0.0.2", "*"])
    for origin in ("localhost:3000", "http://localhost:3000/", "ftp://x", ""):
        with pytest.raises(Exception, match=r"allowed_origin\[0\]"):
            ServerSettings(allowed_origin=[origin])
    for host in ("http://gpu-box.lan", " gpu-box", ""):
        with pytest.raises(Exception, match=r"allowed_host\[0\]"):
            ServerSettings(allowed_host=[host])


def test_big_bodies_are_validated_off_the_event_loop(tiny, monkeypatch):
    """pydantic walks every item of a big body (40,000 prompts of token ids, 300 KB):
    not on the loop, which other clients share. Small bodies stay on it (a thread hop
    costs more than they do)."""
    from galerne.server import serving

    threads: list[bool] = []
    validate = serving.validate

    def spy(model, body):
        threads.append(_on_loop())
        return validate(model, body)

    monkeypatch.setattr(serving, "validate", spy)
    with serve(tiny) as live:
        for prompt in ([5, 6], [[5, 6]] * 40_000):
            r = httpx.post(live.url + "/v1/completions", json={"model": MODEL, "max_tokens": 1, "prompt": prompt},
                           timeout=120)
            assert r.status_code in (200, 400)
    assert threads == [True, False]


def _on_loop() -> bool:
    import asyncio

    try:
        asyncio.get_running_loop()
        return True
    except RuntimeError:
        return False


def test_image_urls_are_not_counted_as_text():
    """A base64 image is bounded by --max-image-mb, not by the context's characters."""
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 10_000}}
    mistral = {"type": "image_url", "image_url": "data:image/png;base64," + "A" * 10_000}
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, image, mistral]}]}
    assert text_chars(body) < 200
