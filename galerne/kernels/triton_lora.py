"""Batched LoRA deltas on CUDA, in Triton (Punica / S-LoRA's shrink and expand).

``lora_delta(x, A, B, slot_of_row, out)`` adds ``B[s] @ (A[s] @ x[t])`` to
``out[t]`` for every row t whose slot s = ``slot_of_row[t]`` is >= 0; rows of
slot -1 (the base model) are neither read nor written. The stacks are
``MultiLoRALinear``'s (galerne.models.lora): A (S, R, in), B (S, out, R), a slot
of rank r < R zero past r, the scaling folded into B.

Two kernels, as Punica:

- shrink: u[t] = A[s] @ x[t], (T, R) in float32. Grid (row block, rank block,
  split of ``in``); each program walks its part of ``in`` a tile at a time.
- expand: out[t] += B[s] @ u[t], in out's dtype. Grid (row block, out tile);
  each program walks the rank a tile at a time.

A row block is BLOCK_T consecutive rows. Rows of one slot are usually
contiguous (a prefill chunk, or decodes of one adapter, which ``LoRARows``
merges into one run), so without sorting anything a program loads its rows'
slots and, when they all agree, multiplies the whole block by one A (or B)
tile with ``tl.dot``; a block that mixes slots falls back to one GEMV per row.
With BLOCK_T = 1 every program is one row's GEMV (BGMV): the shape for decode
steps that mix many adapters. The caller picks BLOCK_T from what the host
already knows (``block_t``; MultiLoRALinear: its groups' mean run length).

Nothing here reads the device from the host: slot_of_row is read by the kernels,
and the launch depends on shapes and on ``max_rank`` and ``block_t`` (host ints),
so a call can be captured in a CUDA graph.

With ``in`` large and few programs (a decode step: a handful of rows, rank 16)
the shrink also splits ``in`` over SPLIT_K programs that add their partial sums
into a zeroed u with float32 atomics (so u's low bits depend on their order).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # galerne runs without triton; MultiLoRALinear then uses torch ops
    triton = None
    tl = None

def reference_lora_delta(x, A, B, slot_of_row, out, *, max_rank=None):
    """What :func:`lora_delta` computes, row by row in float32 (slow; a spec for tests)."""
    R = A.shape[1] if max_rank is None else max_rank
    slots = slot_of_row.tolist()
    for t, s in enumerate(slots):
        if s < 0:
            continue
        u = A[s, :R].float() @ x[t].float()  # (R,)
        out[t] = (out[t].float() + B[s, :, :R].float() @ u).to(out.dtype)
    return out


if triton is not None:

    @triton.jit
    def _shrink_row(x_ptr, a_ptr, u_ptr, t, slot, offs_r, r_mask, k_lo, k_hi,
                    stride_xt, stride_as, stride_ar, stride_ut,
                    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
        """u[t, offs_r] (+)= A[slot, offs_r, k_lo:k_hi] @ x[t, k_lo:k_hi], one GEMV."""
        acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
        a_rows = a_ptr + slot.to(tl.int64) * stride_as + offs_r[:, None] * stride_ar  # (BLOCK_R, 1)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < k_hi
            xv = tl.load(x_ptr + t * stride_xt + offs_k, mask=k_mask, other=0.0).to(tl.float32)
            a = tl.load(a_rows + offs_k[None, :], mask=r_mask[:, None] & k_mask[None, :], other=0.0)
            acc += tl.sum(a.to(tl.float32) * xv[None, :], axis=1)
        dst = u_ptr + t * stride_ut + offs_r
        if SPLIT_K == 1:
            tl.store(dst, acc, mask=r_mask)
        else:
            tl.atomic_add(dst, acc, mask=r_mask)

    @triton.jit
    def _block_slots(slot_ptr, pid_t, T, BLOCK_T: tl.constexpr):
        """The rows of block ``pid_t``, their mask, and the lowest and highest slot among
        them (equal and >= 0: the whole block uses one adapter)."""
        offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        t_mask = offs_t < T
        slots = tl.load(slot_ptr + offs_t, mask=t_mask, other=-1)
        lo = tl.min(tl.where(t_mask, slots, 2147483647), axis=0)
        hi = tl.max(slots, axis=0)
        return offs_t, t_mask, lo, hi

    @triton.jit
    def _shrink_kernel(
        x_ptr, a_ptr, u_ptr, slot_ptr,
        T, K, R, k_per_split,
        stride_xt, stride_as, stride_ar, stride_ut,
        BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
        SPLIT_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        pid_t, pid_r, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        r_mask = offs_r < R
        k_lo = pid_k * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, K)
        if BLOCK_T == 1:
            slot = tl.load(slot_ptr + pid_t)
            if slot >= 0:
                _shrink_row(x_ptr, a_ptr, u_ptr, pid_t, slot, offs_r, r_mask, k_lo, k_hi,
                            stride_xt, stride_as, stride_ar, stride_ut, BLOCK_R, BLOCK_K, SPLIT_K)
        else:
            offs_t, t_mask, lo, hi = _block_slots(slot_ptr, pid_t, T, BLOCK_T)
            if lo == hi and lo >= 0:
                # One slot for the whole block (a prefill chunk): x tile @ A tile^T.
                acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
                a_rows = a_ptr + lo.to(tl.int64) * stride_as + offs_r[None, :] * stride_ar  # (1, BLOCK_R)
                for k0 in range(k_lo, k_hi, BLOCK_K):
                    offs_k = k0 + tl.arange(0, BLOCK_K)
                    k_mask = offs_k < k_hi
                    xt = tl.load(x_ptr + offs_t[:, None] * stride_xt + offs_k[None, :],
                                 mask=t_mask[:, None] & k_mask[None, :], other=0.0)  # (BLOCK_T, BLOCK_K)
                    at = tl.load(a_rows + offs_k[:, None],
                                 mask=k_mask[:, None] & r_mask[None, :], other=0.0)  # (BLOCK_K, BLOCK_R)
                    acc = tl.dot(xt, at, acc, input_precision=DOT_PRECISION)
                dst = u_ptr + offs_t[:, None] * stride_ut + offs_r[None, :]
                mask = t_mask[:, None] & r_mask[None, :]
                if SPLIT_K == 1:
                    tl.store(dst, acc, mask=mask)
                else:
                    tl.atomic_add(dst, acc, mask=mask)
            elif hi >= 0:
                # Slots mixed in the block: one GEMV per adapter row.
                for i in range(BLOCK_T):
                    t = pid_t * BLOCK_T + i
                    if t < T:
                        slot = tl.load(slot_ptr + t)
                        if slot >= 0:
                            _shrink_row(x_ptr, a_ptr, u_ptr, t, slot, offs_r, r_mask, k_lo, k_hi,
                                        stride_xt, stride_as, stride_ar, stride_ut, BLOCK_R, BLOCK_K, SPLIT_K)

    @triton.jit
    def _expand_row(u_ptr, b_ptr, out_ptr, t, slot, offs_n, n_mask, R,
                    stride_ut, stride_bs, stride_bn, stride_ot, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
        """out[t, offs_n] += B[slot, offs_n, :R] @ u[t, :R], one GEMV."""
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        b_rows = b_ptr + slot.to(tl.int64) * stride_bs + offs_n[:, None] * stride_bn  # (BLOCK_N, 1)
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            r_mask = offs_r < R
            uv = tl.load(u_ptr + t * stride_ut + offs_r, mask=r_mask, other=0.0)
            b = tl.load(b_rows + offs_r[None, :], mask=n_mask[:, None] & r_mask[None, :], other=0.0)
            acc += tl.sum(b.to(tl.float32) * uv[None, :], axis=1)
        dst = out_ptr + t * stride_ot + offs_n
        y = tl.load(dst, mask=n_mask)
        tl.store(dst, (y.to(tl.float32) + acc).to(y.dtype), mask=n_mask)

    @triton.jit
    def _expand_kernel(
        u_ptr, b_ptr, out_ptr, slot_ptr,
        T, N, R,
        stride_ut, stride_bs, stride_bn, stride_ot,
        BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):
        pid_t, pid_n = tl.program_id(0), tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        if BLOCK_T == 1:
            slot = tl.load(slot_ptr + pid_t)
            if slot >= 0:
                _expand_row(u_ptr, b_ptr, out_ptr, pid_t, slot, offs_n, n_mask, R,
                            stride_ut, stride_bs, stride_bn, stride_ot, BLOCK_N, BLOCK_R)
        else:
            offs_t, t_mask, lo, hi = _block_slots(slot_ptr, pid_t, T, BLOCK_T)
            if lo == hi and lo >= 0:
                acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
                b_cols = b_ptr + lo.to(tl.int64) * stride_bs + offs_n[None, :] * stride_bn  # (1, BLOCK_N)
                for r0 in range(0, R, BLOCK_R):
                    offs_r = r0 + tl.arange(0, BLOCK_R)
                    r_mask = offs_r < R
                    ut = tl.load(u_ptr + offs_t[:, None] * stride_ut + offs_r[None, :],
                                 mask=t_mask[:, None] & r_mask[None, :], other=0.0)  # (BLOCK_T, BLOCK_R)
                    bt = tl.load(b_cols + offs_r[:, None],
                                 mask=r_mask[:, None] & n_mask[None, :], other=0.0)  # (BLOCK_R, BLOCK_N)
                    # u in B's dtype for the tensor cores (fp16/bf16), as torch's u @ B.T would be.
                    acc = tl.dot(ut.to(bt.dtype), bt, acc, input_precision=DOT_PRECISION)
                dst = out_ptr + offs_t[:, None] * stride_ot + offs_n[None, :]
                mask = t_mask[:, None] & n_mask[None, :]
                y = tl.load(dst, mask=mask)
                tl.store(dst, (y.to(tl.float32) + acc).to(y.dtype), mask=mask)
            elif hi >= 0:
                for i in range(BLOCK_T):
                    t = pid_t * BLOCK_T + i
                    if t < T:
                        slot = tl.load(slot_ptr + t)
                        if slot >= 0:
                            _expand_row(u_ptr, b_ptr, out_ptr, t, slot, offs_n, n_mask, R,
                                        stride_ut, stride_bs, stride_bn, stride_ot, BLOCK_N, BLOCK_R)


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def lora_delta(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, slot_of_row: torch.Tensor, out: torch.Tensor,
    *, max_rank: int | None = None, block_t: int | None = None, split_k: int | None = None,
) -> torch.Tensor:
    """out[t] += B[s] @ (A[s] @ x[t]) for each row t of slot s = slot_of_row[t] >= 0.

    x: (T, in); A: (S, R, in); B: (S, out, R); slot_of_row: (T,) int32 on x's device
    (-1: leave the row alone); out: (T, out), updated in place and returned. x, A, B
    and out share a dtype (float32, float16, bfloat16). ``max_rank``: use only the
    first ``max_rank`` of R (the largest rank among the slots present: the rest is
    zero padding). ``block_t``: rows per program, 1 (one GEMV per row, for rows of
    many slots) or 16 (a tile of rows, ``tl.dot`` when they share a slot); None: 16
    from 64 rows. ``split_k``: programs per row block sharing ``in`` (None: enough
    to fill the GPU); for tests."""
    if triton is None:
        raise RuntimeError("lora_delta needs triton; use reference_lora_delta")
    T, K = x.shape
    S, R_full, K_a = A.shape
    N = out.shape[1]
    R = R_full if max_rank is None else max_rank
    assert K_a == K and B.shape == (S, N, R_full) and out.shape[0] == T and slot_of_row.shape == (T,)
    assert 0 <= R <= R_full
    assert x.dtype == A.dtype == B.dtype == out.dtype, "x, A, B and out share a dtype"
    assert slot_of_row.dtype == torch.int32
    assert x.stride(1) == 1 and A.stride(2) == 1 and B.stride(2) == 1 and out.stride(1) == 1
    if T == 0 or R == 0:
        return out
    if block_t is None:
        block_t = 16 if T >= 64 else 1
    assert block_t in (1, 16), "block_t: 1 (GEMV per row) or 16 (tl.dot's smallest tile)"
    dot_precision = "ieee" if x.dtype == torch.float32 else None  # exact fp32, no tf32

    # Shrink: rank blocks of up to 64, in tiles of 64 (a block GEMV's (64, 64) tile).
    block_r = min(max(_pow2(R), 16), 64)
    block_k = 64
    row_blocks = triton.cdiv(T, block_t)
    programs = row_blocks * triton.cdiv(R, block_r)
    if split_k is None:
        # Few programs (decode): split ``in`` so that some 256 run, each over at
        # least 512 of ``in`` (fewer and the atomics cost more than they spread).
        split_k = max(1, min(256 // programs, K // 512, 32))
    k_per_split = triton.cdiv(triton.cdiv(K, split_k), block_k) * block_k
    split_k = triton.cdiv(K, k_per_split)  # no empty split
    if split_k > 1:
        u = torch.zeros((T, R), dtype=torch.float32, device=x.device)
    else:
        u = torch.empty((T, R), dtype=torch.float32, device=x.device)  # base rows: never read
    _shrink_kernel[(row_blocks, triton.cdiv(R, block_r), split_k)](
        x, A, u, slot_of_row,
        T, K, R, k_per_split,
        x.stride(0), A.stride(0), A.stride(1), u.stride(0),
        BLOCK_T=block_t, BLOCK_R=block_r, BLOCK_K=block_k, SPLIT_K=split_k,
        DOT_PRECISION=dot_precision,
    )

    # Expand: out tiles of 64 (128 for a row's GEMV), the rank in tiles of up to 64.
    block_n = 64 if block_t > 1 else 128
    block_r2 = min(max(_pow2(R), 16), 64)
    _expand_kernel[(row_blocks, triton.cdiv(N, block_n))](
        u, B, out, slot_of_row,
        T, N, R,
        u.stride(0), B.stride(0), B.stride(1), out.stride(0),
        BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_R=block_r2,
        DOT_PRECISION=dot_precision,
    )
    return out
