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
    # Multi-head latent attention (Mistral 4): "q_mla"/"kv_mla" rows hold rotary parts.
    ("model.layers.{i}.self_attn.q_a_proj", "layers.{i}.attention.wq_a", None),
    ("model.layers.{i}.self_attn.q_a_layernorm", "layers.{i}.attention.q_a_norm", None),
    ("model.layers.{i}.self_attn.q_b_proj", "layers.{i}.attention.wq_b", "q_mla"),
    ("model.layers.{i}.self_attn.kv_a_proj_with_mqa", "layers.{i}.attention.wkv_a_with_mqa", "kv_mla"),
    ("model.layers.{i}.self_attn.kv_a_layernorm", "layers.{i}.attention.kv_a_norm", None),
    ("model.layers.{i}.self_attn.kv_b_proj", "layers.{i}.attention.wkv_b", None),
    # Mistral 4's MoE (DeepSeek-V3 names). transformers keeps the routed experts packed
    # (``mlp.experts.gate_up_proj``, see ``pack_experts``); older files list them one by one.
    ("model.layers.{i}.mlp.gate", "layers.{i}.feed_forward.gate", None),
    ("model.layers.{i}.mlp.shared_experts.gate_proj", "layers.{i}.feed_forward.shared_experts.w1", None),
    ("model.layers.{i}.mlp.shared_experts.down_proj", "layers.{i}.feed_forward.shared_experts.w2", None),
    ("model.layers.{i}.mlp.shared_experts.up_proj", "layers.{i}.feed_forward.shared_experts.w3", None),
    ("model.layers.{i}.mlp.experts.{e}.gate_proj", "layers.{i}.feed_forward.experts.{e}.w1", None),
    ("model.layers.{i}.mlp.experts.{e}.down_proj", "layers.{i}.feed_forward.experts.{e}.w2", None),
    ("model.layers.{i}.mlp.experts.{e}.up_proj", "layers.{i}.feed_forward.experts.{e}.w3", None),
]

# transformers' packed experts: (E, 2 * hidden, D) gate then up rows, and (E, D, hidden).
PACKED_HF = re.compile(r"^model\.layers\.(?P<i>\d+)\.mlp\.experts\.(?P<kind>gate_up_proj|down_proj)$")

# Mistral 4's native files put the MoE parts beside the attention, without Mixtral's
# ``feed_forward.``: ``layers.3.experts.0.w1`` is galerne's ``layers.3.feed_forward.experts.0.w1``.
_NATIVE_MOE = re.compile(r"^layers\.(\d+)\.(gate|experts|shared_experts)\.")
_OWN_MOE = re.compile(r"^layers\.(\d+)\.feed_forward\.(gate|experts|shared_experts)\.")


def from_native_file(name: str) -> str:
    """A native checkpoint's tensor name -> galerne's module name."""
    return _NATIVE_MOE.sub(r"layers.\1.feed_forward.\2.", name)


def to_native_file(name: str, args) -> str:
    """galerne's name -> the native file's (Mistral 4's MoE spelling when it has its routing)."""
    if args.moe is not None and not args.moe.mixtral:
        return _OWN_MOE.sub(r"layers.\1.\2.", name)
    return name

# Tensors some checkpoints carry that are not weights (older HF rotary caches).
IGNORED_HF = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")

# Vision-language checkpoints nest the language model under a prefix: transformers 5
# writes ``model.language_model.layers...`` + ``lm_head``, transformers 4
# ``language_model.model.layers...`` + ``language_model.lm_head``.
_HF_TEXT_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
                     ("language_model.lm_head.", "lm_head."))
# Their vision encoder and projector, in both layouts: read apart from the decoder's.
_VISION = re.compile(
    r"^(model\.)?(vision_tower|multi_modal_projector)\."  # Hugging Face
    r"|^(vision_encoder|vision_language_adapter|patch_merger|pre_mm_projector_norm)\."  # Mistral-native
)


def is_vision_tensor(name: str) -> bool:
    """A tensor of a vision encoder or its projector, in either layout."""
    return _VISION.match(name) is not None


