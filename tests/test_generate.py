"""Generation behaviour: sampling, stops, limits, streaming, CLI."""

from __future__ import annotations

import io

import pytest

from conftest import model_prompt_logprobs
from galerne import LLM, SamplingParams
from galerne.cli import main
from galerne.engine.stop import StopChecker
from galerne.errors import InvalidParameter, PromptTooLong


@pytest.fixture(scope="module")
def llm(tiny_factory):
    folder, _ = tiny_factory("mistral")
    return LLM(folder, device="cpu")


@pytest.fixture(scope="module")
def folder(tiny_factory):
    return tiny_factory("mistral")[0]


def _gen(llm, prompt="Once upon a time", **kw):
    return llm.generate([prompt], SamplingParams(**kw))[0]


def test_seeded_sampling_is_reproducible(llm):
    a = _gen(llm, temperature=1.0, seed=7, max_tokens=24, ignore_eos=True)
    b = _gen(llm, temperature=1.0, seed=7, max_tokens=24, ignore_eos=True)
    c = _gen(llm, temperature=1.0, seed=8, max_tokens=24, ignore_eos=True)
    assert a.token_ids == b.token_ids and a.text == b.text
    assert a.token_ids != c.token_ids


def test_top_k_1_and_tiny_top_p_are_greedy(llm):
    greedy = _gen(llm, temperature=0, max_tokens=16, ignore_eos=True).token_ids
    assert _gen(llm, temperature=1.0, top_k=1, seed=1, max_tokens=16, ignore_eos=True).token_ids == greedy
    assert _gen(llm, temperature=1.0, top_p=1e-9, seed=2, max_tokens=16, ignore_eos=True).token_ids == greedy


def test_stop_string_cuts_the_text(llm):
    full = _gen(llm, temperature=0, max_tokens=40, ignore_eos=True)
    stop = full.text[12:16]
    cut = full.text[: full.text.find(stop)]
    out = _gen(llm, temperature=0, max_tokens=40, ignore_eos=True, stop=[stop])
    assert out.finish_reason == "stop" and out.text == cut and out.stop_reason == stop
    kept = _gen(llm, temperature=0, max_tokens=40, ignore_eos=True, stop=[stop], include_stop_str_in_output=True)
    assert kept.text == cut + stop


def test_stop_token_id_and_length(llm):
    first = _gen(llm, temperature=0, max_tokens=5, ignore_eos=True)
    assert first.finish_reason == "length" and len(first.token_ids) == 5 and first.stop_reason is None
    out = _gen(llm, temperature=0, max_tokens=5, stop_token_ids=[first.token_ids[2]])
    assert out.finish_reason == "stop" and out.token_ids == first.token_ids[:3]
    assert out.stop_reason == first.token_ids[2]  # the engine says which token stopped it


def test_eos_stops_unless_ignored_and_says_so(llm):
    """EOS is the stop_reason where it stopped the answer; with ignore_eos it is a token
    like any other, and a bias that makes it certain shows both."""
    eos = llm.tokenizer.eos_id
    out = _gen(llm, temperature=0, max_tokens=4, logit_bias={eos: 100})
    assert (out.finish_reason, out.stop_reason, out.token_ids) == ("stop", eos, [eos])
    out = _gen(llm, temperature=0, max_tokens=4, logit_bias={eos: 100}, ignore_eos=True)
    assert (out.finish_reason, out.stop_reason, out.token_ids) == ("length", None, [eos] * 4)


def test_stream_concatenates_to_the_full_text(llm):
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    full = llm.generate("Bonjour, je m'appelle", params)[0]
    deltas = list(llm.stream("Bonjour, je m'appelle", params))
    assert "".join(d.text for d in deltas) == full.text
    assert [t for d in deltas for t in d.token_ids] == full.token_ids
    assert deltas[-1].finish_reason == "length" and all(d.finish_reason is None for d in deltas[:-1])
    # Prompt + completion is what the tokenizer decodes from all the tokens: the
    # first word keeps its SentencePiece space, nothing is lost or added.
    assert full.text.startswith(" ")
    assert "Bonjour, je m'appelle" + full.text == llm.tokenizer.decode(full.prompt_token_ids + full.token_ids)


