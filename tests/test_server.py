"""The HTTP server, end to end: uvicorn on a free loopback port serving a tiny random
model, driven by the official ``openai`` and ``mistralai`` clients.

Random weights write garbage text, so the tests check structure, lengths, finish
reasons, reproducibility, usage numbers and what grammars guarantee.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import jsonschema
import openai
import pytest
import uvicorn
from mistralai.client import Mistral
from mistralai.client import errors as mistral_errors

from galerne import LLM, SamplingParams
from galerne.config import ServerSettings
from galerne.sampling.guided import Guidance, compiler_for
from galerne.server import create_app

KEY = "test-key-1"
MODEL = "tiny-mistral"
USER = [{"role": "user", "content": "Hello there"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "the weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Paris", "Brest"]}, "celsius": {"type": "boolean"}},
            "required": ["city", "celsius"],
            "additionalProperties": False,
        },
    },
}
# Enums and booleans only: a random model finishes them in a few tokens.
SCHEMA = {
    "type": "object",
    "properties": {"colour": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"}},
    "required": ["colour", "ok"],
    "additionalProperties": False,
}


class LiveServer:
    """uvicorn in a background thread on a free loopback port."""

    def __init__(self, app):
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False, lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.app = app

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    @property
    def state(self):
        return self.app.state.server


@pytest.fixture(scope="module")
def live(tiny_factory):
    folder, _ = tiny_factory("mistral")
    llm = LLM(folder, device="cpu", kv_cache_gb=0.02, block_size=16)
    app = create_app(llm, ServerSettings(api_key=[KEY, "other-key"], served_model_name=[MODEL, "alias"]))
    with LiveServer(app) as server:
        yield server


@pytest.fixture(scope="module")
def oai(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def mis(live):
    return Mistral(api_key=KEY, server_url=live.url)


def wait_idle(state, timeout: float = 10.0) -> None:
    """Until the engine runs nothing and holds no KV block."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = state.engine.stats()
        if stats["running"] == 0 and stats["waiting"] == 0 and state.llm.engine.block_manager.num_used_blocks == 0:
            return
        time.sleep(0.02)
    raise AssertionError(f"engine still busy: {state.engine.stats()}, "
                         f"{state.llm.engine.block_manager.num_used_blocks} blocks used")


# ------------------------------------------------------------------ chat, OpenAI client