# The vision encoder and projector (models/vision.py): Hugging Face's Pixtral / Mistral3 /
# Llava names (after an optional "model." prefix) <-> Mistral-native, the q/k rows of the
# encoder's attention permuted as the decoder's are.
_VISION_TABLE: list[tuple[str, str, str | None]] = [
    ("vision_tower.patch_conv", "vision_encoder.patch_conv", None),
    ("vision_tower.ln_pre", "vision_encoder.ln_pre", None),
    ("vision_tower.transformer.layers.{i}.attention_norm", "vision_encoder.transformer.layers.{i}.attention_norm", None),
    ("vision_tower.transformer.layers.{i}.ffn_norm", "vision_encoder.transformer.layers.{i}.ffn_norm", None),
    ("vision_tower.transformer.layers.{i}.attention.q_proj", "vision_encoder.transformer.layers.{i}.attention.wq", "q"),
    ("vision_tower.transformer.layers.{i}.attention.k_proj", "vision_encoder.transformer.layers.{i}.attention.wk", "k"),
    ("vision_tower.transformer.layers.{i}.attention.v_proj", "vision_encoder.transformer.layers.{i}.attention.wv", None),
    ("vision_tower.transformer.layers.{i}.attention.o_proj", "vision_encoder.transformer.layers.{i}.attention.wo", None),
    ("vision_tower.transformer.layers.{i}.feed_forward.gate_proj", "vision_encoder.transformer.layers.{i}.feed_forward.w1", None),
    ("vision_tower.transformer.layers.{i}.feed_forward.down_proj", "vision_encoder.transformer.layers.{i}.feed_forward.w2", None),
    ("vision_tower.transformer.layers.{i}.feed_forward.up_proj", "vision_encoder.transformer.layers.{i}.feed_forward.w3", None),
    ("multi_modal_projector.norm", "pre_mm_projector_norm", None),
    ("multi_modal_projector.patch_merger.merging_layer", "patch_merger.merging_layer", None),
    ("multi_modal_projector.linear_1", "vision_language_adapter.w_in", None),
    ("multi_modal_projector.linear_2", "vision_language_adapter.w_out", None),
]


def vision_hf_to_native(name: str) -> tuple[str, str | None] | None:
    """A Hugging Face vision tensor's ``(native_name, rotary)``; None if unknown."""
    return _convert(name.removeprefix("model."), _VISION_HF_TO_NATIVE)


def vision_native_to_hf(name: str) -> tuple[str, str | None] | None:
    """A native vision tensor's ``(hf_name, rotary)`` as transformers' save_pretrained
    writes Mistral3 and Llava files (``vision_tower...``, ``multi_modal_projector...``);
    None if unknown."""
    return _convert(name, _VISION_NATIVE_TO_HF)


def _compile(pattern: str) -> re.Pattern[str]:
    rx = re.escape(pattern).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{e\}", r"(?P<e>\d+)")
    # The module path, then whatever follows it (".weight", ".lora_A.weight", ...).
    return re.compile(rf"^{rx}(?P<suffix>\..+)$")


_HF_TO_NATIVE = [(_compile(hf), native, rot) for hf, native, rot in _TABLE]
_NATIVE_TO_HF = [(_compile(native), hf, rot) for hf, native, rot in _TABLE]
_VISION_HF_TO_NATIVE = [(_compile(hf), native, rot) for hf, native, rot in _VISION_TABLE]
_VISION_NATIVE_TO_HF = [(_compile(native), hf, rot) for hf, native, rot in _VISION_TABLE]


def _convert(name: str, rules) -> tuple[str, str | None] | None:
    for rx, target, rot in rules:
        m = rx.match(name)
        if m:
            groups = m.groupdict()
            out = target.replace("{i}", groups.get("i") or "").replace("{e}", groups.get("e") or "")
            return out + groups["suffix"], rot
    return None


def strip_text_prefix(name: str) -> str:
    """A vision-language checkpoint's language-model name -> the text model's."""
    for prefix, plain in _HF_TEXT_PREFIXES:
        if name.startswith(prefix):
            return plain + name[len(prefix):]
    return name


def hf_to_native(name: str) -> tuple[str, str | None] | None:
    """``(native_name, rotary)`` where rotary is "q", "k", "q_mla", "kv_mla" or None;
    None if unknown."""
    return _convert(strip_text_prefix(name), _HF_TO_NATIVE)


_PACKED_NATIVE = re.compile(r"^layers\.(\d+)\.feed_forward\.experts\.(gate_up_proj|down_proj)$")


