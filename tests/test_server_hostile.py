"""Hostile and careless clients: bodies cut short. None gets a 500 or a hang, and the
other clients keep being served."""

from __future__ import annotations

import contextlib
import logging
import socket
import time

import httpx
import pytest
from test_server import LiveServer

from galerne import LLM
from galerne.config import ServerSettings
from galerne.server import create_app

MODEL = "m"
CHAT = "/v1/chat/completions"


class GuardedServer(LiveServer):
    """LiveServer, with raw sockets and metrics."""

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


# ------------------------------------------------------------------ bodies


def test_a_client_gone_while_sending_its_body_is_a_499_not_a_500(tiny):
    llm = LLM(tiny, device="cpu", kv_cache_gb=0.02, block_size=16)
    app = create_app(llm, ServerSettings(served_model_name=[MODEL]))
    with GuardedServer(app) as live, errors_logged() as logged:
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
