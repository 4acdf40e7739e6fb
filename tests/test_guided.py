"""Guided decoding: random tiny models write garbage, so whatever parses and validates
below does so because of the grammar alone."""

from __future__ import annotations

import json
import re
import shutil

import jsonschema
import pytest
import torch
from conftest import TOKENIZERS, V3_TOKENIZER
from mistral_common.experimental.tools import (
    _decode_tool_calls,
    _split_content_and_tool_calls,
)
from mistral_common.tokens.tokenizers.tekken import Tekkenizer

from galerne import LLM, SamplingParams
from galerne.conversation import Conversation
from galerne.errors import InvalidParameter
from galerne.models.args import ModelArgs
from galerne.models.transformer import Transformer
from galerne.sampling.guided import Guidance, compiler_for, guidance_for_chat
from galerne.tokenizer import Tokenizer


def chat_guidance(tokenizer, **options):
    """The grammar for a one-message chat with ``options`` (tools, tool_choice, ...)."""
    return guidance_for_chat(tokenizer, Conversation.parse([{"role": "user", "content": "hi"}], **options))


SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2},
        "pos": {
            "type": "object",
            "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9}, "ok": {"type": "boolean"}},
            "required": ["x", "ok"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "color", "tags", "pos"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city", "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["c", "f"]}},
        "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object",
        "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                       "b": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["a", "b"], "additionalProperties": False}}},
]
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


def tekken_file(folder, version: str):
    """Mistral-common's shipped tekken vocabulary, declared as ``version``; from v11 on
    with the [ARGS] and [CALL_ID] tokens that version's tool calls use (as real files)."""
    data = json.loads((TOKENIZERS / "tekken_240911.json").read_text())
    data["config"]["version"] = version
    if version not in ("v3", "v7"):
        special = [{"rank": t["rank"], "token_str": str(t["token_str"].value), "is_control": True}
                   for t in Tekkenizer.DEPRECATED_SPECIAL_TOKENS]
        special += [{"rank": i, "token_str": f"<SPECIAL_{i}>", "is_control": True} for i in range(20, 32)]
        special += [{"rank": 32, "token_str": "[ARGS]", "is_control": True},
                    {"rank": 33, "token_str": "[CALL_ID]", "is_control": True}]
        data["special_tokens"] = special
    path = folder / f"tekken_{version}.json"
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(scope="module")
def llms(tiny_factory, tmp_path_factory):
    """name -> LLM: the tiny HF model with the v3 and v7 SentencePiece tokenizers, and a
    tiny model whose vocabulary is larger than tekken's (131072 + 64) with tekken v3 / v11."""
    v3 = LLM(tiny_factory("mistral")[0], device="cpu")
    v7 = LLM.from_model(v3.model, Tokenizer.from_path(TOKENIZERS / "mistral_instruct_tokenizer_241114.model.v7"))
    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=128,
                     vocab_size=131072 + 64, max_seq_len=1024)
    model = Transformer(args).eval()
    with torch.no_grad():
        model.output.weight.normal_(0, 0.3)  # spread logits, as conftest's models
    folder = tmp_path_factory.mktemp("tekken")
    out = {"v3": v3, "v7": v7}
    for version in ("v3", "v11"):
        out[f"tekken-{version}"] = LLM.from_model(model, Tokenizer.from_path(tekken_file(folder, version)))
    return out


def chat_prompt(llm, tools=None):
    return llm.tokenizer.encode_chat(MESSAGES, tools=tools)


def sampled(n: int, guided: Guidance, max_tokens: int, **kw) -> list[SamplingParams]:
    return [SamplingParams(temperature=1.0, seed=seed, max_tokens=max_tokens, guided=guided, **kw) for seed in range(n)]


