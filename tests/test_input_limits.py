"""Bad input is a clear 4xx naming the field, never a 5xx, a hang or a stall; and what
a request may ask is bounded (issue #12): lone surrogates in any text field, strict
wire types, schemas that no finite JSON matches, more prompts than the queue holds,
stop strings, caches bounded by bytes, the detokenizer's set-up."""

from __future__ import annotations

import json

import httpx
import pytest
from test_server import LiveServer

from galerne import LLM, SamplingParams
from galerne.config import ServerSettings
from galerne.errors import InvalidParameter
from galerne.sampling.guided import Guidance
from galerne.server import create_app

KEY = "k"
QUEUE = 8  # the test server's max_queued_requests
USER = [{"role": "user", "content": "Hi"}]
BAD = "\ud800"  # a lone surrogate: JSON can write it ("\ud800"), no encoder can take it


@pytest.fixture(scope="module")
def llm(tiny_factory):
    return LLM(tiny_factory("mistral")[0], device="cpu", max_model_len=128, kv_cache_gb=0.01, block_size=16)


@pytest.fixture(scope="module")
def live(llm):
    app = create_app(llm, ServerSettings(api_key=[KEY], served_model_name=["m"], max_queued_requests=QUEUE))
    with LiveServer(app) as server:
        yield server


def send(live, path: str, body: dict, dialect: str = "openai") -> httpx.Response:
    # json.dumps escapes a lone surrogate as JSON allows ("\ud800"); httpx's own encoder would fail on it.
    return httpx.post(live.url + path, content=json.dumps({"model": "m", **body}).encode(), timeout=60,
                      headers={"Authorization": f"Bearer {KEY}", "X-Galerne-Dialect": dialect,
                               "Content-Type": "application/json"})


def refused(live, path: str, body: dict, dialect: str = "openai") -> tuple[int, dict]:
    """(status, error) of a request that must be refused in the dialect's envelope."""
    r = send(live, path, body, dialect)
    error = r.json()
    if dialect == "openai":
        error = error["error"]
    else:
        assert error["object"] == "error"
    assert 400 <= r.status_code < 500, (r.status_code, error)
    return r.status_code, error


def assert_idle(live) -> None:
    stats = live.state.engine.stats()
    assert stats["running"] == stats["waiting"] == 0


# ------------------------------------------------------------------ lone surrogates

CHAT = "/v1/chat/completions"
TOOL = {"type": "function", "function": {"name": "f", "description": "d",
                                         "parameters": {"type": "object", "properties": {"a": {"type": "string"}}}}}
CALL = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": "x"}'}}


def _with_tool_history(**call_fields) -> list[dict]:
    call = {**CALL, "function": {**CALL["function"], **call_fields}}
    return [*USER, {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "ok"}]


