"""Scheduler on its own, driven by a simulated engine loop over a fake paged KV cache.

The fake model writes (position, token) into the slot each scheduled token's KV
would occupy, and reads back every key each query attends to, asserting it holds
the right token. Its "next token" is a function of the keys the last query reads,
so a wrong block table (bad prefix hit, block reused too early, released too
soon) changes the outputs, which are compared with a direct reference.
"""

from __future__ import annotations

import random

import pytest

from galerne.engine.block_manager import NULL_BLOCK, BlockManager
from galerne.engine.request import BATCH, INTERACTIVE
from galerne.engine.scheduler import Scheduler
from galerne.engine.sequence import Sequence, Status
from galerne.errors import InvalidParameter
from galerne.sampling.params import SamplingParams


def next_token(keys: list[tuple[int, int]]) -> int:
    """Deterministic 'model': depends on every (position, token) it attends to."""
    return (sum((p + 1) * (t + 3) for p, t in keys) * 7 + len(keys)) % 97 + 3


def reference(prompt: list[int], max_tokens: int, window: int | None = None) -> list[int]:
    tokens = list(prompt)
    while len(tokens) < len(prompt) + max_tokens:
        lo = 0 if window is None else max(0, len(tokens) - window)
        tokens.append(next_token([(p, tokens[p]) for p in range(lo, len(tokens))]))
    return tokens[len(prompt):]


