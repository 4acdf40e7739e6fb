"""Which tensors of a model a scheme quantizes, and quantizing a built model in place.

A scheme applies to the matrices a decode step streams: the attention and
feed-forward projections of every layer (a mixture of experts' experts too, as
llama.cpp quantizes them), the output projection and the token embedding. Norms
and routers stay in float, and so do latent attention's projections (no quantized
path for them yet). With a 4-bit scheme the output projection is stored in q8_0: its
error goes straight into the logits (llama.cpp keeps it at 6 bits for the same
reason). q4_k is a mix, as llama.cpp's Q4_K_S is: the value projections of the first
4 layers and the down projections of the first eighth of the layers, where 4 bits
cost the most, are stored in q8_0 (llama.cpp: q5_k). A row length the scheme's
blocks don't divide (q4_k's 256) falls back to q8_0, and is logged.
"""

from __future__ import annotations

import logging
import re

import torch
from torch import nn

from .formats import SCHEMES, Scheme, quantize

log = logging.getLogger(__name__)

_LINEAR = re.compile(r"^layers\.(\d+)\.(attention\.w[qkvo]|feed_forward\.(?:experts\.\d+\.|shared_experts\.)?w[123])\.weight$")
EMBEDDING, OUTPUT = "tok_embeddings.weight", "output.weight"


def tensor_scheme(native: str, shape: tuple[int, ...], s: Scheme, n_layers: int | None = None) -> Scheme | None:
    """The scheme native tensor ``native`` of ``shape`` is stored in when a model of
    ``n_layers`` layers is quantized with ``s``, or None: kept in float."""
    linear = _LINEAR.match(native)
    if len(shape) != 2 or not (native in (EMBEDDING, OUTPUT) or linear):
        return None
    chosen = SCHEMES["q8_0"] if native == OUTPUT and s.bits < 8 else s
    if s.name == "q4_k" and linear and n_layers:
        # Every down projection, an expert's too (llama.cpp matches "ffn_down" in any name).
        layer, kind = int(linear[1]), linear[2]
        if (kind == "attention.wv" and layer < 4) or (kind.endswith("w2") and layer < n_layers // 8):
            chosen = SCHEMES["q8_0"]
    if chosen.problem(shape[1]) is None:
        return chosen
    fallback = SCHEMES["q8_0"]
    if fallback.problem(shape[1]) is None:
        log.info("%s: rows of %d weights don't fit %s's blocks of %d; stored in q8_0", native, shape[1], chosen.name,
                 chosen.block)
        return fallback
    log.info("%s: rows of %d weights fit no scheme's blocks; kept in float", native, shape[1])
    return None


def stored_schemes(args) -> dict | None:
    """The block-quantization config of a checkpoint galerne wrote (``galerne quantize``):
    {"quant_method": "galerne", "scheme": NAME, "tensors": {checkpoint tensor name: NAME}},
    under ``quantization`` (params.json) or ``quantization_config`` (config.json); None
    for any other checkpoint."""
    for key in ("quantization", "quantization_config"):
        cfg = args.extra.get(key)
        if isinstance(cfg, dict) and cfg.get("quant_method") == "galerne":
            return cfg
    return None


def quantized_module(native: str, q: torch.Tensor, s: Scheme, shape: tuple[int, ...], dtype: torch.dtype) -> nn.Module:
    """The module that holds quantized tensor ``native`` (blocks ``q`` of a float (out, in) ``shape``)."""
    from ..models.quant import QuantEmbedding, QuantLinear

    if native == EMBEDDING:
        return QuantEmbedding(q, s, shape[1], dtype)
    return QuantLinear(q, s, shape[1], dtype)


@torch.no_grad()
def quantize_model_(model: nn.Module, s: Scheme | str) -> dict[str, str]:
    """Quantize a built model (a ``Transformer`` with float weights) in place with
    scheme ``s``; returns {native tensor name: scheme name} of what was quantized.
    A tied output projection is quantized once, with the embedding's scheme."""
    from .formats import scheme as find

    s = find(s) if isinstance(s, str) else s
    dtype = next(p for p in model.parameters()).dtype
    tied = model.output.weight is model.tok_embeddings.weight
    done: dict[str, str] = {}
    for native, w in list(model.state_dict(keep_vars=True).items()):
        if tied and native == OUTPUT:
            continue
        chosen = tensor_scheme(native, tuple(w.shape), s, model.args.n_layers)
        if chosen is None:
            continue
        module = quantized_module(native, quantize(w.detach(), chosen), chosen, tuple(w.shape), dtype)
        replace_module(model, native.rpartition(".")[0], module)
        done[native] = chosen.name
    if tied:
        tie_output(model)
    return done


def tie_output(model: nn.Module) -> None:
    """The output projection reads the embedding's weight, quantized or not."""
    emb = model.tok_embeddings
    if hasattr(emb, "qweight"):
        from ..models.quant import QuantLinear

        model.output = QuantLinear(emb.qweight, emb.scheme, emb.embedding_dim, emb.dtype)
    else:
        model.output.weight = emb.weight


def replace_module(model: nn.Module, module_name: str, module: nn.Module) -> None:
    """Put ``module`` where the submodule ``module_name`` of ``model`` is."""
    parent_name, _, child = module_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
