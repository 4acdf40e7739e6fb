"""The building blocks of a Mistral-family decoder, smallest first.

Module and parameter names follow Mistral's native checkpoints
(``attention.wq``, ``feed_forward.w1``, ...); ``galerne.weights.names`` maps the
Hugging Face names onto these, with the rotary permutation of q/k.

Shapes: T = tokens in the flat batch (all sequences back to back), D = dim,
H = query heads, K = key/value heads, hd = head_dim.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .args import ModelArgs, QueryScaling, YarnArgs


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


class Rope(NamedTuple):
    """What every attention layer of one forward needs about positions: cos and sin
    (T, rot/2), and the per-token query scale (T,) or None (no llama-4 scaling)."""

    cos: torch.Tensor
    sin: torch.Tensor
    q_scale: torch.Tensor | None = None


def rotary_inv_freq(dim: int, theta: float, yarn: YarnArgs | None = None,
                    device: torch.device | str | None = None) -> tuple[torch.Tensor, float]:
    """The (dim/2,) float32 rotary frequencies and the factor cos/sin are scaled by.

    Plain rotary: theta^(-2i/dim). YaRN keeps the fast-turning dimensions (more
    than ``beta_fast`` turns over the original context), divides the slow ones
    (fewer than ``beta_slow`` turns) by ``factor``, and ramps linearly between the
    two, as transformers' ``_compute_yarn_parameters`` does, in float32.
    """
    exponent = torch.arange(0, dim, 2, device=device, dtype=torch.int64).float() / dim
    pos_freqs = theta**exponent
    inv_freq = 1.0 / pos_freqs
    if yarn is None:
        return inv_freq, 1.0

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(yarn.original_max_position_embeddings / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(yarn.beta_fast), correction_dim(yarn.beta_slow)
    if yarn.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = ((torch.arange(dim // 2, device=device, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp  # 1: keep the frequency, 0: interpolate it
    interpolated = 1.0 / (yarn.factor * pos_freqs)
    return interpolated * (1 - extrapolation) + inv_freq * extrapolation, yarn.magnitude


def rotary_cos_sin(positions: torch.Tensor, dim: int, theta: float, dtype: torch.dtype,
                   yarn: YarnArgs | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (T, dim/2) for the given absolute positions.

    Computed per forward from the positions (cheap: T x dim/2) rather than from a
    table, so that nothing depends on a maximum length and nothing has to be
    re-materialised after building on the ``meta`` device.
    """
    inv_freq, magnitude = rotary_inv_freq(dim, theta, yarn, positions.device)
    freqs = positions.float()[:, None] * inv_freq[None, :]  # (T, dim/2)
    cos, sin = freqs.cos(), freqs.sin()
    if magnitude != 1.0:
        cos, sin = cos * magnitude, sin * magnitude
    return cos.to(dtype), sin.to(dtype)


def query_scale(positions: torch.Tensor, scaling: QueryScaling | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Llama 4's per-token query scale (T,), or None without it."""
    if scaling is None:
        return None
    steps = torch.floor(positions.float() / scaling.original_max_position_embeddings)
    return (1 + scaling.beta * torch.log(1 + steps)).to(dtype)


def model_rope(args: ModelArgs, positions: torch.Tensor, dtype: torch.dtype) -> Rope:
    """The ``Rope`` of a model's forward: every layer rotates ``args.rope_dim`` values
    per head (all of head_dim, or MLA's rotary part, YaRN computed for that size)."""
    cos, sin = rotary_cos_sin(positions, args.rope_dim, args.rope_theta, dtype, args.yarn)
    return Rope(cos, sin, query_scale(positions, args.query_scaling, dtype))


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
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None,
        scale: float | None = None,
    ) -> torch.Tensor:
        """q: (T, H, hd), k: (T, K, hd), v: (T, K, vd) for the new tokens -> (T, H, vd);
        ``scale``: the softmax scale (None: hd^-0.5).

        A backend whose cache holds multi-head latent attention's latents sets
        ``latent = True``: the model then passes the latent as one kv head and v as
        a view of its first columns, which such a backend does not store twice."""
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

    def forward(self, x, rope: Rope, backend: AttentionBackend) -> torch.Tensor:
        T = x.shape[0]
        q = self.wq(x).view(T, self.n_heads, self.head_dim)  # (T, H, hd)
        k = self.wk(x).view(T, self.n_kv_heads, self.head_dim)  # (T, K, hd)
        v = self.wv(x).view(T, self.n_kv_heads, self.head_dim)  # (T, K, hd)
        q, k = apply_rotary(q, rope.cos, rope.sin), apply_rotary(k, rope.cos, rope.sin)
        if rope.q_scale is not None:
            q = q * rope.q_scale[:, None, None]
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
