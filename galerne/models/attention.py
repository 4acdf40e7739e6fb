"""Attention over a flat batch without a cache: scoring and training.

Sequences packed back to back never attend to each other (document masking), and
a layer with a sliding window of W lets token i see tokens i-W+1 .. i (W tokens,
itself included: transformers' convention for Mistral).
"""

from __future__ import annotations

from collections.abc import Sequence

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


class NoCacheAttention:
    """Backend for one forward over whole sequences (``seqlens`` sum to T)."""

    def __init__(self, seqlens: Sequence[int], device: torch.device | str = "cpu"):
        self.seqlens = list(seqlens)
        lens = torch.tensor(self.seqlens, device=device)
        self.seq_ids = torch.repeat_interleave(torch.arange(len(self.seqlens), device=device), lens)
        starts = torch.cumsum(lens, 0) - lens
        self.positions = torch.arange(int(lens.sum()), device=device) - torch.repeat_interleave(starts, lens)
        self._masks: dict[int | None, torch.Tensor] = {}

    def attend(self, layer: int, q, k, v, window: int | None, scale: float | None = None) -> torch.Tensor:
        # (T, H, hd) -> (H, T, hd) for SDPA, and back.
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        T = q.shape[1]
        if len(self.seqlens) == 1 and (window is None or window >= T):
            out = sdpa(q, k, v, causal=True, scale=scale)
        else:
            mask = self._masks.get(window)
            if mask is None:  # the same for every layer with this window: build once
                mask = allowed_mask(self.positions, self.positions, window, self.seq_ids, self.seq_ids)
                self._masks[window] = mask
            out = sdpa(q, k, v, mask=mask, scale=scale)
        return out.transpose(0, 1)
