"""Tokenizer tests: mistral-common parity for chat/tools/FIM, HF chat templates, streaming decode.

The tokenizer files ship inside mistral-common; they are copied into tmp folders under the
names a model folder has, so that folder detection is exercised too.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import mistral_common
import pytest
from conftest import REASONING_SETTINGS, SPM_TOKENIZERS, TEKKEN_VERSIONS, tekken_file
from mistral_common.protocol.fim.request import FIMRequest
from mistral_common.protocol.instruct.chunk import TextChunk, ThinkChunk
from mistral_common.protocol.instruct.messages import (
    AssistantMessage,
    SystemMessage,
    ToolMessage,
    UserMessage,
)
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.tool_calls import (
    Function,
    FunctionCall,
    Tool,
    ToolCall,
)
from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from galerne.conversation import Conversation, mistral_tool_call_id
from galerne.errors import InvalidParameter, TokenizerError
from galerne.tokenizer import IncrementalDetokenizer, Tokenizer
from galerne.tokenizer.base import _find_tokenizer_file

DATA = Path(mistral_common.__file__).parent / "data"
# model-folder name -> file shipped by mistral-common
FILES = {
    "v3": ("tokenizer.model.v3", "mistral_instruct_tokenizer_240323.model.v3"),
    "v7": ("tokenizer.model.v7", "mistral_instruct_tokenizer_241114.model.v7"),
    "tekken": ("tekken.json", "tekken_240911.json"),
}
MISTRAL = list(FILES)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    out = {}
    for name, (folder_name, shipped) in FILES.items():
        folder = tmp_path_factory.mktemp(name)
        shutil.copy(DATA / shipped, folder / folder_name)
        out[name] = folder
    return out


@pytest.fixture(scope="module")
def toks(folders) -> dict[str, Tokenizer]:
    # Loaded once: tekken takes most of a second.
    return {name: Tokenizer.from_path(folder) for name, folder in folders.items()}


@pytest.fixture(scope="module")
def refs() -> dict[str, MistralTokenizer]:
    return {name: MistralTokenizer.from_file(DATA / shipped) for name, (_, shipped) in FILES.items()}


# --------------------------------------------------------------------------- loading


def test_folder_detection(folders, toks):
    assert toks["v3"].kind == "sentencepiece" and toks["v3"].path == folders["v3"] / "tokenizer.model.v3"
    assert toks["tekken"].kind == "tekken" and toks["tekken"].path == folders["tekken"] / "tekken.json"
    for tok in toks.values():
        assert (tok.bos_id, tok.eos_id) == (1, 2)
        assert tok.stop_token_ids() == {2}
    assert toks["v7"].vocab_size == 32768 and toks["tekken"].vocab_size == 131072


def test_folder_preference_order(tmp_path):
    for name in (
        "tokenizer.json",
        "tokenizer.model",
        "tokenizer.model.v7",
        "tokenizer.model.v7m1",
        "tokenizer.model.v11",
    ):
        (tmp_path / name).touch()
    assert _find_tokenizer_file(tmp_path).name == "tokenizer.model.v11"  # numeric, not string, order
    (tmp_path / "tekken.json").touch()
    assert _find_tokenizer_file(tmp_path).name == "tekken.json"


def test_mistral_file_wins_over_tokenizer_json(tmp_path):
    # HF folders of Mistral models ship both; tokenizer.json is never read here.
    shutil.copy(DATA / "tokenizer.model.v1", tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer.json").write_text("not read")
    tok = Tokenizer.from_path(tmp_path)
    assert tok.kind == "sentencepiece" and tok.path.name == "tokenizer.model" and tok.vocab_size == 32000


def test_encode_decode_roundtrip(toks):
    text = "Héllo wörld 🦩 日本語\n  indented"
    for tok in toks.values():
        ids = tok.encode(text)
        assert ids[0] == tok.bos_id and tok.eos_id not in ids
        assert tok.encode(text, bos=False, eos=True) == ids[1:] + [tok.eos_id]
        assert tok.decode(ids + [tok.eos_id]) == text


# --------------------------------------------------------------------------- chat, tools


WEATHER_PARAMS = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
OPENAI_TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Current weather in a city", "parameters": WEATHER_PARAMS},
    }
]


def openai_conversation(call_id: str) -> list[dict]:
    return [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call_id, "content": '{"temperature": 21}'},
        {"role": "user", "content": "And in Lyon? Réponds en français 🙂"},
    ]


def reference_conversation(call_id: str) -> ChatCompletionRequest:
    return ChatCompletionRequest(
        messages=[
            SystemMessage(content="You are a terse assistant."),
            UserMessage(content="Weather in Paris?"),
            AssistantMessage(
                tool_calls=[
                    ToolCall(id=call_id, function=FunctionCall(name="get_weather", arguments='{"city": "Paris"}'))
                ]
            ),
            ToolMessage(tool_call_id=call_id, content='{"temperature": 21}'),
            UserMessage(content="And in Lyon? Réponds en français 🙂"),
        ],
        tools=[
            Tool(
                function=Function(
                    name="get_weather", description="Current weather in a city", parameters=WEATHER_PARAMS
                )
            )
        ],
    )


@pytest.mark.parametrize("name", MISTRAL)
def test_chat_with_tools_matches_mistral_common(name, toks, refs):
    expected = refs[name].encode_chat_completion(reference_conversation("a1b2c3d4e")).tokens
    assert toks[name].encode_chat(openai_conversation("a1b2c3d4e"), OPENAI_TOOLS) == expected


@pytest.mark.parametrize("name", MISTRAL)
def test_foreign_tool_call_id_is_mapped(name, toks, refs):
    foreign = "call_Xy9aB3kL0pQ7rS2t"
    mapped = mistral_tool_call_id(foreign)
    assert re.fullmatch(r"[a-zA-Z0-9]{9}", mapped) and mapped == mistral_tool_call_id(foreign)
    assert mistral_tool_call_id("a1b2c3d4e") == "a1b2c3d4e"  # valid ids are kept
    expected = refs[name].encode_chat_completion(reference_conversation(mapped)).tokens
    assert toks[name].encode_chat(openai_conversation(foreign), OPENAI_TOOLS) == expected


@pytest.mark.parametrize("name", MISTRAL)
def test_assistant_prefix_matches_mistral_common(name, toks, refs):
    request = ChatCompletionRequest(
        messages=[UserMessage(content="Say hi."), AssistantMessage(content="Hi, I am", prefix=True)]
    )
    expected = refs[name].encode_chat_completion(request).tokens
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Say hi."}]},
        {"role": "assistant", "content": "Hi, I am", "prefix": True},
    ]
    assert toks[name].encode_chat(messages) == expected
    assert expected[-1] != toks[name].eos_id


@pytest.mark.parametrize("name", MISTRAL)
def test_developer_role_and_text_parts(name, toks, refs):
    request = ChatCompletionRequest(
        messages=[SystemMessage(content="Be brief."), UserMessage(content=[TextChunk(text="a"), TextChunk(text="b")])]
    )
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
    ]
    assert toks[name].encode_chat(messages) == refs[name].encode_chat_completion(request).tokens


# --------------------------------------------------------------------------- FIM


@pytest.mark.parametrize("name", MISTRAL)  # v3, v7 and tekken all have [PREFIX]/[SUFFIX]
@pytest.mark.parametrize("suffix", ["    return result\n", None])
def test_fim_matches_mistral_common(name, suffix, toks, refs):
    prompt = "def add(a, b):\n    "
    expected = refs[name].encode_fim(FIMRequest(prompt=prompt, suffix=suffix)).tokens
    assert toks[name].encode_fim(prompt, suffix) == expected


@pytest.mark.parametrize("shipped", ["tokenizer.model.v1", "mistral_instruct_tokenizer_240216.model.v2"])
def test_fim_refused_without_fim_tokens(shipped):
    # v2's vocabulary has no [PREFIX]/[SUFFIX]: mistral-common would emit <unk> for them.
    tok = Tokenizer.from_path(DATA / shipped)
    with pytest.raises(TokenizerError, match="fill-in-the-middle"):
        tok.encode_fim("a", "b")


# --------------------------------------------------------------------------- every version
#
# Every tokenizer version mistral-common knows: the SentencePiece files it ships (v1, v2,
# v3, v7) and small tekken files of each tekken version (conftest.tekken_file). galerne's
# prompt must be mistral-common's, token for token, for what each version can write.

VERSIONS = [f"spm-{v}" for v in SPM_TOKENIZERS] + [f"tekken-{v}" for v in TEKKEN_VERSIONS] + ["tekken-v13-nothink"]


def _version_file(folder: Path, name: str) -> Path:
    kind, version, *rest = name.split("-")
    if kind == "spm":
        return SPM_TOKENIZERS[version]
    return tekken_file(folder / name, version, think=not rest)


@pytest.fixture(scope="module")
def versions(tmp_path_factory) -> dict[str, tuple[Tokenizer, MistralTokenizer]]:
    folder = tmp_path_factory.mktemp("versions")
    out = {}
    for name in VERSIONS:
        path = _version_file(folder, name)
        out[name] = (Tokenizer.from_path(path), MistralTokenizer.from_file(path))
    return out


def _same(versions, name, messages, reference: ChatCompletionRequest, tools=None, **options):
    tok, ref = versions[name]
    expected = ref.encode_chat_completion(reference).tokens
    chat = Conversation.parse(messages, tools=tools, **options)
    assert tok.encode_chat(chat) == expected, ref.decode(expected, special_token_policy=SpecialTokenPolicy.KEEP)


@pytest.mark.parametrize("name", VERSIONS)
def test_every_version_system_prompt(name, versions):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    reference = ChatCompletionRequest(messages=[SystemMessage(content="Be brief."), UserMessage(content="Hi"),
                                                AssistantMessage(content="Hello."), UserMessage(content="Bye")])
    _same(versions, name, messages, reference)


@pytest.mark.parametrize("name", [v for v in VERSIONS if v != "spm-v1"])  # v1 has no tools
def test_every_version_tools_calls_and_results(name, versions):
    _same(versions, name, openai_conversation("a1b2c3d4e"), reference_conversation("a1b2c3d4e"), tools=OPENAI_TOOLS)


THINKERS = ["tekken-v13", "tekken-v15"]


def _thinking_reference(closed_prefix: bool | None = None) -> ChatCompletionRequest:
    messages = [UserMessage(content="2+2?"),
                AssistantMessage(content=[ThinkChunk(thinking="add them"), TextChunk(text="4")]),
                UserMessage(content="3+3?")]
    if closed_prefix is not None:
        messages.append(AssistantMessage(content=[ThinkChunk(thinking="so", closed=closed_prefix)], prefix=True))
    return ChatCompletionRequest(messages=messages)


THOUGHT = {  # one earlier thought, in each API's shape
    "mistral": {"role": "assistant", "content": [
        {"type": "thinking", "thinking": [{"type": "text", "text": "add "}, {"type": "text", "text": "them"}]},
        {"type": "text", "text": "4"}]},
    "mistral-common": {"role": "assistant", "content": [{"type": "thinking", "thinking": "add them"},
                                                         {"type": "text", "text": "4"}]},
    "openai": {"role": "assistant", "content": "4", "reasoning_content": "add them"},
    "openai-reasoning": {"role": "assistant", "content": "4", "reasoning": "add them"},
}


@pytest.mark.parametrize("name", THINKERS)
@pytest.mark.parametrize("shape", list(THOUGHT))
def test_thinking_history_matches_mistral_common(name, shape, versions):
    messages = [{"role": "user", "content": "2+2?"}, THOUGHT[shape], {"role": "user", "content": "3+3?"}]
    _same(versions, name, messages, _thinking_reference())


@pytest.mark.parametrize("name", THINKERS)
@pytest.mark.parametrize("closed", [True, False])
def test_thinking_prefix_matches_mistral_common(name, closed, versions):
    messages = [{"role": "user", "content": "2+2?"}, THOUGHT["mistral"], {"role": "user", "content": "3+3?"},
                {"role": "assistant", "content": [{"type": "thinking", "thinking": "so", "closed": closed}],
                 "prefix": True}]
    _same(versions, name, messages, _thinking_reference(closed))
    assert Conversation.parse(messages).open_thinking is not closed


@pytest.mark.parametrize("name", ["tekken-v13-nothink", "tekken-v11", "tekken-v7", "spm-v7"])
def test_thinking_history_refused_where_the_model_cannot_think(name, versions):
    messages = [{"role": "user", "content": "2+2?"}, THOUGHT["openai"], {"role": "user", "content": "3+3?"}]
    with pytest.raises(InvalidParameter) as e:
        versions[name][0].encode_chat(messages)
    assert e.value.field == "messages"


@pytest.mark.parametrize("effort", ["none", "high", None])
def test_reasoning_effort_v15_matches_mistral_common(effort, versions):
    messages = [{"role": "user", "content": "2+2?"}]
    reference = ChatCompletionRequest(messages=[UserMessage(content="2+2?")], reasoning_effort=effort)
    _same(versions, "tekken-v15", messages, reference, reasoning_effort=effort)
    # The default (None) is the file's: written into the prompt all the same.
    tok = versions["tekken-v15"][0]
    text = tok.decode(tok.encode_chat(Conversation.parse(messages, reasoning_effort=effort)), keep_special=True)
    assert text.startswith(f'<s>[MODEL_SETTINGS]{{"reasoning_effort": "{effort or "high"}"}}[/MODEL_SETTINGS]')


def test_reasoning_effort_a_model_does_not_take(versions):
    tok = versions["tekken-v15"][0]
    assert tok.takes_reasoning_effort
    with pytest.raises(InvalidParameter, match="takes none, high") as e:
        tok.encode_chat(Conversation.parse([{"role": "user", "content": "?"}], reasoning_effort="low"))
    assert e.value.field == "reasoning_effort"
    with pytest.raises(InvalidParameter, match="must be one of") as e:
        Conversation.parse([{"role": "user", "content": "?"}], reasoning_effort="extreme")
    assert e.value.field == "reasoning_effort"


@pytest.mark.parametrize("name", [v for v in VERSIONS if v != "tekken-v15"])
def test_reasoning_effort_ignored_where_the_prompt_has_no_place_for_it(name, versions):
    tok, _ = versions[name]
    assert not tok.takes_reasoning_effort
    messages = [{"role": "user", "content": "2+2?"}]
    assert tok.encode_chat(Conversation.parse(messages, reasoning_effort="high")) == tok.encode_chat(messages)


def test_response_format_in_v15_model_settings(tmp_path):
    settings = {**REASONING_SETTINGS, "json_schema": {}}
    path = tekken_file(tmp_path, "v15", settings=settings)
    tok, ref = Tokenizer.from_path(path), MistralTokenizer.from_file(path)
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
    reference = ChatCompletionRequest(messages=[UserMessage(content="?")], response_format=fmt)
    got = tok.encode_chat(Conversation.parse([{"role": "user", "content": "?"}], response_format=fmt))
    assert got == ref.encode_chat_completion(reference).tokens
    assert '"json_schema"' in tok.decode(got)


@pytest.mark.parametrize("name", VERSIONS)
@pytest.mark.parametrize("suffix", ["    return result\n", None])
def test_every_version_fim(name, suffix, versions):
    tok, ref = versions[name]
    prompt = "def add(a, b):\n    "
    if name in ("spm-v1", "spm-v2"):  # no [PREFIX]/[SUFFIX] in these vocabularies
        with pytest.raises(TokenizerError, match="fill-in-the-middle"):
            tok.encode_fim(prompt, suffix)
        return
    expected = ref.encode_fim(FIMRequest(prompt=prompt, suffix=suffix)).tokens
    assert tok.encode_fim(prompt, suffix) == expected
    assert {tok.special_token_id(t) for t in ("[PREFIX]", "[SUFFIX]")} <= set(expected)


def test_thinking_parts_only_where_mistral_common_takes_them():
    for role in ("user", "tool"):
        msg = {"role": role, "content": [{"type": "thinking", "thinking": "x"}], "tool_call_id": "a1b2c3d4e"}
        with pytest.raises(InvalidParameter, match="cannot hold thinking") as e:
            Conversation.parse([msg])
        assert e.value.field == "messages[0].content[0].type"
    bad = [({"type": "thinking", "thinking": 3}, "messages[0].content[0].thinking"),
           ({"type": "thinking", "thinking": [{"type": "image"}]}, "messages[0].content[0].thinking[0]"),
           ({"type": "thinking", "thinking": "x", "closed": "no"}, "messages[0].content[0].closed")]
    for part, field in bad:
        with pytest.raises(InvalidParameter) as e:
            Conversation.parse([{"role": "assistant", "content": [part]}])
        assert e.value.field == field
    both = {"role": "assistant", "content": [{"type": "thinking", "thinking": "a"}], "reasoning_content": "a"}
    with pytest.raises(InvalidParameter, match="once") as e:
        Conversation.parse([both])
    assert e.value.field == "messages[0].reasoning_content"
    with pytest.raises(InvalidParameter, match="differs") as e:
        Conversation.parse([{"role": "assistant", "content": "x", "reasoning_content": "a", "reasoning": "b"}])
    assert e.value.field == "messages[0].reasoning"


# --------------------------------------------------------------------------- HF tokenizer.json

HF_TEMPLATE = (
    "{{ bos_token }}{% if tools %}[TOOLS]{{ tools | tojson }}[/TOOLS]{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}<<SYS>>{{ m['content'] }}<</SYS>>\n"
    "{% elif m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% elif m['role'] == 'assistant' %}"
    "{% if m.tool_calls %}[CALLS]{{ m.tool_calls | tojson }}{% endif %}{{ m['content'] }}"
    "{% if not loop.last %}{{ eos_token }}{% endif %}"
    "{% elif m['role'] == 'tool' %}[RESULT {{ m.name }}]{{ m['content'] }}[/RESULT]"
    "{% else %}{{ raise_exception('unexpected role ' + m['role']) }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %} Answer:{% endif %}"
)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """An HF folder (tokenizer.json + config) converted from the v3 SentencePiece model."""
    pytest.importorskip("google.protobuf", reason="transformers needs protobuf to convert a SentencePiece model")
    transformers = pytest.importorskip("transformers")
    src = tmp_path_factory.mktemp("spm")
    shutil.copy(DATA / FILES["v3"][1], src / "tokenizer.model")
    hf_tok = transformers.LlamaTokenizer.from_pretrained(src, legacy=False)
    hf_tok.chat_template = HF_TEMPLATE
    folder = tmp_path_factory.mktemp("hf")
    hf_tok.save_pretrained(folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 4]}))
    return hf_tok, folder, Tokenizer.from_path(folder)


def test_hf_loads(hf):
    hf_tok, folder, tok = hf
    assert tok.kind == "hf" and tok.path == folder / "tokenizer.json"
    assert (tok.bos_id, tok.eos_id) == (hf_tok.bos_token_id, hf_tok.eos_token_id)
    assert tok.stop_token_ids() == {2, 4}
    text = "Héllo wörld 🦩 日本語\n  indented"
    assert tok.encode(text, bos=False) == hf_tok.encode(text, add_special_tokens=False)
    assert tok.decode(tok.encode(text, eos=True)) == text


def test_hf_chat_matches_transformers(hf):
    hf_tok, _, tok = hf
    messages = openai_conversation("call_abc")
    # Templates read arguments as an object (`| tojson`); we parse the client's JSON string.
    hf_messages = json.loads(json.dumps(messages))
    hf_messages[2]["tool_calls"][0]["function"]["arguments"] = {"city": "Paris"}
    hf_messages[2]["content"] = ""
    hf_messages[3]["name"] = "get_weather"  # we fill a tool result's name from its call
    expected = hf_tok.apply_chat_template(hf_messages, tools=OPENAI_TOOLS, tokenize=True, add_generation_prompt=True)
    assert tok.encode_chat(messages, OPENAI_TOOLS) == list(expected["input_ids"])


def test_hf_prefix_matches_transformers(hf):
    hf_tok, _, tok = hf
    messages = [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi, I am"}]
    expected = hf_tok.apply_chat_template(messages, tokenize=True, continue_final_message=True)
    ours = tok.encode_chat([messages[0], {**messages[1], "prefix": True}])
    assert ours == list(expected["input_ids"])
    assert tok.decode(ours).endswith("Hi, I am")


def test_hf_without_config_or_template(hf, tmp_path):
    _, folder, tok = hf
    with pytest.raises(TokenizerError, match="fill-in-the-middle"):
        tok.encode_fim("a")
    shutil.copy(folder / "tokenizer.json", tmp_path / "tokenizer.json")
    with pytest.raises(TokenizerError, match=f"{re.escape(str(tmp_path))}: no eos_token"):
        Tokenizer.from_path(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    bare = Tokenizer.from_path(tmp_path)
    assert bare.bos_id is None and bare.encode("hi") == tok.encode("hi", bos=False)
    with pytest.raises(TokenizerError, match="no chat template"):
        bare.encode_chat([{"role": "user", "content": "hi"}])


# --------------------------------------------------------------------------- streaming decode

STREAM_TEXT = (
    "Héllo wörld! Ça va? naïve café crème 🦩🎉👩‍👩‍👧 end.\n\n"
    "    indented  double  spaces\n日本語のテキスト、龘 and 𝔘nicode — “quotes” ok"
)


def stream(tok: Tokenizer, ids: list[int], prompt_ids: list[int] = ()) -> list[str]:
    detok = IncrementalDetokenizer(tok, prompt_ids)
    return [detok.push(i) for i in ids] + [detok.flush()]


@pytest.fixture(scope="module", params=["v3", "tekken", "hf"])
def any_tok(request, toks):
    if request.param == "hf":
        return request.getfixturevalue("hf")[2]
    return toks[request.param]


def test_stream_without_prompt(any_tok):
    ids = any_tok.encode(STREAM_TEXT, bos=False)
    pieces = stream(any_tok, ids)
    assert "".join(pieces) == any_tok.decode(ids) == STREAM_TEXT
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces[:-1]  # some character was split across ids and held back


def test_stream_after_prompt_at_every_split(any_tok):
    """Split one encoding at every character boundary: the streamed rest is exactly the rest of
    the text, leading space included (SentencePiece would drop it decoding the rest alone)."""
    ids = any_tok.encode(STREAM_TEXT)
    full = any_tok.decode(ids)
    for k in range(1, len(ids)):
        head = any_tok.decode(ids[:k])
        if head.endswith("\ufffd"):
            continue  # mid-character: the prompt itself would be broken text
        assert "".join(stream(any_tok, ids[k:], ids[:k])) == full[len(head) :], k


def test_stream_first_word_keeps_leading_space(toks):
    tok = toks["v3"]
    ids = tok.encode("The quick brown fox")
    k = len(tok.encode("The quick brown"))
    assert tok.decode(ids[k:]) == "fox"  # alone, SentencePiece drops the space
    assert "".join(stream(tok, ids[k:], ids[:k])) == " fox"


@pytest.mark.parametrize("name", ["v3", "tekken"])
def test_stream_after_chat_prompt(name, toks):
    tok = toks[name]
    prompt = tok.encode_chat([{"role": "user", "content": "Salut"}])
    answer = tok.encode("Bonjour 🦩 !", bos=False) + [tok.eos_id]
    assert "".join(stream(tok, answer, prompt)) == tok.decode(answer) == "Bonjour 🦩 !"


def test_flush_releases_incomplete_character(toks):
    tok = toks["tekken"]
    ids = tok.encode("🦩", bos=False)
    assert len(ids) > 1
    detok = IncrementalDetokenizer(tok)
    assert detok.push(ids[0]) == ""
    assert detok.flush() == tok.decode(ids[:1]) and detok.flush() == ""


# --------------------------------------------------------------------------- errors


def test_error_missing_and_empty(tmp_path):
    with pytest.raises(TokenizerError, match=re.escape(str(tmp_path)) + ".*tekken.json.*tokenizer.json"):
        Tokenizer.from_path(tmp_path)
    with pytest.raises(TokenizerError, match="no-such-model"):
        Tokenizer.from_path(tmp_path / "no-such-model")
    (tmp_path / "vocab.txt").write_text("a")
    with pytest.raises(TokenizerError, match="not a tokenizer file"):
        Tokenizer.from_path(tmp_path / "vocab.txt")


@pytest.mark.parametrize("name", ["tekken.json", "tokenizer.model.v3", "tokenizer.json"])
def test_error_corrupt_file(tmp_path, name):
    (tmp_path / name).write_bytes(b"\x00garbage{not a tokenizer")
    with pytest.raises(TokenizerError, match=re.escape(str(tmp_path / name)) + ": cannot read"):
        Tokenizer.from_path(tmp_path)


BAD_MESSAGES = [
    ([{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}], "messages[1].role", "unknown role 'bot'"),
    ([{"content": "hi"}], "messages[0].role", "missing"),
    ([{"role": "user"}], "messages[0].content", "missing"),
    ([{"role": "user", "content": 3}], "messages[0].content", "string or a list"),
    ([{"role": "user", "content": [{"type": "image_url"}]}], "messages[0].content[0].image_url", "non-empty string"),
    ([{"role": "user", "content": [{"type": "audio"}]}], "messages[0].content[0].type", "text, thinking or image_url"),
    (
        [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [{"id": "a", "function": {}}]}],
        "messages[1].tool_calls[0].function.name",
        "non-empty string",
    ),
    (
        [{"role": "assistant", "content": "x", "prefix": True}, {"role": "user", "content": "hi"}],
        "messages[0].prefix",
        "last message",
    ),
    ([], "messages", "non-empty list"),
    # mistral-common's own validation (conversation must end with user/tool or a prefix)
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}], "messages", "Expected last role"),
]


@pytest.mark.parametrize("messages, field, text", BAD_MESSAGES)
def test_error_bad_messages(toks, messages, field, text):
    with pytest.raises(InvalidParameter, match=re.escape(text)) as info:
        toks["v7"].encode_chat(messages)
    assert info.value.field == field and str(info.value).startswith(f"{field}: ")


def test_error_bad_tools(toks):
    user = [{"role": "user", "content": "hi"}]
    bad_schema = [{"type": "function", "function": {"name": "f", "parameters": {"type": "objectx"}}}]
    with pytest.raises(InvalidParameter, match="invalid JSON schema at type: 'objectx'") as info:
        toks["tekken"].encode_chat(user, bad_schema)
    assert info.value.field == "tools[0].function.parameters"
    with pytest.raises(InvalidParameter, match="must be a string") as info:
        toks["tekken"].encode_chat(user, [{"type": "function", "function": {"name": "f", "description": 3}}])
    assert info.value.field == "tools[0].function.description"
