"""A request is checked once, by ``engine/request.py``'s ``validate_request``, before it
reaches the engine: each bad value gets the same field and message through ``LLM``,
the OpenAI routes and the Mistral routes, and a spy on the function sees the very
error the caller gets."""

from __future__ import annotations

import sys

import httpx
import pytest
from test_server import LiveServer

from galerne import LLM, SamplingParams
from galerne.config import ServerSettings
from galerne.engine.request import Limits, validate_request
from galerne.errors import InvalidParameter, PromptTooLong
from galerne.server import create_app

CONTEXT = 64
LIMITS = Limits(vocab_size=1000, max_model_len=CONTEXT)
KEY = "k"


def error_of(fn, *args, **kwargs) -> InvalidParameter:
    with pytest.raises(InvalidParameter) as e:
        fn(*args, **kwargs)
    return e.value


# ------------------------------------------------------------------ the function itself


@pytest.mark.parametrize("prompt, params, cls, field, message", [
    ([], SamplingParams(), InvalidParameter, "prompt", "prompt: is empty"),
    ([5] * 65, SamplingParams(max_tokens=1), PromptTooLong, "prompt",
     "This model's maximum context length is 64 tokens. However, you requested 66 tokens (65 in the prompt, "
     "1 in the completion). Please reduce the length of the prompt or completion."),
    ([5] * 64, SamplingParams(), PromptTooLong, "prompt",
     "This model's maximum context length is 64 tokens. However, you requested 65 tokens (64 in the prompt, "
     "1 in the completion). Please reduce the length of the prompt or completion."),
    ([5] * 60, SamplingParams(max_tokens=5), PromptTooLong, "max_tokens",
     "This model's maximum context length is 64 tokens. However, you requested 65 tokens (60 in the prompt, "
     "5 in the completion). Please reduce the length of the prompt or completion."),
    ([5, 1000], SamplingParams(), InvalidParameter, "prompt",
     "prompt: token id 1000 is outside the vocabulary (0..999)"),
    ([5, -1], SamplingParams(), InvalidParameter, "prompt", "prompt: token id -1 is outside the vocabulary (0..999)"),
    ([5, "6"], SamplingParams(), InvalidParameter, "prompt", "prompt: must be a list of token ids (integers)"),
    ([5, 6.0], SamplingParams(), InvalidParameter, "prompt", "prompt: must be a list of token ids (integers)"),
    ([5], SamplingParams(logit_bias={7: 1.0, 1000: -1.0}), InvalidParameter, "logit_bias",
     "logit_bias: token id 1000 is outside the vocabulary (0..999)"),
    ([5] * 60, SamplingParams(min_tokens=5), InvalidParameter, "min_tokens",
     "min_tokens: (5) is more than the 4 tokens the prompt (60 tokens) leaves in the model's context of 64 tokens"),
])
def test_each_bad_value_names_its_field(prompt, params, cls, field, message):
    e = error_of(validate_request, prompt, params, LIMITS)
    assert type(e) is cls and e.field == field and str(e) == message


def test_a_good_request_carries_its_budget():
    r = validate_request([5] * 60, SamplingParams(), LIMITS, adapter="a", request_id="r1")
    assert (r.prompt, r.max_tokens, r.adapter, r.request_id) == ((5,) * 60, 4, "a", "r1")
    assert validate_request([5] * 60, SamplingParams(max_tokens=4), LIMITS).max_tokens == 4
    assert validate_request([5], SamplingParams(), LIMITS).request_id != validate_request([5], SamplingParams(), LIMITS).request_id
    # Scoring (no params) may fill the context, not more; the field is the caller's.
    assert validate_request([5] * 64, None, LIMITS).max_tokens == 0
    e = error_of(validate_request, [5] * 65, None, LIMITS, field="token_ids")
    assert type(e) is PromptTooLong and e.field == "token_ids"


# ------------------------------------------------------------------ one function for every caller


