"""LoRA as a transformation of a built model: swap ``nn.Linear`` modules for
:class:`LoRALinear`, never fork the model code (one model class for inference and
training).

A wrapped projection computes ``base(x) + scaling * lora_B(lora_A(dropout(x)))``
with ``lora_A`` (r x in) and ``lora_B`` (out x r) named as mistral-finetune names
them, so LoRA tensors are ``layers.0.attention.wq.lora_A.weight``. The frozen base
weight lives at ``.base.weight`` but appears as ``...wq.weight`` in the model's
state dict (as before the swap), so checkpoints and exports keep their names.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterable

import torch
from torch import nn

from .quant import QuantLinear, linear_device, linear_dtype

DEFAULT_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        self.base = base
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank
        self.in_features, self.out_features = base.in_features, base.out_features
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, **factory)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, **factory)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_lora_parameters()
        # The base weight keeps its pre-LoRA state-dict name ("wq.weight", not "wq.base.weight").
        self._register_state_dict_hook(_hide_base)
        self._register_load_state_dict_pre_hook(_unhide_base)

    def reset_lora_parameters(self) -> None:
        """As PEFT: A kaiming-uniform (a=sqrt(5)), B zeros, so a fresh adapter is a no-op."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The scaling multiplies the (T, r) intermediate, not the (T, out) product: the
        # same numbers, out/r times fewer multiplies (in training, in the backward too).
        return self.base(x) + self.lora_B(self.lora_A(self.dropout(x)) * self.scaling)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A, computed in float32: (out, in)."""
        return self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, scaling={self.scaling:g}"


def _hide_base(module, state_dict, prefix, local_metadata):
    for name in ("weight", "bias"):
        key = f"{prefix}base.{name}"
        if key in state_dict:
            state_dict[f"{prefix}{name}"] = state_dict.pop(key)
    return state_dict


def _unhide_base(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    for name in ("weight", "bias"):
        key = f"{prefix}{name}"
        if key in state_dict:
            state_dict[f"{prefix}base.{name}"] = state_dict.pop(key)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Native module name -> LoRALinear, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply_lora(
    model: nn.Module,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    targets: Iterable[str] = DEFAULT_TARGETS,
) -> nn.Module:
    """Wrap every ``nn.Linear`` whose own name (last component) is in ``targets``;
    freeze every other parameter. ``output`` and the MoE ``gate`` are left alone
    unless listed. Returns ``model`` (modified in place)."""
    targets = set(targets)
    if lora_modules(model):
        raise ValueError("the model already has LoRA modules; merge_lora() it first")
    swaps = []
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            if child_name in targets and type(child) is nn.Linear:
                swaps.append((module, child_name, child))
    if not swaps:
        raise ValueError(f"no nn.Linear named any of {sorted(targets)} in the model")
    for p in model.parameters():
        p.requires_grad_(False)
    for parent, child_name, child in swaps:
        setattr(parent, child_name, LoRALinear(child, rank, alpha, dropout))
    for m in lora_modules(model).values():
        m.lora_A.weight.requires_grad_(True)
        m.lora_B.weight.requires_grad_(True)
    return model


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold ``scaling * B @ A`` into each base weight and put the plain
    ``nn.Linear`` back. Returns ``model`` (modified in place)."""
    for name, m in lora_modules(model).items():
        w = m.base.weight
        w.copy_((w.float() + m.delta_weight()).to(w.dtype))
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child_name, m.base)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the LoRA tensors, native names (``layers.0.attention.wq.lora_A.weight``)."""
    out: dict[str, torch.Tensor] = {}
    for name, m in lora_modules(model).items():
        out[f"{name}.lora_A.weight"] = m.lora_A.weight.detach()
        out[f"{name}.lora_B.weight"] = m.lora_B.weight.detach()
    return out


def lora_config(model: nn.Module) -> dict:
    """rank, alpha, scaling, dropout and target names of the model's LoRA modules."""
    mods = lora_modules(model)
    if not mods:
        raise ValueError("the model has no LoRA modules; call apply_lora() first")
    first = next(iter(mods.values()))
    drop = first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0
    return {
        "rank": first.rank, "alpha": first.alpha, "scaling": first.scaling, "dropout": drop,
        "targets": sorted({name.rpartition(".")[2] for name in mods}),
    }


