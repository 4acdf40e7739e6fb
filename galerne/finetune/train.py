"""A minimal LoRA/full fine-tuning loop over packed batches (:mod:`galerne.finetune.data`).

The loss is mistral-finetune's: cross-entropy of predicting ``tokens[i]`` from the hidden
state at ``i - 1``, weighted by ``weights[i]`` and normalised by the total weight of the
optimizer step (so gradient accumulation over micro-batches equals one big batch).

:func:`train_steps` is the simple single-process loop over a list of batches; the
``galerne finetune`` trainer (:mod:`galerne.finetune.trainer`: config, checkpoints, resume,
evaluation, DDP) runs the same :func:`optimizer_step`.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from galerne.finetune.data import PackedBatch
from galerne.finetune.loss import linear_cross_entropy
from galerne.models.attention import NoCacheAttention


def _chunk_loss(model, hidden: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    logits = model.logits(hidden).float()
    ce = F.cross_entropy(logits, targets, reduction="none")
    return (ce * weights).sum()


def weighted_loss(
    model, hidden: torch.Tensor, tokens: torch.Tensor, weights: torch.Tensor, chunk: int | None = 1024,
    fused: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weighted sum of the cross-entropies, sum of the weights) for one sequence.

    ``hidden``: (T, D) from ``model(tokens, positions, backend)``; ``tokens``, ``weights``: (T,).
    Row ``i - 1`` of ``hidden`` predicts ``tokens[i]`` with weight ``weights[i]`` (so
    ``weights[0]`` is unused). Logits are computed only for the rows that predict a token of
    non-zero weight (prompts, padding and tool results cost nothing), ``chunk`` rows at a
    time, so the (T, vocab) logits never exist at once, neither in the forward nor kept for
    the backward. With a plain ``nn.Linear`` output the projection is fused into the loss
    (:mod:`galerne.finetune.loss`: the gradients are taken while each chunk's logits are
    there); another output (LoRA or quantized), or ``fused=False``, runs each chunk under
    activation checkpointing instead (the logits computed again in the backward).
    ``chunk=None``: one piece, plain autograd: the whole (rows, vocab) float32 logits and
    their log-softmax are kept for the backward (the reference, and the "before" of
    ``benchmarks/finetune_lora.py --variants full``).
    """
    if chunk is not None and chunk < 1:
        raise ValueError(f"chunk must be positive, not {chunk}")
    weights = weights.to(device=hidden.device, dtype=torch.float32)
    tokens = tokens.to(hidden.device)
    w_all = weights[1:]
    rows = torch.nonzero(w_all).squeeze(1)
    h, t, w = hidden[:-1].index_select(0, rows), tokens[1:].index_select(0, rows), w_all.index_select(0, rows)
    if chunk is None:
        return _chunk_loss(model, h, t, w), w_all.sum()
    if fused and type(model.output) is torch.nn.Linear and model.output.bias is None:
        return linear_cross_entropy(h, model.output.weight, t, w, chunk), w_all.sum()
    total = hidden.new_zeros((), dtype=torch.float32)
    checkpointed = torch.is_grad_enabled() and hidden.requires_grad and h.shape[0] > chunk
    for start in range(0, h.shape[0], chunk):
        sl = slice(start, start + chunk)
        if checkpointed:
            part = checkpoint(_chunk_loss, model, h[sl], t[sl], w[sl], use_reentrant=False)
        else:
            part = _chunk_loss(model, h[sl], t[sl], w[sl])
        total = total + part
    return total, w_all.sum()


