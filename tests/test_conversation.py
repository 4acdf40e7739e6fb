"""The conversation module: one check of messages, tools, tool_choice, response_format
and tool-call ids, whose errors name the field, for every reader of a conversation
(the server's routes, the tokenizers, the grammar compiler, the fine-tuning data)."""

from __future__ import annotations

import json
import re

import pytest
from conftest import V3_TOKENIZER

from galerne.conversation import (
    JSON_OBJECT_SCHEMA,
    MAX_SCHEMA_DEPTH,
    Conversation,
    ToolChoice,
    is_tool_call_id,
    mistral_tool_call_id,
    new_tool_call_id,
)
from galerne.errors import InvalidParameter
from galerne.finetune.data import DataError, encode_sample
from galerne.sampling.guided import guidance_for_chat
from galerne.tokenizer import Tokenizer

USER = {"role": "user", "content": "hi"}
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}}}


@pytest.fixture(scope="module")
def v3():
    return Tokenizer.from_path(V3_TOKENIZER)


def test_parse_normalises_both_apis_spellings():
    chat = Conversation.parse(
        [{"role": "developer", "content": "be brief"}, USER,
         {"role": "assistant", "content": None, "tool_calls": [
             {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]},
         {"role": "tool", "tool_call_id": "call_1", "content": "2"},
         {"role": "assistant", "content": "It is", "prefix": True}],
        tools=[TOOL], tool_choice="any", response_format={"type": "json_object"})
    assert [m["role"] for m in chat.messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert chat.messages[3]["name"] == "f"  # a tool result's name comes from the call it answers
    assert "prefix" not in chat.messages[-1] and chat.continue_final
    assert chat.tool_choice == ToolChoice("required") and chat.forced_tools == [TOOL]
    assert chat.response_schema == JSON_OBJECT_SCHEMA
    named = Conversation.parse([USER], tools=[TOOL], tool_choice={"type": "function", "function": {"name": "f"}})
    assert named.tool_choice == ToolChoice("required", "f") and named.calls_allowed
    assert not Conversation.parse([USER], tools=[TOOL], tool_choice="none").calls_allowed


# (request, field, message, the other readers it reaches: the tokenizer's encode_chat
# takes messages and tools, a training line too, but its content must be a string)
BAD = [
    (dict(messages=[USER, {"role": "assistant", "tool_calls": [{"function": {"name": ""}}]}]),
     "messages[1].tool_calls[0].function.name", "non-empty string", ("tokenizer", "data")),
    (dict(messages=[{"role": "user", "content": [{"type": "audio"}]}]), "messages[0].content[0].type", "text, thinking or image_url",
     ("tokenizer",)),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "objectx"}}}]),
     "tools[0].function.parameters", "invalid JSON schema", ("tokenizer", "data")),
    (dict(tools=[TOOL, TOOL]), "tools[1].function.name", "defined twice", ("tokenizer", "data")),
    (dict(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "g"}}),
     "tool_choice.function.name", "'g' is not one of the tools", ()),
    (dict(tool_choice="any"), "tool_choice", "needs tools", ()),
    (dict(response_format={"type": "json_schema", "json_schema": {"schema": "{oops"}}),
     "response_format.json_schema.schema", "not valid JSON", ()),
    (dict(response_format={"type": "xml"}), "response_format.type", "json_schema", ()),
    (dict(parallel_tool_calls="yes"), "parallel_tool_calls", "boolean", ()),
]


@pytest.mark.parametrize("request_, field, text, readers", BAD)
def test_each_problem_names_its_field_for_every_reader(v3, request_, field, text, readers):
    options = dict(request_)
    messages = options.pop("messages", [USER])
    with pytest.raises(InvalidParameter, match=re.escape(text)) as parsed:
        Conversation.parse(messages, **options)
    assert parsed.value.field == field
    if "tokenizer" in readers:
        with pytest.raises(InvalidParameter) as encoded:
            v3.encode_chat(messages, options.get("tools"))
        assert str(encoded.value) == str(parsed.value)
    if "data" in readers:
        line = {"messages": [*messages, {"role": "assistant", "content": "ok"}], **options}
        with pytest.raises(DataError) as read:
            encode_sample(v3, json.loads(json.dumps(line)))
        assert str(read.value) == str(parsed.value)


@pytest.mark.parametrize("messages, field, text", [
    ([USER, {"role": "assistant", "content": "x", "weight": 2}], "messages[1].weight", "0 or 1"),
    ([USER, {"role": "assistant", "tool_calls": [{"id": "call_1", "function": {"name": "f", "arguments": "{}"}}]},
      {"role": "tool", "tool_call_id": "call_1", "content": "1"}, {"role": "assistant", "content": "x"}],
     "messages[1].tool_calls[0].id", "not 9 alphanumeric"),
    ([USER, {"role": "tool", "tool_call_id": "abcDEF123", "content": "1"}, {"role": "assistant", "content": "x"}],
     "messages[1].tool_call_id", "answers no call"),
    ([USER], "messages[0].role", "not the assistant"),
    # Parts: a user's may be text and images (vision models' data); other roles' are strings.
    ([USER, {"role": "assistant", "content": [{"type": "text", "text": "x"}]}],
     "messages[1].content", "must be a string"),
    ([{"role": "user", "content": [{"type": "thinking", "thinking": "hi"}]}, {"role": "assistant", "content": "x"}],
     "messages[0].content[0]", "text or image_url parts"),
])
def test_training_lines_follow_mistral_finetunes_rules(v3, messages, field, text):
    """What a request may do (foreign call ids, content parts, ending on the user) a
    training line may not: it is written as the model will read it."""
    with pytest.raises(DataError, match=re.escape(f"{field}: ") + ".*" + re.escape(text)):
        encode_sample(v3, {"messages": messages})


