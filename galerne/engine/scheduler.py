"""Continuous batching with chunked prefill: which tokens each step computes.

Plain Python, no torch. Every step gives each scheduled sequence a number of new
tokens to compute, prefill and decode alike (vLLM v1's "unified" step): the rest
of a prompt, a chunk of it, or the one token sampled last step. The engine loop is

    out = scheduler.schedule()        # blocks allocated for the tokens to compute
    model forward over out.scheduled  # tokens seq.token_ids[c : c + n], c = num_computed_tokens
    scheduler.advance(out)            # num_computed_tokens += n, register full blocks
    sample for every seq with num_computed_tokens == num_tokens, append the token,
    scheduler.finish(seq, reason) for those that stop

Order of service: running sequences first (arrival order), then waiting ones
(FIFO, never skipping the head). When blocks run out, the latest arrived running
sequences are preempted: their KV is dropped and recomputed later from
prompt + generated tokens, which gives the same outputs.

Priorities: a sequence's ``priority`` (``engine.request``: INTERACTIVE 0, BATCH 1;
lower is more urgent) comes before everything above. Both queues are kept ordered
by priority, then arrival, and a step serves level by level: the running sequences
of the most urgent level, then its waiting ones, then the next level's. So

* a batch sequence's chunk takes only the tokens that interactive work left in the
  step's budget (budget 2048, an interactive decode running, an interactive prompt
  of 500 tokens waiting, a batch prompt of 3000 tokens in prefill: the step computes
  1 + 500 + 1547 tokens, the batch chunk last);
* when blocks run out, the victim is the last of ``running``: the latest arrival of
  the least urgent level, so every batch sequence goes before any interactive one;
* a waiting sequence that does not fit (blocks, or a seat under ``max_num_seqs``)
  preempts running sequences of a less urgent level, latest first, until it does;
  and one that still does not fit stops admission for every level behind it, so a
  client never waits for a batch to drain, and batch work never takes the blocks an
  interactive request waits for;
* a step that computes sequences of the most urgent level computes at most
  ``max_background_seqs`` of the less urgent ones (running first, then admitted); the
  others keep their blocks and their place, and go on in a later step. On a CPU each row
  of a step costs time, so without this cap a batch of 16 decodes made every interactive
  token several times slower; with it, interactive work sees a step barely longer than
  its own, and batches run at full width whenever no interactive request does.

Adapters: a sequence's ``adapter`` (a hashable key, None for the base model) needs
one of ``max_adapters`` device slots while it runs. A waiting sequence is admitted
only when its adapter is already used by a running one or a slot is left, so the
running sequences never use more distinct adapters than there are slots, and every
step can run all of them. A head that waits for a slot lets only base-model
sequences pass it: they take no slot, so they cannot keep it waiting, while admitting
more sequences of the adapters in the slots could (e.g. 2 slots busy with A and B,
C at the head: A's and B's newcomers queue behind C until A or B has no running
sequence left, then C takes the freed slot).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ..errors import InvalidParameter
from .block_manager import BlockManager
from .sequence import Sequence, Status


@dataclass
class ScheduledSeq:
    seq: Sequence
    # Tokens to compute this step: seq.token_ids[c : c + num_new_tokens] with
    # c = seq.num_computed_tokens as it is at schedule time (after prefix-cache hits).
    num_new_tokens: int


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    num_batched_tokens: int = 0

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class _Step:
    """What one ``schedule()`` call carries from level to level."""

    out: SchedulerOutput
    budget: int  # tokens left in the step
    waits_for_slot: bool = False  # a waiting sequence before this one waits for an adapter slot
    admitting: bool = True  # False once a waiting sequence did not fit: none behind it may pass
    seats: float = float("inf")  # sequences of this level the step may still compute (max_background_seqs)


class Scheduler:
    def __init__(self, block_manager: BlockManager, *, max_num_seqs: int = 256, max_num_batched_tokens: int = 2048,
                 max_adapters: int = 0, max_background_seqs: int | None = None):
        for name, v in (("max_num_seqs", max_num_seqs), ("max_num_batched_tokens", max_num_batched_tokens)):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if max_adapters < 0:
            raise ValueError(f"max_adapters must be >= 0, got {max_adapters}")
        self.bm = block_manager
        self.max_adapters = max_adapters
        if max_background_seqs is not None and max_background_seqs < 0:
            raise ValueError(f"max_background_seqs must be >= 0, got {max_background_seqs}")
        self.max_background_seqs = max_background_seqs  # None: no cap
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_chunk = self._max_chunk()
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self._prefix_queried = 0  # tokens of admitted sequences looked up in the prefix cache
        self._prefix_hit = 0  # of those, found

    def _max_chunk(self) -> int:
        """The most tokens one sequence computes in a step.

        The token budget, except with a sliding window: a chunk of n tokens starting
        at c needs the blocks of keys c-window+1 .. c+n-1 at once (see
        ``BlockManager.max_blocks_held``), i.e. blocks_for(window - 1 + n) + 1 <=
        num_blocks, so n <= (num_blocks - 1) * block_size - window + 1. Capping n
        there lets a long window-limited request fit a cache smaller than the budget.
        E.g. 4 blocks of 16, window 32: n <= 3 * 16 - 31 = 17.
        """
        bm = self.bm
        if bm.window is None:
            return self.max_num_batched_tokens
        fits = (bm.num_blocks - 1) * bm.block_size - bm.window + 1
        return max(1, min(self.max_num_batched_tokens, fits))

    # -------------------------------------------------------------- requests

    def add(self, seq: Sequence) -> None:
        """Queue ``seq`` after checking that the KV cache could ever run it to its
        max_tokens alone. (Its prompt and budget against the context were checked
        before, by ``request.validate_request``.)"""
        if seq.adapter is not None and self.max_adapters < 1:
            raise InvalidParameter("adapter", "this engine has no adapter slots (max_loras is 0)")
        p, m = seq.num_prompt_tokens, seq.max_tokens
        n = self.bm.num_blocks
        need = self.bm.max_blocks_held(p + 1, self.max_chunk)
        if need > n:
            raise InvalidParameter(
                "prompt", f"{p} tokens need {need} KV blocks but the cache has {n} blocks of "
                          f"{self.bm.block_size} tokens; shorten the prompt or enlarge the cache",
            )
        need = self.bm.max_blocks_held(p + m, self.max_chunk)
        if need > n:
            raise InvalidParameter(
                "max_tokens", f"the prompt's {p} tokens + max_tokens {m} need {need} KV blocks but the "
                              f"cache has {n} blocks of {self.bm.block_size} tokens; lower max_tokens or "
                              f"enlarge the cache",
            )
        seq.status = Status.WAITING
        self._enqueue(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark ``seq`` finished, free its blocks and drop it from the queues."""
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        self.bm.free(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def abort(self, request_id: str) -> list[Sequence]:
        """Finish every unfinished sequence of ``request_id`` with reason "abort"."""
        seqs = [s for s in [*self.running, *self.waiting] if s.request_id == request_id]
        for s in seqs:
            self.finish(s, "abort")
        return seqs

    # ------------------------------------------------------------------ steps

    def _enqueue(self, seq: Sequence, *, front: bool = False) -> None:
        """Put ``seq`` in ``waiting`` behind every more urgent sequence: after those of its
        own level (a newcomer), or before them (``front``: a preempted sequence, which
        arrived before them)."""
        q, p = self.waiting, seq.priority
        if front:
            i = next((k for k, s in enumerate(q) if s.priority >= p), len(q))
        else:
            i = len(q)
            while i > 0 and q[i - 1].priority > p:
                i -= 1
        q.insert(i, seq)

    def _start(self, seq: Sequence) -> None:
        """Put an admitted ``seq`` in ``running``, after those of its level and before the
        less urgent ones (whose turn in this step comes later)."""
        r, p = self.running, seq.priority
        i = len(r)
        while i > 0 and r[i - 1].priority > p:
            i -= 1
        r.insert(i, seq)

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        """Drop the KV of ``seq`` (already taken out of ``running``); it goes back to the
        front of its level in ``waiting`` and is recomputed when readmitted. Victims come
        latest first, so the earliest ends first."""
        self.bm.free(seq)
        seq.num_computed_tokens = 0
        seq.num_cached_tokens = 0
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        out.preempted.append(seq)
        self._enqueue(seq, front=True)

    def schedule(self) -> SchedulerOutput:
        step = _Step(SchedulerOutput(), self.max_num_batched_tokens)
        levels = sorted({s.priority for s in self.running} | {s.priority for s in self.waiting})
        for level in levels:
            if level != levels[0] and step.out.scheduled and self.max_background_seqs is not None:
                urgent = sum(s.seq.priority == levels[0] for s in step.out.scheduled)
                if urgent:  # less urgent work beside the most urgent: only so many rows
                    step.seats = max(0, self.max_background_seqs - (len(step.out.scheduled) - urgent))
            self._schedule_running(level, step)
            # Waiting sequences are not admitted in a step that preempted before their
            # turn: the memory is short, and the preempted would come straight back in.
            if step.admitting and not step.out.preempted:
                self._admit(level, step)
        step.out.num_batched_tokens = self.max_num_batched_tokens - step.budget
        return step.out

    def _schedule_running(self, level: int, step: _Step) -> None:
        """The running sequences of ``level``, earliest arrival first."""
        running = self.running
        i = next((k for k, s in enumerate(running) if s.priority >= level), len(running))
        while i < len(running) and running[i].priority == level and step.budget > 0 and step.seats > 0:
            seq = running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, step.budget, self.max_chunk)
            if n <= 0:  # nothing to compute (the engine has not appended a token yet)
                i += 1
                continue
            while not self.bm.allocate(seq, n):
                # Out of blocks: preempt the last of running, the latest arrival of the least
                # urgent level. Those behind i were not scheduled yet this step (their level
                # is this one or a later one), so nothing already in `out` is touched.
                victim = running.pop()
                self._preempt(victim, step.out)
                if victim is seq:
                    break
            else:
                step.out.scheduled.append(ScheduledSeq(seq, n))
                step.budget -= n
                step.seats -= 1
                i += 1

    def _admit(self, level: int, step: _Step) -> None:
        """The waiting sequences of ``level``, in order, never skipping one that does not
        fit (later requests must not starve it); only adapter slots let some pass (see
        the module's doc)."""
        waiting = self.waiting
        active = self.active_adapters()
        i = next((k for k, s in enumerate(waiting) if s.priority >= level), len(waiting))
        while i < len(waiting) and waiting[i].priority == level and step.budget > 0 and step.seats > 0:
            seq = waiting[i]
            if seq.adapter is not None and (step.waits_for_slot or (
                    seq.adapter not in active and len(active) >= self.max_adapters)):
                step.waits_for_slot = True  # base-model sequences behind it may still go
                i += 1
                continue
            cached, num_cached = self.bm.get_cached_prefix(seq) if seq.use_prefix_cache else ([], 0)
            n = min(seq.num_tokens - num_cached, step.budget, self.max_chunk)
            if not self._make_room(seq, n, cached, step.out):
                step.admitting = False
                return
            active = self.active_adapters()  # a preemption may have freed a slot
            del waiting[i]  # preempted victims went behind this level: i is still seq's index
            seq.status = Status.RUNNING
            self._start(seq)
            if seq.adapter is not None:
                active.add(seq.adapter)
            self._prefix_queried += seq.num_tokens
            self._prefix_hit += num_cached
            step.out.scheduled.append(ScheduledSeq(seq, n))
            step.budget -= n
            step.seats -= 1

    def _make_room(self, seq: Sequence, n: int, cached: list[int], out: SchedulerOutput) -> bool:
        """Allocate the first ``n`` tokens of a waiting ``seq`` (after its ``cached``
        prefix blocks) and give it a seat under ``max_num_seqs``; short of either, preempt
        running sequences of a less urgent level than its own, latest first (not scheduled
        yet in this step: their level comes later). False when that is not enough."""
        while not (len(self.running) < self.max_num_seqs and self.bm.allocate(seq, n, cached)):
            if not self.running or self.running[-1].priority <= seq.priority:
                return False
            self._preempt(self.running.pop(), out)
        return True

    def advance(self, output: SchedulerOutput) -> None:
        """Record that the model computed the scheduled tokens."""
        for s in output.scheduled:
            seq = s.seq
            if seq.status is not Status.RUNNING:  # finished or aborted in between
                continue
            seq.num_computed_tokens += s.num_new_tokens
            self.bm.cache_blocks(seq)
            self.bm.release_out_of_window(seq)

    # ------------------------------------------------------------------ state

    def active_adapters(self) -> set:
        """The adapters of the running sequences: they hold device slots."""
        return {s.adapter for s in self.running if s.adapter is not None}

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def stats(self) -> dict:
        q = self._prefix_queried
        return {
            "waiting": len(self.waiting),
            "running": len(self.running),
            "kv_usage": self.bm.usage,
            "num_preemptions": self.num_preemptions,
            "prefix_cache_queried_tokens": q,
            "prefix_cache_hit_tokens": self._prefix_hit,
            "prefix_cache_hit_rate": self._prefix_hit / q if q else 0.0,
        }
