"""The model's tool calls, parsed from its output ids as they come
(``galerne.tokenizer.toolcalls``), for each tokenizer format; mistral-common's own
parser is the reference where it reads the same ids."""

from __future__ import annotations

import json

import pytest
from conftest import TOKENIZERS
from mistral_common.experimental.tools import _decode_tool_calls

from galerne.tokenizer import Tokenizer
from galerne.tokenizer.toolcalls import ToolCallParser

CALLS = [{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2]}},
         {"name": "get_time", "arguments": {"tz": "CET \"quoted\" {braces}"}}]


def run(parser: ToolCallParser, ids: list[int]):
    """All the events of ``ids`` (the first is the marker), and whether no call came of them."""
    events = [e for t in ids for e in parser.push(t)]
    events += parser.finish()
    return events, not parser.calls


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
    parser = ToolCallParser(tok)
    seen_first_at = None
    for n, t in enumerate(ids):
        if any(e.kind == "end" for e in parser.push(t)) and seen_first_at is None:
            seen_first_at = n
    assert seen_first_at is not None and seen_first_at < len(ids) - 5  # the first call came out before the end
    parser.finish()
    assert [c.complete for c in parser.calls] == [True, True]
    events, not_a_call = run(ToolCallParser(tok), ids)
    assert not not_a_call
    got = calls_of(events)
    assert [(n, a) for n, a, _ in got] == [(c["name"], c["arguments"]) for c in CALLS]
    assert all(len(i) == 9 and i.isalnum() for _, _, i in got)


def test_garbage_after_the_marker_is_text():
    tok = Tokenizer.from_path(TOKENIZERS / "mistral_instruct_tokenizer_240323.model.v3")
    marker = tok.special_token_id("[TOOL_CALLS]")
    parser = ToolCallParser(tok)
    events, not_a_call = run(parser, [marker, *tok.encode("[{\"name\": oops", bos=False)])
    assert events == [] and not_a_call
    assert parser.raw_text().startswith("[TOOL_CALLS]") and "oops" in parser.raw_text()


class CharTokenizer:
    """A v11-style vocabulary: 5 [TOOL_CALLS], 6 [ARGS], 7 [CALL_ID]; id 100 + c is chr(c)."""

    SPECIAL = {5: "[TOOL_CALLS]", 6: "[ARGS]", 7: "[CALL_ID]"}
    tool_call_format = "args"

    def special_token_id(self, name):
        return {v: k for k, v in self.SPECIAL.items()}.get(name)

    def is_special(self, t):
        return t in self.SPECIAL

    def decode(self, ids, *, keep_special=False):
        return "".join(self.SPECIAL[t] if t in self.SPECIAL else chr(t - 100) for t in ids
                       if keep_special or t not in self.SPECIAL)

    def encode(self, text):
        return [100 + ord(c) for c in text]


def test_v11_calls_stream_their_arguments():
    tok = CharTokenizer()
    ids = []
    for c, cid in zip(CALLS, ["abcDEF123", None]):
        ids += [5, *tok.encode(c["name"]), *([7, *tok.encode(cid)] if cid else []), 6, *tok.encode(json.dumps(c["arguments"]))]
    events, not_a_call = run(ToolCallParser(tok), ids)
    assert not not_a_call
    assert sum(e.kind == "args" for e in events) > 10  # arguments arrive piece by piece
    got = calls_of(events)
    assert [(n, a) for n, a, _ in got] == [(c["name"], c["arguments"]) for c in CALLS]
    assert got[0][2] == "abcDEF123" and len(got[1][2]) == 9


@pytest.mark.parametrize("file", ["mistral_instruct_tokenizer_241114.model.v7", "tekken_240911.json"])
def test_list_calls_equal_mistral_commons_parse(file):
    """Ids, names and arguments as mistral-common's own parser reads the same output."""
    tok = Tokenizer.from_path(TOKENIZERS / file)
    marker = tok.special_token_id("[TOOL_CALLS]")
    calls = [dict(CALLS[0], id="abcDEF123"), CALLS[1]]
    ids = [marker, *tok.encode(json.dumps(calls), bos=False)]
    parser = ToolCallParser(tok)
    run(parser, ids)
    reference = _decode_tool_calls([ids[1:]], tok.mistral_tokenizer.instruct_tokenizer.tokenizer)
    assert [(c.name, json.loads(c.arguments)) for c in parser.calls] == \
        [(r.function.name, json.loads(r.function.arguments)) for r in reference]
    assert parser.calls[0].id == "abcDEF123" == reference[0].id


def test_a_call_cut_short_is_incomplete():
    """An "args" call the output cut (max_tokens) keeps what was written and says so;
    a "list" call that never closed is no call at all."""
    tok = CharTokenizer()
    ids = [5, *tok.encode("get_weather"), 6, *tok.encode('{"city": "Par')]
    events, not_a_call = run(ToolCallParser(tok), ids)
    assert not not_a_call and [e.kind for e in events][0] == "begin" and events[-1].kind == "end"
    assert events[-1].arguments == '{"city": "Par'
    v3 = Tokenizer.from_path(TOKENIZERS / "mistral_instruct_tokenizer_240323.model.v3")
    marker = v3.special_token_id("[TOOL_CALLS]")
    parser = ToolCallParser(v3)
    events, not_a_call = run(parser, [marker, *v3.encode('[{"name": "get_weather", "arguments": {"ci', bos=False)])
    assert events == [] and not_a_call


def test_cut_call_is_not_complete():
    tok = CharTokenizer()
    parser = ToolCallParser(tok)
    run(parser, [5, *tok.encode("f"), 6, *tok.encode('{"a": 1}'), 5, *tok.encode("g"), 6, *tok.encode('{"b": ')])
    assert [(c.name, c.complete) for c in parser.calls] == [("f", True), ("g", False)]
