"""FP8 checkpoints: weights stored as float8_e4m3fn with scales beside them.

Two spellings are read:

- Hugging Face (``quantization_config: {"quant_method": "fp8", "weight_block_size":
  [128, 128]}``, DeepSeek-V3's format, which transformers' fine-grained FP8 writes):
  ``X.weight`` (fp8) and ``X.weight_scale_inv`` (float32, one per 128 x 128 block,
  rounded up at the edges: a (320, 4096) weight has a (3, 32) grid). Despite the
  name, the scale *multiplies*: w = fp8 * scale_inv of its block. Packed experts
  (``mlp.experts.gate_up_proj``) carry ``gate_up_proj_scale_inv`` (E, rows/128,
  cols/128). Without ``weight_block_size`` the scale is per tensor (``X.weight_scale_inv``,
  or ``X.weight_scale`` in older exports) and ``X.activation_scale`` is a static
  activation scale, not needed once dequantized.
- Mistral-native (params.json ``quantization: {"qformat_weight": "fp8_e4m3", ...}``):
  ``X.weight`` (fp8) and ``X.qscale_weight`` (per tensor, multiplies), and
  ``X.qscale_act`` (static activation scales), not needed once dequantized.

On load the weights are dequantized (to float32, then the run dtype); activation
scales are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..errors import ConfigError

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# Tensors that are scales, not weights.
_SCALE_SUFFIXES = ("_scale_inv", ".weight_scale", ".qscale_weight", ".qscale_act", ".input_scale",
                   ".activation_scale", "_activation_scale")


@dataclass(frozen=True)
class Fp8Format:
    layout: str  # "hf" | "mistral"
    block: tuple[int, int] | None  # None: a scale per tensor (or per row)

    @classmethod
    def from_args(cls, args) -> Fp8Format | None:
        """The FP8 format ``args.extra`` describes, None for an unquantized checkpoint."""
        hf, native = args.extra.get("quantization_config"), args.extra.get("quantization")
        if (hf or native or {}).get("quant_method") == "galerne":  # block schemes: galerne.quant
            return None
        if hf:
            method = str(hf.get("quant_method", "")).lower()
            if method != "fp8":
                raise ConfigError(f"quantization_config.quant_method {method!r} is not supported (fp8 is)")
            block = hf.get("weight_block_size")
            return cls("hf", (int(block[0]), int(block[1])) if block else None)
        if native:
            fmt = native.get("qformat_weight")
            if fmt != "fp8_e4m3":
                raise ConfigError(f"quantization {native!r} is not supported (qformat_weight fp8_e4m3 is)")
            return cls("mistral", None)
        return None

    def scale_names(self, weight_name: str) -> tuple[str, ...]:
        """Where the scale of ``weight_name`` may be, in order of preference. A
        per-tensor HF scale is ``weight_scale_inv`` in transformers' fine-grained FP8
        (Ministral 3, Devstral 2) and ``weight_scale`` in older static-FP8 exports."""
        if self.layout == "mistral":
            return (weight_name.removesuffix(".weight") + ".qscale_weight",)
        if not weight_name.endswith(".weight"):  # packed experts: "...experts.gate_up_proj"
            return (weight_name + "_scale_inv",)
        return (weight_name + "_scale_inv",) if self.block else (weight_name + "_scale_inv", weight_name + "_scale")


def is_scale(name: str) -> bool:
    return name.endswith(_SCALE_SUFFIXES)


def dequantize(w: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None) -> torch.Tensor:
    """float32 weights from fp8 ``w`` (..., rows, cols) and its scales: one (scalar),
    one per row, or one per ``block`` (..., ceil(rows/b0), ceil(cols/b1))."""
    w32, s = w.to(torch.float32), scale.to(torch.float32)
    if s.numel() == 1:
        return w32 * s.reshape(())
    if block is None:  # one scale per row: (rows,) or (rows, 1)
        return w32 * s.reshape(w.shape[:-1] + (1,))
    rows, cols = w.shape[-2:]
    b0, b1 = block
    if s.shape[-2:] != (-(-rows // b0), -(-cols // b1)):
        raise ValueError(f"a {tuple(w.shape)} weight needs a {(-(-rows // b0), -(-cols // b1))} grid of "
                         f"{b0}x{b1} block scales, got {tuple(s.shape)}")
    full = s.repeat_interleave(b0, dim=-2)[..., :rows, :].repeat_interleave(b1, dim=-1)[..., :cols]
    return w32 * full


def quantize(w: torch.Tensor, block: tuple[int, int] | None = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weights, float32 scales) such that ``dequantize`` gives ``w`` back within
    e4m3's precision: each block's largest magnitude maps to 448. For tests and tools."""
    fmax = torch.finfo(torch.float8_e4m3fn).max
    w32 = w.to(torch.float32)
    if block is None:
        s = (w32.abs().amax() / fmax).clamp(min=1e-12)
        return (w32 / s).to(torch.float8_e4m3fn), s.reshape(())
    rows, cols = w.shape[-2:]
    b0, b1 = block
    R, C = -(-rows // b0), -(-cols // b1)
    padded = w32.new_zeros(w.shape[:-2] + (R * b0, C * b1))
    padded[..., :rows, :cols] = w32
    tiles = padded.unflatten(-1, (C, b1)).unflatten(-3, (R, b0))  # (..., R, b0, C, b1)
    s = (tiles.abs().amax(dim=(-3, -1)) / fmax).clamp(min=1e-12)  # (..., R, C)
    q = (tiles / s[..., :, None, :, None]).flatten(-2).flatten(-3, -2)[..., :rows, :cols]
    return q.to(torch.float8_e4m3fn), s



class Fp8Weight(NamedTuple):
    """An FP8 weight kept as stored, with its scales, on its way into an ``Fp8Linear``
    (a GPU with FP8 support): the loader's renames, splits and row permutations
    apply to it as to a tensor, or, where the scales cannot follow (a row
    permutation that crosses scale blocks), it is dequantized instead."""

    data: torch.Tensor  # float8 (..., rows, cols)
    scale: torch.Tensor  # float32: one value, or a block grid (..., ceil(rows/b0), ceil(cols/b1))
    block: tuple[int, int] | None

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    def dim(self) -> int:
        return self.data.dim()

    def dense(self) -> torch.Tensor:
        return dequantize(self.data, self.scale, self.block)

    def expert(self, e: int) -> "Fp8Weight":
        """Expert ``e`` of a packed (E, rows, cols) weight."""
        scale = self.scale[e] if self.scale.dim() >= 3 else self.scale
        return Fp8Weight(self.data[e], scale, self.block)

    def rows(self, start: int, stop: int) -> "Fp8Weight | torch.Tensor":
        """Rows ``start:stop`` (a packed gate/up half); dense when they cut a scale block."""
        if self.block is None or self.scale.numel() == 1:
            return Fp8Weight(self.data[start:stop], self.scale, self.block)
        b0 = self.block[0]
        if start % b0 or (stop % b0 and stop != self.data.shape[0]):
            return self.dense()[start:stop]
        return Fp8Weight(self.data[start:stop], self.scale[start // b0 : -(-stop // b0)], self.block)

    def permuted_rows(self, fn, group: int) -> "Fp8Weight | torch.Tensor":
        """``fn`` (a permutation of rows within groups of ``group`` rows: one head)
        applied to the weight; the scales follow when each group lies in one block row."""
        if self.block is None or self.scale.numel() == 1 or self.block[0] % group == 0:
            return Fp8Weight(fn(self.data.view(torch.uint8)).view(self.data.dtype), self.scale, self.block)
        return fn(self.dense())