# --- many adapters at once, unmerged (serving) ----------------------------------------
#
# Serving keeps the base weights as they are and gives every row of a batch its own
# adapter (or none). Each target linear holds stacks of ``max_loras`` adapter *slots*
# of ``max_lora_rank``; an engine copies adapters into slots (galerne.engine.adapters)
# and says, per forward, which slot each row uses.
#
# The layout is a contract with the native kernels (the CPU decode kernel,
# galerne.kernels.triton_lora on CUDA): per layer, the targets in MULTI_TARGETS order, each with
#   lora_A (S, R, in) and lora_B (S, out, R), contiguous, in the base weight's dtype
#   and device; slot s holding an adapter of rank r fills A[s, :r] and B[s, :, :r]
#   (scaling folded into B) and zeros elsewhere; a target the adapter lacks is zero
#   in its slot;
# and per forward a row -> slot index (int32, -1 = the base model).

MULTI_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w3", "w2")


class LoRARows:
    """Which adapter slot each row of the flat batch uses, for one forward: set by the
    engine's runner around the forward (``MultiLoRA.rows``), read by every
    ``MultiLoRALinear`` of the model. Empty (the default): every row is the base model,
    so a forward nobody set up (scoring, a captured CUDA graph) is the base.

    ``groups``: one entry per distinct slot present, ``(slot, rows)`` with ``rows`` a
    slice when that slot's rows are contiguous (one sequence, the usual case) and else a
    (n,) int64 index tensor on the device. ``slot_of_row``: the same as a (T,) int32
    device tensor, -1 for the base (what a fused kernel reads)."""

    def __init__(self, kernel: str = "auto"):
        if kernel not in ("auto", "torch", "triton"):
            raise ValueError(f"kernel must be auto, torch or triton, got {kernel!r}")
        self.groups: list[tuple[int, slice | torch.Tensor]] = []
        self.slot_of_row: torch.Tensor | None = None
        # Rows of the contiguous one-slot run an adapter row sits in, on average over
        # adapter rows: a 500-row chunk among 60 single decodes gives 446, 64 decodes
        # of distinct adapters 1 (the CUDA kernel's row blocks follow it).
        self.mean_run = 0.0
        # How MultiLoRALinear adds the deltas: "auto", the Triton kernel on CUDA when
        # triton imports, else torch ops; "torch"; "triton", on any device (on CPU
        # tensors only under TRITON_INTERPRET=1: tests).
        self.kernel = kernel

    def set(self, seq_slots: list[int], q_lens: list[int], device: torch.device) -> None:
        """seq_slots: the slot of each sequence (-1: base); q_lens: its rows, in order.
        E.g. slots [2, -1, 2, 0], rows [3, 1, 1, 4]: slot 2 has rows 0..2 and 4 (an
        index tensor), slot 0 rows 5..8 (a slice); row 3 is the base."""
        runs: dict[int, list[tuple[int, int]]] = {}
        start = 0
        for slot, n in zip(seq_slots, q_lens):
            if slot >= 0 and n:
                spans = runs.setdefault(slot, [])
                if spans and spans[-1][1] == start:
                    spans[-1] = (spans[-1][0], start + n)  # contiguous with the previous run
                else:
                    spans.append((start, start + n))
            start += n
        lens = [b - a for spans in runs.values() for a, b in spans]
        self.mean_run = sum(n * n for n in lens) / max(sum(lens), 1)
        groups = []
        for slot, spans in runs.items():
            if len(spans) == 1:
                groups.append((slot, slice(*spans[0])))
            else:
                idx = torch.cat([torch.arange(a, b) for a, b in spans]).to(device, non_blocking=True)
                groups.append((slot, idx))
        self.groups = groups
        per_row = torch.repeat_interleave(torch.tensor(seq_slots, dtype=torch.int32), torch.tensor(q_lens))
        self.slot_of_row = per_row.to(device, non_blocking=True)

    def clear(self) -> None:
        self.groups, self.slot_of_row, self.mean_run = [], None, 0.0