@pytest.fixture
def spy(monkeypatch) -> list[InvalidParameter]:
    """validate_request, wrapped in every galerne module that uses it: the errors it raised."""
    raised: list[InvalidParameter] = []

    def spying(*args, **kwargs):
        try:
            return validate_request(*args, **kwargs)
        except InvalidParameter as e:
            raised.append(e)
            raise

    users = [m for name, m in list(sys.modules.items())
             if name.startswith("galerne") and getattr(m, "validate_request", None) is validate_request]
    assert {m.__name__ for m in users} >= {"galerne.llm", "galerne.server.chat", "galerne.server.openai.routes",
                                           "galerne.server.mistral.routes"}
    for m in users:
        monkeypatch.setattr(m, "validate_request", spying)
    return raised


@pytest.fixture(scope="module")
def llm(tiny_factory):
    return LLM(tiny_factory("mistral")[0], device="cpu", max_model_len=CONTEXT, kv_cache_gb=0.01, block_size=16)


VOCAB = 32768  # the tiny model's tokenizer (tests/conftest.py)
LLM_CASES = {
    "prompt too long": ([5] * 70, SamplingParams(max_tokens=2)),
    "max_tokens past the context": ([5] * 10, SamplingParams(max_tokens=60)),
    "token id outside the vocabulary": ([5, VOCAB], SamplingParams(max_tokens=2)),
    "logit_bias id outside the vocabulary": ([5, 6], SamplingParams(max_tokens=2, logit_bias={VOCAB + 3: 1.0})),
}


@pytest.mark.parametrize("case", LLM_CASES)
def test_llm_rejects_through_the_one_function(llm, spy, case):
    prompt, params = LLM_CASES[case]
    expected = error_of(validate_request, prompt, params, llm.limits)
    spy.clear()
    for call in (lambda: llm.generate([[6, 7], prompt], params), lambda: list(llm.stream(prompt, params))):
        e = error_of(call)
        assert (type(e), e.field, str(e)) == (type(expected), expected.field, str(expected))
        assert spy[-1] is e
    assert not llm.engine.has_unfinished()  # nothing was queued, not even the good prompt before it


def test_llm_chat_and_score_use_it_too(llm, spy):
    long = [{"role": "user", "content": "hello " * 80}]
    e = error_of(llm.chat, long, SamplingParams(max_tokens=2))
    assert type(e) is PromptTooLong and spy[-1] is e
    assert e.prompt_len == len(llm.tokenizer.encode_chat(long))
    assert llm.score([5] * CONTEXT).shape == (CONTEXT, llm.model.args.vocab_size)  # scoring may fill the context
    e = error_of(llm.score, [5] * (CONTEXT + 1))
    assert type(e) is PromptTooLong and e.field == "token_ids" and spy[-1] is e
    e = error_of(llm.score, [5, VOCAB])
    assert e.field == "token_ids" and "outside the vocabulary" in str(e) and spy[-1] is e


# ------------------------------------------------------------------ through both APIs


@pytest.fixture(scope="module")
def live(llm):
    app = create_app(llm, ServerSettings(api_key=[KEY], served_model_name=["m"]))
    with LiveServer(app) as server:
        yield server


def post(live, path: str, body: dict, dialect: str) -> tuple[int, dict]:
    r = httpx.post(live.url + path, json={"model": "m", **body}, timeout=60,
                   headers={"Authorization": f"Bearer {KEY}", "X-Galerne-Dialect": dialect})
    body = r.json()
    if dialect == "openai":
        return r.status_code, body["error"]
    assert body["object"] == "error"  # Mistral's envelope
    return r.status_code, body


LONG_TEXT = "hello " * 80
USER = [{"role": "user", "content": "Hi"}]