class FakeModel:
    def __init__(self, bm: BlockManager):
        self.bm = bm
        self.kv: dict[int, tuple[int, int]] = {}

    def slot(self, seq: Sequence, p: int) -> int:
        block = seq.block_table[p // self.bm.block_size]
        assert block != NULL_BLOCK, f"position {p} of {seq} was released but is read"
        return block * self.bm.block_size + p % self.bm.block_size

    def forward(self, out) -> list[tuple[Sequence, int]]:
        """Run a step; return (seq, next token) for sequences whose prompt is done."""
        for s in out.scheduled:  # all writes first, as one batched forward would
            c = s.seq.num_computed_tokens
            assert 1 <= s.num_new_tokens and c + s.num_new_tokens <= s.seq.num_tokens
            for p in range(c, c + s.num_new_tokens):
                self.kv[self.slot(s.seq, p)] = (p, s.seq.token_ids[p])
        sampled = []
        w = self.bm.window
        for s in out.scheduled:
            seq, c, n = s.seq, s.seq.num_computed_tokens, s.num_new_tokens
            for q in range(c, c + n):
                keys = [self.kv[self.slot(seq, k)] for k in range(0 if w is None else max(0, q - w + 1), q + 1)]
                assert keys == [(k, seq.token_ids[k]) for k, _ in keys], f"wrong KV read by {seq} at {q}"
            if c + n == seq.num_tokens:
                sampled.append((seq, next_token(keys)))
        return sampled


def make_seq(prompt, max_tokens, request_id=None, priority=INTERACTIVE):
    return Sequence(list(prompt), SamplingParams(max_tokens=max_tokens), request_id=request_id, priority=priority)


class Engine:
    """The loop the real engine runs, with checks after every step."""

    def __init__(self, num_blocks, block_size, *, window=None, prefix=True, **kw):
        self.bm = BlockManager(num_blocks, block_size, window=window, enable_prefix_caching=prefix)
        self.sched = Scheduler(self.bm, **kw)
        self.model = FakeModel(self.bm)
        self.steps = []  # per step: {seq: num_new_tokens}
        self.preempted = []

    def step(self):
        sched = self.sched
        out = sched.schedule()
        assert out.num_batched_tokens == sum(s.num_new_tokens for s in out.scheduled)
        assert out.num_batched_tokens <= sched.max_num_batched_tokens
        assert len(sched.running) <= sched.max_num_seqs
        if sched.has_unfinished():
            assert out.scheduled, "no progress"
        for seq in out.preempted:
            assert seq.block_table == [] and seq.status is Status.WAITING and seq.num_computed_tokens == 0
            # Never an interactive sequence while a batch one keeps its blocks.
            assert seq.priority == BATCH or all(r.priority == INTERACTIVE for r in sched.running), seq
        # Both queues ordered by priority (then arrival).
        for q in (list(sched.waiting), sched.running):
            assert [s.priority for s in q] == sorted(s.priority for s in q)
        self.preempted += out.preempted
        self.steps.append({s.seq: s.num_new_tokens for s in out.scheduled})
        sampled = self.model.forward(out)
        sched.advance(out)
        for seq, tok in sampled:
            assert seq.num_computed_tokens == seq.num_tokens
            seq.token_ids.append(tok)
            if seq.num_output_tokens >= seq.max_tokens:
                sched.finish(seq, "length")
        self.bm.check_invariants()
        if self.bm.window is not None:
            for seq in sched.running:
                held = sum(b != NULL_BLOCK for b in seq.block_table)
                assert held <= self.bm.max_blocks_held(seq.num_prompt_tokens + seq.max_tokens, sched.max_chunk)
        return out

    def run(self, max_steps=10_000):
        while self.sched.has_unfinished():
            self.step()
            assert len(self.steps) < max_steps
        assert self.bm.num_free_blocks == self.bm.num_blocks

    def first_step(self, seq):
        return next(i for i, st in enumerate(self.steps) if seq in st)


def test_chunked_prefill_then_decode():
    eng = Engine(64, 4, max_num_batched_tokens=8)
    seq = make_seq(range(30), 5)
    eng.sched.add(seq)
    eng.run()
    assert [st[seq] for st in eng.steps] == [8, 8, 8, 6, 1, 1, 1, 1]
    assert seq.output_token_ids == reference(range(30), 5)
    assert seq.status is Status.FINISHED and seq.finish_reason == "length"


def test_budget_respected_with_many_sequences():
    rng = random.Random(0)
    eng = Engine(200, 4, max_num_batched_tokens=16, max_num_seqs=5)
    seqs = [make_seq([rng.randrange(50) for _ in range(rng.randrange(1, 40))], rng.randrange(1, 12))
            for _ in range(20)]
    for s in seqs:
        eng.sched.add(s)
    eng.run()
    assert max(sum(st.values()) for st in eng.steps) == 16
    assert max(len(st) for st in eng.steps) <= 5
    for s in seqs:
        assert s.output_token_ids == reference(s.token_ids[: s.num_prompt_tokens], s.max_tokens)


def test_fifo_admission_no_starvation_and_admits_as_memory_frees():
    eng = Engine(10, 4, max_num_batched_tokens=64)
    first = make_seq(range(14), 2)  # 4 blocks
    long = make_seq(range(100, 128), 4)  # its prompt alone needs 7 blocks
    shorts = [make_seq([200 + i, 1, 2], 1) for i in range(6)]  # 1 block each, would fit at once
    for s in [first, long, *shorts]:
        eng.sched.add(s)
    out = eng.step()
    assert [s.seq for s in out.scheduled] == [first]  # 6 blocks free, long needs 7: nothing after it
    assert eng.sched.num_waiting == 7
    eng.run()
    # long went in as soon as first finished, before any of the shorts behind it.
    assert eng.first_step(long) == len([st for st in eng.steps if first in st])
    assert all(eng.first_step(long) <= eng.first_step(s) for s in shorts)
    order = sorted(shorts, key=eng.first_step)
    assert order == shorts
    for s in [first, long, *shorts]:
        assert s.output_token_ids == reference(s.token_ids[: s.num_prompt_tokens], s.max_tokens)


def test_preemption_order_and_self_preemption():
    eng = Engine(8, 2, max_num_batched_tokens=64)
    a, b, c, d = (make_seq([10 * i + j for j in range(4)], 4) for i in range(4))
    for s in (a, b, c, d):
        eng.sched.add(s)
    out = eng.step()  # 4 prompts of 4 tokens: 2 blocks each, the whole cache
    assert len(out.scheduled) == 4 and eng.bm.num_free_blocks == 0
    out = eng.step()  # each needs a 3rd block for its 5th token
    # d (latest) goes first and gives a and b a block each; then c is the last left.
    assert out.preempted == [d, c]
    assert [s.seq for s in out.scheduled] == [a, b]
    assert list(eng.sched.waiting) == [c, d]  # front of the queue, arrival order
    assert c.num_preemptions == d.num_preemptions == 1 and eng.sched.stats()["num_preemptions"] == 2
    eng.run()
    for s in (a, b, c, d):
        assert s.output_token_ids == reference(s.token_ids[:4], 4)


def test_preempted_sequences_complete_with_the_same_tokens():
    rng = random.Random(1)
    for prefix in (True, False):
        eng = Engine(12, 4, max_num_batched_tokens=32, prefix=prefix)
        seqs = [make_seq([rng.randrange(20) for _ in range(6)], 20) for _ in range(5)]  # 26 tokens: 7 blocks
        for s in seqs:
            eng.sched.add(s)
        eng.run()
        assert eng.preempted and eng.sched.num_preemptions == len(eng.preempted)
        for s in seqs:
            assert s.output_token_ids == reference(s.token_ids[:6], 20)


def test_abort_frees_every_block():
    eng = Engine(16, 4, max_num_batched_tokens=16)
    seqs = [make_seq(range(i, i + 10), 30, request_id=f"r{i % 3}") for i in range(6)]
    for s in seqs:
        eng.sched.add(s)
    for _ in range(3):
        eng.step()
    assert eng.sched.num_running and eng.sched.num_waiting
    aborted = []
    for rid in ("r0", "r1", "r2"):
        aborted += eng.sched.abort(rid)
    assert sorted(s.seq_id for s in aborted) == sorted(s.seq_id for s in seqs)
    assert all(s.status is Status.FINISHED and s.finish_reason == "abort" and s.block_table == [] for s in seqs)
    assert not eng.sched.has_unfinished()
    assert eng.bm.num_free_blocks == 16 and eng.bm.usage == 0.0
    eng.bm.check_invariants()
    assert eng.sched.abort("r0") == []


def test_abort_between_schedule_and_advance():
    eng = Engine(16, 4)
    seq = make_seq(range(10), 5, request_id="x")
    eng.sched.add(seq)
    out = eng.sched.schedule()
    eng.sched.abort("x")
    eng.sched.advance(out)  # must not touch the freed sequence
    assert eng.bm.num_free_blocks == 16
    eng.bm.check_invariants()


def test_request_that_can_never_fit_is_rejected():
    # Only the KV capacity: the context length was checked before (validate_request).
    bm = BlockManager(4, 4)
    sched = Scheduler(bm)
    with pytest.raises(InvalidParameter) as e:
        sched.add(make_seq(range(10), 10))  # 20 tokens: 5 blocks of 4
    assert e.value.field == "max_tokens"
    assert "need 5 KV blocks" in str(e.value) and "has 4 blocks" in str(e.value)
    with pytest.raises(InvalidParameter) as e:
        sched.add(make_seq(range(16), 1))  # the prompt alone fills the cache: 17 tokens, 5 blocks
    assert e.value.field == "prompt" and "16 tokens need 5 KV blocks" in str(e.value)
    with pytest.raises(InvalidParameter) as e:
        sched.add(make_seq(range(70), 1))
    assert e.value.field == "prompt" and "70 tokens" in str(e.value) and "has 4 blocks" in str(e.value)
    assert sched.num_waiting == 0  # nothing refused was queued
    sched.add(make_seq(range(10), 6))  # 16 tokens: exactly 4 blocks
    assert sched.num_waiting == 1


def test_sliding_window_runs_long_requests_in_a_small_cache():
    window = 8
    eng = Engine(6, 4, window=window, max_num_batched_tokens=32)
    # A chunk of n tokens holds window - 1 + n keys: n is capped at 5 * 4 - 8 + 1 = 13.
    assert eng.sched.max_chunk == 13
    seqs = [make_seq(range(40), 30), make_seq(range(5, 30), 20)]  # 70 tokens: 18 blocks without the window
    for s in seqs:
        eng.sched.add(s)
    eng.run()
    assert max(sum(st.values()) for st in eng.steps) <= 32
    for s in seqs:
        assert s.output_token_ids == reference(s.token_ids[: s.num_prompt_tokens], s.max_tokens, window)


def test_prefix_cache_hit_and_stats():
    eng = Engine(32, 4, max_num_batched_tokens=64)
    prompt = list(range(50, 70))  # 20 tokens
    a = make_seq(prompt, 3)
    eng.sched.add(a)
    eng.run()
    b = make_seq(prompt, 3)
    eng.sched.add(b)
    out = eng.step()
    # (20 - 1) // 4 = 4 blocks hit: 16 tokens; the last 4 (token 19 gives the logits) computed.
    assert out.scheduled[0].num_new_tokens == 4 and b.num_cached_tokens == 16
    eng.run()
    assert b.output_token_ids == a.output_token_ids == reference(prompt, 3)
    st = eng.sched.stats()
    assert st["prefix_cache_hit_rate"] == pytest.approx(16 / 40)
    assert (st["waiting"], st["running"], st["kv_usage"]) == (0, 0, 0.0)


def test_max_num_seqs_caps_running():
    eng = Engine(64, 4, max_num_seqs=2, max_num_batched_tokens=64)
    seqs = [make_seq(range(i, i + 5), 3) for i in range(5)]
    for s in seqs:
        eng.sched.add(s)
    out = eng.step()
    assert len(out.scheduled) == 2 and eng.sched.num_running == 2 and eng.sched.num_waiting == 3
    eng.run()
    for s in seqs:
        assert s.output_token_ids == reference(s.token_ids[:5], 3)


def test_sliding_window_with_prefix_hits():
    eng = Engine(32, 4, window=8, max_num_batched_tokens=16)
    prompt = list(range(40))
    a = make_seq(prompt, 6)
    eng.sched.add(a)
    eng.run()
    b = make_seq(prompt, 6)
    eng.sched.add(b)
    out = eng.sched.schedule()
    # 9 blocks hit (36 tokens); the first query (36) reads keys 29..36, so only
    # blocks 7 and 8 of the hit are attached, plus block 9 for tokens 36..39.
    assert b.num_cached_tokens == 36 and out.scheduled[0].num_new_tokens == 4
    assert [blk != NULL_BLOCK for blk in b.block_table] == [False] * 7 + [True] * 3
    eng.sched.abort(b.request_id)  # and once more through the checked loop
    b = make_seq(prompt, 6)
    eng.sched.add(b)
    eng.run()
    assert b.output_token_ids == a.output_token_ids == reference(prompt, 6, window=8)


# ------------------------------------------------------------------ priorities


def test_waiting_queue_is_ordered_by_priority_then_arrival():
    eng = Engine(64, 4, max_num_batched_tokens=64, max_num_seqs=2)
    b1, b2 = (make_seq([i, 1, 2], 2, priority=BATCH) for i in (10, 11))
    i1, i2 = (make_seq([i, 1, 2], 2) for i in (20, 21))
    for s in (b1, i1, b2, i2):
        eng.sched.add(s)
    assert list(eng.sched.waiting) == [i1, i2, b1, b2]
    out = eng.step()
    assert [s.seq for s in out.scheduled] == [i1, i2]  # two seats: both interactive
    eng.run()
    # b1 and b2 go in once i1 and i2 are done, in arrival order.
    assert eng.first_step(b1) == eng.first_step(b2) == 2 and list(eng.steps[2]) == [b1, b2]
    for s in (b1, b2, i1, i2):
        assert s.output_token_ids == reference(s.token_ids[:3], 2)


def test_batch_chunks_take_the_budget_interactive_work_leaves():
    eng = Engine(64, 4, max_num_batched_tokens=16)
    talk = make_seq(range(5), 20)
    eng.sched.add(talk)
    eng.step()  # its prompt
    batch = make_seq(range(100, 140), 3, priority=BATCH)
    eng.sched.add(batch)
    out = eng.step()
    assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(talk, 1), (batch, 15)]
    new = make_seq(range(50, 60), 2)  # arrives while the batch prompt is in prefill
    eng.sched.add(new)
    out = eng.step()
    # The interactive decode, then the whole new prompt, then the rest: 1 + 10 + 5.
    assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(talk, 1), (new, 10), (batch, 5)]
    eng.run()
    for s, p in ((talk, range(5)), (batch, range(100, 140)), (new, range(50, 60))):
        assert s.output_token_ids == reference(list(p), s.max_tokens)


