"""The one table between Hugging Face and Mistral-native tensor names.

galerne's modules use Mistral's native names. A Hugging Face checkpoint differs
in two ways, both handled here and nowhere else:

1. names: ``model.layers.3.self_attn.q_proj.weight`` <-> ``layers.3.attention.wq.weight``;
2. rotary layout: Mistral rotates interleaved pairs (x0, x1), (x2, x3), ...;
   Hugging Face rotates halves (x0, x_{hd/2}), (x1, x_{hd/2+1}), ... . Its
   conversion script permutes the *rows* of wq and wk, head by head, so that
   both layouts compute the same attention scores. We apply the inverse on load
   and the same permutation on export: pure re-indexing, so a round trip is
   bit-identical.

Worked example, one head of head_dim 4 (rows r0..r3 of wq in native order):
native pairs are (r0, r1), (r2, r3); HF wants the first elements of every pair
first: rows (r0, r2, r1, r3). ``to_hf_rows`` views the rows as (pairs=2, 2) and
transposes to (2, pairs).
"""

from __future__ import annotations

import re

import torch

# (Hugging Face pattern, native pattern, rotary kind). {i} is a layer, {e} an expert.
_TABLE: list[tuple[str, str, str | None]] = [
    ("model.embed_tokens", "tok_embeddings", None),
    ("model.norm", "norm", None),
    ("lm_head", "output", None),
    ("model.layers.{i}.input_layernorm", "layers.{i}.attention_norm", None),
    ("model.layers.{i}.post_attention_layernorm", "layers.{i}.ffn_norm", None),
    ("model.layers.{i}.self_attn.q_proj", "layers.{i}.attention.wq", "q"),
    ("model.layers.{i}.self_attn.k_proj", "layers.{i}.attention.wk", "k"),
    ("model.layers.{i}.self_attn.v_proj", "layers.{i}.attention.wv", None),
    ("model.layers.{i}.self_attn.o_proj", "layers.{i}.attention.wo", None),
    ("model.layers.{i}.mlp.gate_proj", "layers.{i}.feed_forward.w1", None),
    ("model.layers.{i}.mlp.down_proj", "layers.{i}.feed_forward.w2", None),
    ("model.layers.{i}.mlp.up_proj", "layers.{i}.feed_forward.w3", None),
    ("model.layers.{i}.block_sparse_moe.gate", "layers.{i}.feed_forward.gate", None),
    ("model.layers.{i}.block_sparse_moe.experts.{e}.w1", "layers.{i}.feed_forward.experts.{e}.w1", None),
    ("model.layers.{i}.block_sparse_moe.experts.{e}.w2", "layers.{i}.feed_forward.experts.{e}.w2", None),
    ("model.layers.{i}.block_sparse_moe.experts.{e}.w3", "layers.{i}.feed_forward.experts.{e}.w3", None),
]

# Tensors some checkpoints carry that are not weights (older HF rotary caches).
IGNORED_HF = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")

# Vision-language checkpoints nest the language model under a prefix: transformers 5
# writes ``model.language_model.layers...`` + ``lm_head``, transformers 4
# ``language_model.model.layers...`` + ``language_model.lm_head``.
_HF_TEXT_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
                     ("language_model.lm_head.", "lm_head."))
# Their vision encoder and projector, in both layouts: not built yet, skipped at load.
_VISION = re.compile(
    r"^(model\.)?(vision_tower|multi_modal_projector)\."  # Hugging Face
    r"|^(vision_encoder|vision_language_adapter|patch_merger|pre_mm_projector_norm)\."  # Mistral-native
)


def is_vision_tensor(name: str) -> bool:
    """A tensor of a vision encoder or its projector, in either layout."""
    return _VISION.match(name) is not None


def _compile(pattern: str) -> re.Pattern[str]:
    rx = re.escape(pattern).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{e\}", r"(?P<e>\d+)")
    # The module path, then whatever follows it (".weight", ".lora_A.weight", ...).
    return re.compile(rf"^{rx}(?P<suffix>\..+)$")


_HF_TO_NATIVE = [(_compile(hf), native, rot) for hf, native, rot in _TABLE]
_NATIVE_TO_HF = [(_compile(native), hf, rot) for hf, native, rot in _TABLE]


def _convert(name: str, rules) -> tuple[str, str | None] | None:
    for rx, target, rot in rules:
        m = rx.match(name)
        if m:
            groups = m.groupdict()
            out = target.replace("{i}", groups.get("i") or "").replace("{e}", groups.get("e") or "")
            return out + groups["suffix"], rot
    return None


def hf_to_native(name: str) -> tuple[str, str | None] | None:
    """``(native_name, rotary)`` where rotary is "q", "k" or None; None if unknown."""
    for prefix, plain in _HF_TEXT_PREFIXES:
        if name.startswith(prefix):
            name = plain + name[len(prefix):]
            break
    return _convert(name, _HF_TO_NATIVE)


def native_to_hf(name: str) -> tuple[str, str | None] | None:
    return _convert(name, _NATIVE_TO_HF)


def to_hf_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Permute the rows of a native q/k projection (n_heads*hd, ...) to HF's order."""
    rows = w.shape[0]
    hd = rows // n_heads
    return w.reshape(n_heads, hd // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def to_native_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of :func:`to_hf_rows`."""
    rows = w.shape[0]
    hd = rows // n_heads
    return w.reshape(n_heads, 2, hd // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def permute_rows(w: torch.Tensor, rotary: str | None, n_heads: int, n_kv_heads: int, to: str) -> torch.Tensor:
    """Apply the rotary row permutation for a q ("q") or k ("k") tensor; ``to`` is
    "hf" or "native". Other tensors pass through untouched."""
    if rotary is None:
        return w
    heads = n_heads if rotary == "q" else n_kv_heads
    fn = to_hf_rows if to == "hf" else to_native_rows
    return fn(w, heads).contiguous()