@pytest.mark.parametrize("name", ["v3", "tekken-v3", "tekken-v11"])
def test_json_schema_output_parses_and_validates(llms, name):
    llm = llms[name]
    guided = chat_guidance(llm.tokenizer, response_format={
        "type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": False}})
    assert guided.kind == "json_schema" and guided.field == "response_format"
    prompt = chat_prompt(llm)
    outs = llm.generate([prompt] * 3, sampled(3, guided, 400))
    texts = set()
    for out in outs:
        o = out.outputs[0]
        assert o.finish_reason == "stop", o.text
        assert max(o.token_ids) < llm.tokenizer.vocab_size  # never an id past the tokenizer's
        jsonschema.validate(json.loads(o.text), SCHEMA)
        texts.add(o.text)
    assert len(texts) > 1  # sampled, not forced into one answer


def test_json_object_gives_an_object(llms):
    llm = llms["v3"]
    tok = llm.tokenizer
    guided = chat_guidance(tok, response_format={"type": "json_object"})
    # Garbage strings end when a quote is drawn, objects when a brace is: make both likely
    # so that the objects close within the budget.
    pieces = {i: tok.decode([i]) for i in range(1000, tok.vocab_size)}
    bias = {i: 10.0 if "}" in p else 6.0 for i, p in pieces.items() if '"' in p or "}" in p}
    outs = llm.generate([chat_prompt(llm)] * 4, sampled(4, guided, 200, logit_bias=bias))
    for out in outs:
        assert out.finish_reason == "stop", out.text
        assert isinstance(json.loads(out.text), dict)


def parse_tool_calls(llm, token_ids: list[int]) -> list:
    """The calls as mistral-common's parser reads them from the ids (the server's way)."""
    tok = llm.tokenizer
    inner = tok.mistral_tokenizer.instruct_tokenizer.tokenizer
    ids = [t for t in token_ids if t != tok.eos_id]
    tool_calls_id = inner.get_special_token("[TOOL_CALLS]")
    assert ids[0] == tool_calls_id  # a forced call starts right away
    content, calls = _split_content_and_tool_calls(ids, tool_calls_id)
    assert content == []
    return _decode_tool_calls(calls, inner)


def raw_json(llm, token_ids: list[int]) -> list[str]:
    """The JSON texts of a forced call as the model wrote them: the list after [TOOL_CALLS]
    (v2-v7), or each call's arguments after [ARGS] (v11+)."""
    tok = llm.tokenizer
    ids = [t for t in token_ids if t != tok.eos_id]
    marker, args = tok.special_token_id("[TOOL_CALLS]"), tok.special_token_id("[ARGS]")
    if tok.tool_call_format == "list":
        return [tok.decode(ids[1:]).strip()]
    texts, cur = [], None
    for t in ids:
        if t == args:
            cur = []
        elif t == marker:
            if cur is not None:
                texts.append(tok.decode(cur).strip())
            cur = None
        elif cur is not None:
            cur.append(t)
    return texts + ([tok.decode(cur).strip()] if cur is not None else [])


@pytest.mark.parametrize("name", ["v3", "v7", "tekken-v3", "tekken-v11"])
@pytest.mark.parametrize("choice", ["required", "any", {"type": "function", "function": {"name": "add"}}])
def test_forced_tool_calls_parse_and_match(llms, name, choice):
    llm = llms[name]
    parallel = name == "tekken-v11"  # v11: another call or EOS after each call
    guided = chat_guidance(llm.tokenizer, tools=TOOLS, tool_choice=choice, parallel_tool_calls=parallel)
    assert guided.kind == "lark"
    outs = llm.generate([chat_prompt(llm, TOOLS)] * 2, sampled(2, guided, 300))
    for out in outs:
        o = out.outputs[0]
        assert o.finish_reason == "stop", llm.tokenizer.decode(o.token_ids)
        calls = parse_tool_calls(llm, o.token_ids)
        assert calls and (parallel or len(calls) == 1)
        for call in calls:
            name_ = call.function.name.strip()  # the v11 grammar allows whitespace before the name
            assert name_ in PARAMETERS and (isinstance(choice, str) or name_ == "add")
            args = call.function.arguments
            jsonschema.validate(json.loads(args) if isinstance(args, str) else args, PARAMETERS[name_])
        # Compact, as Mistral's models write JSON: json.dumps's layout, no free whitespace.
        for text in raw_json(llm, o.token_ids):
            assert text == json.dumps(json.loads(text), ensure_ascii=False), text


