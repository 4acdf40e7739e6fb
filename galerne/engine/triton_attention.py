"""Paged attention for a flat batch mixing prefill chunks and decodes, in Triton.

One kernel serves every step of the paged engine ("unified" attention, as in
vLLM): the new tokens of all sequences are packed back to back in ``q``, and
their keys/values, already written into the paged cache, are read through each
sequence's block table.

Layout and conventions
----------------------
- ``q``: (T, H, hd), the new tokens of sequence b are
  ``q[query_start_loc[b]:query_start_loc[b+1]]``.
- ``k_cache``/``v_cache``: (num_blocks, block_size, K, hd) for one layer; query
  head h reads kv head ``h // (H // K)`` (grouped-query attention).
- ``block_tables``: (B, max_blocks_per_seq) int32; key position p of sequence b
  lives in block ``block_tables[b, p // block_size]``, slot ``p % block_size``.
  Entries the step never needs (past the end, or, with a sliding window, blocks
  out of every query's window, which may hold -1) are never read.
- ``seq_lens``: (B,) int32, context length after the step: the new tokens are
  the last ``q_len`` positions, so query i of sequence b sits at
  ``seq_lens[b] - q_len_b + i``.
- ``window``: a query at p sees keys p-window+1 .. p (window keys, itself
  included: transformers' Mistral convention); None = every key up to p.

Kernel design
-------------
Grid: (query block, kv head, key split). A program owns BLOCK_Q consecutive new
tokens of one sequence and the G = H // K query heads that share one kv head, so
its BLOCK_M = BLOCK_Q * G score rows (token-major, head-minor, padded to a power
of two >= 16 for ``tl.dot``) all use the same K/V tiles: each tile is loaded
once for the whole group. A decode program (one token) has G real rows.

Programs map to (sequence, query block) through a small int32 array built on
the device by :func:`plan_paged_attention` (a cumulative sum of the per-sequence
block counts and a ``searchsorted``), so the launch never syncs with the host
and, with ``max_query_len`` given, has shapes fixed by the batch size and token
count alone: a decode step can be captured in a CUDA graph. When every
sequence fits in one program (``max_query_len <= BLOCK_Q``: decode) the map is
the identity and is not built at all. The plan depends on the batch only, so
an engine builds it once per step and passes it to every layer (the map costs
a handful of tiny launches).

Each program walks the keys it may see, ``[first_pos - window + 1, last_pos]``,
a tile of TILE keys at a time (TILE need not match the cache's block size: each
key finds its block through the block table), so tiles entirely outside the
causal/window range are never visited, and masks the rest. Softmax is online
(flash-attention style) in fp32, in base 2 (scale * log2(e) applied to the
scores). fp32 inputs use IEEE dots (not tf32), for exact tests.

Batches too small to fill the GPU (few sequences x kv heads, i.e. decode)
also split each sequence's key range into ``num_splits`` parts run by separate
programs (flash-decoding); a second small kernel merges their partial results.

Measured on an H200 (triton 3.6, bf16, 32 heads / 8 kv heads, hd 128, block
size 16): decode 3.6-4.0 TB/s of K/V read from 16 sequences up (B=8 at 32k
context: 270 us), B=1 at 4k context about 25 us; a 4096-token causal prefill
about 260 TFLOP/s (cuDNN/flash SDPA on dense k/v: about 510); a CUDA-graph
decode step (B=8) replays in about 20 us.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference implementation still works without triton
    triton = None
    tl = None

LOG2E = 1.4426950408889634


# ---------------------------------------------------------------------------
# Reference (plain PyTorch)
# ---------------------------------------------------------------------------


def reference_paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    window: int | None,
    scale: float,
    max_query_len: int | None = None,
) -> torch.Tensor:
    """What :func:`paged_attention` computes, one sequence at a time, in fp32.

    Gathers each sequence's keys/values from its block table, masks
    causal + window, and runs a plain softmax. Slow; for tests and as a spec.
    """
    _, H, hd = q.shape
    _, block_size, K, _ = k_cache.shape
    hd_v = v_cache.shape[-1]
    G = H // K
    out = q.new_empty((q.shape[0], H, hd_v))
    qsl = query_start_loc.tolist()
    lens = seq_lens.tolist()
    for b in range(len(lens)):
        start, end, L = qsl[b], qsl[b + 1], lens[b]
        n = end - start
        if n == 0:
            continue
        n_blocks = -(-L // block_size)
        blocks = block_tables[b, :n_blocks].long()
        valid = blocks >= 0  # -1: out of every query's window, never attended
        ids = blocks.clamp(min=0)
        # (n_blocks, block_size, K, hd) -> (L, K, hd); zero the unused blocks.
        keep = valid[:, None, None, None]
        keys = torch.where(keep, k_cache[ids].float(), 0.0).reshape(-1, K, hd)[:L]
        values = torch.where(keep, v_cache[ids].float(), 0.0).reshape(-1, K, hd_v)[:L]
        keys = keys.repeat_interleave(G, dim=1).transpose(0, 1)  # (H, L, hd)
        values = values.repeat_interleave(G, dim=1).transpose(0, 1)
        qh = q[start:end].float().transpose(0, 1)  # (H, n, hd)
        q_pos = torch.arange(L - n, L, device=q.device)[:, None]
        k_pos = torch.arange(L, device=q.device)[None, :]
        ok = k_pos <= q_pos
        if window is not None:
            ok &= k_pos > q_pos - window
        scores = (qh @ keys.transpose(1, 2)) * scale
        scores = scores.masked_fill(~ok, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[start:end] = (probs @ values).transpose(0, 1).to(q.dtype)
    return out


# ---------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _unified_attention_kernel(
        out_ptr, part_acc_ptr, part_ml_ptr,
        q_ptr, k_ptr, v_ptr,
        block_tables_ptr, query_start_loc_ptr, seq_lens_ptr, prog_map_ptr,
        qk_scale, window, num_splits,
        stride_qt, stride_qh,
        stride_ot, stride_oh,
        stride_kb, stride_ks, stride_kh,
        stride_vb, stride_vs, stride_vh,
        stride_bt,
        G: tl.constexpr,  # query heads per kv head
        HEAD_DIM: tl.constexpr,  # values' dims (= keys' without ROPE_DIM)
        ROPE_DIM: tl.constexpr,  # keys' extra dims after HEAD_DIM (latent caches), 0 for none
        BLOCK_SIZE: tl.constexpr,  # the cache's tokens per block
        BLOCK_M: tl.constexpr,  # score rows per program (>= BLOCK_Q * G, >= 16)
        BLOCK_Q: tl.constexpr,  # query tokens per program
        TILE: tl.constexpr,  # keys per iteration
        USE_WINDOW: tl.constexpr,
        SPLIT: tl.constexpr,  # write partial (acc, m, l) for a merge kernel
        DIRECT_MAP: tl.constexpr,  # program i = sequence i, query block 0
        DOT_PRECISION: tl.constexpr,
    ):
        pid = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)

        if DIRECT_MAP:  # one program per sequence (decode): no map to read
            seq = pid
            q_block = 0
        else:
            seq = tl.load(prog_map_ptr + 2 * pid)
            q_block = tl.load(prog_map_ptr + 2 * pid + 1)
        q_start = tl.load(query_start_loc_ptr + seq)
        q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
        seq_len = tl.load(seq_lens_ptr + seq)
        first_tok = q_block * BLOCK_Q
        if first_tok >= q_len:  # a spare program of the fixed-size grid
            return
        ctx_len = seq_len - q_len  # position of the first new token

        rows = tl.arange(0, BLOCK_M)
        tok = first_tok + rows // G  # query index within the sequence's new tokens
        head = kv_head * G + rows % G
        row_ok = (rows < BLOCK_Q * G) & (tok < q_len)
        pos = ctx_len + tok  # absolute position of each row's query
        dims = tl.arange(0, HEAD_DIM)

        q_off = (q_start + tok).to(tl.int64) * stride_qt + head * stride_qh
        q = tl.load(q_ptr + q_off[:, None] + dims[None, :], mask=row_ok[:, None], other=0.0)
        if ROPE_DIM > 0:
            rdims = HEAD_DIM + tl.arange(0, ROPE_DIM)
            q_rope = tl.load(q_ptr + q_off[:, None] + rdims[None, :], mask=row_ok[:, None], other=0.0)

        # Keys some row of this program may see: [lo, hi).
        last_tok = tl.minimum(first_tok + BLOCK_Q, q_len) - 1
        hi = ctx_len + last_tok + 1
        if USE_WINDOW:
            lo = tl.maximum(ctx_len + first_tok - window + 1, 0)
        else:
            lo = 0
        tile_lo = lo // TILE
        tile_hi = tl.cdiv(hi, TILE)
        if SPLIT:  # this program's share of the key tiles
            per_split = tl.cdiv(tile_hi - tile_lo, num_splits)
            tile_lo = tile_lo + split * per_split
            tile_hi = tl.minimum(tile_lo + per_split, tile_hi)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
        k_base = k_ptr + kv_head * stride_kh
        v_base = v_ptr + kv_head * stride_vh
        cols = tl.arange(0, TILE)

        # Every tile is masked: on an H200, splitting off the tiles that need no
        # mask into their own loop measured slower (decode and prefill alike),
        # and so did folding the scale into q before the loop.
        for t in range(tile_lo, tile_hi):
            kpos = t * TILE + cols
            k_ok = (kpos >= lo) & (kpos < hi)
            block = tl.load(bt_row + kpos // BLOCK_SIZE, mask=k_ok, other=0).to(tl.int64)
            slot = kpos % BLOCK_SIZE
            k = tl.load(k_base + (block * stride_kb + slot * stride_ks)[None, :] + dims[:, None],
                        mask=k_ok[None, :], other=0.0)  # (HEAD_DIM, TILE)
            v = tl.load(v_base + (block * stride_vb + slot * stride_vs)[:, None] + dims[None, :],
                        mask=k_ok[:, None], other=0.0)  # (TILE, HEAD_DIM)

            s = tl.dot(q, k, input_precision=DOT_PRECISION)
            if ROPE_DIM > 0:
                k_rope = tl.load(k_base + (block * stride_kb + slot * stride_ks)[None, :] + rdims[:, None],
                                 mask=k_ok[None, :], other=0.0)  # (ROPE_DIM, TILE)
                s += tl.dot(q_rope, k_rope, input_precision=DOT_PRECISION)
            s = s * qk_scale
            allowed = k_ok[None, :] & (kpos[None, :] <= pos[:, None])
            if USE_WINDOW:
                allowed = allowed & (kpos[None, :] > pos[:, None] - window)
            s = tl.where(allowed, s, float("-inf"))

            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row with nothing allowed so far keeps m = -inf: shift by 0 instead.
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_shift[:, None])
            alpha = tl.exp2(m_i - m_shift)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new

        if SPLIT:
            # part_acc: (T, H, num_splits, HEAD_DIM) fp32; part_ml: (T, H, num_splits, 2)
            part = ((q_start + tok).to(tl.int64) * (G * tl.num_programs(1)) + head) * num_splits + split
            tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + dims[None, :], acc, mask=row_ok[:, None])
            tl.store(part_ml_ptr + part * 2, m_i, mask=row_ok)
            tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=row_ok)
        else:
            l_safe = tl.where(l_i == 0.0, 1.0, l_i)
            o = acc / l_safe[:, None]
            o_off = (q_start + tok).to(tl.int64) * stride_ot + head * stride_oh
            tl.store(out_ptr + o_off[:, None] + dims[None, :], o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])

    @triton.jit
    def _merge_splits_kernel(
        out_ptr, part_acc_ptr, part_ml_ptr,
        num_heads, num_splits,
        stride_ot, stride_oh,
        HEAD_DIM: tl.constexpr,
        SPLITS_P2: tl.constexpr,
    ):
        """Combine the per-split (acc, max, sum) of one (token, head) row."""
        row = tl.program_id(0)  # token * num_heads + head
        t = row // num_heads
        h = row % num_heads
        s = tl.arange(0, SPLITS_P2)
        s_ok = s < num_splits
        base = row.to(tl.int64) * num_splits
        m = tl.load(part_ml_ptr + (base + s) * 2, mask=s_ok, other=float("-inf"))
        l = tl.load(part_ml_ptr + (base + s) * 2 + 1, mask=s_ok, other=0.0)
        m_max = tl.max(m, 0)
        w = tl.where(m == float("-inf"), 0.0, tl.exp2(m - m_max))
        denom = tl.sum(w * l, 0)
        dims = tl.arange(0, HEAD_DIM)
        acc = tl.load(part_acc_ptr + (base + s)[:, None] * HEAD_DIM + dims[None, :], mask=s_ok[:, None], other=0.0)
        o = tl.sum(acc * w[:, None], 0) / tl.where(denom == 0.0, 1.0, denom)
        o_off = t.to(tl.int64) * stride_ot + h * stride_oh
        tl.store(out_ptr + o_off + dims, o.to(out_ptr.dtype.element_ty))


# ---------------------------------------------------------------------------
# Wrapper
# ---------------------------------------------------------------------------


class AttentionPlan(NamedTuple):
    """Launch parameters of one step, shared by all its layers."""

    prog_map: torch.Tensor | None  # (num_programs, 2) int32: (sequence, query block); None: program i = sequence i
    num_programs: int
    block_m: int
    block_q: int
    tile: int
    num_splits: int
    num_warps: int
    num_stages: int


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def plan_paged_attention(
    query_start_loc: torch.Tensor,
    num_tokens: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
    *,
    block_m: int | None = None,
    tile: int | None = None,
    num_splits: int | None = None,
) -> AttentionPlan:
    """Pick block shapes and map programs to (sequence, query block), on the device.

    No host<->device sync when ``max_query_len`` is given: shapes depend on
    ``num_tokens``, the batch size and ``max_query_len`` only. ``max_seq_len``
    (an upper bound, e.g. max_blocks_per_seq * block_size) helps choose the
    number of key splits for decode; ``block_m``, ``tile`` and ``num_splits``
    override the heuristics (tests, tuning).
    """
    B = query_start_loc.shape[0] - 1
    G = num_heads // num_kv_heads
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max()) if B > 0 else 0
    max_query_len = max(1, int(max_query_len))

    if block_m is None:
        cap = 128 if head_dim <= 64 else 64
        block_m = min(max(16, _next_pow2(G * max_query_len)), max(cap, _next_pow2(G)))
    block_m = max(block_m, 16, _next_pow2(G))
    block_q = block_m // G
    if tile is None:
        tile = 64
    num_warps = 4 if block_m <= 64 else 8
    num_stages = 3

    # Programs: sequence b needs cdiv(q_len_b, block_q) of them; their total is
    # at most num_tokens // block_q + B and at most B * cdiv(max_query_len, block_q).
    num_programs = max(1, min(num_tokens // block_q + B, B * -(-max_query_len // block_q)))
    device = query_start_loc.device
    if max_query_len <= block_q:
        # One program per sequence (decode, short spec-decode chunks): the map is
        # the identity, and the plan launches nothing.
        prog_map = None
        num_programs = max(1, B)
    else:
        qsl = query_start_loc.to(torch.int32)
        n_blocks = (qsl[1:] - qsl[:-1] + (block_q - 1)) // block_q  # (B,)
        ends = torch.cumsum(n_blocks, 0, dtype=torch.int32)
        pid = torch.arange(num_programs, device=device, dtype=torch.int32)
        seq = torch.searchsorted(ends, pid, right=True, out_int32=True).clamp_(max=max(B - 1, 0))
        q_block = pid - (ends - n_blocks)[seq]  # past the last sequence: >= its block count
        prog_map = torch.stack([seq, q_block], dim=1).contiguous()

    if num_splits is None:
        num_splits = 1
        sms = _sm_count(device)
        if sms and max_seq_len:
            programs = num_programs * num_kv_heads
            key_tiles = -(-int(max_seq_len) // tile)
            if programs < sms and key_tiles >= 8:
                # About four programs per SM, each with >= 4 key tiles, at most 32
                # splits, a power of two (odd counts measured slower on an H200).
                want = min(-(-4 * sms // programs), key_tiles // 4, 32)
                num_splits = 1 << (max(1, want).bit_length() - 1)
    return AttentionPlan(prog_map, num_programs, block_m, block_q, tile, int(num_splits), num_warps, num_stages)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    window: int | None,
    scale: float,
    max_query_len: int | None = None,
    *,
    plan: AttentionPlan | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal (optionally sliding-window) paged attention -> (T, H, hd_v) in q's dtype.

    See the module docstring for the layout. With ``max_query_len`` (or a
    ``plan`` from :func:`plan_paged_attention`, built once per step and shared
    by the layers) the call never syncs with the host and is CUDA-graph safe.

    Keys may be wider than values (a latent cache, multi-head latent attention:
    keys are the latent then the rotary key, values a view of the latent, the same
    memory): the first hd_v dims of q and k score as usual, the rest are a second
    dot product, so both parts stay powers of two.
    """
    if triton is None:
        raise RuntimeError("paged_attention needs triton; use reference_paged_attention")
    T, H, hd_k = q.shape
    _, block_size, K, hd_kc = k_cache.shape
    hd = v_cache.shape[-1]
    rope = hd_k - hd
    assert hd_kc == hd_k and v_cache.shape[:-1] == k_cache.shape[:-1] and H % K == 0
    assert hd >= 16 and hd & (hd - 1) == 0, "the values' head_dim must be a power of two >= 16"
    assert rope == 0 or (rope >= 16 and rope & (rope - 1) == 0), "keys' extra dims must be a power of two >= 16"
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    assert out is None or (out.shape == (T, H, hd) and out.dtype == q.dtype and out.stride(-1) == 1)
    assert block_size & (block_size - 1) == 0, "block_size must be a power of two"
    G = H // K
    if out is None:
        out = q.new_empty((T, H, hd))
    if T == 0:
        return out
    if plan is None:
        plan = plan_paged_attention(
            query_start_loc, T, H, K, hd, max_query_len,
            max_seq_len=block_tables.shape[1] * block_size,
        )
    split = plan.num_splits > 1
    if split:
        part_acc = torch.empty((T, H, plan.num_splits, hd), dtype=torch.float32, device=q.device)
        part_ml = torch.empty((T, H, plan.num_splits, 2), dtype=torch.float32, device=q.device)
    else:
        part_acc = part_ml = out  # unused
    dot_precision = "ieee" if q.dtype == torch.float32 else None

    grid = (plan.num_programs, K, plan.num_splits)
    _unified_attention_kernel[grid](
        out, part_acc, part_ml,
        q, k_cache, v_cache,
        block_tables, query_start_loc, seq_lens,
        plan.prog_map if plan.prog_map is not None else query_start_loc,
        float(scale) * LOG2E, int(window) if window is not None else 0, plan.num_splits,
        q.stride(0), q.stride(1),
        out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        G=G, HEAD_DIM=hd, ROPE_DIM=rope, BLOCK_SIZE=block_size,
        BLOCK_M=plan.block_m, BLOCK_Q=plan.block_q, TILE=plan.tile,
        USE_WINDOW=window is not None, SPLIT=split, DIRECT_MAP=plan.prog_map is None,
        DOT_PRECISION=dot_precision,
        num_warps=plan.num_warps, num_stages=plan.num_stages,
    )
    if split:
        _merge_splits_kernel[(T * H,)](
            out, part_acc, part_ml,
            H, plan.num_splits,
            out.stride(0), out.stride(1),
            HEAD_DIM=hd, SPLITS_P2=_next_pow2(plan.num_splits),
            num_warps=4,
        )
    return out