# (route, dialects, body, the field the error names)
SURROGATES = [
    (CHAT, ("openai", "mistral"), {"messages": [{"role": "user", "content": f"a{BAD}b"}]}, "messages[0].content"),
    (CHAT, ("openai", "mistral"), {"messages": [{"role": "user", "content": [{"type": "text", "text": BAD}]}]},
     "messages[0].content[0].text"),
    (CHAT, ("openai", "mistral"), {"messages": [{"role": "system", "content": "é" + BAD}, *USER]}, "messages[0].content"),
    (CHAT, ("openai",), {"messages": [{"role": "user", "content": "hi", "name": BAD}]}, "messages[0].name"),
    (CHAT, ("openai", "mistral"), {"messages": _with_tool_history(name=BAD)}, "messages[1].tool_calls[0].function.name"),
    (CHAT, ("openai", "mistral"), {"messages": _with_tool_history(arguments='{"a": "' + BAD + '"}')},
     "messages[1].tool_calls[0].function.arguments"),
    (CHAT, ("mistral",), {"messages": _with_tool_history(arguments={"a": BAD})},
     "messages[1].tool_calls[0].function.arguments.a"),
    (CHAT, ("openai", "mistral"), {"messages": USER, "tools": [{**TOOL, "function": {**TOOL["function"], "name": BAD}}]},
     "tools[0].function.name"),
    (CHAT, ("openai", "mistral"),
     {"messages": USER, "tools": [{**TOOL, "function": {**TOOL["function"], "description": BAD}}]},
     "tools[0].function.description"),
    (CHAT, ("openai", "mistral"), {"messages": USER, "tools": [{**TOOL, "function": {
        **TOOL["function"], "parameters": {"type": "object", "properties": {BAD: {"type": "string"}}}}}]},
     "tools[0].function.parameters.properties.\\ud800"),  # a key: written escaped
    (CHAT, ("openai", "mistral"), {"messages": USER, "tools": [TOOL],
                                   "tool_choice": {"type": "function", "function": {"name": BAD}}},
     "tool_choice.function.name"),
    (CHAT, ("openai", "mistral"), {"messages": USER, "stop": BAD}, "stop"),
    (CHAT, ("openai", "mistral"), {"messages": USER, "stop": ["ok", BAD]}, "stop[1]"),
    (CHAT, ("openai", "mistral"), {"messages": USER, "response_format": {"type": "json_schema", "json_schema": {
        "name": "r", "schema": {"type": "string", "enum": ["a", BAD]}}}}, "response_format.json_schema.schema.enum[1]"),
    (CHAT, ("openai", "mistral"), {"messages": USER, "response_format": {"type": "json_schema", "json_schema": {
        "name": "r", "schema": '{"type": "string", "description": "' + BAD + '"}'}}}, "response_format.json_schema.schema"),
    (CHAT, ("openai",), {"messages": USER, "user": BAD}, "user"),
    (CHAT, ("mistral",), {"messages": USER, "metadata": {"k": BAD}}, "metadata.k"),
    (CHAT, ("openai", "mistral"), {"messages": USER, "unknown_extension": [BAD]}, "unknown_extension[0]"),
    ("/v1/completions", ("openai",), {"prompt": BAD}, "prompt"),
    ("/v1/completions", ("openai",), {"prompt": ["ok", BAD]}, "prompt[1]"),
    ("/v1/completions", ("openai",), {"prompt": "def f(", "suffix": BAD}, "suffix"),
    ("/v1/completions", ("openai",), {"prompt": "ok", "stop": [BAD]}, "stop[0]"),
    ("/v1/fim/completions", ("mistral",), {"prompt": BAD, "suffix": "x"}, "prompt"),
    ("/v1/fim/completions", ("mistral",), {"prompt": "def f(", "suffix": BAD}, "suffix"),
    ("/v1/fim/completions", ("mistral",), {"prompt": "def f(", "stop": BAD}, "stop"),
]


@pytest.mark.parametrize("path, dialects, body, field", SURROGATES,
                         ids=[f"{case[0]}:{case[3]}" for case in SURROGATES])
def test_a_lone_surrogate_in_any_text_field_is_a_4xx_naming_it(live, path, dialects, body, field):
    for dialect in dialects:
        status, error = refused(live, path, {"max_tokens": 2, **body}, dialect)
        assert status == (400 if dialect == "openai" else 422), dialect  # as any invalid value
        assert error["param"] == field, dialect
        assert "lone UTF-16 surrogate (\\ud800)" in error["message"], dialect
    assert_idle(live)