def test_tool_calls_or_json_with_tool_choice_auto(llms):
    llm = llms["v3"]
    g = chat_guidance(llm.tokenizer, tools=TOOLS, tool_choice="auto", response_format={"type": "json_object"})
    assert g.kind == "lark" and "%json" in g.spec  # JSON, or the model's tool calls
    assert chat_guidance(llm.tokenizer, tools=TOOLS, tool_choice="none",
                             response_format={"type": "json_object"}).kind == "json_schema"
    for choice in (None, "auto", "none"):
        assert chat_guidance(llm.tokenizer, tools=TOOLS, tool_choice=choice) is None
        assert chat_guidance(llm.tokenizer, tool_choice=choice, response_format={"type": "text"}) is None


def test_regex_greedy_logprobs_and_min_tokens(llms):
    llm = llms["v3"]
    guided = Guidance("regex", r"[0-9]{3}-[a-z]{2}")
    params = SamplingParams(temperature=0, max_tokens=30, logprobs=5, min_tokens=20, guided=guided)
    o = llm.generate([chat_prompt(llm)], params)[0].outputs[0]
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", o.text) and o.finish_reason == "stop"  # the grammar beats min_tokens
    # Logprobs come after the mask: the alternatives are allowed tokens, with finite logprobs.
    first = o.top_logprobs[0]
    assert first and all(lp > float("-inf") for _, lp in first)
    assert all(re.fullmatch(r"[0-9]{1,3}", llm.tokenizer.decode([t])) for t, _ in first)


def test_n_completions_each_follow_the_grammar(llms):
    llm = llms["tekken-v3"]
    guided = Guidance("regex", r"(yes|no|maybe)")
    out = llm.generate([chat_prompt(llm)], SamplingParams(n=6, temperature=1.0, seed=3, max_tokens=10, guided=guided))[0]
    assert all(o.text in ("yes", "no", "maybe") and o.finish_reason == "stop" for o in out.outputs)


def test_preemption_does_not_replay_the_grammar(tiny_factory):
    folder = tiny_factory("mistral")[0]
    guided = Guidance.json_schema(SCHEMA)
    g = torch.Generator().manual_seed(6)
    ps = [torch.randint(3, 32768, (int(k),), generator=g).tolist() for k in torch.randint(20, 30, (6,), generator=g)]
    params = SamplingParams(temperature=0, max_tokens=150, guided=guided)
    expected = [o.token_ids for o in LLM(folder, device="cpu", block_size=4).generate(ps, params)]
    per_block = 2 * 2 * 4 * 2 * 16 * 4  # k+v, layers, block, kv heads, head_dim, fp32
    small = LLM(folder, device="cpu", block_size=4, kv_cache_gb=per_block * 60 / 1e9)
    outs = small.generate(ps, params)
    assert small.engine.stats()["num_preemptions"] > 0
    assert [o.token_ids for o in outs] == expected
    for o in outs:
        assert o.finish_reason == "stop"
        jsonschema.validate(json.loads(o.text), SCHEMA)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kwargs, field", [
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}),
     "response_format.json_schema.schema"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x"}}), "response_format.json_schema.schema"),
    (dict(response_format={"type": "yaml"}), "response_format.type"),
    (dict(tool_choice="required"), "tool_choice"),
    (dict(tool_choice="sometimes", tools=TOOLS), "tool_choice"),
    (dict(tool_choice={"type": "function", "function": {"name": "nope"}}, tools=TOOLS), "tool_choice.function.name"),
    (dict(tool_choice="required", tools=[{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"a": {"type": 3}}}}}]),
     "tools[0].function.parameters"),
])
def test_bad_options_name_the_field(llms, kwargs, field):
    with pytest.raises(InvalidParameter) as e:
        chat_guidance(llms["v3"].tokenizer, **kwargs)
    assert e.value.field == field


