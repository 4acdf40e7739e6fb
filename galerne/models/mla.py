"""Multi-head latent attention (DeepSeek-V2/V3, Mistral 4).

Every head's key and value come from one small latent per token: the token's
hidden state is projected to ``kv_lora_rank`` values (normalised) plus one
``qk_rope_head_dim`` rotary key that all heads share; ``wkv_b`` expands the latent
into each head's non-rotary key part (``qk_nope_head_dim``) and value
(``v_head_dim``). Shapes: r = kv_lora_rank, n = qk_nope_head_dim, p =
qk_rope_head_dim, v = v_head_dim, H heads.

Two ways to attend, the same numbers:

- decompressed (training, scoring: ``NoCacheAttention``): build the H keys
  (n + p) and values (v) and run ordinary attention;
- absorbed (the paged engine, whose cache holds only the r + p latent values per
  token): fold ``wkv_b``'s key half into the query, q_nope (n) -> q_nope @ W_UK (r),
  so that a query scores the cached latent directly; attention then runs as
  multi-query attention with one "head" of r + p values whose values are the
  latent's first r, and ``wkv_b``'s value half maps the result back to v per head.
  For Mistral Small 4 (r 256, p 64, 32 heads of 128 + 128) that is 320 cached
  values per token per layer instead of 32 * (128 + 128) = 8192.

The softmax scale is transformers' (and DeepSeek's): qk_head_dim^-0.5, times
YaRN's mscale(factor, mscale_all_dim) squared when the config sets mscale_all_dim.
"""

from __future__ import annotations

import torch
from torch import nn

from .args import ModelArgs, yarn_mscale
from .layers import AttentionBackend, RMSNorm, Rope, apply_rotary
from .quant import dense_weight

# The epsilon of the two latent norms: a constant in DeepSeek-V3's reference code and
# in transformers (not the config's rms_norm_eps, which real Mistral 4 configs set to
# the same 1e-6 anyway).
LATENT_NORM_EPS = 1e-6


def softmax_scale(args: ModelArgs) -> float:
    m = args.mla
    assert m is not None
    scale = m.qk_head_dim**-0.5
    y = args.yarn
    if y is not None and y.mscale_all_dim:
        mscale = yarn_mscale(y.factor, y.mscale_all_dim)
        scale *= mscale * mscale
    return scale


class LatentAttention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        m = args.mla
        assert m is not None
        self.layer = layer
        self.n_heads, self.m = args.n_heads, m
        self.scale = softmax_scale(args)
        H = args.n_heads
        if m.q_lora_rank is None:
            self.wq = nn.Linear(args.dim, H * m.qk_head_dim, bias=False)
        else:
            self.wq_a = nn.Linear(args.dim, m.q_lora_rank, bias=False)
            self.q_a_norm = RMSNorm(m.q_lora_rank, LATENT_NORM_EPS)
            self.wq_b = nn.Linear(m.q_lora_rank, H * m.qk_head_dim, bias=False)
        self.wkv_a_with_mqa = nn.Linear(args.dim, m.kv_lora_rank + m.qk_rope_head_dim, bias=False)
        self.kv_a_norm = RMSNorm(m.kv_lora_rank, LATENT_NORM_EPS)
        self.wkv_b = nn.Linear(m.kv_lora_rank, H * (m.qk_nope_head_dim + m.v_head_dim), bias=False)
        self.wo = nn.Linear(H * m.v_head_dim, args.dim, bias=False)

    def forward(self, x, rope: Rope, backend: AttentionBackend) -> torch.Tensor:
        T, H, m = x.shape[0], self.n_heads, self.m
        n, p, r, v = m.qk_nope_head_dim, m.qk_rope_head_dim, m.kv_lora_rank, m.v_head_dim
        q = self.wq(x) if m.q_lora_rank is None else self.wq_b(self.q_a_norm(self.wq_a(x)))
        q = q.view(T, H, n + p)
        q_nope, q_rope = q[..., :n], apply_rotary(q[..., n:], rope.cos, rope.sin)  # (T, H, n), (T, H, p)
        kv = self.wkv_a_with_mqa(x)  # (T, r + p)
        latent = self.kv_a_norm(kv[:, :r])  # (T, r)
        k_rope = apply_rotary(kv[:, None, r:], rope.cos, rope.sin)  # (T, 1, p)
        if rope.q_scale is not None:
            s = rope.q_scale[:, None, None]
            q_nope, q_rope = q_nope * s, q_rope * s
        w_kv = dense_weight(self.wkv_b, x.dtype).view(H, n + v, r)
        if getattr(backend, "latent", False):
            # Absorbed: scores q_nope . (W_UK latent) = (W_UK^T q_nope) . latent.
            q_lat = torch.einsum("thn,hnr->thr", q_nope, w_kv[:, :n])  # (T, H, r)
            q_all = torch.cat((q_lat, q_rope), dim=-1)  # (T, H, r + p)
            k_all = torch.cat((latent[:, None], k_rope), dim=-1)  # (T, 1, r + p)
            # The backend stores k_all once; the values are its first r columns.
            o = backend.attend(self.layer, q_all, k_all, k_all[..., :r], None, scale=self.scale)  # (T, H, r)
            out = torch.einsum("thr,hvr->thv", o, w_kv[:, n:])  # (T, H, v)
        else:
            kv_b = self.wkv_b(latent).view(T, H, n + v)
            k = torch.cat((kv_b[..., :n], k_rope.expand(T, H, p)), dim=-1)  # (T, H, n + p)
            out = backend.attend(self.layer, torch.cat((q_nope, q_rope), dim=-1), k, kv_b[..., n:], None,
                                 scale=self.scale)  # (T, H, v)
        return self.wo(out.reshape(T, H * v))