class MultiLoRALinear(nn.Module):
    """A frozen base linear plus ``max_loras`` adapter slots, applied per row:
    ``y = base(x)``, then for each slot present the rows of that slot get
    ``(x_rows @ A[s, :r].T) @ B[s, :, :r].T`` (r: the rank of the adapter in that slot,
    scaling already in B). x: (T, in), the flat batch. Layout: see MULTI_TARGETS."""

    def __init__(self, base: nn.Module, rows: LoRARows, max_loras: int, max_rank: int):
        """``base``: an ``nn.Linear`` or a ``QuantLinear`` (the stacks then take the
        activations' dtype)."""
        super().__init__()
        if max_loras < 1 or max_rank < 1:
            raise ValueError(f"max_loras and max_rank must be >= 1, got {max_loras} and {max_rank}")
        self.base, self.rows = base, rows
        self.in_features, self.out_features = base.in_features, base.out_features
        factory = {"device": linear_device(base), "dtype": linear_dtype(base)}
        # Not in the state dict: slots are serving state, filled from adapters, not weights.
        self.register_buffer("lora_A", torch.zeros(max_loras, max_rank, self.in_features, **factory), persistent=False)
        self.register_buffer("lora_B", torch.zeros(max_loras, self.out_features, max_rank, **factory), persistent=False)
        self.ranks = [0] * max_loras  # per slot: the rank of its adapter here, 0 = nothing (skipped)
        self._register_state_dict_hook(_hide_base)
        self._register_load_state_dict_pre_hook(_unhide_base)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @torch.no_grad()
    def set_slot(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None, scaling: float) -> None:
        """Put an adapter's A (r, in) and B (out, r) in ``slot``, ``scaling`` folded into B
        (in float32, then cast); None: the adapter does not target this layer (zeros).
        Whatever the previous occupant left is zeroed."""
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        if a is None:
            self.ranks[slot] = 0
            return
        r = a.shape[0]
        self.lora_A[slot, :r].copy_(a)
        self.lora_B[slot, :, :r].copy_(b.float() * scaling)
        self.ranks[slot] = r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (T, out)
        if not self.rows.groups:
            return y
        kernel = _triton_lora() if self._use_triton(x) else None
        if kernel is None and self.rows.kernel == "triton":
            raise RuntimeError("LoRARows.kernel is 'triton' but triton is not importable (or x is not a flat batch)")
        if kernel is not None:
            # One launch pair for all slots, reading rows.slot_of_row on the device (no
            # host sync: capturable). The rank and row block come from host state only.
            rank = max(self.ranks[slot] for slot, _ in self.rows.groups)
            if rank:
                block_t = 16 if self.rows.mean_run >= 16 else 1
                kernel.lora_delta(x, self.lora_A, self.lora_B, self.rows.slot_of_row, y,
                                  max_rank=rank, block_t=block_t)
            return y
        # Torch ops, one slot at a time (the CPU kernel has its own LoRA GEMVs).
        for slot, rows in self.rows.groups:
            r = self.ranks[slot]
            if not r:
                continue
            a, b = self.lora_A[slot, :r], self.lora_B[slot, :, :r]  # (r, in), (out, r)
            if isinstance(rows, slice):
                y[rows].addmm_(x[rows] @ a.T, b.T)
            else:
                y.index_add_(0, rows, (x.index_select(0, rows) @ a.T) @ b.T)
        return y

    def _use_triton(self, x: torch.Tensor) -> bool:
        mode = self.rows.kernel
        if mode == "torch" or (mode == "auto" and not x.is_cuda):
            return False
        return x.dim() == 2 and x.dtype == self.lora_A.dtype and x.stride(1) == 1

    def extra_repr(self) -> str:
        S, R, _ = self.lora_A.shape
        return f"slots={S}, max_rank={R}"


@functools.cache
def _triton_lora():
    """galerne.kernels.triton_lora, or None without triton."""
    from ..kernels import triton_lora

    return triton_lora if triton_lora.triton is not None else None


