"""Server pieces without a server: tool-call streaming for each tokenizer format,
the dialect rule, the error envelopes."""

from __future__ import annotations

import json

import pytest
from conftest import TOKENIZERS
from starlette.requests import Request

from galerne.errors import InvalidParameter, PromptTooLong
from galerne.server import dialect
from galerne.server.errors import FieldError, Overloaded, RequestInvalid, error_body
from galerne.server.tools import ToolCallStream
from galerne.tokenizer import Tokenizer

CALLS = [{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2]}},
         {"name": "get_time", "arguments": {"tz": "CET \"quoted\" {braces}"}}]


def run(stream: ToolCallStream, ids: list[int]):
    events = [e for t in ids for e in stream.push(t)]
    tail, not_a_call = stream.finish()
    return events + tail, not_a_call


def calls_of(events) -> list[tuple[str, dict, str]]:
    """(name, arguments, id) of each call, from the OpenAI-style begin/args events,
    checked against the Mistral-style end events."""
    out: dict[int, list] = {}
    for e in events:
        if e.kind == "begin":
            out[e.index] = [e.name, "", e.id]
        elif e.kind == "args":
            out[e.index][1] += e.arguments
        else:
            assert [e.name, e.arguments, e.id] == out[e.index]
    return [(n, json.loads(a), i) for n, a, i in (out[k] for k in sorted(out))]


@pytest.mark.parametrize("file", ["mistral_instruct_tokenizer_240323.model.v3",
                                  "mistral_instruct_tokenizer_241114.model.v7", "tekken_240911.json"])
def test_json_list_calls_stream_one_by_one(file):
    tok = Tokenizer.from_path(TOKENIZERS / file)
    marker = tok.special_token_id("[TOOL_CALLS]")
    ids = [marker, *tok.encode(json.dumps(CALLS), bos=False)]
    stream = ToolCallStream(tok, marker)
    seen_first_at = None
    for n, t in enumerate(ids):
        if any(e.kind == "end" for e in stream.push(t)) and seen_first_at is None:
            seen_first_at = n
    assert seen_first_at is not None and seen_first_at < len(ids) - 5  # the first call came out before the end
    events, not_a_call = stream.finish()
    assert not not_a_call
    stream2 = ToolCallStream(tok, marker)
    events, _ = run(stream2, ids)
    got = calls_of(events)
    assert [(n, a) for n, a, _ in got] == [(c["name"], c["arguments"]) for c in CALLS]
    assert all(len(i) == 9 and i.isalnum() for _, _, i in got)


def test_garbage_after_the_marker_is_text():
    tok = Tokenizer.from_path(TOKENIZERS / "mistral_instruct_tokenizer_240323.model.v3")
    marker = tok.special_token_id("[TOOL_CALLS]")
    stream = ToolCallStream(tok, marker)
    events, not_a_call = run(stream, [marker, *tok.encode("[{\"name\": oops", bos=False)])
    assert events == [] and not_a_call
    assert stream.raw_text().startswith("[TOOL_CALLS]") and "oops" in stream.raw_text()


class CharTokenizer:
    """A v11-style vocabulary: 5 [TOOL_CALLS], 6 [ARGS], 7 [CALL_ID]; id 100 + c is chr(c)."""

    SPECIAL = {5: "[TOOL_CALLS]", 6: "[ARGS]", 7: "[CALL_ID]"}

    def special_token_id(self, name):
        return {v: k for k, v in self.SPECIAL.items()}.get(name)

    def is_special(self, t):
        return t in self.SPECIAL

    def decode(self, ids, *, keep_special=False):
        return "".join(self.SPECIAL[t] if t in self.SPECIAL else chr(t - 100) for t in ids
                       if keep_special or t not in self.SPECIAL)

    def encode(self, text):
        return [100 + ord(c) for c in text]

    def decode_tool_calls(self, groups):
        out = []
        for g in groups:
            head, args = g[: g.index(6)], g[g.index(6) + 1:]
            cid = None
            if 7 in head:
                head, cid = head[: head.index(7)], self.decode(head[head.index(7) + 1:])
            out.append({"id": cid, "name": self.decode(head), "arguments": json.loads(self.decode(args))})
        return out


def test_v11_calls_stream_their_arguments():
    tok = CharTokenizer()
    ids = []
    for c, cid in zip(CALLS, ["abcDEF123", None]):
        ids += [5, *tok.encode(c["name"]), *([7, *tok.encode(cid)] if cid else []), 6, *tok.encode(json.dumps(c["arguments"]))]
    stream = ToolCallStream(tok, 5)
    events, not_a_call = run(stream, ids)
    assert not not_a_call
    assert sum(e.kind == "args" for e in events) > 10  # arguments arrive piece by piece
    got = calls_of(events)
    assert [(n, a) for n, a, _ in got] == [(c["name"], c["arguments"]) for c in CALLS]
    assert got[0][2] == "abcDEF123" and len(got[1][2]) == 9


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
