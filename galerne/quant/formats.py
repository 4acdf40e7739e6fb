"""Weight quantization schemes: their block layouts, and quantize / dequantize in torch.

Every scheme stores a weight of shape (out, in) as ``uint8`` rows of blocks,
(out, in / block * block_bytes), one row per output feature: rows permute like the
float weight's (the rotary permutation of q/k needs nothing new) and a GEMV reads
one row of blocks per output. The blocks are llama.cpp's (ggml's), byte for byte,
so a GGUF file's tensors are used as they are, with no repacking, and what galerne
writes llama.cpp reads:

- ``q8_0``: 32 weights per block: a float16 scale ``d`` and 32 int8, w = d q (34 bytes)
- ``q4_0``: 32 weights per block: ``d`` and 16 bytes of nibbles, w = d (q - 8), weight j
  in the low nibble of byte j, weight j + 16 in its high nibble (18 bytes)
- ``q4_k``: 256 weights per super-block: float16 ``d`` and ``dmin``, 8 sub-blocks of 32
  with 6-bit scales and mins packed in 12 bytes, 128 bytes of nibbles,
  w = d sc q - dmin m (144 bytes, 4.5 bits a weight)

``q5_k`` and ``q6_k`` (what llama.cpp's Q4_K_M and Q5_K_M files put in some tensors)
are read: dequantized (no kernel reads them yet). ``quantize`` gives the same bytes
as llama.cpp's reference quantizers (``quantize_row_*_ref``, what ``llama-quantize``
runs without an importance matrix): q8_0 and q4_0 bit for bit (checked against the
``gguf`` package's port); q4_k is the same search, vectorised, whose float sums run
in another order: 97% of cpu-125m's blocks come out identical to llama.cpp's, the
others differ in a rounding tie, with the same error to 5 digits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ConfigError


@dataclass(frozen=True)
class Scheme:
    name: str
    ggml_type: int  # gguf.GGMLQuantizationType's value
    block: int  # weights per block
    block_bytes: int
    kernel: bool  # the CPU decode kernel reads it as it is
    quantizer: bool  # galerne can write it

    @property
    def bits(self) -> float:
        return 8 * self.block_bytes / self.block

    def row_bytes(self, n: int) -> int:
        return n // self.block * self.block_bytes

    def problem(self, in_features: int) -> str | None:
        """Why a row of ``in_features`` weights can't be stored in this scheme, or None."""
        if in_features % self.block:
            return f"{self.name} stores rows in blocks of {self.block} weights; {in_features} is not a multiple"
        return None


SCHEMES: dict[str, Scheme] = {s.name: s for s in (
    Scheme("q8_0", 8, 32, 34, kernel=True, quantizer=True),
    Scheme("q4_0", 2, 32, 18, kernel=True, quantizer=True),
    Scheme("q4_k", 12, 256, 144, kernel=True, quantizer=True),
    Scheme("q5_k", 13, 256, 176, kernel=False, quantizer=False),
    Scheme("q6_k", 14, 256, 210, kernel=False, quantizer=False),
)}
WRITABLE = tuple(n for n, s in SCHEMES.items() if s.quantizer)


def scheme(name: str) -> Scheme:
    """The scheme called ``name`` (case-insensitive), or a ConfigError listing them."""
    s = SCHEMES.get(str(name).lower())
    if s is None or not s.quantizer:
        raise ConfigError(f"unknown quantization scheme {name!r}; use one of {', '.join(WRITABLE)}")
    return s


@dataclass
class QTensor:
    """A quantized tensor as a checkpoint reader yields it: ``data`` (out, row_bytes)
    uint8 blocks of ``scheme`` for a float tensor of ``shape`` (out, in)."""

    data: torch.Tensor
    scheme: Scheme
    shape: tuple[int, int]

    @property
    def dtype(self) -> torch.dtype:
        return torch.uint8

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.data, self.scheme, self.shape[1], dtype)


def by_ggml_type(t: int) -> Scheme | None:
    return next((s for s in SCHEMES.values() if s.ggml_type == int(t)), None)


# --------------------------------------------------------------------- helpers