def test_a_surrogate_pair_is_text(live):
    """JSON's escaped pairs ("\\ud83d\\ude00") are one character, and fine."""
    r = send(live, CHAT, {"messages": [{"role": "user", "content": "smile \U0001F600"}], "max_tokens": 1})
    assert r.status_code == 200
    raw = b'{"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": "\\ud83d\\ude00"}]}'
    r = httpx.post(live.url + CHAT, content=raw, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 200


def test_the_offline_api_refuses_a_lone_surrogate_naming_the_field(llm):
    params = SamplingParams(max_tokens=1)
    for call, field in [
        (lambda: llm.generate("a" + BAD, params), "prompt"),
        (lambda: llm.chat([{"role": "user", "content": [{"type": "text", "text": BAD}]}], params),
         "messages[0].content[0].text"),
        (lambda: llm.tokenizer.encode_fim("def f(", BAD), "suffix"),
        (lambda: llm.generate("a", SamplingParams(guided=Guidance("regex", "a" + BAD, field="regex"))), "regex"),
    ]:
        with pytest.raises(InvalidParameter) as e:
            call()
        assert e.value.field == field and "lone UTF-16 surrogate" in str(e.value)


# ------------------------------------------------------------------ strict types

ROUTES = [
    (CHAT, "openai", {"messages": USER}),
    (CHAT, "mistral", {"messages": USER}),
    ("/v1/completions", "openai", {"prompt": "Once"}),
    ("/v1/fim/completions", "mistral", {"prompt": "def f(", "suffix": "):"}),
]
# Values that lax parsing would coerce (a bool for a number, a numeric string, "yes" for true).
NOT_COERCED = [
    ("max_tokens", True), ("max_tokens", "10"), ("max_tokens", 10.0), ("stream", "yes"), ("stream", 1),
    ("n", 1.0), ("n", "2"), ("temperature", True), ("temperature", "0.5"), ("top_p", "1"), ("top_k", 5.0),
    ("min_tokens", False), ("ignore_eos", "no"), ("presence_penalty", "0"),
]
PER_ROUTE = {
    (CHAT, "openai"): [("parallel_tool_calls", "yes"), ("logprobs", "true"), ("top_logprobs", 1.0), ("seed", "1"),
                       ("stream_options", {"include_usage": "yes"}), ("max_completion_tokens", "3")],
    (CHAT, "mistral"): [("parallel_tool_calls", "yes"), ("logprobs", 1), ("safe_prompt", "yes"),
                        ("random_seed", 1.0)],
    ("/v1/completions", "openai"): [("echo", "yes"), ("logprobs", True), ("seed", "1"), ("best_of", 1.0)],
    ("/v1/fim/completions", "mistral"): [("random_seed", "1")],
}


@pytest.mark.parametrize("path, dialect, body", ROUTES, ids=[f"{d}:{p}" for p, d, _ in ROUTES])
def test_wire_types_are_strict_in_both_dialects(live, path, dialect, body):
    for name, value in NOT_COERCED + PER_ROUTE[(path, dialect)]:
        status, error = refused(live, path, {**body, "max_tokens": 1, name: value}, dialect)
        assert status == (400 if dialect == "openai" else 422), (name, value)
        assert error["param"].split(".")[0] == name, (name, value, error)
    # A number field takes an integer: JSON does not tell 1 from 1.0.
    r = send(live, path, {**body, "max_tokens": 1, "temperature": 1, "top_p": 1, "presence_penalty": 0,
                          "repetition_penalty": 1, "stream": False}, dialect)
    assert r.status_code == 200, r.text
    assert_idle(live)


# ------------------------------------------------------------------ more prompts than the queue holds


@pytest.mark.parametrize("prompt, n, field", [
    (["a"] * (QUEUE + 1), 1, "prompt"),
    ([[5, 6]] * (QUEUE + 1), 1, "prompt"),
    (["a"] * 3, 3, "prompt"),  # n times the prompts: 9 completions
    ("a", QUEUE + 1, "n"),
])
def test_more_completions_than_the_queue_ever_holds_is_a_400_not_a_429(live, prompt, n, field):
    status, error = refused(live, "/v1/completions", {"prompt": prompt, "n": n, "max_tokens": 1})
    assert status == 400 and error["param"] == field  # a 429 would be retried forever
    assert f"queues at most {QUEUE} (max_queued_requests)" in error["message"]
    assert_idle(live)


def test_as_many_completions_as_the_queue_holds_run(live):
    r = send(live, "/v1/completions", {"prompt": ["a", "b"], "n": QUEUE // 2, "max_tokens": 1})
    assert r.status_code == 200 and len(r.json()["choices"]) == QUEUE


@pytest.mark.parametrize("prompt", [[], [[]]])
def test_an_empty_prompt_is_a_400(live, prompt):
    status, error = refused(live, "/v1/completions", {"prompt": prompt, "max_tokens": 1})
    assert status == 400 and error["param"] == "prompt" and error["message"].endswith("is empty")


# ------------------------------------------------------------------ schemas no finite JSON matches


@pytest.mark.parametrize("dialect", ["openai", "mistral"])
def test_a_self_referencing_schema_is_a_400_naming_the_field(live, dialect):
    """{"$ref": "#"} was a 200 whose grammar failed mid-answer ("Too many items")."""
    for body, field in [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": {"$ref": "#"}}}},
         "response_format.json_schema.schema"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"$ref": "#"}}}],
          "tool_choice": "required" if dialect == "openai" else "any"}, "tools[0].function.parameters"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": {
            "type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}}}},
         "response_format.json_schema.schema"),
    ]:
        status, error = refused(live, CHAT, {"messages": USER, "max_tokens": 8, **body}, dialect)
        assert status == 400 and error["param"] == field
        assert "no finite JSON value can match" in error["message"]
    assert_idle(live)


@pytest.mark.parametrize("dialect", ["openai", "mistral"])
def test_a_schema_nested_too_deeply_is_a_400_naming_the_field(live, dialect):
    from galerne.conversation import MAX_SCHEMA_DEPTH

    deep: dict = {"type": "string"}
    for _ in range(MAX_SCHEMA_DEPTH // 2 + 1):  # two levels each: past the schema's limit, within the body's (128)
        deep = {"type": "object", "properties": {"a": deep}}
    for body, field in [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": deep}}},
         "response_format.json_schema.schema"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": deep}}]},
         "tools[0].function.parameters"),
    ]:
        status, error = refused(live, CHAT, {"messages": USER, "max_tokens": 8, **body}, dialect)
        assert status == 400 and error["param"] == field
        assert f"more than {MAX_SCHEMA_DEPTH} deep" in error["message"]


