"""Sparse mixture of experts (Mixtral): a router picks the top-k experts per token
and mixes their outputs with a softmax over the chosen experts' logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .args import MoeArgs
from .layers import FeedForward


class MoeLayer(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, moe: MoeArgs):
        super().__init__()
        self.num_experts_per_tok = moe.num_experts_per_tok
        self.gate = nn.Linear(dim, moe.num_experts, bias=False)
        self.experts = nn.ModuleList(FeedForward(dim, hidden_dim) for _ in range(moe.num_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (T, D)
        logits = self.gate(x)  # (T, E)
        top_logits, top_idx = torch.topk(logits, self.num_experts_per_tok, dim=-1)  # (T, k)
        # Softmax over the chosen experts only; float32 like the references, so the
        # mixing weights do not depend on the activation dtype.
        weights = F.softmax(top_logits, dim=-1, dtype=torch.float32).to(x.dtype)  # (T, k)
        out = torch.zeros_like(x)
        # Loop over experts, each taking the tokens routed to it: exact, and the
        # work is proportional to k, not to the number of experts.
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(top_idx == e)
            if tok.numel() == 0:
                continue
            y = expert(x[tok]) * weights[tok, slot, None]
            out.index_add_(0, tok, y)
        return out
