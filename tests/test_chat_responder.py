"""The chat responder on hand-made engine outputs: what the engine says stopped a
choice decides what is content and what has a logprob; tool calls come from one parse
of the ids; a call cut short is "length" with no control text, an output that was no
call after all is returned as it was written."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from conftest import V3_TOKENIZER

from galerne.engine.engine import StepOutput
from galerne.sampling.params import SamplingParams
from galerne.server.chat import ChatResponder
from galerne.server.dialect import Dialect
from galerne.server.serving import Generation
from galerne.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_path(V3_TOKENIZER)


def responder(tok, dialect=Dialect.OPENAI, *, stream=False, tools=True, top_logprobs=None, params=None):
    server = SimpleNamespace(tokenizer=tok, max_model_len=512)
    gen = SimpleNamespace(params=params or SamplingParams(), prompts=[[1, 2, 3]], id="x",
                          num_prompt_tokens=3, num_generated=0, num_cached_tokens=0)
    gen.usage = lambda: Generation.usage(gen)
    return ChatResponder(server, dialect, gen, model="m", stream=stream, tools=tools, top_logprobs=top_logprobs)


def outputs(ids, finish, stop_reason=None, logprobs=False):
    """One StepOutput per id, the last one finishing."""
    outs = []
    for k, t in enumerate(ids):
        last = k == len(ids) - 1
        outs.append(StepOutput("r", 0, "", [t], finish_reason=finish if last else None,
                               stop_reason=stop_reason if last else None,
                               logprobs=[-0.5] if logprobs else None, top_logprobs=[[(t, -0.5)]] if logprobs else None))
    return outs


def message(r, outs):
    for out in outs:
        r.add(0, out)
    return r.body()["choices"][0]


def test_the_stop_token_is_neither_content_nor_logprob_but_an_eos_that_did_not_stop_is(tok):
    ids = tok.encode("Hello", bos=False)
    choice = message(responder(tok, top_logprobs=0), outputs([*ids, tok.eos_id], "stop", tok.eos_id, logprobs=True))
    assert [e["token_id"] for e in choice["logprobs"]["content"]] == ids
    # ignore_eos: the engine did not stop at EOS, so it is a token of the answer like any other
    choice = message(responder(tok, top_logprobs=0, params=SamplingParams(ignore_eos=True)),
                     outputs([*ids, tok.eos_id], "length", None, logprobs=True))
    assert [e["token_id"] for e in choice["logprobs"]["content"]] == [*ids, tok.eos_id]
    assert choice["finish_reason"] == "length"


@pytest.mark.parametrize("dialect", list(Dialect))
def test_complete_calls_then_a_cut_are_length_with_the_calls(tok, dialect):
    marker = tok.special_token_id("[TOOL_CALLS]")
    text = json.dumps([{"name": "f", "arguments": {"a": 1}}, {"name": "g", "arguments": {"b": 2}}])
    ids = [marker, *tok.encode(text, bos=False)]
    cut = ids[: len(ids) - 6]  # inside the second call
    choice = message(responder(tok, dialect), outputs(cut, "length"))
    assert choice["finish_reason"] == "length"
    assert [c["function"]["name"] for c in choice["message"]["tool_calls"]] == ["f"]
    assert not choice["message"]["content"]
    choice = message(responder(tok, dialect), outputs([*ids, tok.eos_id], "stop", tok.eos_id))
    assert choice["finish_reason"] == "tool_calls"
    assert [json.loads(c["function"]["arguments"]) for c in choice["message"]["tool_calls"]] == [{"a": 1}, {"b": 2}]


def test_output_that_is_no_call_is_returned_as_written(tok):
    """Not forced, the model wrote the marker and then no call before EOS: nothing it said
    is dropped (control tokens written out), and it is not a tool call."""
    marker = tok.special_token_id("[TOOL_CALLS]")
    ids = [*tok.encode("Let me see", bos=False), marker, *tok.encode("oops", bos=False)]
    r = responder(tok, stream=True)
    chunks = [c for out in outputs([*ids, tok.eos_id], "stop", tok.eos_id) for c in r.add(0, out)]
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert streamed == "Let me see[TOOL_CALLS]oops" == r.choices[0].answer.content
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert not any("tool_calls" in c["choices"][0]["delta"] for c in chunks)
