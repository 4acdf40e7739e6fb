"""Evaluation of a language model on weighted samples: mean loss and perplexity.

The loss is the weighted mean cross-entropy over every trained token (the same
definition as training's :func:`galerne.finetune.train.weighted_loss`), so that
``perplexity = exp(loss)`` of a pretraining file is the usual per-token perplexity
(BOS excluded, EOS included).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from galerne.finetune.data import PackedBatch
from galerne.finetune.train import batch_loss


@dataclass(frozen=True)
class EvalResult:
    loss: float
    perplexity: float
    tokens: float  # total weight (tokens, when weights are 0/1)


@torch.no_grad()
def loss_sums(model, batches: Iterable[PackedBatch], *, chunk: int = 1024,
              amp_dtype: torch.dtype | None = None, loss_fn=None) -> tuple[float, float]:
    """(weighted sum of the cross-entropies, total weight) of ``model`` over packed
    ``batches``; the model is put in eval mode for the pass, then restored. Processes of a
    distributed run each sum their shard, then add the pairs up. ``loss_fn(batch)``: what
    computes a batch's (loss sum, weight) (default: ``batch_loss(model, batch, chunk)``;
    the trainer's FSDP root module under FSDP)."""
    was_training = model.training
    model.eval()
    device_type = next(model.parameters()).device.type
    total, weight = 0.0, 0.0
    try:
        for b in batches:
            with torch.autocast(device_type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
                loss_sum, w = loss_fn(b) if loss_fn is not None else batch_loss(model, b, chunk=chunk)
            total += float(loss_sum)
            weight += float(w)
    finally:
        model.train(was_training)
    return total, weight


def result(total: float, weight: float) -> EvalResult:
    if weight <= 0:
        raise ValueError("no token with a positive weight in the evaluation data")
    loss = total / weight
    return EvalResult(loss=loss, perplexity=math.exp(loss), tokens=weight)


def evaluate(model, batches: Iterable[PackedBatch], *, chunk: int = 1024, amp_dtype: torch.dtype | None = None) -> EvalResult:
    """Weighted mean loss and perplexity of ``model`` over packed ``batches``."""
    return result(*loss_sums(model, batches, chunk=chunk, amp_dtype=amp_dtype))
