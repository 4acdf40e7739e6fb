"""Server pieces without a server: the dialect rule, the error envelopes."""

from __future__ import annotations

import json

import pytest
from starlette.requests import Request

from galerne.errors import InvalidParameter, PromptTooLong
from galerne.server import dialect
from galerne.server.errors import FieldError, Overloaded, RequestInvalid, error_body

# ------------------------------------------------------------------ dialects and envelopes


def request(path="/v1/chat/completions", **headers) -> Request:
    raw = [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()]
    return Request({"type": "http", "method": "POST", "path": path, "headers": raw, "query_string": b""})


@pytest.mark.parametrize("req, body, expected", [
    (request(user_agent="mistral-client-python/3.7.0"), {}, "mistral"),
    (request(user_agent="OpenAI/Python 3.57.0"), {"random_seed": 1}, "openai"),
    (request(x_stainless_lang="js"), {}, "openai"),
    (request(x_galerne_dialect="mistral", user_agent="OpenAI/Python"), {}, "mistral"),
    (request(user_agent="curl/8"), {"random_seed": 3}, "mistral"),
    (request(user_agent="curl/8"), {"tool_choice": "any"}, "mistral"),
    (request(user_agent="curl/8"), {"seed": 3}, "openai"),
    (request("/v1/fim/completions", user_agent="OpenAI/Python"), {}, "mistral"),
    (request("/v1/completions", user_agent="mistral-client"), {}, "openai"),
])
def test_dialect_rule(req, body, expected):
    assert dialect.detect(req, body).value == expected
    assert dialect.of(req).value == expected


def test_envelopes():
    status, body, _ = error_body(PromptTooLong(600, 512), dialect.Dialect.OPENAI)
    assert status == 400 and body["error"]["code"] == "context_length_exceeded" and "600" in body["error"]["message"]
    status, body, _ = error_body(InvalidParameter("top_p", "too big"), dialect.Dialect.MISTRAL)
    assert status == 400 and body["object"] == "error" and body["param"] == "top_p"
    invalid = RequestInvalid([FieldError(("body", "messages", 0, "content"), "bad")])
    assert error_body(invalid, dialect.Dialect.OPENAI)[1]["error"]["param"] == "messages[0].content"
    status, body, _ = error_body(invalid, dialect.Dialect.MISTRAL)
    assert status == 422 and body["detail"][0]["loc"] == ["body", "messages", 0, "content"]
    status, _, headers = error_body(Overloaded("full", retry_after=3), dialect.Dialect.OPENAI)
    assert status == 429 and headers == {"Retry-After": "3"}
    status, body, _ = error_body(KeyError("secret"), dialect.Dialect.OPENAI)
    assert status == 500 and "secret" not in json.dumps(body)