def test_bad_guidance_is_rejected_before_queueing(llms):
    llm = llms["v3"]
    with pytest.raises(InvalidParameter) as e:
        Guidance("json_schema", '{"type": 5}', field="response_format")
    assert e.value.field == "response_format"
    with pytest.raises(InvalidParameter) as e:
        Guidance("toml", "x")
    assert e.value.field == "guided"
    with pytest.raises(InvalidParameter) as e:
        SamplingParams(guided="{}")
    assert e.value.field == "guided"
    engine = llm.engine
    with pytest.raises(InvalidParameter) as e:
        engine.add_request(llm.validate([1, 2, 3], SamplingParams(guided=Guidance("lark", "start: foo(", field="grammar"))))
    assert e.value.field == "grammar"
    assert not engine.has_unfinished()


def test_json_schema_with_an_hf_tokenizer(llms, tmp_path):
    pytest.importorskip("google.protobuf", reason="transformers needs protobuf to convert a SentencePiece model")
    transformers = pytest.importorskip("transformers")
    shutil.copy(V3_TOKENIZER, tmp_path / "tokenizer.model")
    transformers.LlamaTokenizer.from_pretrained(tmp_path, legacy=False).save_pretrained(tmp_path / "hf")
    tok = Tokenizer.from_path(tmp_path / "hf")
    assert tok.kind == "hf"
    llm = LLM.from_model(llms["v3"].model, tok)
    guided = chat_guidance(tok, response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}})
    for out in llm.generate([tok.encode("Answer:")] * 2, sampled(2, guided, 400)):
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), SCHEMA)
    with pytest.raises(InvalidParameter) as e:  # its tool-call format is its template's business
        chat_guidance(tok, tools=TOOLS, tool_choice="required")
    assert e.value.field == "tool_choice"


def test_forced_tool_calls_need_a_known_format(llms, tmp_path):
    assert compiler_for(llms["v3"].tokenizer) is compiler_for(llms["v3"].tokenizer)  # one per tokenizer
    v1 = Tokenizer.from_path(TOKENIZERS / "tokenizer.model.v1")
    with pytest.raises(InvalidParameter) as e:
        chat_guidance(v1, tools=TOOLS, tool_choice="required")
    assert e.value.field == "tool_choice"
    # JSON needs no tool format.
    assert chat_guidance(v1, response_format={"type": "json_object"}).kind == "json_schema"


# pydantic's models put sub-models in "$defs" and point at them from the root; a tree
# points at itself ("#"). Inside the calls' grammar each tool's schema lies deeper.
LOCAL_REFS = [
    {"type": "function", "function": {"name": "paint", "parameters": {
        "$defs": {"Colour": {"enum": ["red", "green"]}},
        "type": "object", "properties": {"colour": {"$ref": "#/$defs/Colour"}},
        "required": ["colour"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "tree", "parameters": {
        "type": "object", "properties": {"leaf": {"type": "boolean"},
                                         "kids": {"type": "array", "items": {"$ref": "#"}, "maxItems": 1}},
        "required": ["leaf"], "additionalProperties": False}}},
]


@pytest.mark.parametrize("name", ["v3", "tekken-v11"])
def test_forced_calls_with_local_refs(llms, name):
    llm = llms[name]
    guided = chat_guidance(llm.tokenizer, tools=LOCAL_REFS, tool_choice="required", parallel_tool_calls=False)
    outs = llm.generate([chat_prompt(llm, LOCAL_REFS)] * 2, sampled(2, guided, 300))
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in LOCAL_REFS}
    for out in outs:
        o = out.outputs[0]
        assert o.finish_reason == "stop", llm.tokenizer.decode(o.token_ids)
        (call,) = parse_tool_calls(llm, o.token_ids)
        args = call.function.arguments
        jsonschema.validate(json.loads(args) if isinstance(args, str) else args, schemas[call.function.name.strip()])


# ------------------------------------------------------------------ recursive schemas (issue #12)

# A linked list: recursion with a way out (next is optional).
CHAIN = {"type": "object", "properties": {"v": {"enum": [1, 2]}, "next": {"$ref": "#"}},
         "required": ["v"], "additionalProperties": False}
# As pydantic writes models: definitions under $defs, referred to from the root.
TREE = {"$defs": {"Node": {"type": "object", "properties": {
            "leaf": {"type": "boolean"}, "kids": {"type": "array", "items": {"$ref": "#/$defs/Node"}, "maxItems": 2}},
            "required": ["leaf"], "additionalProperties": False}},
        "type": "object", "properties": {"root": {"$ref": "#/$defs/Node"}}, "required": ["root"],
        "additionalProperties": False}
# No finite JSON matches these: the grammar would never let the answer end.
ENDLESS = [
    {"$ref": "#"},
    {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]},
    {"type": "array", "items": {"$ref": "#"}, "minItems": 1},
    {"$defs": {"x": {"$ref": "#/$defs/y"}, "y": {"allOf": [{"$ref": "#/$defs/x"}]}}, "$ref": "#/$defs/x"},
]


