"""Invariants of the paged, continuously batched engine, on tiny random models."""

from __future__ import annotations

import asyncio

import pytest
import torch
from dense_reference import DenseGenerator

from galerne import LLM, SamplingParams
from galerne.errors import InvalidParameter

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def prompts(n: int, seed: int = 0, lo: int = 3, hi: int = 70) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [torch.randint(3, 32768, (k,), generator=g).tolist() for k in lens]


def tokens(outs) -> list[list[int]]:
    return [o.token_ids for o in outs]


@pytest.fixture(scope="module")
def folder(tiny_factory):
    return tiny_factory("mistral")[0]


def make(folder, **engine) -> LLM:
    engine.setdefault("block_size", 4)
    return LLM(folder, device="cpu", **engine)


@pytest.fixture(scope="module")
def llm(folder):
    return make(folder)


def test_paged_equals_dense_reference(llm):
    dense = DenseGenerator(llm.model, llm.tokenizer, llm.max_model_len)
    for p in prompts(3, seed=1):
        expected = [t for d in dense.stream(p, GREEDY) for t in d.token_ids]
        assert llm.generate([p], GREEDY)[0].token_ids == expected


def test_batched_equals_one_at_a_time(llm):
    ps = prompts(8, seed=2)
    together = tokens(llm.generate(ps, GREEDY))
    alone = [llm.generate([p], GREEDY)[0].token_ids for p in ps]
    assert together == alone


def test_chunked_prefill_equals_one_shot(folder, llm):
    ps = prompts(4, seed=3, lo=40, hi=90)
    one_shot = tokens(llm.generate(ps, GREEDY))
    chunked = make(folder, max_num_batched_tokens=16)  # every prompt is split over several steps
    assert tokens(chunked.generate(ps, GREEDY)) == one_shot
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=0)
    a, b = llm.generate(ps[:1], params)[0].outputs[0], chunked.generate(ps[:1], params)[0].outputs[0]
    assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4)


def test_prefix_cache_hit_equals_miss(folder):
    shared = prompts(1, seed=4, lo=40, hi=41)[0]
    ps = [shared + [100 + i] * 5 for i in range(3)]
    cached = make(folder)
    first = tokens(cached.generate(ps[:1], GREEDY))
    hits = cached.generate(ps, GREEDY)
    stats = cached.engine.stats()
    uncached = make(folder, enable_prefix_caching=False)
    assert tokens(hits) == tokens(uncached.generate(ps, GREEDY))
    assert tokens(hits)[0] == first[0]
    assert stats["prefix_cache_hit_rate"] > 0.5


def test_sliding_window_past_its_window_equals_transformers(tiny_factory):
    folder, ref = tiny_factory("mistral-window")  # window 16
    llm = make(folder)  # blocks of 4: out-of-window blocks are released
    g = torch.Generator().manual_seed(5)
    prompt = torch.randint(3, 32768, (40,), generator=g)
    with torch.no_grad():
        expected = ref.generate(prompt[None], max_new_tokens=48, min_new_tokens=48, do_sample=False, pad_token_id=0)[0, 40:].tolist()
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    assert llm.generate([prompt.tolist()], params)[0].token_ids == expected
    # A window model holds a bounded number of blocks whatever the length.
    bm = llm.engine.block_manager
    assert bm.num_used_blocks == 0 and bm.num_free_blocks == bm.num_blocks


def test_preemption_and_recompute_give_the_same_tokens(folder, llm):
    ps = prompts(6, seed=6, lo=20, hi=30)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    expected = tokens(llm.generate(ps, params))
    # About 3 sequences' worth of blocks for 6 sequences: some must be preempted.
    per_block = 2 * 2 * 4 * 2 * 16 * 4  # k+v, layers, block, kv heads, head_dim, fp32
    small = make(folder, kv_cache_gb=per_block * 60 / 1e9)
    assert tokens(small.generate(ps, params)) == expected
    assert small.engine.stats()["num_preemptions"] > 0


def test_seeded_request_same_alone_and_in_a_crowd(llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=24, ignore_eos=True)
    p = prompts(1, seed=7)[0]
    alone = llm.generate([p], params)[0].token_ids
    crowd = prompts(6, seed=8)
    others = [SamplingParams(temperature=0.8, max_tokens=30, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
              SamplingParams(temperature=1.0, seed=99, max_tokens=20, ignore_eos=True)] * 2
    outs = llm.generate(crowd[:3] + [p] + crowd[3:], others[:3] + [params] + others[3:])
    assert outs[3].token_ids == alone


def test_n_completions_and_logprobs(llm):
    params = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=8, ignore_eos=True, logprobs=2)
    out = llm.generate(["Hello"], params)[0]
    assert len(out.outputs) == 3 and len({tuple(c.token_ids) for c in out.outputs}) > 1
    for c in out.outputs:
        assert len(c.token_ids) == 8 and len(c.logprobs) == 8 and all(len(t) == 2 for t in c.top_logprobs)
        assert all(lp <= 0 for lp in c.logprobs)


def test_cancelling_frees_every_block(llm):
    engine = llm.engine
    ids = [engine.add_request(llm.validate(p, SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)))
           for p in prompts(5, seed=9)]
    for _ in range(6):
        engine.step()
    assert engine.block_manager.num_used_blocks > 0
    for rid in ids:
        engine.abort(rid)
    bm = engine.block_manager
    assert not engine.has_unfinished()
    assert bm.num_used_blocks == 0 and bm.num_free_blocks == bm.num_blocks
    bm.check_invariants()


def test_a_request_that_can_never_fit_is_rejected(folder):
    per_block = 2 * 2 * 4 * 2 * 16 * 4
    small = make(folder, kv_cache_gb=per_block * 10 / 1e9)  # 40 tokens of KV in all
    with pytest.raises(InvalidParameter) as e:
        small.generate([[5] * 30], SamplingParams(max_tokens=30))
    assert "blocks" in str(e.value)
    assert not small.engine.has_unfinished()


def test_async_engine_streams_and_cancels(llm):
    from galerne.engine.async_engine import AsyncEngine

    p = prompts(1, seed=10)[0]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    expected = llm.generate([p], params)[0].token_ids  # before the async loop owns the engine

    async def main():
        engine = AsyncEngine(llm.engine)
        try:
            got = [t async for out in engine.generate(llm.validate(p, params)) for t in out.token_ids]
            assert got == expected
            # A consumer that leaves early aborts its request: blocks come back.
            stream = engine.generate(llm.validate(p, SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)))
            async for _ in stream:
                break
            await stream.aclose()
            for _ in range(50):
                if not llm.engine.has_unfinished():
                    break
                await asyncio.sleep(0.02)
            assert llm.engine.block_manager.num_used_blocks == 0
            assert engine.stats()["running"] == 0
        finally:
            engine.shutdown()

    asyncio.run(main())