def test_a_batch_sequence_is_preempted_before_any_interactive_one():
    eng = Engine(8, 2, max_num_batched_tokens=64)
    a = make_seq([0, 1, 2, 3], 4, priority=BATCH)  # the earliest, but a batch
    b, c, d = (make_seq([10 * i + j for j in range(4)], 4) for i in (1, 2, 3))
    for s in (a, b, c, d):
        eng.sched.add(s)
    out = eng.step()  # interactive first: b, c, d, then a; 2 blocks each, the whole cache
    assert [s.seq for s in out.scheduled] == [b, c, d, a] and eng.bm.num_free_blocks == 0
    out = eng.step()  # each needs a 3rd block: the batch goes first, then the latest interactive
    assert out.preempted == [a, d]
    assert [s.seq for s in out.scheduled] == [b, c]
    assert list(eng.sched.waiting) == [d, a]
    eng.run()
    for s in (a, b, c, d):
        assert s.output_token_ids == reference(s.token_ids[:4], 4)


def test_a_waiting_interactive_request_preempts_batch_work():
    eng = Engine(8, 4, max_num_batched_tokens=64)
    batch = [make_seq(range(10 * i, 10 * i + 7), 9, priority=BATCH) for i in range(4)]  # 2 blocks each
    for s in batch:
        eng.sched.add(s)
    out = eng.step()
    assert [s.seq for s in out.scheduled] == batch and eng.bm.num_free_blocks == 0
    talk = make_seq(range(200, 210), 2)  # 3 blocks
    eng.sched.add(talk)
    out = eng.step()
    # The newcomer takes the blocks of the latest two batch sequences, and goes first;
    # the other two decode after it (their 8th token still fits their 2 blocks).
    assert out.preempted == [batch[3], batch[2]]
    assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(talk, 10), (batch[0], 1), (batch[1], 1)]
    eng.run()
    assert eng.first_step(talk) == 1
    for s in [*batch, talk]:
        assert s.output_token_ids == reference(s.token_ids[: s.num_prompt_tokens], s.max_tokens)


