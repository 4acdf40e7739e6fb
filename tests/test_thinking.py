"""Reasoning models: ``[THINK]...[/THINK]`` in the output, parsed once (AnswerParser),
served in both dialects to the real ``openai`` and ``mistralai`` clients, streamed and
not, before content or tool calls; grammars that let the model think first; the
reasoning system prompt and reasoning_effort.

A random model does not think on its own, so the live tests serve "chain" models: real
weights (galerne's Transformer, the real engine, sampler, parser and responders) whose
attention and feed-forward write nothing, so that the next token depends on the current
one alone, and whose output head maps each token of a chosen answer to the next one:
greedy decoding writes that answer after the prompt's last token, ``[/INST]``.
"""

from __future__ import annotations

import itertools
import json

import httpx
import openai
import pytest
import torch
from conftest import tekken_file
from mistralai.client import Mistral
from test_server import KEY, MODEL, LiveServer

from galerne import LLM
from galerne.config import ServerSettings
from galerne.conversation import Conversation
from galerne.models.args import ModelArgs
from galerne.models.transformer import Transformer
from galerne.sampling.guided import compiler_for, guidance_for_chat
from galerne.server import create_app
from galerne.tokenizer import IncrementalDetokenizer, Tokenizer
from galerne.tokenizer.answer import AnswerParser

THOUGHT, ANSWER = "Let me think.", "Hi!"
PING = {"type": "function", "function": {"name": "ping", "description": "is it there?",
                                         "parameters": {"type": "object", "properties": {}}}}
USER = [{"role": "user", "content": "Hello"}]
SYSTEM_PROMPT = "Think first, as below.\n[THINK]\nyour thoughts\n[/THINK]\nThen answer."


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("thinker")
    tekken_file(folder, "v13")
    (folder / "SYSTEM_PROMPT.txt").write_text(SYSTEM_PROMPT)
    return folder


@pytest.fixture(scope="module")
def tok(folder) -> Tokenizer:
    return Tokenizer.from_path(folder)


def special(tok, *names):
    return [tok.special_token_id(n) for n in names]


def think_then(tok, *rest) -> list[int]:
    """[THINK] THOUGHT [/THINK], then ``rest`` (texts, or lists of ids)."""
    ids = [*special(tok, "[THINK]"), *tok.encode(THOUGHT, bos=False), *special(tok, "[/THINK]")]
    for part in rest:
        ids += part if isinstance(part, list) else tok.encode(part, bos=False)
    return ids


def ping_call(tok) -> list[int]:
    return [*special(tok, "[TOOL_CALLS]"), *tok.encode("ping", bos=False), *special(tok, "[ARGS]"),
            *tok.encode("{}", bos=False)]


# ------------------------------------------------------------------ the parser


def parse(tok, ids, *, tools=True, split=1, **kw):
    """Parse ``ids`` pushed ``split`` at a time, each with the text the engine makes of
    them (an IncrementalDetokenizer after a chat prompt); the joined deltas and the parser."""
    parser, detok = AnswerParser(tok, tools=tools, **kw), IncrementalDetokenizer(tok, tok.encode_chat(USER))
    thinking = content = ""
    events = []
    for k in range(0, len(ids), split):
        chunk = ids[k:k + split]
        text = "".join(detok.push(t) for t in chunk)
        d = parser.push(chunk, text + (detok.flush() if k + split >= len(ids) else ""))
        thinking, content, events = thinking + d.thinking, content + d.content, events + d.tool_events
    d = parser.finish("stop")
    return thinking, content + d.content, events + d.tool_events, parser


@pytest.mark.parametrize("split", [1, 2, 3, 100])
def test_thinking_then_content(tok, split):
    thinking, content, events, p = parse(tok, think_then(tok, ANSWER), split=split)
    assert (thinking, content, events) == (THOUGHT, ANSWER, [])
    assert (p.thinking, p.content, p.thought) == (THOUGHT, ANSWER, True)
    assert p.reasoning_tokens == len(tok.encode(THOUGHT, bos=False)) + 2  # with [THINK] and [/THINK]


@pytest.mark.parametrize("split", [1, 4, 100])
def test_thinking_then_tool_call(tok, split):
    thinking, content, events, p = parse(tok, think_then(tok, ping_call(tok)), split=split)
    assert (thinking, content) == (THOUGHT, "")
    assert [(e.kind, e.name) for e in events if e.kind != "args"] == [("begin", "ping"), ("end", "ping")]
    assert [(c.name, c.arguments) for c in p.calls.calls] == [("ping", "{}")]


