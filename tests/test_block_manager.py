"""BlockManager on its own: allocation arithmetic, ref counts, prefix cache, LRU, window."""

from __future__ import annotations

import pytest
import torch

from galerne.engine.block_manager import NULL_BLOCK, BlockManager
from galerne.engine.paged import BatchMetadata
from galerne.engine.sequence import Sequence
from galerne.sampling.params import SamplingParams


def make_seq(tokens, adapter=None, max_tokens=16):
    return Sequence(list(tokens), SamplingParams(max_tokens=max_tokens), adapter=adapter)


def compute(bm: BlockManager, seq: Sequence, n: int) -> None:
    """Allocate and 'compute' n more tokens of seq, as a scheduler step would."""
    assert bm.allocate(seq, n)
    seq.num_computed_tokens += n
    bm.cache_blocks(seq)
    bm.release_out_of_window(seq)


def prefill(bm, tokens, adapter=None) -> Sequence:
    seq = make_seq(tokens, adapter)
    compute(bm, seq, len(tokens))
    return seq


def test_allocation_arithmetic():
    bm = BlockManager(10, 4)
    assert [bm.blocks_for(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]
    seq = make_seq(range(10))
    assert bm.allocate(seq, 10)
    assert len(seq.block_table) == 3  # positions 0..9 -> blocks 0, 1, 2
    assert (bm.num_free_blocks, bm.num_used_blocks, bm.usage) == (7, 3, 0.3)
    # The cache slots the model writes these 10 positions to: position 9 at offset 1
    # of the sequence's third block, 10 distinct slots in its 3 blocks.
    slots = BatchMetadata.build([(seq.block_table, 0, 10)], 4, torch.device("cpu")).slot_mapping.tolist()
    assert slots[9] == seq.block_table[2] * 4 + 1 and slots[4] == seq.block_table[1] * 4
    assert len(set(slots)) == 10 and {s // 4 for s in slots} == set(seq.block_table)
    seq.num_computed_tokens = 10
    for n_tokens, n_blocks in ((11, 3), (12, 3), (13, 4)):
        seq.token_ids.append(0)  # the sampled token; its slot is allocated next step
        assert bm.allocate(seq, 1)
        seq.num_computed_tokens += 1
        assert seq.num_tokens == n_tokens and len(seq.block_table) == n_blocks
    assert len(set(seq.block_table)) == 4
    bm.check_invariants()


def test_allocation_is_all_or_nothing():
    bm = BlockManager(4, 4)
    a = make_seq(range(12))
    assert bm.allocate(a, 12)  # 3 blocks, 1 left
    b = make_seq(range(100, 108))
    assert not bm.allocate(b, 8)  # needs 2
    assert b.block_table == [] and bm.num_free_blocks == 1
    assert bm.allocate(b, 4)  # a chunk of 4 fits
    assert bm.num_free_blocks == 0
    bm.check_invariants()


def test_failed_allocation_leaves_cached_block_in_free_queue():
    bm = BlockManager(4, 4)
    a = prefill(bm, range(5))  # block 0 registered (tokens 0..3)
    bm.free(a)
    hog = make_seq(range(100, 112))
    assert bm.allocate(hog, 8)  # 2 blocks: the 2 never-used ones; a's 2 blocks stay free
    b = make_seq(range(9))
    cached, n = bm.get_cached_prefix(b)
    assert n == 4 and len(cached) == 1
    # b needs the cached block + 2 fresh (positions 4..8) but only 1 other is free.
    assert not bm.allocate(b, 5, cached)
    assert b.block_table == [] and b.num_computed_tokens == 0
    assert bm.num_free_blocks == 2
    assert bm.get_cached_prefix(b) == (cached, 4)  # still cached
    bm.check_invariants()


def test_shared_prefix_ref_counts():
    bm = BlockManager(10, 4)
    a = prefill(bm, range(9))  # blocks 0, 1 full and registered; block 2 holds token 8
    b = make_seq(list(range(8)) + [50, 51, 52])
    cached, n = bm.get_cached_prefix(b)
    assert cached == a.block_table[:2] and n == 8
    assert bm.allocate(b, 3, cached)
    assert b.block_table[:2] == a.block_table[:2]  # the same physical blocks
    assert b.num_computed_tokens == b.num_cached_tokens == 8
    assert len(b.block_table) == 3 and b.block_table[2] != a.block_table[2]
    assert bm.num_used_blocks == 4
    bm.check_invariants()
    bm.free(a)
    assert bm.num_used_blocks == 3  # b still holds the shared two
    bm.check_invariants()
    bm.free(b)
    assert bm.num_free_blocks == 10
    bm.check_invariants()


def test_prefix_hit_never_covers_last_token():
    bm = BlockManager(10, 4)
    a = prefill(bm, range(12))  # 3 full blocks registered
    assert bm.get_cached_prefix(make_seq(range(12))) == (a.block_table[:2], 8)  # token 11 recomputed
    assert bm.get_cached_prefix(make_seq(range(13))) == (a.block_table[:3], 12)
    assert bm.get_cached_prefix(make_seq(range(8))) == (a.block_table[:1], 4)
    assert bm.get_cached_prefix(make_seq(range(4))) == ([], 0)
    assert bm.get_cached_prefix(make_seq([99] + list(range(1, 12)))) == ([], 0)  # differs in block 0
    assert bm.get_cached_prefix(make_seq([0, 1, 2, 3, 99, 5, 6, 7, 8])) == (a.block_table[:1], 4)


def test_partial_block_is_not_registered_until_full():
    bm = BlockManager(10, 4)
    seq = make_seq(range(6))
    compute(bm, seq, 6)
    assert bm.get_cached_prefix(make_seq(range(20)))[1] == 4
    seq.token_ids += [6, 7]
    compute(bm, seq, 2)  # now tokens 0..7 computed: block 1 full
    assert bm.get_cached_prefix(make_seq(range(20)))[1] == 8


def test_adapter_is_part_of_the_key():
    bm = BlockManager(10, 4)
    prefill(bm, range(9), adapter="fr")
    assert bm.get_cached_prefix(make_seq(range(9)))[1] == 0
    assert bm.get_cached_prefix(make_seq(range(9), adapter="de"))[1] == 0
    assert bm.get_cached_prefix(make_seq(range(9), adapter="fr"))[1] == 8


def test_hash_collision_is_not_a_hit():
    bm = BlockManager(10, 4)
    bm._key = lambda parent, tokens, adapter: 0  # every block collides
    prefill(bm, range(9))
    assert bm.get_cached_prefix(make_seq(range(9)))[1] == 4  # block 0 found; block 1 could not register
    assert bm.get_cached_prefix(make_seq(range(100, 109)))[1] == 0  # same key, other tokens
    bm.check_invariants()


def test_lru_eviction_order_and_hit_takes_block_back():
    bm = BlockManager(3, 2)
    a, b, c = (prefill(bm, t) for t in ([1, 2], [3, 4], [5, 6]))  # one full block each
    blocks = {s: s.block_table[0] for s in (a, b, c)}
    for s in (b, a, c):  # freed in this order: b is the least recently freed
        bm.free(s)
    assert bm.num_free_blocks == 3 and bm.usage == 0.0
    d = make_seq([7, 8])
    assert bm.allocate(d, 2)
    assert d.block_table == [blocks[b]]  # b's block evicted first
    assert bm.get_cached_prefix(make_seq([3, 4, 9]))[1] == 0
    # A hit on a's freed block takes it out of the free queue...
    e = make_seq([1, 2, 9])
    cached, n = bm.get_cached_prefix(e)
    assert cached == [blocks[a]] and n == 2
    assert bm.allocate(e, 1, cached)
    # ... so the fresh block for token 9 had to evict c's, the last one free.
    assert e.block_table == [blocks[a], blocks[c]]
    assert bm.num_free_blocks == 0
    assert bm.get_cached_prefix(make_seq([5, 6, 9]))[1] == 0
    bm.check_invariants()


def test_unregistered_blocks_are_handed_out_before_cached_ones():
    bm = BlockManager(3, 2)
    a = prefill(bm, [1, 2, 3])  # block 0 registered, block 1 holds token 3 only
    full, partial = a.block_table
    bm.free(a)
    order = []
    for t in range(3):
        s = make_seq([10 + t])
        assert bm.allocate(s, 1)
        order.append(s.block_table[0])
    never_used = ({0, 1, 2} - {full, partial}).pop()
    assert order == [partial, never_used, full]


def test_sliding_window_bounds_blocks_held():
    window, bs = 6, 4
    bm = BlockManager(4, bs, window=window)
    seq = make_seq(range(4))
    compute(bm, seq, 4)
    peak = 0
    while seq.num_tokens < 60:  # 60 tokens would need 15 blocks without the window
        seq.token_ids.append(seq.num_tokens)
        compute(bm, seq, 1)
        held = [b for b in seq.block_table if b != NULL_BLOCK]
        peak = max(peak, len(held))
        # Every key the next query (position num_computed) reads is still there.
        for p in range(seq.num_computed_tokens - window + 1, seq.num_computed_tokens):
            assert seq.block_table[p // bs] != NULL_BLOCK
        # And everything before the window is released.
        lo = seq.num_computed_tokens - window + 1
        assert seq.block_table[: lo // bs] == [NULL_BLOCK] * (lo // bs)
        bm.check_invariants()
    assert peak <= bm.max_blocks_held(seq.num_tokens, 1) == 3  # blocks_for(6) + 1
    bm.free(seq)
    assert bm.num_free_blocks == 4
    bm.check_invariants()


def test_sliding_window_prefix_hit_skips_blocks_behind_the_window():
    bm = BlockManager(20, 4, window=4)
    a = prefill(bm, range(17))  # blocks 0..3 registered, then released behind the window
    assert a.block_table[:3] == [NULL_BLOCK] * 3
    bm.free(a)
    b = make_seq(list(range(17)) + [77])
    cached, n = bm.get_cached_prefix(b)
    assert n == 16 and len(cached) == 4
    assert bm.allocate(b, 2, cached)
    # The first query is at 16 and reads keys 13..16: blocks 3 and 4 only.
    assert b.block_table[:3] == [NULL_BLOCK] * 3
    assert b.block_table[3] == cached[3] and len(b.block_table) == 5
    assert bm.num_used_blocks == 2
    bm.check_invariants()
    bm.free(b)
    assert bm.num_free_blocks == 20


def test_free_returns_to_empty_and_is_idempotent():
    bm = BlockManager(8, 4)
    # Two sequences computing the same tokens (the second's blocks stay unregistered
    # duplicates), and a third attached to the first's cached blocks.
    seqs = [prefill(bm, range(9)) for _ in range(2)]
    seqs.append(make_seq(range(10)))
    cached, _ = bm.get_cached_prefix(seqs[2])
    assert bm.allocate(seqs[2], 2, cached)
    for s in seqs:
        bm.free(s)
        bm.free(s)
        assert s.block_table == []
    assert bm.num_free_blocks == 8 and bm.num_used_blocks == 0
    bm.check_invariants()


def test_reset_prefix_cache():
    bm = BlockManager(8, 4)
    bm.free(prefill(bm, range(9)))
    assert bm.get_cached_prefix(make_seq(range(9)))[1] == 8
    bm.reset_prefix_cache()
    assert bm.get_cached_prefix(make_seq(range(9)))[1] == 0
    bm.check_invariants()


def test_prefix_caching_off():
    bm = BlockManager(8, 4, enable_prefix_caching=False)
    bm.free(prefill(bm, range(9)))
    assert bm.get_cached_prefix(make_seq(range(9))) == ([], 0)


def test_check_invariants_catches_a_bad_ref_count():
    bm = BlockManager(4, 4)
    seq = prefill(bm, range(5))
    bm._ref[seq.block_table[0]] += 1
    with pytest.raises(AssertionError):
        bm.check_invariants()