def test_a_recursive_schema_that_can_end_is_served(live):
    chain = {"type": "object", "properties": {"v": {"type": "boolean"}, "next": {"$ref": "#"}},
             "required": ["v"], "additionalProperties": False}
    r = send(live, CHAT, {"messages": USER, "max_tokens": 60, "temperature": 0, "response_format": {
        "type": "json_schema", "json_schema": {"name": "r", "schema": chain}}})
    assert r.status_code == 200
    choice = r.json()["choices"][0]
    if choice["finish_reason"] == "stop":
        import jsonschema

        jsonschema.validate(json.loads(choice["message"]["content"]), chain)


# ------------------------------------------------------------------ stop strings


def test_stop_strings_are_bounded_in_number_and_length():
    from galerne.sampling.params import MAX_STOP, MAX_STOP_CHARS

    assert SamplingParams(stop=["x" * MAX_STOP_CHARS] * MAX_STOP).stop
    with pytest.raises(InvalidParameter, match=f"at most {MAX_STOP} stop strings") as e:
        SamplingParams(stop=["x"] * (MAX_STOP + 1))
    assert e.value.field == "stop"
    with pytest.raises(InvalidParameter, match=f"at most {MAX_STOP_CHARS} characters") as e:
        SamplingParams(stop=["ok", "x" * (MAX_STOP_CHARS + 1)])
    assert e.value.field == "stop[1]"


@pytest.mark.parametrize("path, dialect, body", ROUTES, ids=[f"{d}:{p}" for p, d, _ in ROUTES])
def test_too_many_or_too_long_stop_strings_are_a_400_on_every_route(live, path, dialect, body):
    # (Megabytes of them are refused before: the body's size, the text a context can hold.)
    for stop, field in [(["a"] * 17, "stop"), ("y" * 1100, "stop[0]"), (["ok", "z" * 1500], "stop[1]")]:
        status, error = refused(live, path, {**body, "max_tokens": 1, "stop": stop}, dialect)
        assert status == 400 and error["param"] == field
        assert len(error["message"]) < 200  # the value is not quoted back
    assert_idle(live)


def _naive_stop_check(stops, pushes, include):
    """StopChecker as it was (the reference): every partial match recomputed per push."""
    pending, out = "", []
    for text in pushes:
        buf = pending + text
        hits = [(i, s) for s in stops if (i := buf.find(s)) >= 0]
        if hits:
            i, s = min(hits)
            return out + [buf[: i + len(s) if include else i]], True
        hold = max((k for s in stops for k in range(1, min(len(s), len(buf) + 1)) if buf.endswith(s[:k])), default=0)
        pending = buf[len(buf) - hold:]
        out.append(buf[: len(buf) - hold])
    return out + [pending], False


def test_stop_checker_holds_back_and_stops_as_the_naive_check():
    import random

    from galerne.engine.stop import StopChecker

    rnd = random.Random(0)
    for trial in range(3000):
        alpha = "ab" if trial % 2 else "abc"
        stops = tuple("".join(rnd.choice(alpha) for _ in range(rnd.randint(1, 6))) for _ in range(rnd.randint(1, 3)))
        pushes = ["".join(rnd.choice(alpha + "x") for _ in range(rnd.randint(0, 4))) for _ in range(rnd.randint(1, 8))]
        include = rnd.random() < 0.5
        checker, got, stopped = StopChecker(stops, include), [], False
        for text in pushes:
            text, stopped = checker.push(text)
            got.append(text)
            if stopped:
                break
        if not stopped:
            got.append(checker.flush())
        assert (got, stopped) == _naive_stop_check(stops, pushes, include), (stops, pushes)


def test_long_stop_strings_cost_little_per_token():
    """The longest stop strings allowed, with text that keeps a partial match of each alive:
    each push is linear in its text (it was quadratic in the stop strings' length)."""
    import time

    from galerne.engine.stop import StopChecker
    from galerne.sampling.params import MAX_STOP, MAX_STOP_CHARS

    stops = tuple(("ab" * MAX_STOP_CHARS)[: MAX_STOP_CHARS - 2] + f"c{i}" for i in range(MAX_STOP))
    checker, emitted = StopChecker(stops), []
    start = time.perf_counter()
    for _ in range(5000):
        text, stopped = checker.push("ab")
        assert not stopped
        emitted.append(text)
    seconds = time.perf_counter() - start
    assert len(checker.pending) == MAX_STOP_CHARS - 2  # the partial match held back
    assert "".join(emitted) + checker.pending == "ab" * 5000
    assert seconds < 1.0  # ~0.1 s; the naive check took ~4 s