def test_unclosed_thought_and_no_thinking(tok):
    ids = think_then(tok)[:-1]  # cut before [/THINK] (max_tokens)
    thinking, content, _, p = parse(tok, ids)
    assert (thinking, content, p.thought) == (THOUGHT, "", True)
    # Not parsed where thinking is off (FIM), nor inside a thought for tools.
    thinking, content, _, p = parse(tok, think_then(tok, ANSWER), thinking=False)
    assert (thinking, content, p.thought, p.reasoning_tokens) == ("", THOUGHT + ANSWER, False, 0)
    thinking, content, events, _ = parse(tok, [*special(tok, "[THINK]"), *ping_call(tok), *special(tok, "[/THINK]")])
    assert (thinking, content, events) == ("ping{}", "", [])
    # A prefix whose thought is open: the answer starts inside it.
    thinking, content, _, _ = parse(tok, [*tok.encode(THOUGHT, bos=False), *special(tok, "[/THINK]"),
                                          *tok.encode(ANSWER, bos=False)], in_thought=True)
    assert (thinking, content) == (THOUGHT, ANSWER)


def test_tokenizers_that_do_not_think(tmp_path):
    for version, think in (("v11", True), ("v13", False)):
        tok = Tokenizer.from_path(tekken_file(tmp_path / f"{version}{think}", version, think=think))
        assert not tok.thinks
    assert Tokenizer.from_path(tekken_file(tmp_path / "v15", "v15")).thinks


# ------------------------------------------------------------------ grammars that let the model think


def accepts(tok, guidance, ids) -> bool:
    m = compiler_for(tok).matcher(guidance)
    for t in ids:
        m.advance(t)
        if m.error is not None:
            return False
    return m.is_accepting


def test_forced_tool_call_may_follow_a_thought(tok):
    for choice in ("required", {"type": "function", "function": {"name": "ping"}}):
        g = guidance_for_chat(tok, Conversation.parse(USER, tools=[PING], tool_choice=choice))
        assert accepts(tok, g, think_then(tok, ping_call(tok)))
        assert accepts(tok, g, ping_call(tok))  # thinking is optional
        assert not accepts(tok, g, think_then(tok, ANSWER))


def test_json_may_follow_a_thought(tmp_path):
    # mistral-common's grammars allow a thought before JSON from v15 on (think_with_json);
    # galerne allows it on v13 too (Magistral), so that forced JSON starts after thinking.
    fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": {
        "type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}}}
    for version in ("v15", "v13"):
        tok = Tokenizer.from_path(tekken_file(tmp_path / version, version))
        g = guidance_for_chat(tok, Conversation.parse(USER, response_format=fmt))
        assert accepts(tok, g, tok.encode('{"ok": true}', bos=False))
        assert accepts(tok, g, think_then(tok, '{"ok": true}'))
        assert not accepts(tok, g, think_then(tok, "no json"))
    tok = Tokenizer.from_path(tekken_file(tmp_path / "v13-no-think", "v13", think=False))
    g = guidance_for_chat(tok, Conversation.parse(USER, response_format=fmt))
    assert accepts(tok, g, tok.encode('{"ok": true}', bos=False))


# ------------------------------------------------------------------ live: both clients


def chain_llm(tok: Tokenizer, answer: list[int]) -> LLM:
    """A model that writes ``answer`` then EOS after ``[/INST]`` (see the module's doc)."""
    chain = [*special(tok, "[/INST]"), *answer, tok.eos_id]
    assert len(set(chain[:-1])) == len(chain) - 1, "a token with two successors"
    dim = 64
    assert len(chain) <= dim
    args = ModelArgs(dim=dim, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=64,
                     vocab_size=tok.vocab_size, max_seq_len=1024)
    model = Transformer(args).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for norm in (model.layers[0].attention_norm, model.layers[0].ffn_norm, model.norm):
            norm.weight.fill_(1.0)
        for k, (t, nxt) in enumerate(itertools.pairwise(chain)):
            model.tok_embeddings.weight[t, k] = 1.0  # one-hot: RMS-normed to sqrt(dim) on slot k
            model.output.weight[nxt, k] = 4.0  # its successor's logit: 32; every other token's: 0
    return LLM.from_model(model, tok, kv_cache_gb=0.01, block_size=16)


def serve(llm):
    return LiveServer(create_app(llm, ServerSettings(api_key=[KEY], served_model_name=[MODEL])))


@pytest.fixture(scope="module")
def thinker(tok):
    with serve(chain_llm(tok, think_then(tok, ANSWER))) as server:
        yield server