def _schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "r", "schema": schema}}


@pytest.mark.parametrize("name", ["v3", "v7", "tekken-v3", "tekken-v11"])
def test_recursive_schemas_that_can_end_are_allowed(llms, name):
    llm = llms[name]
    for schema in (CHAIN, TREE):
        guided = chat_guidance(llm.tokenizer, response_format=_schema_format(schema))
        outs = llm.generate([chat_prompt(llm)] * 3, sampled(3, guided, 120))
        finished = [o for o in outs if o.outputs[0].finish_reason == "stop"]
        assert finished, [o.outputs[0].text for o in outs]
        for o in finished:
            jsonschema.validate(json.loads(o.outputs[0].text), schema)


@pytest.mark.parametrize("name", ["v3", "v7", "tekken-v3", "tekken-v11"])
def test_a_forced_call_reads_its_tool_s_refs_in_its_own_parameters(llms, name):
    """"#" and "#/$defs/..." in a tool's parameters point into those parameters, in every
    tool-call format, a named choice among several tools too (v2-v7 wrap the arguments in
    a list of calls: see ``embedded``)."""
    llm = llms[name]
    tools = [{"type": "function", "function": {"name": "chain", "parameters": CHAIN}},
             {"type": "function", "function": {"name": "tree", "parameters": TREE}}]
    for fn in ("chain", "tree"):
        guided = chat_guidance(llm.tokenizer, tools=tools, tool_choice={"type": "function", "function": {"name": fn}},
                               parallel_tool_calls=False)
        outs = llm.generate([chat_prompt(llm, tools)] * 3, sampled(3, guided, 150))
        finished = [o.outputs[0] for o in outs if o.outputs[0].finish_reason == "stop"]
        assert finished
        for o in finished:
            (call,) = parse_tool_calls(llm, o.token_ids)
            args = call.function.arguments
            jsonschema.validate(json.loads(args) if isinstance(args, str) else args, CHAIN if fn == "chain" else TREE)
            for text in raw_json(llm, o.token_ids):  # still laid out as json.dumps writes it
                assert text == json.dumps(json.loads(text), ensure_ascii=False), text


@pytest.mark.parametrize("schema", ENDLESS)
def test_a_schema_no_finite_json_matches_is_refused_naming_the_field(llms, schema):
    tok = llms["v3"].tokenizer
    for options, field in [
        (dict(response_format=_schema_format(schema)), "response_format.json_schema.schema"),
        (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": schema}}], tool_choice="required"),
         "tools[0].function.parameters"),
    ]:
        with pytest.raises(InvalidParameter) as e:
            chat_guidance(tok, **options)
        assert e.value.field == field and "no finite JSON value can match" in str(e.value)
    with pytest.raises(InvalidParameter) as e:  # the offline API's Guidance too
        Guidance.json_schema(schema, "guided")
    assert "no finite JSON value can match" in str(e.value)