def test_a_waiting_interactive_request_takes_a_batch_seat():
    eng = Engine(64, 4, max_num_batched_tokens=64, max_num_seqs=2)
    batch = [make_seq(range(10 * i, 10 * i + 3), 6, priority=BATCH) for i in range(3)]
    for s in batch:
        eng.sched.add(s)
    eng.step()
    assert eng.sched.running == batch[:2]
    talk = make_seq([7, 8, 9], 2)
    eng.sched.add(talk)
    out = eng.step()
    assert out.preempted == [batch[1]] and talk in eng.sched.running and len(eng.sched.running) == 2
    assert list(eng.sched.waiting) == [batch[1], batch[2]]
    eng.run()
    for s in [*batch, talk]:
        assert s.output_token_ids == reference(s.token_ids[:3], s.max_tokens)


def test_an_interactive_head_that_does_not_fit_holds_batch_admission():
    eng = Engine(10, 4, max_num_batched_tokens=64)
    first = make_seq(range(20), 2)  # 6 blocks, interactive
    eng.sched.add(first)
    eng.step()
    big = make_seq(range(100, 120), 4)  # 6 blocks: waits for first, which batch work cannot free
    small = make_seq([1, 2, 3], 2, priority=BATCH)  # 1 block: would fit now, but must not pass
    eng.sched.add(big)
    eng.sched.add(small)
    out = eng.step()
    assert [s.seq for s in out.scheduled] == [first] and list(eng.sched.waiting) == [big, small]
    eng.run()
    assert eng.first_step(big) <= eng.first_step(small)
    for s in (first, big, small):
        assert s.output_token_ids == reference(s.token_ids[: s.num_prompt_tokens], s.max_tokens)


