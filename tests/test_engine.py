"""Invariants of the paged, continuously batched engine, on tiny random models."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch
from dense_reference import DenseGenerator

from galerne import LLM, SamplingParams
from galerne.engine.async_engine import AsyncEngine
from galerne.errors import EngineDeadError, InvalidParameter

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
    # Every block comes back, the ones released behind the window included (that the
    # blocks held stay bounded is test_block_manager's and test_scheduler's).
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
    n = len(out.prompt_token_ids)
    for c in out.outputs:
        assert len(c.token_ids) == 8 and len(c.logprobs) == 8 and all(len(t) == 2 for t in c.top_logprobs)
        # Each completion's logprobs are its own tokens' under the model: rescoring the
        # whole text without a cache gives them (and the two most likely alternatives).
        ref = torch.log_softmax(llm.score(out.prompt_token_ids + c.token_ids), dim=-1)[n - 1 : -1]
        expected = ref[torch.arange(8), torch.tensor(c.token_ids)]
        torch.testing.assert_close(torch.tensor(c.logprobs), expected, rtol=0, atol=1e-4)
        top = ref.topk(2, dim=-1)
        assert [[t for t, _ in alts] for alts in c.top_logprobs] == top.indices.tolist()
        torch.testing.assert_close(torch.tensor([[lp for _, lp in alts] for alts in c.top_logprobs]), top.values,
                                   rtol=0, atol=1e-4)


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


# ------------------------------------------------------------------ the async front


class Spy:
    """Wraps the engine's methods: records the threads that call them and the requests
    that get outputs; ``hold`` makes each step sleep that long (a long prefill: sleep
    releases the GIL as a forward does), ``fail`` makes the next step raise."""

    def __init__(self, engine, monkeypatch):
        self.threads: set[str] = set()
        self.ran: set[str] = set()  # request ids that got an output
        self.hold = 0.0
        self.holding = threading.Event()  # set when a held step starts
        self.fail: BaseException | None = None
        for name in ("add_request", "abort", "step", "stats", "has_unfinished"):
            monkeypatch.setattr(engine, name, self._wrap(name, getattr(engine, name)))

    def _wrap(self, name, real):
        def call(*args, **kwargs):
            self.threads.add(threading.current_thread().name)
            if name != "step":
                return real(*args, **kwargs)
            if self.fail is not None:
                raise self.fail
            if self.hold:
                self.holding.set()
                time.sleep(self.hold)
            outputs = real(*args, **kwargs)
            self.ran.update(o.request_id for o in outputs)
            return outputs

        return call


async def until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


LONG = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)


def test_async_engine_streams_and_cancels(llm, monkeypatch):
    p = prompts(1, seed=10)[0]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    expected = llm.generate([p], params)[0].token_ids  # before the async loop owns the engine

    async def main():
        front = AsyncEngine(llm.engine)
        spy = Spy(llm.engine, monkeypatch)
        try:
            got = [t async for out in front.generate(llm.validate(p, params)) for t in out.token_ids]
            assert got == expected
            # A consumer that leaves early aborts its request: blocks come back.
            stream = front.generate(llm.validate(p, LONG))
            async for _ in stream:
                break
            await stream.aclose()
            await until(lambda: front.stats()["running"] == 0)
            assert front.stats()["kv_usage"] == 0.0
            # Only the engine thread ever called the engine (stats included: a snapshot).
            assert spy.threads == {"galerne-engine"}
        finally:
            front.shutdown()
        assert llm.engine.block_manager.num_used_blocks == 0

    asyncio.run(main())


def test_async_engine_abort_does_not_wait_for_the_step(llm, monkeypatch):
    async def main():
        front = AsyncEngine(llm.engine)
        spy = Spy(llm.engine, monkeypatch)
        try:
            stream = front.generate(llm.validate(prompts(1, seed=11)[0], LONG))
            await stream.__anext__()
            spy.hold = 1.0
            await asyncio.to_thread(spy.holding.wait, 5)
            t0 = time.monotonic()
            await stream.aclose()  # the client went away in the middle of a long step
            assert time.monotonic() - t0 < 0.2
            assert front.stats()["running"] == 1  # the step still runs; the abort waits for its end
            spy.hold = 0.0
            await until(lambda: front.stats()["running"] == 0)
        finally:
            front.shutdown()
        assert llm.engine.block_manager.num_used_blocks == 0

    asyncio.run(main())


def test_a_request_cancelled_before_its_add_never_runs(llm, monkeypatch):
    async def main():
        front = AsyncEngine(llm.engine)
        spy = Spy(llm.engine, monkeypatch)
        try:
            busy = front.generate(llm.validate(prompts(1, seed=12)[0], LONG))
            await busy.__anext__()
            spy.hold = 0.5
            await asyncio.to_thread(spy.holding.wait, 5)
            late = llm.validate(prompts(1, seed=13)[0], LONG)  # its add waits for the step to end

            async def consume():
                async for _ in front.generate(late):
                    pass

            task = asyncio.create_task(consume())
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await busy.aclose()
            spy.hold = 0.0
            await until(lambda: front.stats()["running"] == front.stats()["waiting"] == 0)
            assert late.request_id not in spy.ran
        finally:
            front.shutdown()
        assert not llm.engine.has_unfinished() and llm.engine.block_manager.num_used_blocks == 0

    asyncio.run(main())


def test_async_engine_returns_a_refusal_to_its_request(folder):
    per_block = 2 * 2 * 4 * 2 * 16 * 4
    small = make(folder, kv_cache_gb=per_block * 10 / 1e9)  # 40 tokens of KV in all

    async def main():
        front = AsyncEngine(small.engine)
        try:
            with pytest.raises(InvalidParameter) as e:
                async for _ in front.generate(small.validate([5] * 30, SamplingParams(max_tokens=30))):
                    pass
            assert e.value.field == "max_tokens" and "blocks" in str(e.value)
            # The refusal was that request's alone: the engine goes on.
            params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
            got = [t async for out in front.generate(small.validate([5] * 5, params)) for t in out.token_ids]
            assert len(got) == 3 and not front.errored
        finally:
            front.shutdown()

    asyncio.run(main())


def test_async_engine_reports_a_failed_step(folder, monkeypatch):
    llm = make(folder)

    async def main():
        front = AsyncEngine(llm.engine)
        spy = Spy(llm.engine, monkeypatch)
        try:
            assert not front.errored and front.error is None
            streams = [front.generate(llm.validate(p, LONG)) for p in prompts(2, seed=14)]
            for stream in streams:
                await stream.__anext__()
            spy.fail = RuntimeError("device lost")
            for stream in streams:  # every request waiting gets the typed error
                with pytest.raises(EngineDeadError, match="RuntimeError"):
                    async for _ in stream:
                        pass
            assert front.errored and front.error is spy.fail
            with pytest.raises(EngineDeadError):  # and so does every later one, at once
                await front.generate(llm.validate([5, 6], LONG)).__anext__()
        finally:
            front.shutdown()
        assert not llm.engine.has_unfinished()  # what it ran was aborted

    asyncio.run(main())


def test_async_engine_shutdown_ends_requests_and_leaves_the_engine_clean(llm):
    async def main():
        front = AsyncEngine(llm.engine)
        stream = front.generate(llm.validate(prompts(1, seed=15)[0], LONG))
        await stream.__anext__()
        await asyncio.to_thread(front.shutdown)
        with pytest.raises(EngineDeadError, match="shut down"):
            async for _ in stream:
                pass
        assert not front.errored
        with pytest.raises(EngineDeadError, match="shut down"):
            await front.generate(llm.validate([5, 6], LONG)).__anext__()

    asyncio.run(main())
    assert not llm.engine.has_unfinished() and llm.engine.block_manager.num_used_blocks == 0