# ------------------------------------------------------------------ the detokenizer's set-up and pushes


def _byte_id(tok, b: int) -> int:
    inner = tok.mistral_tokenizer.instruct_tokenizer.tokenizer
    if tok.kind == "sentencepiece":
        return inner._model.piece_to_id(f"<0x{b:02X}>")
    return inner.num_special_tokens + b  # tekken: the 256 bytes come first


@pytest.fixture(scope="module")
def toks():
    from conftest import TOKENIZERS, V3_TOKENIZER

    from galerne.tokenizer import Tokenizer

    return {"v3": Tokenizer.from_path(V3_TOKENIZER), "tekken": Tokenizer.from_path(TOKENIZERS / "tekken_240911.json")}


class CountingDecode:
    """How many ids a tokenizer decodes (the detokenizer's work), while installed."""

    def __init__(self, tok, monkeypatch):
        self.ids = 0
        decode = tok.decode

        def counting(ids, **kwargs):
            self.ids += len(ids)
            return decode(ids, **kwargs)

        monkeypatch.setattr(tok, "decode", counting)


@pytest.mark.parametrize("name", ["v3", "tekken"])
def test_detokenizer_set_up_and_pushes_are_bounded_for_runs_of_bytes(toks, name, monkeypatch):
    """A prompt (or an answer) of bytes that make no text (each <0xE2> alone: every window
    opens on U+FFFD) made the set-up look back over the whole prompt, decoding ever longer
    windows, and the pushes hold their text back in an ever longer window: the square of
    the run's length, per sequence, on the engine's thread."""
    from galerne.tokenizer import IncrementalDetokenizer

    tok = toks[name]
    e2 = _byte_id(tok, 0xE2)
    count = CountingDecode(tok, monkeypatch)
    for length in (1000, 8000):
        count.ids = 0
        detok = IncrementalDetokenizer(tok, [tok.bos_id] + [e2] * length)
        assert count.ids <= 200, (length, count.ids)  # the same few windows, however long the prompt
        count.ids = 0
        text = "".join(detok.push(e2) for _ in range(length)) + detok.flush()
        assert count.ids <= 40 * length, (length, count.ids)  # a bounded window per push
        assert text == "\ufffd" * length


@pytest.mark.parametrize("name", ["v3", "tekken"])
def test_detokenizer_streams_runs_of_bytes_exactly(toks, name):
    """Whatever mix of text, valid and stray bytes: the streamed text is what the ids add
    to the prompt's text, long stray runs (held back, then let go) included."""
    import random

    from galerne.tokenizer import IncrementalDetokenizer

    tok = toks[name]
    rnd = random.Random(0)
    words = tok.encode("Bonjour 🦩 le monde, ça va ? 日本語", bos=False)
    for _ in range(200):
        ids = []
        for _ in range(rnd.randint(1, 6)):
            kind = rnd.random()
            if kind < 0.4:  # stray and lead bytes, in runs up to past the held-back limit
                ids += [_byte_id(tok, rnd.choice([0xE2, 0x82, 0xAC, 0xF0, 0x9F, 0xA6, 0x41]))] * rnd.randint(1, 40)
            elif kind < 0.7:
                ids += words[: rnd.randint(1, len(words))]
            else:  # whole characters, byte by byte
                ids += [_byte_id(tok, b) for b in "€🦩".encode()] * rnd.randint(1, 5)
        prompt = tok.encode(rnd.choice(["Hello", "Bonjour 🦩"]), bos=True) + ids[: rnd.randint(0, 3)]
        detok = IncrementalDetokenizer(tok, prompt)
        streamed = "".join(detok.push(i) for i in ids) + detok.flush()
        assert streamed == tok.decode(prompt + ids)[len(tok.decode(prompt)):], ids


def test_adding_n_sequences_for_a_prompt_of_bytes_is_cheap(tiny_factory, monkeypatch):
    """n = 128 on a prompt of byte tokens: the engine sets up 128 detokenizers under its lock
    (it froze every other stream for 22 s)."""
    llm = LLM(tiny_factory("mistral")[0], device="cpu", max_model_len=512, kv_cache_gb=0.05, block_size=16)
    tok = llm.tokenizer
    prompt = [tok.bos_id] + [_byte_id(tok, 0xE2)] * 500
    count = CountingDecode(tok, monkeypatch)
    request = llm.validate(prompt, SamplingParams(n=128, max_tokens=1))
    llm.engine.add_request(request)
    llm.engine.abort(request.request_id)
    assert count.ids <= 128 * 200, count.ids  # it was 128 x 125,000
