"""A minimal LoRA/full fine-tuning loop over packed batches (:mod:`galerne.finetune.data`).

The loss is mistral-finetune's: cross-entropy of predicting ``tokens[i]`` from the hidden
state at ``i - 1``, weighted by ``weights[i]`` and normalised by the total weight of the
optimizer step (so gradient accumulation over micro-batches equals one big batch).

This is only the simple single-process loop: config, checkpoints/resume and multi-process
come next.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from galerne.finetune.data import PackedBatch
from galerne.models.attention import NoCacheAttention


def _chunk_loss(model, hidden: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    logits = model.logits(hidden).float()
    ce = F.cross_entropy(logits, targets, reduction="none")
    return (ce * weights).sum()


def weighted_loss(
    model, hidden: torch.Tensor, tokens: torch.Tensor, weights: torch.Tensor, chunk: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weighted sum of the cross-entropies, sum of the weights) for one sequence.

    ``hidden``: (T, D) from ``model(tokens, positions, backend)``; ``tokens``, ``weights``: (T,).
    Row ``i - 1`` of ``hidden`` predicts ``tokens[i]`` with weight ``weights[i]`` (so
    ``weights[0]`` is unused). The logits are computed ``chunk`` rows at a time, each chunk
    under activation checkpointing, so the (T, vocab) logits never exist at once, neither in
    the forward nor kept for the backward.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be positive, not {chunk}")
    weights = weights.to(device=hidden.device, dtype=torch.float32)
    tokens = tokens.to(hidden.device)
    h, t, w = hidden[:-1], tokens[1:], weights[1:]
    total = hidden.new_zeros((), dtype=torch.float32)
    grad = torch.is_grad_enabled() and hidden.requires_grad
    for start in range(0, h.shape[0], chunk):
        sl = slice(start, start + chunk)
        if not bool((w[sl] != 0).any()):
            continue  # nothing to learn here: skip the logits altogether
        if grad:
            part = checkpoint(_chunk_loss, model, h[sl], t[sl], w[sl], use_reentrant=False)
        else:
            part = _chunk_loss(model, h[sl], t[sl], w[sl])
        total = total + part
    return total, w.sum()


def batch_loss(model, batch: PackedBatch, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """``weighted_loss`` of one packed sequence (document masking, per-document positions)."""
    device = next(model.parameters()).device
    tokens = torch.tensor(batch.tokens, device=device)
    weights = torch.tensor(batch.weights, device=device, dtype=torch.float32)
    seqlens = batch.seqlens or [len(batch.tokens)]
    backend = NoCacheAttention(seqlens, device)
    hidden = model(tokens, backend.positions, backend)
    return weighted_loss(model, hidden, tokens, weights, chunk=chunk)


def lr_factor(step: int, warmup_steps: int, max_steps: int) -> float:
    """Linear warmup over ``warmup_steps`` (step s uses (s+1)/warmup), then cosine decay
    from 1 to 0 at ``max_steps`` (0-based ``step``)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _microbatches(batches: Iterable[PackedBatch]):
    """Endless when ``batches`` is a sequence (epochs over it); else ends with the iterator."""
    if isinstance(batches, Sequence):
        if not batches:
            raise ValueError("no training batches")
        return itertools.cycle(batches)
    return iter(batches)


def train_steps(
    model,
    batches: Iterable[PackedBatch],
    *,
    lr: float,
    weight_decay: float = 0.0,
    warmup_steps: int = 0,
    max_steps: int,
    grad_clip: float | None = 1.0,
    num_microbatches: int = 1,
    seed: int = 0,
    chunk: int = 1024,
    log: Callable[[dict], None] | None = None,
    amp_dtype: torch.dtype | None = None,
) -> list[float]:
    """Train the model's trainable parameters (``requires_grad``; only LoRA's after
    ``apply_lora``) for ``max_steps`` optimizer steps; return each step's loss.

    Each step accumulates the gradients of ``num_microbatches`` packed batches, every one
    scaled by 1 / (the total weight of the step), clips the gradient norm to ``grad_clip``
    (None or 0: no clipping) and takes one AdamW step (betas (0.9, 0.95) as mistral-finetune).
    The learning rate warms up linearly over ``warmup_steps``, then decays with a cosine to
    0 at ``max_steps`` (:func:`lr_factor`). A sequence of batches is cycled over; an iterator
    that runs out ends training early. The model is left in train mode. Deterministic given
    ``seed`` (dropout draws from the global generator, seeded here). ``amp_dtype``
    (e.g. ``torch.bfloat16``) runs the forward under autocast on the parameters' device
    while the parameters and optimizer state stay in their own dtype.

    This is only the simple single-process loop: config, checkpoints/resume and
    multi-process come next.
    """
    if max_steps < 1 or num_microbatches < 1:
        raise ValueError("max_steps and num_microbatches must be positive")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warmup_steps, max_steps))
    source = _microbatches(batches)
    device_type = params[0].device.type
    model.train()
    losses: list[float] = []
    for step in range(max_steps):
        micro = list(itertools.islice(source, num_microbatches))
        if not micro:
            break
        total_w = sum(float(sum(b.weights[1:])) for b in micro)
        if total_w <= 0:
            raise ValueError(f"step {step}: no token with a positive weight in its batches")
        opt.zero_grad(set_to_none=True)
        step_loss = 0.0
        for b in micro:
            with torch.autocast(device_type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
                loss_sum, _ = batch_loss(model, b, chunk=chunk)
            (loss_sum / total_w).backward()
            step_loss += loss_sum.item()
        grad_norm = None
        if grad_clip:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip))
        cur_lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        losses.append(step_loss / total_w)
        if log is not None:
            log({"step": step + 1, "loss": losses[-1], "lr": cur_lr, "grad_norm": grad_norm, "weight": total_w})
    return losses