def http_cases(tok):
    """(name, dialect, path, body, prompt ids the route encodes, params that matter for the check, prompt field)"""
    chat = tok.encode_chat(USER)
    long_chat = tok.encode_chat([{"role": "user", "content": LONG_TEXT}])
    fim = tok.encode_fim("def f(", "):")
    long_fim = tok.encode_fim(LONG_TEXT, "):")
    text = tok.encode("Once", bos=True)
    bias = {"logit_bias": {str(VOCAB + 3): 1.0}}
    return [
        ("prompt too long", "openai", "/v1/chat/completions", {"messages": [{"role": "user", "content": LONG_TEXT}]},
         long_chat, SamplingParams(), "messages"),
        ("prompt too long", "mistral", "/v1/chat/completions", {"messages": [{"role": "user", "content": LONG_TEXT}]},
         long_chat, SamplingParams(), "messages"),
        # (OpenAI's legacy completions default to max_tokens 16)
        ("prompt too long", "openai", "/v1/completions", {"prompt": [5] * 70}, [5] * 70, SamplingParams(max_tokens=16),
         "prompt"),
        ("prompt too long", "openai", "/v1/completions", {"prompt": [[5, 6], [5] * 70]}, [5] * 70,
         SamplingParams(max_tokens=16), "prompt[1]"),
        ("prompt too long", "mistral", "/v1/fim/completions", {"prompt": LONG_TEXT, "suffix": "):"}, long_fim,
         SamplingParams(), "prompt"),
        ("max_tokens past the context", "openai", "/v1/chat/completions", {"messages": USER, "max_tokens": 100},
         chat, SamplingParams(max_tokens=100), "messages"),
        ("max_tokens past the context", "mistral", "/v1/chat/completions", {"messages": USER, "max_tokens": 100},
         chat, SamplingParams(max_tokens=100), "messages"),
        ("max_tokens past the context", "openai", "/v1/completions", {"prompt": "Once", "max_tokens": 100},
         text, SamplingParams(max_tokens=100), "prompt"),
        ("max_tokens past the context", "mistral", "/v1/fim/completions",
         {"prompt": "def f(", "suffix": "):", "max_tokens": 100}, fim, SamplingParams(max_tokens=100), "prompt"),
        # Token-id prompts and logit_bias exist in OpenAI's API only.
        ("token id outside the vocabulary", "openai", "/v1/completions", {"prompt": [5, VOCAB]}, [5, VOCAB],
         SamplingParams(), "prompt"),
        ("token id outside the vocabulary", "openai", "/v1/completions", {"prompt": [[5], [5, VOCAB]]}, [5, VOCAB],
         SamplingParams(), "prompt[1]"),
        ("logit_bias id outside the vocabulary", "openai", "/v1/chat/completions", {"messages": USER, **bias},
         chat, SamplingParams(**bias), "messages"),
        ("logit_bias id outside the vocabulary", "openai", "/v1/completions", {"prompt": "Once", **bias},
         text, SamplingParams(**bias), "prompt"),
    ]


def test_both_apis_reject_through_the_one_function(live, llm, spy):
    for name, dialect, path, body, ids, params, field in http_cases(llm.tokenizer):
        expected = error_of(validate_request, ids, params, llm.limits, field=field)
        spy.clear()
        status, error = post(live, path, body, dialect)
        where = f"{name}, {dialect} {path}"
        assert status == 400, where
        assert (error["param"], error["message"]) == (expected.field, str(expected)), where
        assert error["code"] == ("context_length_exceeded" if isinstance(expected, PromptTooLong) else "invalid_value")
        assert [(e.field, str(e)) for e in spy] == [(expected.field, str(expected))], where
    stats = live.state.engine.stats()
    assert stats["running"] == stats["waiting"] == 0 and stats["kv_usage"] == 0.0  # nothing reached the engine


def test_both_apis_reject_a_bad_sampling_value_as_sampling_params_does(live, spy):
    # Within each field's wire bounds, but not together: SamplingParams (validated once, when
    # made) refuses it before validate_request runs.
    expected = error_of(SamplingParams, min_tokens=10, max_tokens=5)
    for dialect, path, body in [
        ("openai", "/v1/chat/completions", {"messages": USER}),
        ("mistral", "/v1/chat/completions", {"messages": USER}),
        ("openai", "/v1/completions", {"prompt": "Once"}),
        ("mistral", "/v1/fim/completions", {"prompt": "def f(", "suffix": "):"}),
    ]:
        status, error = post(live, path, {**body, "min_tokens": 10, "max_tokens": 5}, dialect)
        assert status == 400 and (error["param"], error["message"]) == (expected.field, str(expected)), path
    assert spy == []


@pytest.mark.parametrize("prompt", [[], [[]], [[5], []]])
def test_an_empty_prompt_list_or_prompt_is_a_400(live, prompt):
    """No prompt at all (found by the fuzzer: it was a 500), or an empty one among others."""
    status, error = post(live, "/v1/completions", {"prompt": prompt}, "openai")
    assert status == 400 and error["param"] == ("prompt[1]" if len(prompt) == 2 else "prompt")
    assert error["message"].endswith("is empty")