def multi_lora_unsupported(model: nn.Module) -> str | None:
    """Why adapters can't be served unmerged on ``model`` (None: they can)."""
    args = getattr(model, "args", None)
    if args is not None and args.mla is not None:
        return "multi-head latent attention"
    if args is not None and args.moe is not None:
        return "mixture-of-experts layers (tokens are regrouped by expert, not by adapter)"
    for name, m in _multi_targets(model):
        if isinstance(m, MultiLoRALinear):
            return "adapter slots already applied"
        if type(m) not in (nn.Linear, QuantLinear) or getattr(m, "bias", None) is not None:
            return f"{name} is a {type(m).__name__}{' with a bias' if type(m) is nn.Linear else ''}, not a plain linear layer"
    return None


def _multi_targets(model: nn.Module) -> list[tuple[str, nn.Module]]:
    out = []
    for i, layer in enumerate(model.layers):
        for t in MULTI_TARGETS:
            kind = "attention" if t in ("wq", "wk", "wv", "wo") else "feed_forward"
            out.append((f"layers.{i}.{kind}.{t}", getattr(getattr(layer, kind), t)))
    return out


class MultiLoRA:
    """What ``apply_multi_lora`` made: the model's ``MultiLoRALinear`` modules by native
    name (``layers.0.attention.wq``) and the ``LoRARows`` they share."""

    def __init__(self, modules: dict[str, MultiLoRALinear], rows: LoRARows, max_loras: int, max_rank: int):
        self.modules, self.rows = modules, rows
        self.max_loras, self.max_rank = max_loras, max_rank

    def layers(self) -> list[list[MultiLoRALinear]]:
        """Per layer, the modules in MULTI_TARGETS order (the kernels' contract)."""
        per = len(MULTI_TARGETS)
        mods = list(self.modules.values())
        return [mods[i : i + per] for i in range(0, len(mods), per)]

    def fill(self, slot: int, tensors: dict[str, tuple[torch.Tensor, torch.Tensor]], scaling: float) -> None:
        """Put an adapter (native module name -> (A, B)) in ``slot``; modules it does not
        target are zeroed there. Names must be among ``modules`` (checked by the caller)."""
        for name, m in self.modules.items():
            a, b = tensors.get(name, (None, None))
            m.set_slot(slot, a, b, scaling)

    def clear(self, slot: int) -> None:
        for m in self.modules.values():
            m.set_slot(slot, None, None, 0.0)

    @contextlib.contextmanager
    def batch(self, seq_slots: list[int], q_lens: list[int], device: torch.device):
        """Within: the model's forward applies slot ``seq_slots[i]`` to the ``q_lens[i]``
        rows of sequence i (-1: none)."""
        self.rows.set(seq_slots, q_lens, device)
        try:
            yield
        finally:
            self.rows.clear()

    @property
    def nbytes(self) -> int:
        return sum(m.lora_A.nbytes + m.lora_B.nbytes for m in self.modules.values())


def multi_lora_bytes(model: nn.Module, max_loras: int, max_rank: int) -> int:
    """Bytes the adapter slots of ``apply_multi_lora`` take on the model's device."""
    total = 0
    for _, m in _multi_targets(model):
        total += max_loras * max_rank * (m.in_features + m.out_features) * linear_dtype(m).itemsize
    return total


def apply_multi_lora(model: nn.Module, max_loras: int, max_rank: int, kernel: str = "auto") -> MultiLoRA:
    """Wrap every target linear (MULTI_TARGETS of every layer) in a ``MultiLoRALinear``
    of ``max_loras`` empty slots of rank ``max_rank``. All stacks are allocated before
    any module is swapped, so that a failure (out of memory) leaves the model as it was.
    Raises ValueError when ``multi_lora_unsupported`` gives a reason. ``kernel``: see
    ``LoRARows.kernel``."""
    reason = multi_lora_unsupported(model)
    if reason is not None:
        raise ValueError(f"adapters can't be served unmerged on this model: {reason}")
    rows = LoRARows(kernel)
    targets = _multi_targets(model)
    wrapped = {name: MultiLoRALinear(m, rows, max_loras, max_rank) for name, m in targets}
    for name, m in wrapped.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, m)
    return MultiLoRA(wrapped, rows, max_loras, max_rank)
