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

import math
from collections.abc import Iterable

import torch
from torch import nn

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
        return self.base(x) + self.scaling * self.lora_B(self.lora_A(self.dropout(x)))

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