@pytest.mark.parametrize("cap", [0, 2])
def test_batch_rows_beside_interactive_work_are_capped(cap):
    eng = Engine(64, 4, max_num_batched_tokens=64, max_background_seqs=cap)
    batch = [make_seq(range(10 * i, 10 * i + 3), 8, priority=BATCH) for i in range(5)]
    for b in batch:
        eng.sched.add(b)
    out = eng.step()
    assert len(out.scheduled) == 5  # alone, batch work runs at full width
    talk = make_seq([1, 2, 3], 3)
    eng.sched.add(talk)
    while talk.status is not Status.FINISHED:
        out = eng.step()
        rows = [s.seq for s in out.scheduled]
        assert rows[0] is talk and len(rows) == 1 + cap
        assert rows[1:] == [b for b in batch if b in rows]  # the earliest batch rows first
    assert all(b.status is Status.RUNNING for b in batch) and not eng.preempted  # the others kept their KV
    assert len(eng.step().scheduled) == 5
    eng.run()
    for b in batch:
        assert b.output_token_ids == reference(b.token_ids[: b.num_prompt_tokens], 8)


def test_mixed_priorities_under_memory_pressure_give_the_reference_outputs():
    rng = random.Random(2)
    for prefix, cap in ((True, None), (False, None), (True, 1)):
        eng = Engine(12, 4, max_num_batched_tokens=24, max_num_seqs=6, prefix=prefix, max_background_seqs=cap)
        seqs = []
        for step in range(60):  # arrivals spread over the run
            if step % 3 == 0 and len(seqs) < 18:
                s = make_seq([rng.randrange(20) for _ in range(rng.randrange(2, 12))], rng.randrange(1, 16),
                             priority=rng.choice((INTERACTIVE, BATCH)))
                seqs.append(s)
                eng.sched.add(s)
            if eng.sched.has_unfinished():
                eng.step()
        eng.run()
        assert eng.preempted
        for s in seqs:
            assert s.output_token_ids == reference(s.token_ids[: s.num_prompt_tokens], s.max_tokens)
