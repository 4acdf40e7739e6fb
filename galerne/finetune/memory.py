"""Activation checkpointing chosen by memory (``checkpoint: auto``).

Without checkpointing, every transformer block keeps its activations for the backward;
with it, a block keeps only its input and recomputes the rest in the backward (about a
third more compute for that block). ``auto`` checkpoints the fewest blocks that make the
step fit in the memory the run may use, so a run that fits trains at full speed, and a
run that does not fit trades only the recompute it needs.

Worked example: mistral-7b, LoRA rank 16 on every linear, bf16, 4096 tokens. One block
keeps ~195 KB per token (:func:`block_bytes_per_token`), i.e. 0.80 GB per block and
25.5 GB for the 32 blocks; checkpointed, it keeps its input, 32 MB. On a 24 GB budget
with 14.5 GB of weights loaded and ~0.5 GB of LoRA gradients and AdamW state, 9 GB are
left for activations: 10 blocks keep everything, 22 are checkpointed. On an 80 GB GPU,
none is.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import torch

from galerne.models.args import ModelArgs

log = logging.getLogger(__name__)

GB = 1e9
# What the estimate leaves aside: the caching allocator's fragmentation, temporary
# buffers of kernels, the loss chunk's float32 logits.
MARGIN = 0.10


@dataclass(frozen=True)
class CheckpointPlan:
    blocks: int  # how many transformer blocks run under activation checkpointing (the first ones)
    reason: str


def block_bytes_per_token(args: ModelArgs, act_bytes: int, lora_rank: int = 0, n_lora_targets: int = 7) -> int:
    """Bytes one transformer block keeps for the backward per token, without checkpointing.

    What autograd saves in ``TransformerBlock.forward`` (activations of ``act_bytes``):
    each RMSNorm its float32 input (2 x D x 4 bytes); the normed inputs of the attention
    and feed-forward projections (2 D); q and k before and after the rotary (2 (H + K) hd);
    v and the attention output (K hd + H hd); the feed-forward's w1 and w3 outputs, the
    SiLU and the product (4 F); each LoRA's rank-r intermediate (r per target); without
    LoRA (full-weight training) the norms' weight gradients keep their inputs (2 D). A
    mixture of experts counts F for the experts each token goes through. Within 10% of
    what autograd saves (tests/test_finetune_memory.py).
    """
    d, hd = args.dim, args.head_dim
    q, kv = args.n_heads * hd, args.n_kv_heads * hd
    ffn = args.hidden_dim
    if args.moe is not None:
        ffn = (args.moe.expert_hidden_dim or args.hidden_dim) * args.moe.num_experts_per_tok
    elems = 2 * d + 2 * (q + kv) + kv + q + 4 * ffn + lora_rank * n_lora_targets + (0 if lora_rank else 2 * d)
    return elems * act_bytes + 2 * d * 4


def plan_checkpointing(*, n_layers: int, block_bytes: int, input_bytes: int, fixed_bytes: int,
                       available_bytes: int, margin: float = MARGIN) -> CheckpointPlan:
    """The fewest blocks to checkpoint so that ``fixed_bytes`` (gradients, optimizer state,
    loss buffers: what the step needs besides activations) plus the activations fit in
    ``available_bytes`` less ``margin`` of it.

    ``block_bytes``: what a block keeps without checkpointing; ``input_bytes``: what it
    keeps with (its input). With k of n blocks checkpointed the activations are
    ``(n - k) x block_bytes + k x input_bytes``, plus one block's ``block_bytes`` while
    the backward recomputes it (k > 0). When even k = n does not fit, all are
    checkpointed (the run may still fit: the estimate has a margin; else it fails with
    the device's out-of-memory error).
    """
    budget = available_bytes * (1 - margin) - fixed_bytes
    need_all = n_layers * block_bytes
    if budget >= need_all:
        return CheckpointPlan(0, f"activations of all {n_layers} blocks ({need_all / GB:.2f} GB) fit in "
                                 f"{budget / GB:.2f} GB")
    saved_per_block = block_bytes - input_bytes
    if saved_per_block <= 0:
        return CheckpointPlan(0, "checkpointing would save nothing")
    # smallest k with (n - k) * block + k * input + block <= budget
    k = max(1, math.ceil((need_all + block_bytes - budget) / saved_per_block))
    if k >= n_layers:
        k = n_layers
        need = n_layers * input_bytes + block_bytes
        fits = "fit" if need <= budget else "do NOT fit either (expect an out-of-memory error)"
        return CheckpointPlan(k, f"activations of all {n_layers} blocks ({need_all / GB:.2f} GB) exceed "
                                 f"{budget / GB:.2f} GB; checkpointing every block ({need / GB:.2f} GB) should {fits}")
    need = (n_layers - k) * block_bytes + k * input_bytes + block_bytes
    return CheckpointPlan(k, f"activations of all {n_layers} blocks ({need_all / GB:.2f} GB) exceed "
                             f"{budget / GB:.2f} GB; checkpointing {k} blocks brings them to {need / GB:.2f} GB")


def available_memory(device: torch.device, limit_bytes: int | None = None) -> int:
    """Bytes the run may still allocate on ``device``: CUDA: the device's free memory
    (``torch.cuda.mem_get_info``); CPU: the system's available memory (``MemAvailable``).
    ``limit_bytes`` (e.g. ``max_memory_gb``) caps what the run holds in all, what it
    already holds included (CUDA: ``memory_allocated``; CPU: the resident set)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        held = torch.cuda.memory_allocated(device)
    else:
        free, held = _meminfo_available(), _resident_bytes()
    if limit_bytes:
        free = min(free, max(0, limit_bytes - held))
    return int(free)


def _meminfo_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _resident_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def step_fixed_bytes(model: torch.nn.Module, tokens: int, act_bytes: int, chunk: int = 1024,
                     amp_copy_bytes: int = 0) -> int:
    """What a step needs besides the blocks' activations: each trained parameter's gradient
    and two AdamW moments (float32), the loss's chunk of float32 logits and its gradient,
    the (tokens, D) hidden states' gradient, and ``amp_copy_bytes`` per frozen-dtype
    parameter that autocast copies (full-weight training of float32 weights under bf16
    autocast keeps a bf16 copy of each weight for the backward)."""
    trained = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    adam = sum(2 * p.numel() * 4 for p in model.parameters() if p.requires_grad)
    args: ModelArgs = model.args
    loss = min(chunk, tokens) * args.vocab_size * (4 + act_bytes)
    hidden = 3 * tokens * args.dim * 4
    copies = sum(p.numel() for p in model.layers.parameters()) * amp_copy_bytes
    return trained + adam + loss + hidden + copies


def choose_checkpointing(model: torch.nn.Module, device: torch.device, tokens: int, act_dtype: torch.dtype, *,
                         lora_rank: int = 0, amp_copies: bool = False, limit_bytes: int | None = None) -> CheckpointPlan:
    """The plan for ``model`` training on ``tokens`` tokens per micro-batch, on ``device``
    (see :func:`plan_checkpointing`). CPU: none unless memory is short, as on a GPU."""
    args: ModelArgs = model.args
    act = torch.empty((), dtype=act_dtype).element_size()
    n_targets = 7 if lora_rank else 0
    block = block_bytes_per_token(args, act, lora_rank, n_targets) * tokens
    fixed = step_fixed_bytes(model, tokens, act, amp_copy_bytes=act if amp_copies else 0)
    return plan_checkpointing(n_layers=len(model.layers), block_bytes=block, input_bytes=tokens * args.dim * act,
                              fixed_bytes=fixed, available_bytes=available_memory(device, limit_bytes))