def test_limits_are_errors_not_truncation(llm):
    with pytest.raises(PromptTooLong, match=r"maximum context length is 512 tokens. However, you requested 601 tokens"):
        llm.generate([[5] * 600], SamplingParams(max_tokens=1))
    with pytest.raises(PromptTooLong, match=r"requested 600 tokens \(500 in the prompt, 100 in the completion\)") as e:
        llm.generate([[5] * 500], SamplingParams(max_tokens=100))
    assert e.value.field == "max_tokens"
    with pytest.raises(InvalidParameter, match=r"prompt: token id 40000 is outside the vocabulary"):
        llm.generate([[5, 40000]], SamplingParams(max_tokens=1))


def test_max_tokens_none_runs_to_the_context(llm):
    out = llm.generate([[5] * 500], SamplingParams(temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 12 and out.finish_reason == "length"


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(temperature=-1), "temperature"),
        (dict(temperature="hot"), "temperature"),
        (dict(top_p=0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(max_tokens=-1), "max_tokens"),
        (dict(prompt_logprobs=21), "prompt_logprobs"),
        (dict(seed=1.5), "seed"),
        (dict(stop=["ok", ""]), "stop[1]"),
        (dict(stop_token_ids=[-1]), "stop_token_ids[0]"),
    ],
)
def test_sampling_params_name_the_bad_field(kwargs, field):
    with pytest.raises(InvalidParameter) as e:
        SamplingParams(**kwargs)
    assert e.value.field == field and str(e.value).startswith(field + ":")


def test_stop_checker_holds_back_partial_matches():
    s = StopChecker(("</end>",))
    assert s.push("Hello </") == ("Hello ", False)
    assert s.push("en") == ("", False)
    assert s.push("d> tail") == ("", True)
    s = StopChecker(("</end>",))
    assert s.push("a </") == ("a ", False)
    assert s.push("b") == ("</b", False)
    assert s.flush() == ""
    s = StopChecker(("xy", "abc"))
    assert s.push("zzab") == ("zz", False)
    assert s.push("cxy") == ("", True)


