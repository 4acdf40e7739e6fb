"""Paged KV-cache bookkeeping: which fixed-size blocks each sequence holds.

Plain Python, no torch: the cache tensors live elsewhere; this only hands out
block ids. The KV of a sequence's token at position p lives in slot

    block_table[p // block_size] * block_size + p % block_size

e.g. block_size 16, block_table [7, 3]: position 20 is in block 3 (20 // 16 = 1),
offset 4 (20 % 16), so slot 3 * 16 + 4 = 52.

Three mechanisms share the pool:

* Reference counts. A block is held by every sequence whose table lists it; it
  is free when its count is 0.
* Prefix caching. A block full of computed tokens is registered under a chain key
  hash((parent key, its tokens, adapter key)), so the key names the whole prefix up
  to and including that block. A new sequence with the same leading tokens reuses
  those blocks instead of recomputing them. A freed registered block keeps its
  key and content in an LRU free queue until the pool needs it for something else.
* Sliding window. When every layer only looks ``window`` tokens back, blocks that
  fell out of the window are released mid-sequence and replaced by ``NULL_BLOCK``
  in the table, so a long generation holds a bounded number of blocks.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

from .sequence import Sequence

NULL_BLOCK = -1  # a block-table entry whose block was released (out of the window)


@dataclass
class _SeqState:
    """Per-sequence bookkeeping, dropped by ``free``."""

    num_registered: int = 0  # leading blocks whose chain key is known (registered or hit)
    parent_key: int | None = None  # chain key of block num_registered - 1
    num_released: int = 0  # leading entries already replaced by NULL_BLOCK


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True,
                 window: int | None = None):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks} and {block_size}")
        if window is not None and window < 1:
            raise ValueError(f"window must be >= 1 or None, got {window}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.window = window
        self._ref = [0] * num_blocks
        # Free blocks in eviction order: the first is handed out next. Unregistered
        # blocks (never used, or holding nothing reusable) sit at the front, so a
        # registered block is only evicted when no worthless block is left; among
        # registered ones, the least recently freed goes first. An OrderedDict gives
        # O(1) pop-first, append, move-to-front and removal of a block that gets a hit.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        # Prefix cache: chain key -> block, and per block what it was registered
        # under, compared on lookup so that a hash collision is never a false hit.
        self._cached: dict[int, int] = {}
        self._block_key: list[int | None] = [None] * num_blocks
        self._block_ident: list[tuple | None] = [None] * num_blocks  # (parent key, tokens, adapter)
        self._seqs: dict[int, Sequence] = {}  # sequences holding blocks (for check_invariants)
        self._state: dict[int, _SeqState] = {}

    # ------------------------------------------------------------------ sizes

    @property
    def num_free_blocks(self) -> int:
        """Blocks allocatable now, counting cached blocks nobody holds (evictable)."""
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks that hold ``num_tokens`` tokens from position 0 (ceil division)."""
        return -(-num_tokens // self.block_size)

    def max_blocks_held(self, num_tokens: int, max_chunk: int) -> int:
        """The most blocks one sequence of ``num_tokens`` tokens ever holds at once,
        when each step computes at most ``max_chunk`` of its tokens.

        Without a window it is all of them. With one, a step computing positions
        c .. c+n-1 holds the keys c-window+1 .. c+n-1 (earlier ones were released
        after the previous step): window-1+n tokens, which can straddle one block
        more than ``blocks_for`` counts when they do not start on a block boundary.
        E.g. block_size 4, window 4, decode at position 5: keys 2..5, blocks 0 and 1,
        blocks_for(4) + 1 = 2.
        """
        full = self.blocks_for(num_tokens)
        if self.window is None:
            return full
        return min(full, self.blocks_for(self.window - 1 + max_chunk) + 1)

    # ---------------------------------------------------------- prefix cache

    def _key(self, parent: int | None, tokens: tuple[int, ...], adapter: Hashable | None) -> int:
        return hash((parent, tokens, adapter))

    def _lookup(self, parent: int | None, tokens: tuple[int, ...], adapter: Hashable | None):
        """(key, block or None) for the block that follows ``parent`` with ``tokens``."""
        key = self._key(parent, tokens, adapter)
        block = self._cached.get(key)
        if block is not None and self._block_ident[block] != (parent, tokens, adapter):
            block = None  # hash collision: a different prefix landed on the same key
        return key, block

    def get_cached_prefix(self, seq: Sequence) -> tuple[list[int], int]:
        """(cached block ids, tokens they cover) for a sequence with no blocks yet.

        Never covers the last token: it must be computed to produce the logits of
        the next one. With 10 tokens and block_size 4, at most (10 - 1) // 4 = 2
        blocks (tokens 0..7); with 9 tokens also 2 (tokens 0..7, token 8 computed);
        with 8 tokens only 1 (tokens 0..3: a full hit on block 1 would cover token 7).
        Changes nothing.
        """
        if not self.enable_prefix_caching:
            return [], 0
        bs = self.block_size
        blocks: list[int] = []
        parent = None
        for i in range((seq.num_tokens - 1) // bs):
            parent, block = self._lookup(parent, _block_tokens(seq, i, bs), seq.adapter)
            if block is None:
                break
            blocks.append(block)
        return blocks, len(blocks) * bs

    def cache_blocks(self, seq: Sequence) -> None:
        """Register the blocks that became full of computed tokens since the last call.

        Called after ``seq.num_computed_tokens`` moved forward. With block_size 4 and
        10 computed tokens, blocks 0 and 1 are full (10 // 4 = 2); block 2 holds
        tokens 8, 9 and is registered once token 11 is computed.
        """
        if not self.enable_prefix_caching:
            return
        st = self._state.get(seq.seq_id)
        if st is None:
            return
        bs = self.block_size
        for i in range(st.num_registered, seq.num_computed_tokens // bs):
            block = seq.block_table[i]
            assert block != NULL_BLOCK, "a block is registered before it leaves the window"
            tokens = _block_tokens(seq, i, bs)
            key, existing = self._lookup(st.parent_key, tokens, seq.adapter)
            # Another sequence may have computed the same block at the same time: keep
            # the first one registered; this copy stays unregistered (freed first).
            if existing is None and key not in self._cached:
                self._cached[key] = block
                self._block_key[block] = key
                self._block_ident[block] = (st.parent_key, tokens, seq.adapter)
            st.parent_key = key
            st.num_registered = i + 1

    def reset_prefix_cache(self) -> None:
        """Forget every registered block (held blocks keep their content, unshared)."""
        for block in [b for b in self._free if self._block_key[b] is not None]:
            self._free.move_to_end(block, last=False)  # worthless now: hand out first
        self._cached.clear()
        self._block_key = [None] * self.num_blocks
        self._block_ident = [None] * self.num_blocks

    # ------------------------------------------------------------ allocation

    def _take(self, block: int) -> None:
        """One more holder of ``block``; a free cached block comes out of the queue."""
        if self._ref[block] == 0:
            del self._free[block]
        self._ref[block] += 1

    def _pop_free(self) -> int:
        """A block for new content: the first in the free queue, its cache entry evicted."""
        block, _ = self._free.popitem(last=False)
        key = self._block_key[block]
        if key is not None:
            del self._cached[key]
            self._block_key[block] = None
            self._block_ident[block] = None
        self._ref[block] = 1
        return block

    def _release(self, block: int) -> None:
        self._ref[block] -= 1
        if self._ref[block] == 0:
            self._free[block] = None  # most recently freed: evicted last
            if self._block_key[block] is None:
                self._free.move_to_end(block, last=False)  # nothing to reuse: hand out first

    def _num_out_of_window(self, num_computed: int) -> int:
        """How many leading blocks no future query reads, once ``num_computed`` tokens
        are computed.

        The next query is at position num_computed and reads keys from
        lo = num_computed - window + 1. Block j's last slot is (j+1)*bs - 1, which is
        < lo exactly when j < lo // bs. E.g. block_size 4, window 6, 12 computed:
        lo = 7, so block 0 (positions 0..3) goes and block 1 (4..7) stays: 7 is read.
        """
        if self.window is None:
            return 0
        return max(0, num_computed - self.window + 1) // self.block_size

    def allocate(self, seq: Sequence, num_new_tokens: int, cached_blocks=()) -> bool:
        """Give ``seq`` slots for positions up to num_computed_tokens + num_new_tokens - 1.

        ``cached_blocks`` (from ``get_cached_prefix``, first allocation only) are
        attached first and count as computed: num_computed_tokens and
        num_cached_tokens become len(cached_blocks) * block_size. All or nothing:
        when the free blocks do not suffice, nothing changes and it returns False.
        """
        cached = list(cached_blocks)
        bs = self.block_size
        if cached:
            assert not seq.block_table, "cached blocks attach to a sequence without blocks"
            first = len(cached) * bs
            # With a window, cached blocks already behind it are never read: leave
            # them out (NULL) rather than take them from the pool.
            skip = min(self._num_out_of_window(first), len(cached))
        else:
            first = seq.num_computed_tokens
            skip = 0
        have = len(cached) if cached else len(seq.block_table)
        num_fresh = max(0, self.blocks_for(first + num_new_tokens) - have)
        # Attaching a cached block nobody holds also takes it from the free queue.
        needed = num_fresh + sum(1 for b in cached[skip:] if self._ref[b] == 0)
        if needed > len(self._free):
            return False

        st = self._state.setdefault(seq.seq_id, _SeqState())
        self._seqs[seq.seq_id] = seq
        if cached:
            for b in cached[skip:]:
                self._take(b)
            seq.block_table = [NULL_BLOCK] * skip + cached[skip:]
            seq.num_computed_tokens = seq.num_cached_tokens = first
            st.num_registered = len(cached)
            st.parent_key = self._block_key[cached[-1]]
            st.num_released = skip
        for _ in range(num_fresh):
            seq.block_table.append(self._pop_free())
        return True

    def release_out_of_window(self, seq: Sequence) -> None:
        """Release the blocks behind the sliding window (no-op without a window)."""
        st = self._state.get(seq.seq_id)
        if st is None:
            return
        n = min(self._num_out_of_window(seq.num_computed_tokens), len(seq.block_table))
        # Latest first, so that the earlier blocks of a prefix are freed later and
        # outlive the later ones in the LRU queue (a prefix hit needs its head).
        for j in range(n - 1, st.num_released - 1, -1):
            if seq.block_table[j] != NULL_BLOCK:
                self._release(seq.block_table[j])
                seq.block_table[j] = NULL_BLOCK
        st.num_released = max(st.num_released, n)

    def free(self, seq: Sequence) -> None:
        """Release every block of ``seq``; registered ones stay reusable. Idempotent."""
        # Last block first: it is freed earliest, so it is evicted before the blocks
        # of the same prefix that precede it.
        for block in reversed(seq.block_table):
            if block != NULL_BLOCK:
                self._release(block)
        seq.block_table = []
        self._state.pop(seq.seq_id, None)
        self._seqs.pop(seq.seq_id, None)

    # ---------------------------------------------------------------- checks

    def check_invariants(self) -> None:
        """Assert the bookkeeping is consistent (tests and debugging)."""
        holders = [0] * self.num_blocks
        for seq in self._seqs.values():
            for b in seq.block_table:
                if b != NULL_BLOCK:
                    holders[b] += 1
        assert holders == self._ref, f"ref counts {self._ref} != table holders {holders}"
        free = {b for b in range(self.num_blocks) if self._ref[b] == 0}
        assert set(self._free) == free, f"free queue {sorted(self._free)} != unreferenced {sorted(free)}"
        assert len(self._free) == len(free), "a block is in the free queue twice"
        for key, block in self._cached.items():
            assert self._block_key[block] == key, f"block {block} cached under {key} but keyed {self._block_key[block]}"
        assert sum(k is not None for k in self._block_key) == len(self._cached), "a block key is not in the cache"


def _block_tokens(seq: Sequence, i: int, bs: int) -> tuple:
    """What block ``i`` of ``seq`` is keyed by: its tokens, and the digests of the images
    it holds tokens of (every image's [IMG] tokens are the same ids)."""
    tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
    images = seq.images_in(i * bs, (i + 1) * bs)
    return tokens + tuple(im.digest for im in images) if images else tokens
