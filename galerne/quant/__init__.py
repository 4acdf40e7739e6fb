"""Quantized weights: schemes (llama.cpp's block layouts), quantize and dequantize."""

from .formats import (
    SCHEMES,
    WRITABLE,
    QTensor,
    Scheme,
    by_ggml_type,
    dequantize,
    quantize,
    scheme,
)

__all__ = ["QTensor", "SCHEMES", "WRITABLE", "Scheme", "by_ggml_type", "dequantize", "quantize", "scheme"]