def test_a_grammar_nothing_can_match_is_refused_before_queueing(llms):
    llm = llms["v3"]
    for spec in ('start: a\na: a "x"', "start: a\na: b\nb: a"):
        with pytest.raises(InvalidParameter, match="no text can match it") as e:
            llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, guided=Guidance("lark", spec, field="grammar")))
        assert e.value.field == "grammar"
    assert not llm.engine.has_unfinished()


def test_a_compile_error_does_not_quote_the_whole_grammar(llms):
    with pytest.raises(InvalidParameter) as e:
        compiler_for(llms["v3"].tokenizer).matcher(Guidance("lark", 'start: "' + "x" * 100_000 + '" foo('))
    assert len(str(e.value)) < 700


def test_the_engine_reuses_what_the_route_compiled(llms, monkeypatch):
    """The route compiles in its worker thread; adding the request (on the engine's
    thread, which every stream waits for) must not compile again, whatever the caches
    kept: the compiled grammar travels with the request's Guidance."""
    llm = llms["v3"]
    compiler = compiler_for(llm.tokenizer)
    guided = chat_guidance(llm.tokenizer, response_format=_schema_format(CHAIN))
    compiler._grammars.clear()
    compiler._protos.clear()

    def no_compiling(*args, **kwargs):
        raise AssertionError("compiled again")

    monkeypatch.setattr(compiler, "compile", no_compiling)
    out = llm.generate([chat_prompt(llm)], SamplingParams(max_tokens=60, temperature=0, guided=guided))[0]
    assert out.outputs[0].token_ids


def test_compiled_grammars_are_cached_by_bytes(llms, monkeypatch):
    """Each cache holds at most its byte budget, keys and values together, whatever the
    number of schemas; one schema bigger than a quarter of it is not kept. No cache key
    holds a request's Guidance (which carries its compiled matcher)."""
    import gc
    import weakref

    from galerne import conversation
    from galerne.cache import ByteLRU
    from galerne.sampling import guided as guided_module

    tok = llms["tekken-v11"].tokenizer  # mistral-common's GrammarFactory renders its grammars
    compiler = compiler_for(tok)
    budget = 400_000
    monkeypatch.setattr(compiler, "_grammars", ByteLRU(budget))
    monkeypatch.setattr(compiler, "_protos", ByteLRU(4 * budget))
    for cached in (conversation._schema_problem, guided_module._compile_problem):
        cached.cache.clear()
        monkeypatch.setattr(cached.cache, "max_bytes", budget)
        monkeypatch.setattr(cached.cache, "max_item_bytes", budget // 4)

    def schema(i: int, props: int) -> dict:
        return {"type": "object", "additionalProperties": False, "properties": {
            f"p{i}_{k}": {"type": "string", "maxLength": 4, "description": "x" * 100} for k in range(props)}}

    alive = []
    for i in range(12):
        for props in (200, 20):  # ~30 KB and ~3 KB of schema
            tools = [{"type": "function", "function": {"name": "f", "parameters": schema(i, props)}}]
            for options in (dict(response_format=_schema_format(schema(i, props))),
                            dict(tools=tools, tool_choice="required")):
                g = chat_guidance(tok, **options)
                alive.append(weakref.ref(g))
                del g
    gc.collect()
    assert not any(ref() is not None for ref in alive)  # nothing keeps a request's Guidance
    for cache in (compiler._grammars, compiler._protos, conversation._schema_problem.cache,
                  guided_module._compile_problem.cache):
        assert 0 < cache.nbytes <= cache.max_bytes, cache
    assert len(compiler._grammars) < 48  # evicted by bytes: 48 grammars were compiled
    big = schema(99, 3000)  # ~400 KB: over a quarter of the budget, compiled but not kept
    before = dict(compiler._grammars._data)
    chat_guidance(tok, response_format=_schema_format(big))
    assert dict(compiler._grammars._data) == before
    # mistral-common keeps no cache of its own of the grammars it renders.
    from mistral_common.guidance import grammar_factory

    assert not hasattr(grammar_factory._cached_get_lark_from_jinja, "cache_info")
