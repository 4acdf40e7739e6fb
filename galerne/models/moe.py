"""Sparse mixture of experts: a router picks the top-k experts per token and mixes
their outputs.

One module, with Mixtral's routing as the default: a softmax over the router's
scores, the k best kept and renormalised to sum to 1 (the same weights as a
softmax over the chosen logits only). Mistral 4 (DeepSeek-V3's layout) switches on:

- grouped routing: the experts form ``num_expert_groups`` groups; a token keeps
  the ``num_expert_groups_per_tok`` groups whose two best scores sum highest and
  picks its k experts among them. Worked example, 8 experts in 2 groups of 4,
  one group per token, k = 2: scores (.30 .05 .02 .01 | .20 .19 .13 .10) give
  group sums .35 and .39, so the second group is kept and the token goes to
  experts 4 and 5 (not 0, whose group lost);
- ``routed_scale``: a factor on the routed experts' weights;
- shared experts: one feed-forward of ``num_shared_experts * expert_hidden_dim``
  every token goes through, added to the routed mix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .args import MoeArgs
from .layers import FeedForward


def route(logits: torch.Tensor, moe: MoeArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, E) router logits -> expert weights (T, k) float32 and indices (T, k)."""
    scores = F.softmax(logits, dim=-1, dtype=torch.float32)  # (T, E)
    choice = scores
    G = moe.num_expert_groups
    if G > 1:
        T, E = scores.shape
        grouped = scores.view(T, G, E // G)
        group_score = grouped.topk(2, dim=-1).values.sum(-1)  # (T, G)
        keep = group_score.topk(moe.num_expert_groups_per_tok, dim=-1).indices  # (T, g)
        mask = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep, True)  # (T, G)
        choice = grouped.masked_fill(~mask[..., None], 0.0).view(T, E)
    idx = choice.topk(moe.num_experts_per_tok, dim=-1).indices  # (T, k)
    weights = scores.gather(1, idx)
    if moe.normalize:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * moe.routed_scale, idx


class MoeLayer(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, moe: MoeArgs):
        super().__init__()
        self.moe = moe
        expert_dim = moe.expert_hidden_dim or hidden_dim
        self.gate = nn.Linear(dim, moe.num_experts, bias=False)
        self.experts = nn.ModuleList(FeedForward(dim, expert_dim) for _ in range(moe.num_experts))
        if moe.num_shared_experts:
            self.shared_experts = FeedForward(dim, expert_dim * moe.num_shared_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (T, D). Routing in float32 like the references, so that the mixing
        # weights do not depend on the activation dtype.
        weights, top_idx = route(self.gate(x), self.moe)  # (T, k), (T, k)
        weights = weights.to(x.dtype)
        # The (token, slot) pairs sorted by expert (stable: by token within one), so
        # that each expert used runs once on its tokens, back to back, and the others
        # cost nothing: a decode step of Mistral Small 4 touches 4 of 128 experts.
        k = top_idx.shape[1]
        flat = top_idx.flatten()
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=len(self.experts)).tolist()
        tok = order // k
        xs = x.index_select(0, tok)
        ys = torch.empty_like(xs)
        start = 0
        for e, n in enumerate(counts):
            if n:
                ys[start : start + n] = self.experts[e](xs[start : start + n])
                start += n
        out = torch.zeros_like(x).index_add_(0, tok, ys * weights.flatten()[order, None])
        if self.moe.num_shared_experts:
            out = out + self.shared_experts(x)
        return out
