"""CUDA graphs for decode steps.

A decode step at small batch is hundreds of tiny kernel launches; replaying a
captured graph issues them all at once. One graph per batch size bucket, all
sharing one memory pool (captured largest first). A batch of n sequences runs in
the graph of the next bucket >= n; the extra rows are padding that write their
keys/values into a scratch block the block manager never hands out.
"""

from __future__ import annotations

import bisect
import logging

import torch

from ..models.transformer import Transformer
from .paged import BatchMetadata, PagedKVCache, TritonPagedAttention

log = logging.getLogger(__name__)


class DecodeGraphs:
    def __init__(self, model: Transformer, cache: PagedKVCache, sizes: list[int], max_blocks: int):
        self.model, self.cache = model, cache
        self.sizes = sorted(sizes)
        self.max_blocks = max_blocks
        dev = cache.k.device
        n = self.sizes[-1]
        bs = cache.block_size
        self.scratch = cache.num_blocks - 1  # the cache holds one block more than the manager owns
        self.tokens = torch.zeros(n, dtype=torch.long, device=dev)
        self.positions = torch.zeros(n, dtype=torch.long, device=dev)
        self.slots = torch.full((n,), self.scratch * bs, dtype=torch.long, device=dev)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.tables = torch.full((n, max_blocks), self.scratch, dtype=torch.int32, device=dev)
        self.qsl = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        with torch.inference_mode():
            for size in reversed(self.sizes):
                self._capture(size)
        log.info("captured CUDA graphs for decode batch sizes %s", self.sizes)

    def _meta(self, n: int) -> BatchMetadata:
        return BatchMetadata(
            positions=self.positions[:n], slot_mapping=self.slots[:n], query_start_loc=self.qsl[: n + 1],
            seq_lens=self.seq_lens[:n], block_tables=self.tables[:n], q_lens=[1] * n, ctx_lens=[], tables=[],
            max_query_len=1,
        )

    def _capture(self, n: int) -> None:
        backend = TritonPagedAttention(self.cache, self._meta(n))
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up: compile kernels, settle the allocator
            for _ in range(2):
                self.model(self.tokens[:n], self.positions[:n], backend)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.model(self.tokens[:n], self.positions[:n], backend)
        self.pool = graph.pool()
        self.graphs[n] = (graph, out)

    def fits(self, n: int, entries) -> bool:
        return n <= self.sizes[-1] and all(len(table) <= self.max_blocks for table, _, _ in entries)

    def run(self, tokens: list[int], entries: list[tuple[list[int], int, int]]) -> torch.Tensor:
        """entries: (block_table, num_computed_tokens, 1) per sequence."""
        n = len(tokens)
        size = self.sizes[bisect.bisect_left(self.sizes, n)]
        bs = self.cache.block_size
        width = max(len(t) for t, _, _ in entries)
        positions = [start for _, start, _ in entries]
        host = torch.tensor(
            [tokens, positions, [t[p // bs] * bs + p % bs for (t, _, _), p in zip(entries, positions)],
             [p + 1 for p in positions]],
            dtype=torch.long,
        )
        table = torch.tensor([t + [self.scratch] * (width - len(t)) for t, _, _ in entries], dtype=torch.int32)
        dev = self.tokens.device
        host = host.to(dev, non_blocking=True)
        self.tokens[:n].copy_(host[0])
        self.positions[:n].copy_(host[1])
        self.slots[:n].copy_(host[2])
        self.seq_lens[:n].copy_(host[3].to(torch.int32))
        self.tables[:n, :width].copy_(table.to(dev, non_blocking=True))
        # Padding rows: decode one token at position 0 into the scratch block.
        if size > n:
            self.tokens[n:size].zero_()
            self.positions[n:size].zero_()
            self.slots[n:size].fill_(self.scratch * bs)
            self.seq_lens[n:size].fill_(1)
            self.tables[n:size, 0].fill_(self.scratch)
        graph, out = self.graphs[size]
        graph.replay()
        return out[:n]