def test_tool_call_ids_one_rule():
    assert all(is_tool_call_id(new_tool_call_id()) for _ in range(50))
    assert not is_tool_call_id("call_1") and not is_tool_call_id(None) and is_tool_call_id("a1b2c3d4e")
    foreign = "call_Xy12_openai-style"
    mapped = mistral_tool_call_id(foreign)
    assert is_tool_call_id(mapped) and mapped == mistral_tool_call_id(foreign) != mistral_tool_call_id(foreign + "2")
    assert mistral_tool_call_id("a1b2c3d4e") == "a1b2c3d4e"  # valid ids are kept


def test_the_grammar_reads_the_checked_options(v3):
    """No option is re-read by the grammar: the Conversation decides (a named choice
    forces that function only)."""
    other = {"type": "function", "function": {"name": "g", "parameters": {"type": "object", "properties": {}}}}
    chat = Conversation.parse([USER], tools=[TOOL, other], tool_choice={"type": "function", "function": {"name": "g"}})
    lark = guidance_for_chat(v3, chat).spec
    assert '"g"' in lark and '"f"' not in lark
    assert guidance_for_chat(v3, Conversation.parse([USER], tools=[TOOL])) is None


def nested(levels: int) -> dict:
    """A valid schema whose objects nest ``levels`` deep."""
    schema: dict = {"type": "object"}
    for _ in range(levels - 1):
        schema = {"not": schema}
    return schema


def test_a_schema_nested_too_deeply_is_refused_before_the_checkers_recurse():
    assert Conversation.parse([USER], response_format={"type": "json_schema", "json_schema": {
        "schema": nested(MAX_SCHEMA_DEPTH)}}).response_schema == nested(MAX_SCHEMA_DEPTH)
    for options in (dict(response_format={"type": "json_schema", "json_schema": {"schema": nested(1001)}}),
                    dict(tools=[{"type": "function", "function": {"name": "f", "parameters": nested(MAX_SCHEMA_DEPTH + 1)}}])):
        with pytest.raises(InvalidParameter, match=f"more than {MAX_SCHEMA_DEPTH} deep"):
            Conversation.parse([USER], **options)


@pytest.mark.parametrize("schema, finite", [
    ({"$ref": "#"}, False),
    ({"type": "object", "properties": {"a": {"$ref": "#"}}}, True),  # a may be left out
    ({"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}, False),
    ({"properties": {"a": {"$ref": "#"}}, "required": ["a"]}, True),  # no type: a string matches
    ({"type": "array", "items": {"$ref": "#"}}, True),
    ({"type": "array", "items": {"$ref": "#"}, "minItems": 1}, False),
    ({"type": ["array", "null"], "items": {"$ref": "#"}, "minItems": 1}, True),
    ({"type": "array", "prefixItems": [{"$ref": "#"}], "minItems": 1}, False),
    ({"anyOf": [{"$ref": "#"}, {"type": "null"}]}, True),
    ({"allOf": [{"$ref": "#"}]}, False),
    ({"$defs": {"x": {"$ref": "#/$defs/y"}, "y": {"$ref": "#/$defs/x"}}, "$ref": "#/$defs/x"}, False),
    ({"$defs": {"T": {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#/$defs/T"}}},
                      "required": ["kids"]}}, "$ref": "#/$defs/T"}, True),  # kids: []
    ({"type": "object", "properties": {"a": False}, "required": ["a"]}, False),
    ({"type": "object", "required": ["a"], "additionalProperties": False}, False),
    ({"type": "object", "required": ["a"]}, True),
    ({"$ref": "#/$defs/elsewhere"}, True),  # not followed here: the grammar compiler judges it
])
def test_a_schema_must_admit_a_finite_value(schema, finite):
    as_format = dict(response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": schema}})
    if finite:
        assert Conversation.parse([USER], **as_format).response_schema == schema
        return
    for options, field in [(as_format, "response_format.json_schema.schema"),
                           (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": schema}}]),
                            "tools[0].function.parameters")]:
        with pytest.raises(InvalidParameter) as e:
            Conversation.parse([USER], **options)
        assert e.value.field == field and "no finite JSON value can match" in str(e.value)


def test_byte_lru_is_bounded_by_bytes():
    from galerne.cache import ByteLRU

    cache = ByteLRU(100)
    for i in range(10):
        cache.put(i, str(i), 20)
    assert cache.nbytes == 100 and len(cache) == 5 and 4 not in cache and 5 in cache
    assert cache.get(5) == "5"  # now the most recent: the next put evicts 6
    cache.put("a", "x", 20)
    assert 6 not in cache and 5 in cache and cache.nbytes == 100
    cache.put("big", "y", 26)  # over a quarter of the budget: not kept, nothing evicted
    assert "big" not in cache and len(cache) == 5
    cache.put("a", "z", 5)  # a new value for a key: its size is counted once
    assert cache.get("a") == "z" and cache.nbytes == 85