@pytest.fixture(scope="module")
def caller(folder):
    tok = Tokenizer.from_path(folder)  # its own: one per LLM
    with serve(chain_llm(tok, think_then(tok, ping_call(tok)))) as server:
        yield server


def oai(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def mis(live):
    return Mistral(api_key=KEY, server_url=live.url)


def n_thinking(tok) -> int:
    return len(tok.encode(THOUGHT, bos=False)) + 2


def test_openai_reasoning_content(thinker, tok):
    r = oai(thinker).chat.completions.create(model=MODEL, messages=USER, temperature=0, max_tokens=40)
    m = r.choices[0].message
    assert (m.content, m.reasoning_content, r.choices[0].finish_reason) == (ANSWER, THOUGHT, "stop")
    answer = len(think_then(tok, ANSWER)) + 1  # EOS counts
    assert r.usage.completion_tokens == answer
    assert r.usage.completion_tokens_details.reasoning_tokens == n_thinking(tok)


def test_openai_streams_reasoning_content(thinker, tok):
    stream = oai(thinker).chat.completions.create(model=MODEL, messages=USER, temperature=0, max_tokens=40,
                                                   stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    thinking = [getattr(d, "reasoning_content", None) or "" for d in deltas]
    content = [d.content or "" for d in deltas]
    assert ("".join(thinking), "".join(content)) == (THOUGHT, ANSWER)
    # As generated: every thought piece comes before the first content piece, in several chunks.
    first_content = next(i for i, c in enumerate(content) if c)
    assert sum(bool(t) for t in thinking[:first_content]) > 1 and not any(thinking[first_content:])
    assert chunks[-1].usage.completion_tokens_details.reasoning_tokens == n_thinking(tok)


def test_mistral_thinking_chunks(thinker):
    r = mis(thinker).chat.complete(model=MODEL, messages=USER, temperature=0, max_tokens=40)
    think, text = r.choices[0].message.content
    assert type(think).__name__ == "ThinkChunk" and type(text).__name__ == "TextChunk"
    assert ("".join(t.text for t in think.thinking), text.text) == (THOUGHT, ANSWER)


def test_mistral_streams_thinking_chunks(thinker):
    thinking, content = [], []
    with mis(thinker).chat.stream(model=MODEL, messages=USER, temperature=0, max_tokens=40) as events:
        for event in events:
            c = event.data.choices[0].delta.content
            if isinstance(c, list):
                for chunk in c:
                    assert type(chunk).__name__ in ("ThinkChunk", "TextChunk")
                    if type(chunk).__name__ == "ThinkChunk":
                        thinking += [t.text for t in chunk.thinking]
                    else:
                        content.append(chunk.text)
            elif c:
                content.append(c)
    assert ("".join(thinking), "".join(content)) == (THOUGHT, ANSWER) and len(thinking) > 1


def test_earlier_thoughts_go_back_into_the_prompt(thinker, tok):
    """Each client sends back what it was given: the prompt is mistral-common's."""
    history = [*USER, {"role": "assistant", "content": ANSWER, "reasoning_content": THOUGHT}, *USER]
    r = oai(thinker).chat.completions.create(model=MODEL, messages=history, temperature=0, max_tokens=40)
    assert r.usage.prompt_tokens == len(tok.encode_chat(history))
    first = mis(thinker).chat.complete(model=MODEL, messages=USER, temperature=0, max_tokens=40)
    again = mis(thinker).chat.complete(model=MODEL, temperature=0, max_tokens=40, messages=[
        *USER, {"role": "assistant", "content": first.choices[0].message.content}, *USER])
    assert again.usage.prompt_tokens == r.usage.prompt_tokens


@pytest.mark.parametrize("dialect", ["openai", "mistral"])
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("tool_choice", ["auto", "required"])
def test_a_call_after_a_thought(caller, dialect, stream, tool_choice):
    kw = {"model": MODEL, "messages": USER, "temperature": 0, "max_tokens": 40, "tools": [PING],
          "tool_choice": tool_choice if dialect == "openai" else {"required": "any"}.get(tool_choice, tool_choice)}
    if dialect == "openai" and not stream:
        r = oai(caller).chat.completions.create(**kw)
        m, finish = r.choices[0].message, r.choices[0].finish_reason
        thinking, content, calls = m.reasoning_content, m.content, m.tool_calls
    elif dialect == "openai":
        thinking = content = ""
        calls, finish = [], None
        for c in oai(caller).chat.completions.create(**kw, stream=True):
            d = c.choices[0].delta
            thinking += getattr(d, "reasoning_content", None) or ""
            content += d.content or ""
            calls += d.tool_calls or []
            finish = c.choices[0].finish_reason or finish
    elif not stream:
        r = mis(caller).chat.complete(**kw)
        m, finish = r.choices[0].message, r.choices[0].finish_reason
        (think,), calls, content = m.content, m.tool_calls, ""
        thinking = "".join(t.text for t in think.thinking)
    else:
        thinking, content, calls, finish = "", "", [], None
        with mis(caller).chat.stream(**kw) as events:
            for event in events:
                choice = event.data.choices[0]
                c = choice.delta.content
                if isinstance(c, list):
                    thinking += "".join(t.text for chunk in c for t in chunk.thinking)
                elif isinstance(c, str):
                    content += c
                calls += choice.delta.tool_calls or []
                finish = choice.finish_reason or finish
    assert (thinking, content or "", finish) == (THOUGHT, "", "tool_calls")
    assert [(c.function.name, c.function.arguments) for c in calls] in ([("ping", "{}")], [("ping", {})])


def test_reasoning_prompt_mode(thinker, tok):
    r = mis(thinker).chat.complete(model=MODEL, messages=USER, temperature=0, max_tokens=40, prompt_mode="reasoning")
    with_prompt = [{"role": "system", "content": [
        {"type": "text", "text": "Think first, as below.\n"},
        {"type": "thinking", "thinking": "\nyour thoughts\n", "closed": True},
        {"type": "text", "text": "\nThen answer."}]}, *USER]
    assert r.usage.prompt_tokens == len(tok.encode_chat(with_prompt)) > len(tok.encode_chat(USER))
    assert tok.reasoning_system_prompt() == with_prompt[0]["content"]


def raw(live, body: dict, dialect: str) -> httpx.Response:
    return httpx.post(live.url + "/v1/chat/completions", json={"model": MODEL, "messages": USER, **body},
                      headers={"Authorization": f"Bearer {KEY}", "X-Galerne-Dialect": dialect}, timeout=60)


def test_bad_reasoning_requests_name_the_field(thinker, tmp_path):
    r = raw(thinker, {"reasoning_effort": "extreme"}, "openai")
    assert r.status_code == 400 and r.json()["error"]["param"] == "reasoning_effort"
    r = raw(thinker, {"reasoning_effort": "extreme"}, "mistral")
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "reasoning_effort"
    # A model without thinking-effort settings (v13) ignores a valid one, as vLLM.
    assert raw(thinker, {"reasoning_effort": "high", "max_tokens": 2}, "openai").status_code == 200
    r = raw(thinker, {"messages": [{"role": "user", "content": [{"type": "thinking", "thinking": "x"}]}]}, "openai")
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content[0].type"
    r = raw(thinker, {"messages": [*USER, {"role": "assistant", "content": "a", "reasoning_content": 3}]}, "openai")
    assert r.status_code == 400 and "reasoning_content" in json.dumps(r.json())


def test_prompt_mode_without_a_reasoning_prompt(caller, folder, tmp_path):
    # The caller's tokenizer was loaded from the same folder: hide its prompt for a moment.
    prompt = folder / "SYSTEM_PROMPT.txt"
    prompt.rename(tmp_path / "kept.txt")
    try:
        r = raw(caller, {"prompt_mode": "reasoning"}, "mistral")
    finally:
        (tmp_path / "kept.txt").rename(prompt)
    assert r.status_code == 400 and r.json()["param"] == "prompt_mode"


def test_langchain_clients_get_the_answer_past_the_thinking(thinker, tok):
    """LangChain's Mistral and OpenAI chat models read a thinking model's replies
    (content chunks, reasoning_content) without breaking, streamed and not."""
    from langchain_mistralai import ChatMistralAI
    from langchain_openai import ChatOpenAI

    for chat in (ChatMistralAI(model=MODEL, api_key=KEY, endpoint=thinker.url + "/v1", temperature=0,
                               max_tokens=40, max_retries=0),
                 ChatOpenAI(model=MODEL, api_key=KEY, base_url=thinker.url + "/v1", temperature=0,
                            max_tokens=40, max_retries=0)):
        reply = chat.invoke("Hello")
        assert reply.content == ANSWER
        assert reply.usage_metadata["output_tokens"] == len(think_then(tok, ANSWER)) + 1
        assert "".join(c.content for c in chat.stream("Hello")) == ANSWER
    assert reply.usage_metadata["output_token_details"]["reasoning"] == n_thinking(tok)