def test_openai_chat_plain(oai, live):
    r = oai.chat.completions.create(model=MODEL, messages=USER, max_tokens=8, temperature=0)
    assert r.object == "chat.completion" and r.model == MODEL and r.id.startswith("chatcmpl-")
    (c,) = r.choices
    assert c.index == 0 and c.message.role == "assistant" and isinstance(c.message.content, str)
    assert c.finish_reason in ("stop", "length")
    expected_prompt = len(live.state.tokenizer.encode_chat(USER))
    assert r.usage.prompt_tokens == expected_prompt
    assert 1 <= r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_openai_chat_streams_the_same_text(oai):
    kw = dict(model=MODEL, messages=USER, max_tokens=10, temperature=0)
    whole = oai.chat.completions.create(**kw)
    chunks = list(oai.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    # usage: null on every chunk, then a last chunk with no choices and the usage
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_openai_stream_without_usage_option_ends_with_it(live, oai):
    # The last chunk (the finish) carries the usage, as Mistral's API sends it: a Mistral
    # client detected as OpenAI (a plain user agent) still gets it. No other chunk has it.
    chunks = list(oai.chat.completions.create(model=MODEL, messages=USER, max_tokens=3, stream=True))
    assert all(c.usage is None for c in chunks[:-1]) and chunks[-1].choices[0].finish_reason is not None
    assert chunks[-1].usage.completion_tokens == 3
    assert chunks[-1].usage.prompt_tokens == len(live.state.tokenizer.encode_chat(USER))


def test_n_completions(oai):
    r = oai.chat.completions.create(model=MODEL, messages=USER, max_tokens=5, n=3, temperature=1.0, seed=1)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(isinstance(c.message.content, str) for c in r.choices)
    assert 3 <= r.usage.completion_tokens <= 15  # all three completions count
    assert len({c.message.content for c in r.choices}) > 1  # seed + i: different draws
    streamed = list(oai.chat.completions.create(model=MODEL, messages=USER, max_tokens=4, n=2, stream=True))
    finished = sorted(c.choices[0].index for c in streamed if c.choices and c.choices[0].finish_reason)
    assert finished == [0, 1]


def test_seed_reproducibility(oai, mis):
    kw = dict(model=MODEL, messages=USER, max_tokens=12, temperature=1.0)
    a = oai.chat.completions.create(seed=1234, **kw).choices[0].message.content
    b = oai.chat.completions.create(seed=1234, **kw).choices[0].message.content
    c = oai.chat.completions.create(seed=4321, **kw).choices[0].message.content
    assert a == b and a != c
    m1 = mis.chat.complete(random_seed=1234, **kw).choices[0].message.content
    m2 = mis.chat.complete(random_seed=1234, **kw).choices[0].message.content
    assert m1 == m2 == a  # the same seed is the same sampling, whichever the dialect


def test_stop_strings_cut_the_text(oai):
    kw = dict(model=MODEL, messages=USER, max_tokens=24, temperature=0)
    full = oai.chat.completions.create(**kw).choices[0].message.content
    assert len(full) > 6
    stop = full[3:6]
    r = oai.chat.completions.create(stop=[stop], **kw)
    assert r.choices[0].message.content == full[: full.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in oai.chat.completions.create(stream=True, stop=stop, **kw))
    assert streamed == full[: full.index(stop)]


def test_logprobs(oai, live):
    r = oai.chat.completions.create(model=MODEL, messages=USER, max_tokens=6, temperature=0, logprobs=True,
                                    top_logprobs=3, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 6
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
    # greedy: the chosen token is the most likely one
    assert all(e.token == e.top_logprobs[0].token for e in content)
    assert "".join(e.token for e in content).strip() == r.choices[0].message.content.strip()


def test_unknown_fields_and_developer_role_are_accepted(oai):
    r = oai.chat.completions.create(
        model=MODEL, max_completion_tokens=3,
        messages=[{"role": "developer", "content": "Be brief."}, *USER],
        extra_body={"some_future_field": {"x": 1}, "top_k": 5, "repetition_penalty": 1.1},
        presence_penalty=0.5, frequency_penalty=0.5, user="me",
    )
    assert r.usage.completion_tokens <= 3


def test_model_alias_and_unknown_model(oai):
    assert oai.chat.completions.create(model="alias", messages=USER, max_tokens=2).model == MODEL
    with pytest.raises(openai.NotFoundError) as e:
        oai.chat.completions.create(model="gpt-9", messages=USER, max_tokens=2)
    assert e.value.body["code"] == "model_not_found"


# ------------------------------------------------------------------ chat, Mistral client


def test_mistral_chat_plain_and_streamed(mis, live):
    kw = dict(model=MODEL, messages=USER, max_tokens=8, temperature=0)
    r = mis.chat.complete(**kw)
    (c,) = r.choices
    assert c.finish_reason in ("stop", "length") and isinstance(c.message.content, str)
    assert r.usage.prompt_tokens == len(live.state.tokenizer.encode_chat(USER))
    events = list(mis.chat.stream(**kw))
    text = "".join(e.data.choices[0].delta.content or "" for e in events)
    assert text == c.message.content
    # Mistral: the usage rides on the last chunk, which has the finish reason
    last = events[-1].data
    assert last.choices[0].finish_reason == c.finish_reason
    assert last.usage.completion_tokens == r.usage.completion_tokens
    assert all(e.data.usage is None for e in events[:-1])


# Mistral's documented guardrail prompt (docs.mistral.ai, "Guardrailing"), which safe_prompt prepends.
GUARDRAIL = ("Always assist with care, respect, and truth. Respond with utmost utility yet securely. "
             "Avoid harmful, unethical, prejudiced, or negative content. Ensure replies promote fairness and positivity.")


def test_mistral_prefix_and_safe_prompt(mis, live, tiny_factory):
    messages = [*USER, {"role": "assistant", "content": "Sure:", "prefix": True}]
    r = mis.chat.complete(model=MODEL, max_tokens=4, temperature=0, messages=messages)
    # The answer continues the prefix: it is what the model generates after the prompt
    # that ends with it (here from a second LLM on the same weights: the server's engine
    # belongs to its loop).
    ids = live.state.tokenizer.encode_chat(messages)
    assert r.usage.prompt_tokens == len(ids)
    twin = LLM(tiny_factory("mistral")[0], device="cpu")
    assert r.choices[0].message.content == twin.generate([ids], SamplingParams(temperature=0, max_tokens=4))[0].text
    safe = mis.chat.complete(model=MODEL, messages=USER, max_tokens=1, safe_prompt=True)
    guarded = [{"role": "system", "content": GUARDRAIL}, *USER]
    assert safe.usage.prompt_tokens == len(live.state.tokenizer.encode_chat(guarded))


def test_mistral_n_and_model_length(mis):
    r = mis.chat.complete(model=MODEL, messages=USER, max_tokens=3, n=2)
    assert [c.index for c in r.choices] == [0, 1]


# ------------------------------------------------------------------ tools and JSON (grammar)


def _openai_stream_calls(chunks) -> tuple[dict[int, dict], list[str]]:
    calls: dict[int, dict] = {}
    finishes = []
    for ch in chunks:
        if not ch.choices:
            continue
        d = ch.choices[0].delta
        for tc in d.tool_calls or ():
            call = calls.setdefault(tc.index, {"id": None, "name": None, "arguments": ""})
            if tc.id:
                call["id"] = tc.id
            if tc.function and tc.function.name:
                call["name"] = tc.function.name
            if tc.function and tc.function.arguments:
                call["arguments"] += tc.function.arguments
        if ch.choices[0].finish_reason:
            finishes.append(ch.choices[0].finish_reason)
    return calls, finishes


def _check_call(name: str, arguments, call_id: str) -> None:
    assert name == "get_weather"
    args = json.loads(arguments) if isinstance(arguments, str) else arguments
    jsonschema.validate(args, WEATHER["function"]["parameters"])
    assert len(call_id) == 9 and call_id.isalnum()


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_openai_forced_tool_call(oai, choice):
    # Seeded: a grammar bounds the whitespace a random model loves, but not to few tokens.
    kw = dict(model=MODEL, messages=USER, tools=[WEATHER], tool_choice=choice, max_tokens=300, seed=0,
              parallel_tool_calls=False)
    r = oai.chat.completions.create(**kw)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.tool_calls
    for call in c.message.tool_calls:
        _check_call(call.function.name, call.function.arguments, call.id)
    calls, finishes = _openai_stream_calls(oai.chat.completions.create(stream=True, **kw))
    assert finishes == ["tool_calls"] and calls
    for call in calls.values():
        _check_call(call["name"], call["arguments"], call["id"])


def test_mistral_forced_tool_call(mis):
    kw = dict(model=MODEL, messages=USER, tools=[WEATHER], tool_choice="any", max_tokens=300, random_seed=0,
              parallel_tool_calls=False)
    r = mis.chat.complete(**kw)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and len(c.message.tool_calls) == 1
    call = c.message.tool_calls[0]
    _check_call(call.function.name, call.function.arguments, call.id)
    streamed = [tc for e in mis.chat.stream(**kw) for tc in (e.data.choices[0].delta.tool_calls or [])]
    assert len(streamed) == 1  # Mistral streams each call whole
    _check_call(streamed[0].function.name, streamed[0].function.arguments, streamed[0].id)


UNIT = {"type": "function", "function": {"name": "set_unit", "description": "the unit of temperatures", "parameters": {
    "type": "object", "properties": {"unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["unit"], "additionalProperties": False}}}
CONTROL = ("[TOOL_CALLS]", "[ARGS]", "[CALL_ID]", "</s>")


@pytest.mark.parametrize("seed", [None, 0, 1, 2])
def test_an_enum_call_completes_within_32_tokens(oai, mis, seed):
    """Forced JSON is compact: a random model, which would spend its budget on free
    whitespace, completes a one-enum call well within 32 tokens (greedy and sampled)."""
    sampling = dict(temperature=0) if seed is None else dict(temperature=1.0)
    r = oai.chat.completions.create(model=MODEL, messages=USER, tools=[UNIT], tool_choice="required", max_tokens=32,
                                    parallel_tool_calls=False, seed=seed, **sampling)
    m = mis.chat.complete(model=MODEL, messages=USER, tools=[UNIT], tool_choice="any", max_tokens=32,
                          parallel_tool_calls=False, random_seed=seed, **sampling)
    for c in (r.choices[0], m.choices[0]):
        assert c.finish_reason == "tool_calls", c
        (call,) = c.message.tool_calls
        args = call.function.arguments
        assert call.function.name == "set_unit"
        assert json.loads(args) in ({"unit": "celsius"}, {"unit": "fahrenheit"}) if isinstance(args, str) \
            else args in ({"unit": "celsius"}, {"unit": "fahrenheit"})
        if isinstance(args, str):
            assert args == json.dumps(json.loads(args))  # json.dumps's layout, as Mistral's models write it
    assert r.usage.completion_tokens <= 32 and m.usage.completion_tokens <= 32


@pytest.mark.parametrize("max_tokens", [1, 3, 12])
def test_a_forced_call_cut_by_max_tokens_shows_no_control_text(oai, mis, max_tokens):
    """Cut anywhere (at the marker, inside the JSON), the answer says "length" and never
    carries the model's control text as content, in either dialect, streamed or not."""
    kw = dict(model=MODEL, messages=USER, tools=[WEATHER], max_tokens=max_tokens, temperature=0)
    r = oai.chat.completions.create(tool_choice="required", **kw)
    m = mis.chat.complete(tool_choice="any", **kw)
    for c in (r.choices[0], m.choices[0]):
        assert c.finish_reason == "length"
        assert not any(t in (c.message.content or "") for t in CONTROL), c.message.content
    chunks = list(oai.chat.completions.create(tool_choice="required", stream=True, **kw))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert chunks[-1].choices[0].finish_reason == "length" and not any(t in text for t in CONTROL)
    events = [e.data for e in mis.chat.stream(tool_choice="any", **kw)]
    text = "".join(e.choices[0].delta.content or "" for e in events if isinstance(e.choices[0].delta.content, str))
    assert events[-1].choices[0].finish_reason == "length" and not any(t in text for t in CONTROL)


def test_tool_choice_none_and_output_that_is_not_a_call(oai):
    kw = dict(model=MODEL, messages=USER, tools=[WEATHER], max_tokens=4, logit_bias={"5": 100})  # 5: [TOOL_CALLS]
    # auto: the model starts a "call" that max_tokens cuts before anything is called: no call,
    # and no control text as content either
    r = oai.chat.completions.create(**kw)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason == "length"
    assert r.choices[0].message.content == ""
    streamed = list(oai.chat.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == ""
    assert streamed[-1].choices[0].finish_reason == "length"
    # none: [TOOL_CALLS] cannot be drawn, whatever the bias
    r = oai.chat.completions.create(tool_choice="none", **kw)
    assert "[TOOL_CALLS]" not in r.choices[0].message.content and r.choices[0].message.tool_calls is None


def test_tool_history_with_foreign_ids(oai, mis):
    history = [
        *USER,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_Xy12_openai-style", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris", "celsius": true}'}}]},
        {"role": "tool", "tool_call_id": "call_Xy12_openai-style", "content": "21 degrees"},
    ]
    r = oai.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER], max_tokens=4)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    m = mis.chat.complete(model=MODEL, messages=history, tools=[WEATHER], max_tokens=4)
    assert m.usage.prompt_tokens == r.usage.prompt_tokens


def test_json_schema_output_validates(oai, mis):
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}}
    r = oai.chat.completions.create(model=MODEL, messages=USER, response_format=fmt, max_tokens=300, seed=0)
    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
    assert r.choices[0].finish_reason == "stop"
    text = "".join(c.choices[0].delta.content or "" for c in
                   oai.chat.completions.create(model=MODEL, messages=USER, response_format=fmt, max_tokens=300, seed=0,
                                               stream=True))
    jsonschema.validate(json.loads(text), SCHEMA)
    m = mis.chat.complete(model=MODEL, messages=USER, response_format=fmt, max_tokens=300, random_seed=0)
    jsonschema.validate(json.loads(m.choices[0].message.content), SCHEMA)


@pytest.mark.parametrize("extreme", [dict(temperature=1e-45), dict(temperature=1.0, top_p=1e-300),
                                     dict(extra_body={"repetition_penalty": 1e-300})])
def test_extreme_sampling_values_keep_the_grammar(live, oai, extreme):
    """Values that underflow or overflow in float32 act as their limits: the JSON still
    parses and ends with "stop" (it used to be token 0, " ⁇ ", and a broken grammar), and
    top_logprobs leave out what the grammar forbids (it used to be -inf: a 500, and
    -Infinity in a stream, which is not JSON)."""
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}}
    kw = dict(model=MODEL, messages=USER, response_format=fmt, max_tokens=300, seed=0, logprobs=True, top_logprobs=5,
              **extreme)
    r = oai.chat.completions.create(**kw)
    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
    assert r.choices[0].finish_reason == "stop"
    for entry in r.choices[0].logprobs.content:
        assert all(-1e4 < alt.logprob <= 0 for alt in entry.top_logprobs) and entry.top_logprobs
    body = {k: v for k, v in kw.items() if k != "extra_body"} | kw.get("extra_body", {}) | {"stream": True}
    with httpx.stream("POST", live.url + "/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as resp:
        lines = [line[6:] for line in resp.iter_lines() if line.startswith("data: ") and line != "data: [DONE]"]
    # Strict JSON: Python's parser would take -Infinity and NaN.
    chunks = [json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in a stream")) for line in lines]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    jsonschema.validate(json.loads(text), SCHEMA)


def test_json_object_mode(mis, live):
    """A random model writes one endless JSON string, so the answer is cut: what it wrote
    is still, token by token, the start of a JSON object (test_guided sees objects close)."""
    m = mis.chat.complete(model=MODEL, messages=USER, response_format={"type": "json_object"}, max_tokens=40,
                          temperature=0)
    content = m.choices[0].message.content
    assert m.choices[0].finish_reason == "length" and content.startswith("{")
    tok = live.state.tokenizer
    matcher = compiler_for(tok).matcher(Guidance("json_object"))
    for t in tok.encode(content, bos=False):
        matcher.advance(t)
    assert matcher.error is None and not matcher.is_finished


# ------------------------------------------------------------------ FIM, completions, models


def test_fim_both_clients(mis, oai):
    r = mis.fim.complete(model=MODEL, prompt="def add(a, b):\n    return ", suffix="\n\nprint(add(1, 2))",
                         max_tokens=6, temperature=0)
    assert isinstance(r.choices[0].message.content, str) and 1 <= r.usage.completion_tokens <= 6
    events = list(mis.fim.stream(model=MODEL, prompt="def add(a, b):\n    return ", suffix="\n\nprint(add(1, 2))",
                                 max_tokens=6, temperature=0))
    assert "".join(e.data.choices[0].delta.content or "" for e in events) == r.choices[0].message.content
    legacy = oai.completions.create(model=MODEL, prompt="def add(a, b):\n    return ", suffix="\n\nprint(add(1, 2))",
                                    max_tokens=6, temperature=0)
    assert legacy.choices[0].text == r.choices[0].message.content
    assert legacy.usage.prompt_tokens == r.usage.prompt_tokens


def test_legacy_completions(oai):
    r = oai.completions.create(model=MODEL, prompt=["Once upon", "a time"], max_tokens=4, n=2, logprobs=2,
                               echo=True, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text.startswith("Once upon") and r.choices[2].text.startswith("a time")
    # echo: the prompt's tokens come first, the first of them with no logprob
    assert all(c.logprobs.top_logprobs[0] is None and c.logprobs.token_logprobs[0] is None for c in r.choices)
    assert all(len(t) == 2 for c in r.choices for t in c.logprobs.top_logprobs[1:])
    assert [len(c.logprobs.tokens) for c in r.choices] == [len(r.choices[0].logprobs.tokens)] * 2 + \
        [len(r.choices[2].logprobs.tokens)] * 2
    chunks = list(oai.completions.create(model=MODEL, prompt="Once upon", max_tokens=4, temperature=0, stream=True))
    assert "Once upon" + "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text


def test_models(oai, mis, live):
    assert [m.id for m in oai.models.list().data] == [MODEL]
    card = mis.models.list().data[0]
    assert card.id == MODEL and card.capabilities.completion_chat and card.capabilities.function_calling
    assert card.capabilities.completion_fim and card.max_context_length == live.state.max_model_len
    assert oai.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("nope")


def test_health_metrics_and_docs(live, oai):
    oai.chat.completions.create(model=MODEL, messages=USER, max_tokens=2)
    assert httpx.get(live.url + "/health").json()["status"] == "ok"
    text = httpx.get(live.url + "/metrics").text
    for name in ("galerne_requests_total", "galerne_time_to_first_token_seconds_count",
                 "galerne_inter_token_latency_seconds_bucket", "galerne_kv_cache_usage_ratio",
                 "galerne_engine_requests_waiting", "galerne_generation_tokens_total"):
        assert name in text
    spec = httpx.get(live.url + "/openapi.json").json()
    assert "OpenAIChatCompletionRequest" in spec["components"]["schemas"]
    assert "/v1/fim/completions" in spec["paths"]
    assert httpx.get(live.url + "/docs").status_code == 200


# ------------------------------------------------------------------ errors


def test_401_in_each_dialect(live):
    bad = openai.OpenAI(base_url=live.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.chat.completions.create(model=MODEL, messages=USER)
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    with pytest.raises(mistral_errors.SDKError) as m:
        Mistral(api_key="wrong", server_url=live.url).chat.complete(model=MODEL, messages=USER)
    assert m.value.status_code == 401 and json.loads(m.value.body)["object"] == "error"
    r = httpx.get(live.url + "/v1/models")  # no key at all
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(live.url + "/v1/models", headers={"Authorization": "Bearer other-key"}).status_code == 200


def test_prompt_longer_than_the_context(oai, mis, live):
    long = [{"role": "user", "content": "hello " * 600}]
    n = len(live.state.tokenizer.encode_chat(long))
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model=MODEL, messages=long, max_tokens=4)
    msg = e.value.body["message"]
    assert str(n) in msg and str(live.state.max_model_len) in msg and e.value.body["code"] == "context_length_exceeded"
    # OpenAI's wording, which LiteLLM, LangChain and agents that trim their history match on
    assert msg.startswith(f"This model's maximum context length is {live.state.max_model_len} tokens. "
                          f"However, you requested {n + 4} tokens ({n} in the messages, 4 in the completion).")
    assert e.value.body["param"] == "messages"
    with pytest.raises(mistral_errors.SDKError) as m:
        mis.chat.stream(model=MODEL, messages=long, max_tokens=4)  # refused before the stream starts
    assert m.value.status_code == 400 and str(n) in m.value.body
    with pytest.raises(openai.BadRequestError) as e:  # max_tokens past the context
        oai.chat.completions.create(model=MODEL, messages=USER, max_tokens=100_000, stream=True)
    assert e.value.body["param"] == "max_tokens"
    wait_idle(live.state)


def test_bad_values_name_the_field(oai, mis, live):
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model=MODEL, messages=USER, temperature=7)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": 5}])
    assert e.value.body["param"].startswith("messages[0].content")
    with pytest.raises(mistral_errors.HTTPValidationError) as m:
        mis.chat.complete(model=MODEL, messages=USER, top_p=3.0)
    assert m.value.data.detail[0].loc[-1] == "top_p"
    r = httpx.post(live.url + "/v1/chat/completions", content=b"{not json", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]
    deep = '{"a":' * 100_000 + "1" + "}" * 100_000  # deeper than the JSON decoder recurses
    r = httpx.post(live.url + "/v1/chat/completions", content=f'{{"model": "{MODEL}", "metadata": {deep}}}'.encode(),
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and "nested too deeply (more than 128 levels)" in r.json()["error"]["message"]
    for depth in (129, 300, 900):  # past MAX_JSON_DEPTH, within the decoder's recursion or not: the same 400
        deep = "[" * depth + "]" * depth
        r = httpx.post(live.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                       content=f'{{"model": "{MODEL}", "messages": [], "metadata": {deep}}}'.encode())
        assert r.status_code == 400 and "more than 128 levels" in r.json()["error"]["message"], depth
    schema: dict = {"type": "object"}
    for _ in range(40):  # deeper than MAX_SCHEMA_DEPTH (64), within MAX_JSON_DEPTH: the schema's own check
        schema = {"type": "object", "properties": {"a": schema}}
    r = httpx.post(live.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, json={
        "model": MODEL, "messages": USER, "tools": [{"type": "function", "function": {"name": "f", "parameters": schema}}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools[0].function.parameters"
    r = httpx.post(live.url + "/v1/chat/completions", json={"model": MODEL, "messages": USER, "random_seed": "x"},
                   headers={"Authorization": f"Bearer {KEY}"})  # Mistral by its field: 422 with detail
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "random_seed"
    with pytest.raises(openai.BadRequestError) as e:  # the tokenizer's checks name the field too
        oai.chat.completions.create(model=MODEL, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}])
    assert e.value.body["param"] == "messages[0].content[0].image_url"  # a text model: no vision encoder
    assert "no vision encoder" in e.value.body["message"]


# ------------------------------------------------------------------ disconnects


def test_client_disconnect_frees_blocks(live):
    state = live.state
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": MODEL, "messages": USER, "max_tokens": 400, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", live.url + "/v1/chat/completions", json=body, headers=headers) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert json.loads(first[6:])["choices"]
            assert state.engine.stats()["running"] == 1
    wait_idle(state)

    # A non-streamed request is cancelled too when its client goes away.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(live.url + "/v1/chat/completions", json={**body, "stream": False}, headers=headers, timeout=0.5)
    wait_idle(state)
