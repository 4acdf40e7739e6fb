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


class Scheduler:
    def __init__(self, block_manager: BlockManager, *, max_num_seqs: int = 256, max_num_batched_tokens: int = 2048,
                 max_adapters: int = 0):
        for name, v in (("max_num_seqs", max_num_seqs), ("max_num_batched_tokens", max_num_batched_tokens)):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if max_adapters < 0:
            raise ValueError(f"max_adapters must be >= 0, got {max_adapters}")
        self.bm = block_manager
        self.max_adapters = max_adapters
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
        self.waiting.append(seq)

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

    def _preempt(self, seq: Sequence) -> None:
        """Drop the KV of a running ``seq``; it is recomputed when readmitted."""
        self.bm.free(seq)
        seq.num_computed_tokens = 0
        seq.num_cached_tokens = 0
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens

        # 1. Running sequences, earliest arrival first.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget, self.max_chunk)
            if n <= 0:  # nothing to compute (the engine has not appended a token yet)
                i += 1
                continue
            while not self.bm.allocate(seq, n):
                # Out of blocks: preempt the latest arrival. Those behind i were not
                # scheduled yet this step, so nothing already in `out` is touched.
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                out.scheduled.append(ScheduledSeq(seq, n))
                budget -= n
                i += 1
        # Back to the front of the queue in arrival order: they were preempted latest
        # first, so pushing each to the front leaves the earliest one first.
        for victim in out.preempted:
            self.waiting.appendleft(victim)

        # 2. Waiting sequences, in order. Not in a step that preempted: the memory is
        # short, and the preempted would come straight back in.
        active = self.active_adapters()
        waits_for_slot = False  # a sequence before this one waits for an adapter slot
        i = 0
        while not out.preempted and i < len(self.waiting) and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[i]
            if seq.adapter is not None and (waits_for_slot or (
                    seq.adapter not in active and len(active) >= self.max_adapters)):
                waits_for_slot = True  # base-model sequences behind it may still go
                i += 1
                continue
            cached, num_cached = self.bm.get_cached_prefix(seq) if seq.use_prefix_cache else ([], 0)
            n = min(seq.num_tokens - num_cached, budget, self.max_chunk)
            if not self.bm.allocate(seq, n, cached):
                break  # never skip it: later requests must not starve it
            del self.waiting[i]
            seq.status = Status.RUNNING
            self.running.append(seq)
            if seq.adapter is not None:
                active.add(seq.adapter)
            self._prefix_queried += seq.num_tokens
            self._prefix_hit += num_cached
            out.scheduled.append(ScheduledSeq(seq, n))
            budget -= n

        out.num_batched_tokens = self.max_num_batched_tokens - budget
        return out

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
