"""The Pixtral vision encoder and the projector that feeds its output to the language model.

Mistral's vision-language checkpoints (Pixtral 12B, Mistral Small 3.1/3.2, Ministral 3,
Mistral Small 4) pair a Mistral decoder with one encoder:

- ``patch_conv``: a stride-``patch_size`` convolution, one vector per patch;
- ``ln_pre``: an RMSNorm;
- ``transformer``: pre-norm blocks (RMSNorm, attention with a 2-D rotary embedding,
  RMSNorm, SwiGLU), each image attending only to itself;
- the projector: an optional RMSNorm (``pre_mm_projector_norm``), an optional patch
  merger (each ``spatial_merge_size`` x ``spatial_merge_size`` square of patches
  concatenated, then one linear), and a two-layer GELU MLP (``vision_language_adapter``)
  into the decoder's width.

The result has one row per ``[IMG]`` token of the image, rows in reading order; the
decoder takes those rows in place of the ``[IMG]`` embeddings.

Names are Mistral-native (``vision_encoder.transformer.layers.0.attention.wq``), as the
decoder's are. The 2-D rotary rotates interleaved pairs as mistral-inference does
(complex multiplication): pair ``j`` of a head turns with the patch's row for the first
quarter of the head, its column for the second, at frequencies ``theta^(-4j/hd)`` and
``theta^(-(4j+2)/hd)``. Hugging Face checkpoints rotate halves: their q/k rows are
permuted at load (``weights/names.py``), as the decoder's are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .layers import RMSNorm, apply_rotary
from .vision_args import VisionArgs

class _Attention(nn.Module):
    def __init__(self, a: VisionArgs):
        super().__init__()
        self.n_heads, self.head_dim = a.n_heads, a.dim_per_head
        inner = a.n_heads * a.dim_per_head
        self.wq = nn.Linear(a.hidden_size, inner, bias=False)
        self.wk = nn.Linear(a.hidden_size, inner, bias=False)
        self.wv = nn.Linear(a.hidden_size, inner, bias=False)
        self.wo = nn.Linear(inner, a.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        shape = (x.shape[0], self.n_heads, self.head_dim)
        q = apply_rotary(self.wq(x).view(shape), cos, sin)
        k = apply_rotary(self.wk(x).view(shape), cos, sin)
        v = self.wv(x).view(shape)
        # Each image attends to itself only: one attention per image (no (N, N) mask).
        # 4-D inputs: torch's CPU flash kernel takes them (3-D ones fall to the math path, 5x slower).
        out = [F.scaled_dot_product_attention(*(t.transpose(0, 1)[None] for t in (qi, ki, vi)))[0].transpose(0, 1)
               for qi, ki, vi in zip(q.split(lengths), k.split(lengths), v.split(lengths))]
        return self.wo(torch.cat(out).flatten(1))


class _FeedForward(nn.Module):
    def __init__(self, a: VisionArgs):
        super().__init__()
        self.w1 = nn.Linear(a.hidden_size, a.intermediate_size, bias=False)
        self.w2 = nn.Linear(a.intermediate_size, a.hidden_size, bias=False)
        self.w3 = nn.Linear(a.hidden_size, a.intermediate_size, bias=False)
        self.act = F.silu if a.act == "silu" else F.gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act(self.w1(x)) * self.w3(x))


class _Block(nn.Module):
    def __init__(self, a: VisionArgs):
        super().__init__()
        self.attention_norm = RMSNorm(a.hidden_size, 1e-5)
        self.attention = _Attention(a)
        self.ffn_norm = RMSNorm(a.hidden_size, 1e-5)
        self.feed_forward = _FeedForward(a)

    def forward(self, x, cos, sin, lengths):
        h = x + self.attention(self.attention_norm(x), cos, sin, lengths)
        return h + self.feed_forward(self.ffn_norm(h))


class _Transformer(nn.Module):
    def __init__(self, a: VisionArgs):
        super().__init__()
        self.layers = nn.ModuleList(_Block(a) for _ in range(a.n_layers))


class VisionEncoder(nn.Module):
    """``vision_encoder.*``: images (C, H, W) -> one row per patch."""

    def __init__(self, a: VisionArgs):
        super().__init__()
        self.args = a
        self.patch_conv = nn.Conv2d(a.num_channels, a.hidden_size, kernel_size=a.patch_size, stride=a.patch_size,
                                    bias=False)
        self.ln_pre = RMSNorm(a.hidden_size, 1e-5)
        self.transformer = _Transformer(a)

    def rotary(self, grids: list[tuple[int, int]], device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (N, hd/2) of every patch of images of (rows, columns) ``grids``."""
        hd = self.args.dim_per_head
        freqs = 1.0 / (self.args.rope_theta ** (torch.arange(0, hd, 2, device=device).float() / hd))
        angles = []
        for rows, cols in grids:
            r = torch.arange(rows, device=device).float()[:, None, None] * freqs[None, None, ::2]
            c = torch.arange(cols, device=device).float()[None, :, None] * freqs[None, None, 1::2]
            angles.append(torch.cat([r.expand(rows, cols, -1), c.expand(rows, cols, -1)], dim=-1).flatten(0, 1))
        a = torch.cat(angles)
        return a.cos().to(dtype), a.sin().to(dtype)

    def forward(self, images: list[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Images (C, H, W), H and W multiples of patch_size -> (patches of all images
        back to back, hidden_size) and each image's (rows, columns) of patches."""
        dtype = self.patch_conv.weight.dtype
        patches = [self.patch_conv(img.unsqueeze(0).to(dtype))[0] for img in images]  # (D, rows, cols)
        grids = [(p.shape[1], p.shape[2]) for p in patches]
        x = self.ln_pre(torch.cat([p.flatten(1).t() for p in patches]))
        cos, sin = self.rotary(grids, x.device, x.dtype)
        lengths = [r * c for r, c in grids]
        for layer in self.transformer.layers[: self.args.feature_layers]:
            x = layer(x, cos, sin, lengths)
        return x, grids


class PatchMerger(nn.Module):
    """Each ``m`` x ``m`` square of patches, concatenated (channel-major, as
    ``torch.nn.functional.unfold`` orders them) -> one linear -> one row."""

    def __init__(self, dim: int, m: int):
        super().__init__()
        self.m = m
        self.merging_layer = nn.Linear(dim * m * m, dim, bias=False)

    def forward(self, x: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
        out = []
        for part, (rows, cols) in zip(x.split([r * c for r, c in grids]), grids):
            grid = part.view(rows, cols, -1).permute(2, 0, 1).unsqueeze(0)  # (1, D, rows, cols)
            out.append(F.unfold(grid, kernel_size=self.m, stride=self.m)[0].t())
        return self.merging_layer(torch.cat(out))


class Adapter(nn.Module):
    """``vision_language_adapter``: w_out(gelu(w_in x))."""

    def __init__(self, dim: int, text_dim: int, bias: bool):
        super().__init__()
        self.w_in = nn.Linear(dim, text_dim, bias=bias)
        self.w_out = nn.Linear(text_dim, text_dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_out(F.gelu(self.w_in(x)))


class VisionModel(nn.Module):
    """Encoder and projector: ``encode(images)`` gives each image's rows for its
    ``[IMG]`` tokens, in the decoder's width."""

    def __init__(self, a: VisionArgs):
        super().__init__()
        self.args = a
        self.vision_encoder = VisionEncoder(a)
        self.pre_mm_projector_norm = RMSNorm(a.hidden_size, a.pre_norm_eps) if a.pre_norm else None
        self.patch_merger = PatchMerger(a.hidden_size, a.spatial_merge_size) if a.patch_merger else None
        self.vision_language_adapter = Adapter(a.hidden_size, a.text_dim, a.adapter_bias)

    def forward(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """Images (C, H, W) as mistral-common prepares them (normalised, sides multiples
        of patch_size * spatial_merge_size) -> per image, (its [IMG] tokens, text_dim)."""
        return self.project(*self.vision_encoder(images))

    def project(self, x: torch.Tensor, grids: list[tuple[int, int]]) -> list[torch.Tensor]:
        """The projector: the encoder's rows (``vision_encoder``'s output) -> per image,
        (its [IMG] tokens, text_dim). Fine-tuning trains it; the encoder stays frozen."""
        if self.pre_mm_projector_norm is not None:
            x = self.pre_mm_projector_norm(x)
        m = self.args.spatial_merge_size
        if self.patch_merger is not None:
            x = self.patch_merger(x, grids)
        elif m != 1:
            raise ConfigError(f"spatial_merge_size {m} without a patch merger")
        x = self.vision_language_adapter(x)
        return list(x.split([(r // m) * (c // m) for r, c in grids]))

    def projector_state(self) -> dict[str, torch.Tensor]:
        """The projector's tensors (native names): what fine-tuning changes."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("vision_encoder.")}

    def train_projector(self) -> list[torch.nn.Parameter]:
        """Freeze the encoder, let the projector learn; its parameters."""
        self.requires_grad_(False)
        params = [p for name, p in self.named_parameters() if not name.startswith("vision_encoder.")]
        for p in params:
            p.requires_grad_(True)
        return params

    def embed(self, embeds: torch.Tensor, tokens: list[int], images: list) -> torch.Tensor:
        """``embeds`` (T, D) of ``tokens`` with the rows of ``images`` (ImageInput, whole
        spans inside ``tokens``) in place of their [IMG] tokens; out of place, so that
        gradients reach the projector. The encoder runs without gradients."""
        if not images:
            return embeds
        dtype = self.patch_conv_dtype
        with torch.no_grad():
            x, grids = self.vision_encoder([im.pixels.to(embeds.device, dtype) for im in images])
        rows = [p for im in images for p in im.rows(tokens, self.args.image_token_id)]
        features = torch.cat(self.project(x, grids))
        if features.shape[0] != len(rows):
            raise ValueError(f"{len(rows)} image tokens for {features.shape[0]} encoder rows")
        return embeds.index_copy(0, torch.tensor(rows, device=embeds.device), features.to(embeds.dtype))

    @property
    def patch_conv_dtype(self) -> torch.dtype:
        return self.vision_encoder.patch_conv.weight.dtype

    def check_image(self, pixels: torch.Tensor) -> int:
        """Refuse an image this encoder cannot take (shape), naming what is wrong; else the
        rows it gives for it (one per [IMG] token)."""
        a = self.args
        if pixels.dim() != 3 or pixels.shape[0] != a.num_channels:
            raise ValueError(f"image of shape {tuple(pixels.shape)}: expected ({a.num_channels}, H, W)")
        if pixels.shape[1] % a.token_pixels or pixels.shape[2] % a.token_pixels:
            raise ValueError(f"image of {pixels.shape[2]}x{pixels.shape[1]} pixels: sides must be multiples of "
                             f"{a.token_pixels}")
        return (pixels.shape[1] // a.token_pixels) * (pixels.shape[2] // a.token_pixels)
