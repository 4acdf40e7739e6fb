"""The building blocks of a Mistral-family decoder, smallest first.

Module and parameter names follow Mistral's native checkpoints
(``attention.wq``, ``feed_forward.w1``, ...); ``galerne.weights.names`` maps the
Hugging Face names onto these, with the rotary permutation of q/k.

Shapes: T = tokens in the flat batch (all sequences back to back), D = dim,
H = query heads, K = key/value heads, hd = head_dim.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .args import ModelArgs


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 whatever the weight dtype, as the reference does,
        # then scale in the activation dtype.
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin of shape (T, hd/2) for the given absolute positions.

    Computed per forward from the positions (cheap: T x hd/2) rather than from a
    table, so that nothing depends on a maximum length and nothing has to be
    re-materialised after building on the ``meta`` device.
    """
    exponent = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta**exponent)  # (hd/2,)
    freqs = positions.float()[:, None] * inv_freq[None, :]  # (T, hd/2)
    return freqs.cos().to(dtype), freqs.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) by the angle of pair i.

    This is Mistral's native layout (mistral-inference multiplies complex
    numbers made of consecutive pairs). Hugging Face checkpoints rotate the two
    halves instead; their q/k rows are permuted at load time so that both give
    the same numbers. x: (T, heads, hd); cos/sin: (T, hd/2).
    """
    xp = x.unflatten(-1, (-1, 2))  # (T, heads, hd/2, 2)
    x0, x1 = xp[..., 0], xp[..., 1]
    c, s = cos[:, None, :], sin[:, None, :]  # broadcast over heads
    return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2)


class AttentionBackend(Protocol):
    """Where keys and values go and how queries read them.

    The model never owns a cache: each forward is given a backend that knows the
    batch layout (sequence lengths, positions) and the cache, if any. The dense
    reference, the training path and (later) the paged engine are different
    backends behind this one call.
    """

    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None
    ) -> torch.Tensor:
        """q: (T, H, hd), k/v: (T, K, hd) for the new tokens -> (T, H, hd)."""
        ...


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.window = args.window(layer)
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x, cos, sin, backend: AttentionBackend) -> torch.Tensor:
        T = x.shape[0]
        q = self.wq(x).view(T, self.n_heads, self.head_dim)  # (T, H, hd)
        k = self.wk(x).view(T, self.n_kv_heads, self.head_dim)  # (T, K, hd)
        v = self.wv(x).view(T, self.n_kv_heads, self.head_dim)  # (T, K, hd)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = backend.attend(self.layer, q, k, v, self.window)  # (T, H, hd)
        return self.wo(out.reshape(T, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