def test_chat_uses_the_template(llm):
    msgs = [{"role": "user", "content": "Hi"}]
    out = llm.chat(msgs, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    assert out.prompt_token_ids == llm.tokenizer.encode_chat(msgs)
    assert len(out.token_ids) == 8


def test_cli_generate_streams_the_completion(folder, llm, capsys):
    code = main(["generate", str(folder), "--prompt", "Once upon a time", "--max-tokens", "12",
                 "--temperature", "0", "--ignore-eos", "--device", "cpu"])
    assert code == 0
    expected = _gen(llm, temperature=0, max_tokens=12, ignore_eos=True).text
    assert capsys.readouterr().out == expected + "\n"


def test_cli_chat_reads_turns_from_stdin(folder, llm, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello there\n/reset\nSecond question\n/exit\nNot read\n"))
    code = main(["chat", str(folder), "--max-tokens", "6", "--temperature", "0", "--ignore-eos"])
    assert code == 0
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    hello, second = ({"role": "user", "content": text} for text in ("Hello there", "Second question"))
    first = llm.chat([hello], params)[0].text
    fresh = llm.chat([second], params)[0].text
    continued = llm.chat([hello, {"role": "assistant", "content": first}, second], params)[0].text
    assert fresh != continued  # else a /reset that kept the history would pass unseen
    # One answer per question; after /reset the second question starts a new conversation;
    # /reset and /exit print nothing, and nothing after /exit is read.
    assert capsys.readouterr().out == first + "\n" + fresh + "\n"


def test_cli_rejects_bad_sampling_values(folder, capsys):
    assert main(["generate", str(folder), "--prompt", "x", "--top-p", "2"]) == 1
    assert "top_p: must be <= 1.0" in capsys.readouterr().err


# ------------------------------------------------------------------ prompt logprobs (scoring)


@pytest.mark.parametrize("engine", [
    dict(),  # the prompt in one chunk
    dict(max_num_batched_tokens=16, block_size=16),  # in chunks of 16 tokens, in several steps
    dict(max_num_batched_tokens=7, block_size=16),  # chunks that straddle the 512-row slices never: still exact
])
def test_prompt_logprobs_are_the_models_scores(tiny_factory, engine):
    folder, _ = tiny_factory("mistral")
    llm = LLM(folder, device="cpu", **engine)
    ids = llm.tokenizer.encode("The quick brown fox jumps over the lazy dog " * 6, bos=True)
    table, lps, ranks = model_prompt_logprobs(llm, ids)
    # A cached prefix is there (the same prompt ran before), and must not be used.
    llm.generate([ids], SamplingParams(max_tokens=2, temperature=0))
    for max_tokens in (0, 3):
        out = llm.generate([ids], SamplingParams(max_tokens=max_tokens, temperature=0, prompt_logprobs=3, n=2))[0]
        got = out.prompt_logprobs
        assert len(got) == len(ids) and got[0] is None
        assert [g.logprob for g in got[1:]] == pytest.approx(lps, abs=1e-4)
        assert [g.rank for g in got[1:]] == ranks
        for p, g in enumerate(got[1:]):
            top = table[p].topk(3)
            assert [t for t, _ in g.top] == top.indices.tolist()
            assert [v for _, v in g.top] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert [len(c.token_ids) for c in out.outputs] == [max_tokens, max_tokens]
        assert all(c.finish_reason == "length" for c in out.outputs)
    assert llm.engine.block_manager.num_used_blocks == 0


def test_max_tokens_0_scores_a_prompt_that_fills_the_context(llm):
    ids = [1] + [5] * (llm.max_model_len - 1)
    out = llm.generate([ids], SamplingParams(max_tokens=0, prompt_logprobs=0))[0]
    assert out.outputs[0].token_ids == [] and out.outputs[0].text == "" and out.finish_reason == "length"
    _, lps, _ = model_prompt_logprobs(llm, ids)
    assert [g.logprob for g in out.prompt_logprobs[1:]] == pytest.approx(lps, abs=1e-4)
    assert all(g.top == [] for g in out.prompt_logprobs[1:])
    with pytest.raises(PromptTooLong):  # one token more does not fit, even to score it
        llm.generate([ids + [5]], SamplingParams(max_tokens=0))


def test_prompt_logprobs_survive_preemption(tiny_factory):
    """Sequences preempted mid-prompt recompute it: their scores are not added twice."""
    folder, _ = tiny_factory("mistral")
    per_block = 2 * 2 * 16 * 2 * 16 * 4  # k+v, layers, block, kv heads, head_dim, fp32
    llm = LLM(folder, device="cpu", block_size=16, max_num_batched_tokens=32, kv_cache_gb=per_block * 12 / 1e9)
    ids = [llm.tokenizer.encode(f"{i} little pigs went to the market and came back " * 4, bos=True) for i in range(4)]
    outs = llm.generate(ids, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, prompt_logprobs=0))
    assert llm.engine.scheduler.num_preemptions > 0
    for p, out in zip(ids, outs):
        _, lps, _ = model_prompt_logprobs(llm, p)
        assert len(out.prompt_logprobs) == len(p)
        assert [g.logprob for g in out.prompt_logprobs[1:]] == pytest.approx(lps, abs=1e-4)


def test_cli_chat_near_the_end_of_the_context_answers_shorter(folder, llm, monkeypatch, capsys):
    """The default --max-tokens (256) is more than a long conversation leaves: the REPL
    answers with the room left and says so, where it used to refuse the turn."""
    question = "word " * 480
    ids = llm.tokenizer.encode_chat([{"role": "user", "content": question}])
    room = llm.max_model_len - len(ids)
    assert 0 < room < 256
    monkeypatch.setattr("sys.stdin", io.StringIO(question + "\n"))
    assert main(["chat", str(folder), "--temperature", "0", "--ignore-eos"]) == 0
    out, err = capsys.readouterr()
    assert f"room for {room} more tokens" in err and "error" not in err
    expected = llm.chat([{"role": "user", "content": question}],
                        SamplingParams(temperature=0, max_tokens=room, ignore_eos=True))[0].text
    assert out == expected + "\n"