# Mistral 4's MoE names, not Mixtral's, for a model with latent attention.
_NATIVE_TO_HF_MLA = [rule for rule in _NATIVE_TO_HF if "block_sparse_moe" not in rule[1]]


def native_to_hf(name: str, args=None) -> tuple[str, str | None] | None:
    """``(hf_name, rotary)``; ``args`` picks the architecture's names where two
    share a native name (Mixtral's and Mistral 4's ``feed_forward.gate``)."""
    packed = _PACKED_NATIVE.match(name)
    if packed:  # from pack_experts
        return f"model.layers.{packed[1]}.mlp.experts.{packed[2]}", None
    mla = args is not None and args.mla is not None
    return _convert(name, _NATIVE_TO_HF_MLA if mla else _NATIVE_TO_HF)


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


def permute_for(args, w: torch.Tensor, rotary: str | None, to: str) -> torch.Tensor:
    """:func:`permute_rows` for the model ``args`` describes.

    Multi-head latent attention rotates only the last ``qk_rope_head_dim`` rows of
    each head's query (wq / wq_b) and of the shared key (the end of
    wkv_a_with_mqa). transformers' Mistral 4 with ``rope_interleave`` (its
    default) rotates interleaved pairs, as galerne does: nothing to permute;
    without it, those rows are permuted like a dense model's q/k."""
    m = args.mla
    if m is None:
        return permute_rows(w, rotary, args.n_heads, args.n_kv_heads, to)
    if rotary is None or m.rope_interleave:
        return w
    fn = to_hf_rows if to == "hf" else to_native_rows
    w = w.clone()
    p = m.qk_rope_head_dim
    if rotary in ("q", "q_mla"):
        heads = w.view(args.n_heads, m.qk_head_dim, *w.shape[1:])  # (H, n + p, ...)
        heads[:, m.qk_nope_head_dim:] = torch.stack([fn(h[m.qk_nope_head_dim:], 1) for h in heads])
    else:
        w[-p:] = fn(w[-p:], 1)
    return w


def pack_experts(items, args):
    """(native name, tensor) items with each MoE layer's per-expert w1/w3/w2 replaced by
    transformers' packed ``layers.{i}.feed_forward.experts.gate_up_proj`` / ``down_proj``
    (mapped to ``model.layers.{i}.mlp.experts.*`` by :func:`native_to_hf`), emitted when
    the layer's last expert tensor has passed. Works on meta tensors too."""
    E = args.moe.num_experts if args.moe else 0
    pending: dict[str, dict[str, torch.Tensor]] = {}
    rx = re.compile(r"^layers\.(\d+)\.feed_forward\.experts\.(\d+)\.(w[123])\.weight$")
    for name, t in items:
        m = rx.match(name)
        if m is None:
            yield name, t
            continue
        layer = pending.setdefault(m[1], {})
        layer[f"{m[2]}.{m[3]}"] = t
        if len(layer) == 3 * E:
            del pending[m[1]]
            gate_up = torch.stack([torch.cat((layer[f"{e}.w1"], layer[f"{e}.w3"])) for e in range(E)])
            yield f"layers.{m[1]}.feed_forward.experts.gate_up_proj", gate_up  # (E, 2 * hidden, D)
            yield f"layers.{m[1]}.feed_forward.experts.down_proj", torch.stack([layer[f"{e}.w2"] for e in range(E)])
    if pending:
        raise ValueError(f"incomplete experts in layer(s) {', '.join(sorted(pending))}")


def split_packed(kind: str, layer: str, t) -> list[tuple[str, object]]:
    """transformers' packed expert tensor (or kept FP8 weight, ``weights.fp8.Fp8Weight``)
    -> galerne's per-expert (name, tensor)."""
    out = []
    for e in range(t.shape[0]):
        base = f"layers.{layer}.feed_forward.experts.{e}"
        one = t.expert(e) if hasattr(t, "expert") else t[e]
        if kind == "gate_up_proj":
            half = t.shape[1] // 2
            if hasattr(one, "rows"):
                out += [(f"{base}.w1.weight", one.rows(0, half)), (f"{base}.w3.weight", one.rows(half, 2 * half))]
            else:
                out += [(f"{base}.w1.weight", one[:half]), (f"{base}.w3.weight", one[half:])]
        else:
            out.append((f"{base}.w2.weight", one))
    return out