def _round_away(x: torch.Tensor) -> torch.Tensor:
    """C's roundf: halves away from zero (torch.round rounds them to even)."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    """float32 (...,) -> (..., 2) uint8: the float16 value's little-endian bytes."""
    return x.to(torch.float16).contiguous().view(torch.uint8).reshape(*x.shape, 2)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """(..., 2) uint8 -> (...,) float32."""
    return b.contiguous().view(torch.float16).squeeze(-1).float()


def _blocks(q: torch.Tensor, s: Scheme, in_features: int) -> torch.Tensor:
    if q.dtype != torch.uint8 or q.dim() != 2 or q.shape[1] != s.row_bytes(in_features) or in_features % s.block:
        raise ValueError(f"{s.name}: expected uint8 rows of {s.row_bytes(in_features)} bytes for {in_features} weights, "
                         f"got {q.dtype} {tuple(q.shape)}")
    return q.reshape(q.shape[0], in_features // s.block, s.block_bytes)


# --------------------------------------------------------------------- q8_0, q4_0


def _quantize_q8_0(x: torch.Tensor) -> torch.Tensor:  # x: (..., 32) float32
    d = x.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    q = _round_away(x * inv).to(torch.int8)
    return torch.cat([_f16_bytes(d.squeeze(-1)), q.view(torch.uint8)], -1)


def _dequantize_q8_0(b: torch.Tensor) -> torch.Tensor:
    return _f16(b[..., :2]).unsqueeze(-1) * b[..., 2:].view(torch.int8).float()


def _quantize_q4_0(x: torch.Tensor) -> torch.Tensor:
    # The value of largest magnitude, sign kept, maps to -8.
    i = x.abs().argmax(-1, keepdim=True)
    d = x.gather(-1, i) / -8
    inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    q = torch.clamp(torch.trunc(x * inv + 8.5), max=15).to(torch.uint8)
    return torch.cat([_f16_bytes(d.squeeze(-1)), q[..., :16] | (q[..., 16:] << 4)], -1)


def _dequantize_q4_0(b: torch.Tensor) -> torch.Tensor:
    qs = b[..., 2:]
    q = torch.cat([qs & 0xF, qs >> 4], -1).float() - 8
    return _f16(b[..., :2]).unsqueeze(-1) * q


# --------------------------------------------------------------------- q4_k


def _scale_min_k4(sc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., 12) packed bytes -> (..., 8) scales and (..., 8) mins (6 bits each)."""
    sc = sc.long()
    lo = sc[..., 0:4] & 63, sc[..., 4:8] & 63
    hi_s = (sc[..., 8:12] & 0xF) | ((sc[..., 0:4] >> 6) << 4)
    hi_m = (sc[..., 8:12] >> 4) | ((sc[..., 4:8] >> 6) << 4)
    return torch.cat([lo[0], hi_s], -1).float(), torch.cat([lo[1], hi_m], -1).float()


def _pack_scale_min_k4(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_scale_min_k4`: (..., 8) integers in [0, 63] each -> (..., 12) uint8."""
    ls, lm = ls.long(), lm.long()
    out = torch.zeros(*ls.shape[:-1], 12, dtype=torch.long, device=ls.device)
    out[..., 0:4] = ls[..., 0:4] | ((ls[..., 4:8] >> 4) << 6)
    out[..., 4:8] = lm[..., 0:4] | ((lm[..., 4:8] >> 4) << 6)
    out[..., 8:12] = (ls[..., 4:8] & 0xF) | ((lm[..., 4:8] & 0xF) << 4)
    return out.to(torch.uint8)


def _dequantize_q4_k(b: torch.Tensor) -> torch.Tensor:
    d, dmin = _f16(b[..., 0:2]).unsqueeze(-1), _f16(b[..., 2:4]).unsqueeze(-1)
    sc, m = _scale_min_k4(b[..., 4:16])
    qs = b[..., 16:].reshape(*b.shape[:-1], 4, 32)
    q = torch.stack([qs & 0xF, qs >> 4], -2).reshape(*b.shape[:-1], 8, 32).float()  # sub-block 2i: low, 2i+1: high
    return ((d * sc).unsqueeze(-1) * q - (dmin * m).unsqueeze(-1)).reshape(*b.shape[:-1], 256)


def _qkx2(x: torch.Tensor, nmax: int = 15, rmin: float = -1.0, rdelta: float = 0.1, nstep: int = 20):
    """llama.cpp's make_qkx2_quants, vectorised over sub-blocks: for each row of
    ``x`` (.., 32), the scale and (positive) min of x ~ scale * L - min, L in [0, nmax],
    found by weighted least squares over a few candidate grids. As in the C, a better
    candidate's min becomes the origin of the grids tried after it."""
    w = (x.pow(2).mean(-1, keepdim=True)).sqrt() + x.abs()
    lo = x.amin(-1, keepdim=True).clamp(max=0)
    hi = x.amax(-1, keepdim=True)
    flat = hi == lo
    sum_w, sum_x = w.sum(-1, keepdim=True), (w * x).sum(-1, keepdim=True)

    def levels(iscale, mn):
        return torch.clamp(torch.round(iscale * (x - mn)), 0, nmax)  # nearest_int: halves to even

    def inv(span):
        return torch.where(span > 0, 1.0 / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(span))

    iscale = nmax * inv(hi - lo)
    scale, mn = torch.where(flat, torch.zeros_like(iscale), 1.0 / torch.where(flat, torch.ones_like(iscale), iscale)), lo
    best = (w * (scale * levels(iscale, mn) + mn - x).pow(2)).sum(-1, keepdim=True)
    for step in range(nstep + 1):
        L = levels((rmin + rdelta * step + nmax) * inv(hi - mn), mn)
        sum_l, sum_l2, sum_xl = (w * L).sum(-1, keepdim=True), (w * L * L).sum(-1, keepdim=True), (w * L * x).sum(-1, keepdim=True)
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = (D > 0) & ~flat
        Ds = torch.where(ok, D, torch.ones_like(D))
        s = (sum_w * sum_xl - sum_x * sum_l) / Ds
        m = (sum_l2 * sum_x - sum_l * sum_xl) / Ds
        pos = m > 0
        s = torch.where(pos, sum_xl / torch.where(sum_l2 > 0, sum_l2, torch.ones_like(sum_l2)), s)
        m = torch.where(pos, torch.zeros_like(m), m)
        err = (w * (s * L + m - x).pow(2)).sum(-1, keepdim=True)
        better = ok & (err < best)
        best, scale, mn = torch.where(better, err, best), torch.where(better, s, scale), torch.where(better, m, mn)
    return scale.squeeze(-1), (-mn).squeeze(-1)


def _quantize_q4_k(x: torch.Tensor) -> torch.Tensor:  # x: (..., 256)
    sub = x.reshape(*x.shape[:-1], 8, 32)
    scales, mins = _qkx2(sub)
    max_scale, max_min = scales.amax(-1, keepdim=True), mins.amax(-1, keepdim=True)
    inv_s = torch.where(max_scale > 0, 63 / max_scale.clamp(min=1e-30), torch.zeros_like(max_scale))
    inv_m = torch.where(max_min > 0, 63 / max_min.clamp(min=1e-30), torch.zeros_like(max_min))
    ls = torch.clamp(torch.round(inv_s * scales), max=63)
    lm = torch.clamp(torch.round(inv_m * mins), max=63)
    d = (max_scale / 63).squeeze(-1).to(torch.float16).float()
    dmin = (max_min / 63).squeeze(-1).to(torch.float16).float()
    dj = (d.unsqueeze(-1) * ls).unsqueeze(-1)
    dm = (dmin.unsqueeze(-1) * lm).unsqueeze(-1)
    q = torch.where(dj > 0, torch.round((sub + dm) / torch.where(dj > 0, dj, torch.ones_like(dj))), torch.zeros_like(sub))
    q = q.clamp(0, 15).to(torch.uint8).reshape(*x.shape[:-1], 4, 2, 32)
    qs = (q[..., 0, :] | (q[..., 1, :] << 4)).reshape(*x.shape[:-1], 128)
    return torch.cat([_f16_bytes(d), _f16_bytes(dmin), _pack_scale_min_k4(ls, lm), qs], -1)


# --------------------------------------------------------------------- q5_k, q6_k (read only)


def _dequantize_gguf(b: torch.Tensor, s: Scheme) -> torch.Tensor:
    from gguf.quants import dequantize

    flat = b.reshape(-1, s.block_bytes).cpu().numpy()
    return torch.from_numpy(np.ascontiguousarray(dequantize(flat, s.ggml_type))).reshape(*b.shape[:-1], s.block)


# --------------------------------------------------------------------- torch's int4 matmuls


def int4_operands(q: torch.Tensor, scheme: Scheme, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A q4_0 or q4_k weight as torch's int4 matmuls take it: the 4-bit values (out,
    in) int32 in [0, 15], and per group of 32 a scale and a zero, (in / 32, out, 2)
    float32, with w = (q - 8) * scale + zero. q4_0: scale d, zero 0; q4_k: scale
    d * sc, zero 8 d sc - dmin m."""
    n = q.shape[0]
    if scheme.name == "q4_0":
        b = q.reshape(n, in_features // 32, 18)
        scale = b[..., :2].contiguous().view(torch.float16).squeeze(-1).float()
        qs = b[..., 2:]
        vals = torch.cat([qs & 0xF, qs >> 4], -1)
        zero = torch.zeros_like(scale)
    elif scheme.name == "q4_k":
        b = q.reshape(n, in_features // 256, 144)
        d, dmin = _f16(b[..., 0:2]).unsqueeze(-1), _f16(b[..., 2:4]).unsqueeze(-1)
        sc, m = _scale_min_k4(b[..., 4:16])
        scale, zero = (d * sc).reshape(n, -1), (8 * d * sc - dmin * m).reshape(n, -1)
        qs = b[..., 16:].reshape(n, in_features // 256, 4, 32)
        vals = torch.stack([qs & 0xF, qs >> 4], -2)
    else:
        raise ValueError(f"{scheme.name} is not a 4-bit scheme of groups of 32")
    sz = torch.stack([scale, zero], -1).transpose(0, 1).contiguous()
    return vals.reshape(n, in_features).to(torch.int32), sz


_QUANTIZE = {"q8_0": _quantize_q8_0, "q4_0": _quantize_q4_0, "q4_k": _quantize_q4_k}
_DEQUANTIZE = {"q8_0": _dequantize_q8_0, "q4_0": _dequantize_q4_0, "q4_k": _dequantize_q4_k}

_CHUNK_ROWS = 1024  # rows per piece: the temporaries of a 14336-wide row stay in the tens of MB


def quantize(w: torch.Tensor, s: Scheme | str) -> torch.Tensor:
    """(out, in) float -> (out, row_bytes) uint8 blocks of scheme ``s``."""
    s = scheme(s) if isinstance(s, str) else s
    if w.dim() != 2:
        raise ValueError(f"quantize: a 2-D weight, got shape {tuple(w.shape)}")
    if (p := s.problem(w.shape[1])) is not None:
        raise ValueError(p)
    fn = _QUANTIZE[s.name]
    out = torch.empty(w.shape[0], s.row_bytes(w.shape[1]), dtype=torch.uint8, device=w.device)
    for r in range(0, w.shape[0], _CHUNK_ROWS):
        x = w[r:r + _CHUNK_ROWS].float().reshape(-1, w.shape[1] // s.block, s.block)
        out[r:r + _CHUNK_ROWS] = fn(x).reshape(x.shape[0], -1)
    return out


def dequantize(q: torch.Tensor, s: Scheme | str, in_features: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(out, row_bytes) uint8 blocks -> (out, in_features) ``dtype``, in torch ops
    (the CPU kernel has a faster one: ``galerne.kernels.cpu.dequantize``)."""
    s = SCHEMES[s] if isinstance(s, str) else s
    b = _blocks(q, s, in_features)
    fn = _DEQUANTIZE.get(s.name)
    out = torch.empty(q.shape[0], in_features, dtype=dtype, device=q.device)
    for r in range(0, q.shape[0], _CHUNK_ROWS):
        part = b[r:r + _CHUNK_ROWS]
        x = fn(part) if fn is not None else _dequantize_gguf(part, s).to(q.device)
        out[r:r + _CHUNK_ROWS] = x.reshape(part.shape[0], in_features).to(dtype)
    return out
