"""A sequence being generated: the unit the scheduler and block manager work on.

Plain Python, no torch. A request with ``n > 1`` becomes n sequences that share
a prompt (and, through the prefix cache, its KV blocks).
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable
from enum import Enum

from ..sampling.params import SamplingParams

_ids = itertools.count()


class Status(Enum):
    WAITING = "waiting"  # queued, or preempted (its KV was dropped: recomputed on resume)
    RUNNING = "running"  # holds KV blocks, scheduled every step
    FINISHED = "finished"


class Sequence:
    def __init__(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        request_id: str | None = None,
        index: int = 0,
        adapter: Hashable | None = None,
        max_tokens: int | None = None,
        priority: int = 0,
        images: tuple = (),
    ):
        self.seq_id = next(_ids)
        self.request_id = request_id if request_id is not None else str(self.seq_id)
        self.index = index  # which of the request's n completions
        self.params = params
        # The loaded adapter it runs through (None: the base model): a key unique to one
        # load of one adapter (``engine.adapters.AdapterKey``), never reused, so that it
        # can key the prefix cache (KV depends on the weights) and the adapter slots.
        self.adapter = adapter
        # False: every position is computed (prompt logprobs need each one's logits).
        self.use_prefix_cache = True
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        # Tokens whose keys/values are in the cache (computed, or found in the prefix
        # cache). The scheduler moves it forward; preemption resets it to 0.
        self.num_computed_tokens = 0
        # Of those, how many came from the prefix cache (for stats).
        self.num_cached_tokens = 0
        self.block_table: list[int] = []
        self.status = Status.WAITING
        self.finish_reason: str | None = None
        # The generation budget, fixed when the request is admitted.
        self.max_tokens = max_tokens if max_tokens is not None else params.max_tokens
        self.num_preemptions = 0
        # Lower is served first (engine.request.INTERACTIVE, BATCH): see the scheduler.
        self.priority = priority
        # The prompt's images (galerne.images.ImageInput), in order: the runner puts the
        # encoder's rows in place of their [IMG] tokens; the prefix cache keys their
        # blocks by the images' digests.
        self.images = images

    def images_in(self, start: int, end: int) -> tuple:
        """The images whose spans overlap tokens [start, end)."""
        return tuple(im for im in self.images if im.offset < end and start < im.end) if self.images else ()

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, status={self.status.value}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, blocks={len(self.block_table)})")