def batch_loss(model, batch: PackedBatch, chunk: int | None = 1024, fused: bool = True,
               vision=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``weighted_loss`` of one packed sequence (document masking, per-document positions).
    ``vision``: a vision model's encoder and projector (``models.vision.VisionModel``), for
    sequences with images: their rows replace the [IMG] embeddings."""
    device = next(model.parameters()).device
    tokens = torch.tensor(batch.tokens, device=device)
    weights = torch.tensor(batch.weights, device=device, dtype=torch.float32)
    seqlens = batch.seqlens or [len(batch.tokens)]
    backend = NoCacheAttention(seqlens, device)
    embeds = None
    if batch.images:
        if vision is None:
            raise ValueError("a sequence with images, and no vision encoder")
        embeds = vision.embed(model.tok_embeddings(tokens), batch.tokens, batch.images)
    hidden = model(tokens, backend.positions, backend, embeds)
    return weighted_loss(model, hidden, tokens, weights, chunk=chunk, fused=fused)


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


LossFn = Callable[[PackedBatch], "tuple[torch.Tensor, torch.Tensor]"]


@dataclass
class StepStats:
    """One optimizer step: its loss (weighted mean over every trained token of the step, on
    every process), the learning rate it used, the gradient norm before clipping (None when
    not clipping) and the total loss weight (trained tokens) of the step."""

    loss: float
    lr: float
    grad_norm: float | None
    weight: float


def step_weight(micro: Sequence[PackedBatch]) -> float:
    """The loss weight of micro-batches: the sum of their weights but each sequence's first
    (which :func:`weighted_loss` never uses)."""
    return float(sum(sum(b.weights[1:]) for b in micro))


def optimizer_step(
    loss_fn: LossFn,
    micro: Sequence[PackedBatch],
    params: Sequence[torch.nn.Parameter],
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    *,
    grad_clip: float | None,
    amp_dtype: torch.dtype | None = None,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> StepStats:
    """One optimizer step over this process's micro-batches: the step code of
    :func:`train_steps` and of the trainer (:mod:`galerne.finetune.trainer`).

    ``loss_fn(batch)`` -> (weighted loss sum, weight), e.g. :func:`batch_loss`. Each
    micro-batch's loss sum is divided by the weight of the whole step (over every process
    when ``all_reduce``, a sum over processes, is given), so accumulating ``len(micro)``
    micro-batches, on one or several processes, gives the gradient of one big batch. Under
    DDP, ``no_sync`` (the DDP module's) skips the gradient all-reduce of all but the last
    micro-batch; the gradients must be summed over processes, not averaged (the trainer
    registers a summing communication hook). Then: gradient clipping to ``grad_clip``
    (None/0: none), one optimizer step and one scheduler step.
    """
    device = params[0].device
    total_w = step_weight(micro)
    if all_reduce is not None:
        total_w = float(all_reduce(torch.tensor([total_w], dtype=torch.float64, device=device))[0])
    if total_w <= 0:
        raise ValueError("no token with a positive weight in the step's batches")
    opt.zero_grad(set_to_none=True)
    loss_sum = 0.0
    for i, b in enumerate(micro):
        sync = no_sync is None or i == len(micro) - 1
        with contextlib.nullcontext() if sync else no_sync():
            with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
                part, _ = loss_fn(b)
            (part / total_w).backward()
        loss_sum += part.item()
    if all_reduce is not None:
        loss_sum = float(all_reduce(torch.tensor([loss_sum], dtype=torch.float64, device=device))[0])
    grad_norm = None
    if grad_clip:
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
        # FSDP2: the norm of DTensor gradients is a replicated DTensor
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    lr = opt.param_groups[0]["lr"]
    opt.step()
    sched.step()
    return StepStats(loss_sum / total_w, lr, grad_norm, total_w)


def make_optimizer(
    params: Sequence[torch.nn.Parameter], *, lr: float, weight_decay: float, warmup_steps: int, max_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (betas (0.9, 0.95), eps 1e-8, as mistral-finetune) and its warmup + cosine schedule."""
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warmup_steps, max_steps))
    return opt, sched


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
    chunk: int | None = 1024,
    fused_loss: bool = True,
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

    The ``galerne finetune`` trainer adds config, checkpoints, resume, evaluation and
    multi-process training around the same :func:`optimizer_step`.
    """
    if max_steps < 1 or num_microbatches < 1:
        raise ValueError("max_steps and num_microbatches must be positive")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    torch.manual_seed(seed)
    opt, sched = make_optimizer(params, lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps, max_steps=max_steps)
    source = _microbatches(batches)
    model.train()
    losses: list[float] = []
    for step in range(max_steps):
        micro = list(itertools.islice(source, num_microbatches))
        if not micro:
            break
        if step_weight(micro) <= 0:
            raise ValueError(f"step {step}: no token with a positive weight in its batches")
        stats = optimizer_step(lambda b: batch_loss(model, b, chunk=chunk, fused=fused_loss), micro, params, opt, sched,
                               grad_clip=grad_clip, amp_dtype=amp_dtype)
        losses.append(stats.loss)
        if log is not None:
            log({"step": step + 1, "loss": stats.loss, "lr": stats.lr, "grad_norm": stats.grad_norm, "weight": stats.weight})
    return losses


def checkpoint_blocks(model, blocks: int | None = None) -> None:
    """Activation checkpointing of the first ``blocks`` transformer blocks (None: all): in
    training, such a block keeps only its input and recomputes its activations in the
    backward. The blocks' state-dict names do not change (their ``forward`` is wrapped,
    the modules are not). Idempotent."""
    for block in list(model.layers)[:blocks]:
        if getattr(block, "_galerne_checkpointed", False):
            continue
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)
            return _inner(*args, **kwargs)

        block.forward = forward
        block._galerne_checkpointed = True
