"""Third-party clients, each with its own habits, against a live server: the openai
SDK's stream helper, instructor's partial streaming, LangChain's Mistral and OpenAI
chat models. Each test is what a user of that client writes.

The tiny random model writes garbage, so tool calls and JSON are forced by a grammar
(tool_choice, response_format) and the tests check structure: one call per call,
arguments that parse, usage that adds up.
"""

from __future__ import annotations

import json
from typing import Literal

import httpx
import openai
import pytest
from pydantic import BaseModel, ConfigDict

from galerne import LLM
from galerne.config import ServerSettings
from galerne.server import create_app

from conftest import model_prompt_logprobs
from test_server import KEY, MODEL, USER, WEATHER, LiveServer, _check_call


@pytest.fixture(scope="module")
def live(tiny_factory):
    folder, _ = tiny_factory("mistral")
    llm = LLM(folder, device="cpu", kv_cache_gb=0.02, block_size=16)
    with LiveServer(create_app(llm, ServerSettings(api_key=[KEY], served_model_name=[MODEL]))) as server:
        yield server


@pytest.fixture(scope="module")
def oai(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


FORCED = {"type": "function", "function": {"name": "get_weather"}}


def _raw_chunks(live, body: dict, headers: dict | None = None) -> list[dict]:
    """The stream's chunks as JSON, read with a plain httpx client (no SDK user agent)."""
    headers = {"Authorization": f"Bearer {KEY}", **(headers or {})}
    chunks = []
    with httpx.stream("POST", live.url + "/v1/chat/completions", json={**body, "stream": True}, headers=headers,
                      timeout=60) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    return chunks


# ------------------------------------------------------------------ streamed tool calls


@pytest.mark.parametrize("dialect", ["openai", "mistral"])
def test_each_streamed_call_is_one_whole_entry(live, dialect):
    body = {"model": MODEL, "messages": USER, "tools": [WEATHER], "tool_choice": FORCED, "max_tokens": 300,
            "seed": 0, "parallel_tool_calls": False}
    chunks = _raw_chunks(live, body, {"X-Galerne-Dialect": dialect})
    entries = [tc for ch in chunks for c in ch["choices"] for tc in c["delta"].get("tool_calls") or ()]
    assert len(entries) == 1
    e = entries[0]
    assert e["index"] == 0 and e["type"] == "function"
    _check_call(e["function"]["name"], e["function"]["arguments"], e["id"])
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_openai_stream_helper_sees_one_call(oai):
    """``chat.completions.stream()`` merges deltas by index; it used to see a name-only
    call and an arguments-only call for one call."""
    kw = dict(model=MODEL, messages=USER, tools=[WEATHER], tool_choice=FORCED, max_tokens=300, seed=0,
              parallel_tool_calls=False)
    with oai.chat.completions.stream(**kw) as stream:
        events = [e.type for e in stream]
        final = stream.get_final_completion()
    calls = final.choices[0].message.tool_calls
    assert len(calls) == 1 and final.choices[0].finish_reason == "tool_calls"
    _check_call(calls[0].function.name, calls[0].function.arguments, calls[0].id)
    assert events.count("tool_calls.function.arguments.done") == 1
    assert final.usage is not None and final.usage.completion_tokens > 0


class Paint(BaseModel):
    # additionalProperties: false, as a strict schema: else a random model writes keys forever.
    model_config = ConfigDict(extra="forbid")
    colour: Literal["red", "green", "blue"]
    glossy: bool


@pytest.mark.parametrize("mode", ["TOOLS", "JSON_SCHEMA"])
def test_instructor_partial_streaming(oai, mode):
    instructor = pytest.importorskip("instructor")
    client = instructor.from_openai(oai, mode=getattr(instructor.Mode, mode))
    partials = list(client.chat.completions.create_partial(
        model=MODEL, messages=USER, response_model=Paint, max_tokens=200, seed=0, max_retries=0))
    assert partials, "no partial object"
    final = partials[-1]
    assert final.colour in ("red", "green", "blue") and isinstance(final.glossy, bool)
    whole = client.chat.completions.create(model=MODEL, messages=USER, response_model=Paint, max_tokens=200,
                                           seed=0, max_retries=0)
    assert isinstance(whole, Paint)  # (its prompt names the tool Paint, not PartialPaint: another answer)


# ------------------------------------------------------------------ usage in streams


def test_plain_client_gets_usage_in_last_chunk(live):
    """A Mistral client with a plain user agent is served the OpenAI dialect: the last
    chunk (the finish) still carries the usage, as Mistral's API sends it."""
    chunks = _raw_chunks(live, {"model": MODEL, "messages": USER, "max_tokens": 4, "temperature": 0})
    assert [("usage" in ch and ch["usage"] is not None) for ch in chunks] == [False] * (len(chunks) - 1) + [True]
    last = chunks[-1]
    assert last["choices"][0]["finish_reason"] == "length" and last["usage"]["completion_tokens"] == 4
    # With OpenAI's include_usage: an extra last chunk with no choices, usage null before it.
    chunks = _raw_chunks(live, {"model": MODEL, "messages": USER, "max_tokens": 4, "temperature": 0,
                                "stream_options": {"include_usage": True}})
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4
    assert all(ch["usage"] is None for ch in chunks[:-1])


def test_langchain_mistralai_stream_usage_and_tools(live):
    chat_models = pytest.importorskip("langchain_mistralai.chat_models")
    llm = chat_models.ChatMistralAI(model=MODEL, api_key=KEY, endpoint=live.url + "/v1", max_tokens=5,
                                    temperature=0, max_retries=0)
    chunks = list(llm.stream("Hello there"))
    total = chunks[0]
    for c in chunks[1:]:
        total += c
    whole = llm.invoke("Hello there")
    assert total.content == whole.content
    assert total.usage_metadata is not None and total.usage_metadata["output_tokens"] == 5
    assert total.usage_metadata == whole.usage_metadata

    tools = llm.bind_tools([WEATHER], tool_choice="any")
    streamed = None
    for c in tools.stream("Weather in Paris?", max_tokens=300, random_seed=0):
        streamed = c if streamed is None else streamed + c
    assert len(streamed.tool_calls) == 1 and streamed.tool_calls[0]["name"] == "get_weather"
    assert set(streamed.tool_calls[0]["args"]) == {"city", "celsius"}


def test_langchain_openai_counts_usage_once(live):
    chat_models = pytest.importorskip("langchain_openai")
    llm = chat_models.ChatOpenAI(model=MODEL, api_key=KEY, base_url=live.url + "/v1", max_tokens=5, temperature=0,
                                 max_retries=0)
    whole = llm.invoke("Hello there")
    for stream_usage in (True, False):
        total = None
        for c in llm.stream("Hello there", stream_usage=stream_usage):
            total = c if total is None else total + c
        assert total.content == whole.content
        # Usage comes in one chunk only, whichever way it was asked: never added twice.
        assert total.usage_metadata["output_tokens"] == 5
        assert total.usage_metadata["input_tokens"] == whole.usage_metadata["input_tokens"]


# ------------------------------------------------------------------ scoring: lm-evaluation-harness


def test_lm_eval_loglikelihood(live, oai):
    """What lm-evaluation-harness's local-completions model sends to score a continuation:
    token ids, echo, logprobs 1, max_tokens 1 (it drops the last, generated, entry) or 0;
    the echoed prompt's logprobs are the model's, within 1e-4 of ``LLM.score``."""
    llm, tok = live.state.llm, live.state.tokenizer
    context = tok.encode("The capital of France is", bos=True)
    requests = [context + tok.encode(" Paris", bos=False), context + tok.encode(" a small dog", bos=False)]
    for max_tokens in (1, 0):
        r = oai.completions.create(model=MODEL, prompt=requests, echo=True, logprobs=1, max_tokens=max_tokens,
                                   temperature=0, seed=1234)
        choices = sorted(r.choices, key=lambda c: c.index)
        assert len(choices) == 2
        for ids, choice in zip(requests, choices):
            lp = choice.logprobs
            assert len(lp.token_logprobs) == len(ids) + max_tokens
            assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
            table, expected, _ = model_prompt_logprobs(llm, ids)
            assert lp.token_logprobs[1:len(ids)] == pytest.approx(expected, abs=1e-4)
            # lm-eval's is_greedy: the token's logprob against the best alternative's
            for p in range(1, len(ids)):
                assert max(lp.top_logprobs[p].values()) == pytest.approx(table[p - 1].max().item(), abs=1e-4)
            assert lp.tokens[: len(ids)] == [tok.token_str(t) for t in ids]
            assert choice.text.startswith(tok.decode(ids))
            # offsets into the choice's text: where each token's text starts
            assert [choice.text[: lp.text_offset[p]] for p in range(len(ids))] == \
                [tok.decode(ids[:p]) for p in range(len(ids))]
            assert choice.finish_reason == "length"
        assert r.usage.completion_tokens == 2 * max_tokens


def test_lm_eval_when_the_model_would_stop(live, oai):
    """The generated token is EOS: it still has its entry (lm-eval drops the last entry;
    without it, the continuation's last token was dropped, and a one-token continuation
    scored 0.0)."""
    llm, tok = live.state.llm, live.state.tokenizer
    ids = tok.encode("The capital of Italy is Rome", bos=True)
    eos = tok.eos_id
    r = oai.completions.create(model=MODEL, prompt=ids, echo=True, logprobs=1, max_tokens=1, temperature=0,
                               logit_bias={str(eos): 100})
    lp = r.choices[0].logprobs
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 1
    assert len(lp.token_logprobs) == len(ids) + 1 and lp.tokens[-1] == tok.token_str(eos)
    assert r.choices[0].text == tok.decode(ids)  # EOS has a logprob, not text
    assert lp.text_offset[-1] == len(r.choices[0].text)
    _, expected, _ = model_prompt_logprobs(llm, ids)
    assert sum(lp.token_logprobs[len(ids) - 1:-1]) == pytest.approx(expected[-1], abs=1e-4)


def test_echo_logprobs_stream_as_they_answer(live):
    body = {"model": MODEL, "prompt": "Once upon a time", "echo": True, "logprobs": 2, "max_tokens": 3,
            "temperature": 0, "stream": True}
    whole = httpx.post(live.url + "/v1/completions", json={**body, "stream": False}, timeout=60,
                       headers={"Authorization": f"Bearer {KEY}"}).json()["choices"][0]
    pieces = {"tokens": [], "token_logprobs": []}
    text = ""
    with httpx.stream("POST", live.url + "/v1/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                c = json.loads(line[6:])["choices"][0]
                text += c["text"]
                for key in pieces:
                    pieces[key] += (c["logprobs"] or {}).get(key, [])
    assert text == whole["text"] and pieces["tokens"] == whole["logprobs"]["tokens"]
    assert pieces["token_logprobs"] == pytest.approx(whole["logprobs"]["token_logprobs"])


@pytest.mark.parametrize("route", ["chat", "completions"])
def test_prompt_logprobs_extension(live, oai, route):
    """vLLM's prompt_logprobs: per prompt token, its logprob and rank and the top k."""
    llm, tok = live.state.llm, live.state.tokenizer
    if route == "chat":
        r = oai.chat.completions.create(model=MODEL, messages=USER, max_tokens=2, temperature=0,
                                        extra_body={"prompt_logprobs": 2})
        entries, ids = r.model_extra["prompt_logprobs"], tok.encode_chat(USER)
    else:
        ids = tok.encode("Once upon a time", bos=True)
        r = oai.completions.create(model=MODEL, prompt=ids, max_tokens=2, temperature=0,
                                   extra_body={"prompt_logprobs": 2})
        entries = r.choices[0].model_extra["prompt_logprobs"]
    table, expected, _ = model_prompt_logprobs(llm, ids)
    assert len(entries) == len(ids) and entries[0] is None
    for p, (entry, lp) in enumerate(zip(entries[1:], expected)):
        own = entry[str(ids[p + 1])]
        assert own["logprob"] == pytest.approx(lp, abs=1e-4) and own["decoded_token"] == tok.token_str(ids[p + 1])
        assert own["rank"] == int((table[p] > table[p, ids[p + 1]]).sum()) + 1
        best = table[p].topk(2)
        for rank, (t, v) in enumerate(zip(best.indices.tolist(), best.values.tolist()), 1):
            assert entry[str(t)]["logprob"] == pytest.approx(v, abs=1e-4)
            assert entry[str(t)]["rank"] == rank
