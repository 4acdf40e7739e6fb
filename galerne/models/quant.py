"""Quantized linear layers: transformations applied to a built model.

``QuantLinear`` and ``QuantEmbedding`` keep a weight in one of ``galerne.quant``'s
block schemes (q8_0, q4_0, q4_k: llama.cpp's blocks), as ``uint8`` rows in a
buffer named ``qweight`` (out, row_bytes). On a CPU the native decode kernel reads
those rows directly (``galerne.kernels``); everywhere else (prefill, GPUs without a
kernel for the scheme) the layer dequantizes its weight for the call and multiplies
in the activations' dtype, with the kernel's multi-threaded dequantizer where it is
built. An embedding dequantizes only the rows it looks up.

``Fp8Linear`` keeps an FP8 checkpoint's weights as they are stored (float8 e4m3 with
their scales: one per tensor, or one per 128 x 128 block as Mistral Small 4 ships),
half the memory of bf16. Where the GPU multiplies FP8 (compute capability 8.9+:
Ada, Hopper, Blackwell) a per-tensor-scaled weight goes through
``torch._scaled_mm`` with the activations quantized per row on the fly; otherwise
(block-scaled weights, other shapes) the layer dequantizes its weight for each
forward and multiplies in the activations' dtype: the memory saving stays, the
speed is that of a bf16 matmul plus the dequantization.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..quant import SCHEMES, Scheme
from ..quant import dequantize as dequantize_blocks
from ..quant.formats import int4_operands
from ..weights.fp8 import dequantize

E4M3_MAX = 448.0
DEQUANT_CHUNK = 4 << 20  # weights a QuantLinear dequantizes at once (16 MB in float32)


class Fp8Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None,
                 scaled_mm: bool | None = None):
        """``weight``: (out, in) float8_e4m3fn; ``scale``: float32, one value or the
        (ceil(out/b0), ceil(in/b1)) grid of ``block``. ``scaled_mm``: multiply in FP8
        (None: where the device can, for per-tensor scales)."""
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.register_buffer("scale", scale.to(torch.float32))
        self.block = block
        per_tensor = scale.numel() == 1
        if scaled_mm is None:
            scaled_mm = per_tensor and fp8_matmul_supported(weight.device) and weight.shape[0] % 16 == 0 \
                and weight.shape[1] % 16 == 0
        if scaled_mm and not per_tensor:
            raise ValueError("the FP8 matmul path takes per-tensor weight scales only")
        self.scaled_mm = scaled_mm

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize(self.weight, self.scale, self.block).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.scaled_mm:
            return F.linear(x, self.dense_weight(x.dtype))
        rows = x.reshape(-1, self.in_features)
        # Dynamic per-row activation scales: each row's largest magnitude maps to e4m3's.
        x_scale = (rows.abs().amax(dim=-1, keepdim=True).float() / E4M3_MAX).clamp(min=1e-12)
        x8 = (rows.float() / x_scale).to(torch.float8_e4m3fn)
        w_scale = self.scale.reshape(1, 1).expand(1, self.out_features).contiguous()
        out = torch._scaled_mm(x8, self.weight.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=x.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        kind = f"blocks {self.block[0]}x{self.block[1]}" if self.block and self.scale.numel() > 1 else "per tensor"
        return f"in={self.in_features}, out={self.out_features}, fp8 {kind}, {'fp8 matmul' if self.scaled_mm else 'dequantized per call'}"


# Up to this many rows, QuantLinear multiplies on the CPU by the kernel's GEMV over the
# blocks; past it, dequantize then sgemm (measured on cpu-125m's matrices, 2 cores:
# at 32 rows the two are even on a 2048 x 768 w1, the GEMV 4x faster on the 32768 x 768
# output; at 64 and more, sgemm wins on w1).
GEMV_MAX_ROWS = 32


def _dequantize(q: torch.Tensor, s: Scheme, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    if q.device.type == "cpu" and s.kernel:
        from ..kernels import cpu

        fast = cpu.dequantize(q, s, in_features)  # None where the kernel is not built
        if fast is not None:
            return fast if dtype == torch.float32 else fast.to(dtype)
    return dequantize_blocks(q, s, in_features, dtype)


class QuantLinear(nn.Module):
    """A bias-free linear layer whose weight is stored in a block scheme.
    ``qweight``: (out, in / block * block_bytes) uint8, ``galerne.quant``'s layout."""

    def __init__(self, qweight: torch.Tensor, scheme: Scheme | str, in_features: int,
                 dtype: torch.dtype = torch.float32):
        """``dtype``: the activations' (what an adapter served on this layer is kept in)."""
        super().__init__()
        self.dtype = dtype
        self.scheme = SCHEMES[scheme] if isinstance(scheme, str) else scheme
        if qweight.dtype != torch.uint8 or qweight.dim() != 2 or qweight.shape[1] != self.scheme.row_bytes(in_features) \
                or in_features % self.scheme.block:
            raise ValueError(f"QuantLinear: {self.scheme.name} rows of {in_features} weights are "
                             f"{self.scheme.row_bytes(in_features)} bytes; got {qweight.dtype} {tuple(qweight.shape)}")
        self.in_features, self.out_features = in_features, qweight.shape[0]
        self.register_buffer("qweight", qweight)
        # On the CPU, the blocks against int8-rounded inputs in the kernel's GEMV (set by
        # the engine from --quantized-activations; galerne.kernels.cpu.int8_reference).
        self.int8_dot = False
        self._int4 = None
        if qweight.is_cuda and self._int4_ok:  # made now, not inside a CUDA graph's capture
            self._int4_operands()

    @property
    def _int4_ok(self) -> bool:
        return self.scheme.name in INT4_GROUP32 and self.in_features % 1024 == 0 and self.out_features % 8 == 0

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return _dequantize(self.qweight, self.scheme, self.in_features, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and self._int4_ok:
            return self._int4_mm(x)
        rows = x.numel() // self.in_features
        if rows <= GEMV_MAX_ROWS and x.device.type == "cpu" and x.dtype == torch.float32 and not x.requires_grad \
                and self.scheme.kernel:
            # A few rows (the logits of a prefill's last tokens): the CPU kernel's GEMV
            # reads the blocks, where a dense copy would write and read the whole matrix.
            from ..kernels import cpu

            y = cpu.linear(x.reshape(rows, self.in_features), self.qweight, self.scheme, self.in_features,
                           self.int8_dot)
            if y is not None:
                return y.reshape(*x.shape[:-1], self.out_features)
        rows = max(1, DEQUANT_CHUNK // self.in_features)
        if rows >= self.out_features:
            return F.linear(x, self.dense_weight(x.dtype))
        # A big matrix goes by pieces of rows: its float copy would cost as much memory as
        # the quantized model saves (a 7B's w1 is 235 MB in float32).
        y = x.new_empty(*x.shape[:-1], self.out_features)
        for r in range(0, self.out_features, rows):
            w = _dequantize(self.qweight[r : r + rows], self.scheme, self.in_features, x.dtype)
            y[..., r : r + rows] = F.linear(x, w)
        return y

    def _int4_mm(self, x: torch.Tensor) -> torch.Tensor:
        """On CUDA, q4_0 and q4_k through torch's int4 weight-only matmul (tinygemm, as
        gpt-fast uses it), bf16 activations. Its operands are made on first use and kept
        beside the blocks (4.5 more bits a weight: the blocks stay the model's weights)."""
        packed, sz = self._int4 if self._int4 is not None else self._int4_operands()
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
        y = torch._weight_int4pack_mm(rows, packed, 32, sz)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def _int4_operands(self) -> tuple[torch.Tensor, torch.Tensor]:
        vals, sz = int4_operands(self.qweight, self.scheme, self.in_features)
        packed = torch._convert_weight_to_int4pack((vals[:, ::2] << 4 | vals[:, 1::2]).to(torch.uint8), 8)
        self._int4 = (packed, sz.to(torch.bfloat16))
        return self._int4

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.scheme.name}"


INT4_GROUP32 = ("q4_0", "q4_k")  # 4-bit schemes whose groups of 32 are (q - 8) * scale + zero


class QuantEmbedding(nn.Module):
    """A token embedding stored in a block scheme: a lookup dequantizes its rows only.
    ``dtype``: the activations' (what ``nn.Embedding`` would have returned)."""

    def __init__(self, qweight: torch.Tensor, scheme: Scheme | str, dim: int, dtype: torch.dtype):
        super().__init__()
        self.scheme = SCHEMES[scheme] if isinstance(scheme, str) else scheme
        if qweight.dtype != torch.uint8 or qweight.dim() != 2 or qweight.shape[1] != self.scheme.row_bytes(dim):
            raise ValueError(f"QuantEmbedding: {self.scheme.name} rows of {dim} are {self.scheme.row_bytes(dim)} bytes; "
                             f"got {qweight.dtype} {tuple(qweight.shape)}")
        self.num_embeddings, self.embedding_dim, self.dtype = qweight.shape[0], dim, dtype
        self.register_buffer("qweight", qweight)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = self.qweight.index_select(0, tokens.reshape(-1))
        return dequantize_blocks(rows, self.scheme, self.embedding_dim, self.dtype).reshape(*tokens.shape, -1)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.scheme.name}"


def linear_dtype(linear: nn.Module) -> torch.dtype:
    """The dtype a linear layer computes in: its weight's, or a quantized layer's activations'."""
    return linear.dtype if isinstance(linear, QuantLinear) else linear.weight.dtype


def linear_device(linear: nn.Module) -> torch.device:
    return linear.qweight.device if isinstance(linear, QuantLinear) else linear.weight.device


def dense_weight(linear: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The (out, in) weight of a linear layer in ``dtype``, whatever it is stored as
    (latent attention multiplies by pieces of ``wkv_b`` directly)."""
    if isinstance(linear, (Fp8Linear, QuantLinear)):
        return linear.dense_weight(dtype)
    return linear.weight


def fp8_matmul_supported(device: torch.device) -> bool:
    """FP8 tensor-core matmuls: CUDA compute capability 8.9 and up."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)
