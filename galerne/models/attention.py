"""Attention over a flat batch without a cache: scoring and training.

Sequences packed back to back never attend to each other (document masking), and
a layer with a sliding window of W lets token i see tokens i-W+1 .. i (W tokens,
itself included: transformers' convention for Mistral).

One sequence that the window does not cut is one causal SDPA call (FlashAttention on
CUDA). Several packed sequences (documents), or a window shorter than the sequence, take
one of three kernels, all equal up to rounding:

* ``dense``: one SDPA call with a (T, T) bool mask (causal, same document, window). The
  CPU default: one call over T tokens, no per-document overhead. On CUDA a mask rules
  out FlashAttention (SDPA falls back to its memory-efficient kernel, which reads the
  T x T mask and computes the blocks the mask throws away).
* ``varlen``: FlashAttention's variable-length kernel (``torch.nn.attention.varlen``):
  the documents' boundaries as cumulative lengths, the window as FlashAttention's
  (W - 1, 0), grouped KV heads natively; no mask, no wasted block. The CUDA default for
  fp16/bf16 (autocast's dtype included) and head dims FlashAttention takes; CUDA only.
* ``documents``: one causal SDPA call per document (a document the window cuts gets
  its own (L, L) mask). Any device and dtype: the CUDA fallback (float32 without
  autocast, different q and v head dims), and the path the CPU tests check against
  ``dense``, gradients included.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False,
         scale: float | None = None):
    """q: (H, Tq, hd), k: (K, Tk, hd), v: (K, Tk, vd), mask: (Tq, Tk) bool (True = may attend) -> (H, Tq, vd).

    Grouped-query attention without repeating k/v: SDPA broadcasts K heads over H.
    ``scale`` None: hd^-0.5.
    """
    return F.scaled_dot_product_attention(
        q[None], k[None], v[None], attn_mask=mask, is_causal=causal, enable_gqa=q.shape[0] != k.shape[0], scale=scale
    )[0]


def allowed_mask(
    q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None,
    q_seq: torch.Tensor | None = None, k_seq: torch.Tensor | None = None,
) -> torch.Tensor:
    """(Tq, Tk) bool: causal, within the window, and (if given) in the same sequence."""
    qp, kp = q_pos[:, None], k_pos[None, :]
    ok = kp <= qp
    if window is not None:
        ok &= kp > qp - window
    if q_seq is not None:
        ok &= q_seq[:, None] == k_seq[None, :]
    return ok


KERNELS = ("auto", "dense", "documents", "varlen")


@functools.cache
def _varlen_attn() -> tuple[Callable | None, frozenset[str]]:
    """(torch's varlen_attn or None, the names of its parameters). It came in torch 2.10
    with ``is_causal``; 2.11+ has ``window_size`` instead, and GQA as ``enable_gqa``."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, frozenset()
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


class NoCacheAttention:
    """Backend for one forward over whole sequences (``seqlens`` sum to T).

    ``kernel``: how packed sequences (or a window shorter than a sequence) are attended,
    see the module docstring; ``auto``: ``varlen`` on CUDA when it applies, else
    ``documents`` there; ``dense`` on CPU.
    """

    def __init__(self, seqlens: Sequence[int], device: torch.device | str = "cpu", kernel: str = "auto"):
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, not {kernel!r}")
        self.seqlens = list(seqlens)
        self.kernel = kernel
        lens = torch.tensor(self.seqlens, device=device)
        self.seq_ids = torch.repeat_interleave(torch.arange(len(self.seqlens), device=device), lens)
        starts = torch.cumsum(lens, 0) - lens
        self.positions = torch.arange(int(lens.sum()), device=device) - torch.repeat_interleave(starts, lens)
        # Python ints: slicing per document and the varlen kernel's lengths need no device sync.
        ends = [0]
        for n in self.seqlens:
            ends.append(ends[-1] + n)
        self.bounds = list(zip(ends[:-1], ends[1:]))
        self.max_len = max(self.seqlens, default=0)
        self._cu_seqlens: torch.Tensor | None = None
        self._masks: dict[int | None, torch.Tensor] = {}
        self._doc_masks: dict[tuple[int, int], torch.Tensor] = {}

    def attend(self, layer: int, q, k, v, window: int | None, scale: float | None = None) -> torch.Tensor:
        T = q.shape[0]
        if len(self.seqlens) == 1 and (window is None or window >= T):
            # (T, H, hd) -> (H, T, hd) for SDPA, and back.
            return sdpa(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), causal=True, scale=scale).transpose(0, 1)
        kernel = self._pick(q, v)
        if kernel == "varlen":
            return self._varlen(q, k, v, window, scale)
        if kernel == "documents":
            return self._documents(q, k, v, window, scale)
        mask = self._masks.get(window)
        if mask is None:  # the same for every layer with this window: build once
            mask = allowed_mask(self.positions, self.positions, window, self.seq_ids, self.seq_ids)
            self._masks[window] = mask
        return sdpa(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), mask=mask, scale=scale).transpose(0, 1)

    def _pick(self, q: torch.Tensor, v: torch.Tensor) -> str:
        if self.kernel != "auto":
            return self.kernel
        if q.device.type != "cuda":
            return "dense"
        dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else q.dtype
        hd = q.shape[-1]
        fn, params = _varlen_attn()
        fits = dtype in (torch.float16, torch.bfloat16) and hd == v.shape[-1] and hd % 8 == 0 and hd <= 256
        gqa = q.shape[1] == v.shape[1] or "enable_gqa" in params
        return "varlen" if fits and gqa and fn is not None else "documents"

    def _varlen(self, q, k, v, window: int | None, scale: float | None) -> torch.Tensor:
        varlen_attn, params = _varlen_attn()
        if varlen_attn is None:
            raise RuntimeError(f"kernel 'varlen' needs torch.nn.attention.varlen (torch >= 2.10), not in torch {torch.__version__}")
        if self._cu_seqlens is None:
            self._cu_seqlens = torch.tensor([0] + [e for _, e in self.bounds], dtype=torch.int32, device=q.device)
        if torch.is_autocast_enabled(q.device.type):  # a custom op: autocast does not cast its inputs
            dtype = torch.get_autocast_dtype(q.device.type)
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        # FlashAttention's window (left, right) lets token i see i - left .. i + right:
        # galerne's window W (W tokens, itself included) is (W - 1, 0); (-1, 0) is causal.
        left = -1 if window is None or window >= self.max_len else window - 1
        if "window_size" in params:
            kwargs = {"window_size": (left, 0)}
        elif left == -1:
            kwargs = {"is_causal": True}
        else:  # torch 2.10: no window
            return self._documents(q, k, v, window, scale)
        if q.shape[1] != k.shape[1]:
            kwargs["enable_gqa"] = True
        cu = self._cu_seqlens
        return varlen_attn(q, k, v, cu, cu, self.max_len, self.max_len, scale=scale, **kwargs)

    def _documents(self, q, k, v, window: int | None, scale: float | None) -> torch.Tensor:
        outs = []
        for start, end in self.bounds:
            n = end - start
            qd, kd, vd = q[start:end].transpose(0, 1), k[start:end].transpose(0, 1), v[start:end].transpose(0, 1)
            if window is None or window >= n:
                out = sdpa(qd, kd, vd, causal=True, scale=scale)  # (H, n, vd)
            else:
                mask = self._doc_masks.get((n, window))
                if mask is None:
                    pos = self.positions[start:end]
                    mask = self._doc_masks[(n, window)] = allowed_mask(pos, pos, window)
                out = sdpa(qd, kd, vd, mask=mask, scale=scale)
            outs.append(out.transpose(0, 1))
        return torch.cat(outs, dim=0)  # (T, H, vd)
