"""The decoder: one module class for inference and fine-tuning.

``forward`` takes a flat token stream (every sequence of the batch back to back)
with each token's absolute position, and an attention backend that knows how the
stream splits into sequences and where keys/values live. It returns the final
normalised hidden states; ``logits`` projects them, so that callers compute logits
only for the rows they need (the last token of each sequence when decoding, chunks
of rows for a memory-light training loss).
"""

from __future__ import annotations

import torch
from torch import nn

from .args import ModelArgs
from .layers import Attention, AttentionBackend, FeedForward, RMSNorm, Rope, model_rope
from .mla import LatentAttention
from .moe import MoeLayer


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention: nn.Module = LatentAttention(args, layer) if args.mla else Attention(args, layer)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward: nn.Module = (
            MoeLayer(args.dim, args.hidden_dim, args.moe) if args.is_moe_layer(layer)
            else FeedForward(args.dim, args.hidden_dim)
        )

    def forward(self, x, rope: Rope, backend: AttentionBackend) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), rope, backend)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tied_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, backend: AttentionBackend,
                embeds: torch.Tensor | None = None) -> torch.Tensor:
        """tokens, positions: (T,) -> hidden states (T, D). ``embeds``: the (T, D) inputs
        to use instead of the tokens' embeddings (a prompt's image rows in place)."""
        h = self.tok_embeddings(tokens) if embeds is None else embeds  # (T, D)
        rope = model_rope(self.args, positions, h.dtype)
        for layer in self.layers:
            h = layer(h, rope, backend)
        return self.norm(h)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N, vocab), in the weights' dtype."""
        return self.output(hidden)
