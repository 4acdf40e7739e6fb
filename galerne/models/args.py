"""One dataclass describes every model of the family, read from the files shipped
with the weights: Mistral's ``params.json`` or Hugging Face's ``config.json``.

Nothing is guessed from a path name. Fields a file leaves out get the default the
upstream reference implementation uses (mistral-inference for ``params.json``,
transformers for ``config.json``) and the defaults are written here, once.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from .vision_args import VisionArgs

# params.json has no context-length field for most releases; mistral-inference
# does not bound positions, and Mistral's own model cards give 32k for 7B v0.3.
DEFAULT_NATIVE_CONTEXT = 32768

# HF architectures we load through the same code (they differ only in names we map
# or in fields we read below).
HF_ARCHITECTURES = {
    "MistralForCausalLM", "MixtralForCausalLM", "LlamaForCausalLM",
    "MinistralForCausalLM",  # per-layer sliding windows (layer_types)
    "Ministral3ForCausalLM",  # YaRN + llama-4 query scaling
    "Mistral3ForConditionalGeneration",  # vision-language: its language model
    "Mistral4ForCausalLM",  # multi-head latent attention + MoE with shared experts
    "LlavaForConditionalGeneration",  # Pixtral 12B's Hugging Face layout
}
# Vision-language wrappers: their text_config names the language model by model_type.
MULTIMODAL_ARCHITECTURES = {"Mistral3ForConditionalGeneration", "LlavaForConditionalGeneration"}
TEXT_MODEL_TYPES = {
    "mistral": "MistralForCausalLM", "ministral": "MinistralForCausalLM",
    "ministral3": "Ministral3ForCausalLM", "llama": "LlamaForCausalLM",
    "mistral4": "Mistral4ForCausalLM",
}


@dataclass(frozen=True)
class MoeArgs:
    """A sparse mixture of experts. The defaults are Mixtral's: a softmax over the
    router's scores, the top ``num_experts_per_tok`` renormalised to sum to 1.

    Mistral 4 (DeepSeek-V3's layout) adds shared experts every token goes through,
    experts of their own hidden size, grouped routing (experts in
    ``num_expert_groups`` groups; a token first picks the
    ``num_expert_groups_per_tok`` groups whose two best scores sum highest, then
    its experts among those), a factor on the routed experts' weights, and dense
    feed-forward layers for the first ``first_k_dense_replace`` layers."""

    num_experts: int
    num_experts_per_tok: int
    num_shared_experts: int = 0
    expert_hidden_dim: int | None = None  # None: the model's hidden_dim
    num_expert_groups: int = 1
    num_expert_groups_per_tok: int = 1
    routed_scale: float = 1.0
    normalize: bool = True  # renormalise the chosen experts' weights to sum to 1
    first_k_dense_replace: int = 0

    def __post_init__(self) -> None:
        if self.num_experts % self.num_expert_groups:
            raise ConfigError(f"{self.num_experts} experts do not split into {self.num_expert_groups} groups")
        per_group = self.num_experts // self.num_expert_groups
        if self.num_expert_groups > 1 and per_group < 2:
            raise ConfigError("grouped routing needs at least 2 experts per group")
        if not 1 <= self.num_expert_groups_per_tok <= self.num_expert_groups:
            raise ConfigError(f"num_expert_groups_per_tok must be in 1..{self.num_expert_groups}")
        if not 1 <= self.num_experts_per_tok <= self.num_expert_groups_per_tok * per_group:
            raise ConfigError("num_experts_per_tok is more than the chosen groups hold")

    @property
    def mixtral(self) -> bool:
        """No Mistral-4 feature: a Mixtral MoE (its params.json and config.json spellings)."""
        return self == MoeArgs(self.num_experts, self.num_experts_per_tok)


@dataclass(frozen=True)
class MlaArgs:
    """Multi-head latent attention (DeepSeek-V2/V3, Mistral 4).

    Keys and values come from one shared latent of ``kv_lora_rank`` values per
    token (plus a ``qk_rope_head_dim`` rotary key shared by all heads): the
    cache keeps only those. Queries are projected directly (``q_lora_rank``
    None) or through a ``q_lora_rank`` bottleneck. Each head's query/key is
    ``qk_nope_head_dim`` values without rotary then ``qk_rope_head_dim`` with,
    its value ``v_head_dim``. ``rope_interleave``: the layout of the rotary rows
    in a Hugging Face checkpoint (True: interleaved pairs, the native layout;
    False: halves, permuted at load)."""

    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None
    rope_interleave: bool = True

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Cached values per token per layer: the latent and the rotary key."""
        return self.kv_lora_rank + self.qk_rope_head_dim


@dataclass(frozen=True)
class YarnArgs:
    """YaRN rope scaling (transformers' ``rope_type: "yarn"``; Mistral's ``yarn``).

    Frequencies of the dimensions that turn more than ``beta_fast`` times over the
    original context keep their value, those that turn less than ``beta_slow``
    times are divided by ``factor``, with a linear ramp in between; cos and sin
    are then multiplied by ``attention_factor`` (None: derived from ``factor``,
    ``mscale`` and ``mscale_all_dim`` as transformers does)."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True

    @property
    def magnitude(self) -> float:
        """The factor cos and sin are multiplied by (transformers' ``attention_factor``)."""
        if self.attention_factor is not None:
            return self.attention_factor
        if self.mscale and self.mscale_all_dim:
            return yarn_mscale(self.factor, self.mscale) / yarn_mscale(self.factor, self.mscale_all_dim)
        return yarn_mscale(self.factor)


@dataclass(frozen=True)
class QueryScaling:
    """Llama 4's position-dependent query scaling (Ministral 3, Mistral 4):
    queries are multiplied by ``1 + beta * log(1 + floor(position / original_max_position_embeddings))``,
    1 within the original context, growing slowly past it."""

    beta: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelArgs:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int
    vocab_size: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    yarn: YarnArgs | None = None
    query_scaling: QueryScaling | None = None
    # None (full attention), one int for every layer, or one entry per layer
    # (None in the list = that layer attends to everything).
    sliding_window: int | tuple[int | None, ...] | None = None
    tied_embeddings: bool = False
    moe: MoeArgs | None = None
    mla: MlaArgs | None = None
    max_seq_len: int = DEFAULT_NATIVE_CONTEXT
    # Token ids from the config, used only when the tokenizer does not say.
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    # A vision-language checkpoint's encoder and projector (models/vision.py), None for
    # text models.
    vision: VisionArgs | None = field(default=None, compare=False, repr=False)
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.mla is not None:
            if self.mla.qk_rope_head_dim % 2:
                raise ConfigError(f"qk_rope_head_dim must be even, got {self.mla.qk_rope_head_dim}")
            if self.head_dim != self.mla.qk_head_dim or self.n_kv_heads != self.n_heads:
                raise ConfigError("multi-head latent attention: head_dim must be qk_nope_head_dim + qk_rope_head_dim "
                                  "and n_kv_heads n_heads")
            if self.sliding_window is not None:
                raise ConfigError("sliding windows with multi-head latent attention are not supported")
        sw = self.sliding_window
        if isinstance(sw, (list, tuple)) and len(sw) != self.n_layers:
            raise ConfigError(
                f"sliding_window lists {len(sw)} layers but the model has {self.n_layers}"
            )

    def window(self, layer: int) -> int | None:
        """The sliding window of ``layer`` in tokens (None: full attention)."""
        sw = self.sliding_window
        if isinstance(sw, tuple):
            return sw[layer]
        return sw

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe is not None and layer >= self.moe.first_k_dense_replace

    @property
    def rope_dim(self) -> int:
        """The dimensions each head rotates: all of head_dim, or MLA's rotary part."""
        return self.mla.qk_rope_head_dim if self.mla else self.head_dim

    @property
    def n_params(self) -> int:
        D, H, m = self.dim, self.n_heads, self.mla
        if m is None:
            attn = D * self.head_dim * (2 * H + 2 * self.n_kv_heads)
        else:
            q = D * H * m.qk_head_dim if m.q_lora_rank is None else m.q_lora_rank * (D + 1 + H * m.qk_head_dim)
            attn = (q + D * m.latent_dim + m.kv_lora_rank * (1 + H * (m.qk_nope_head_dim + m.v_head_dim))
                    + H * m.v_head_dim * D)
        dense = 3 * D * self.hidden_dim
        total = 0
        for i in range(self.n_layers):
            ffn = dense
            if self.is_moe_layer(i):
                e = self.moe  # type: ignore[union-attr]
                ffn = 3 * D * (e.expert_hidden_dim or self.hidden_dim) * (e.num_experts + e.num_shared_experts) + D * e.num_experts
            total += attn + ffn + 2 * D
        emb = self.vocab_size * D * (1 if self.tied_embeddings else 2)
        return total + emb + D

    # ------------------------------------------------------------------ readers

    @classmethod
    def from_params_json(cls, p: dict[str, Any], where: str = "params.json") -> "ModelArgs":
        """Mistral-native ``params.json`` (mistral-inference's field names; the
        ``yarn``, ``llama_4_scaling`` and ``vision_encoder`` keys as Mistral ships
        them with Ministral 3 and Mistral Small 3.x)."""
        _require(p, ("dim", "n_layers", "n_heads", "hidden_dim", "vocab_size"), where)
        moe = _native_moe(p.get("moe"), where)
        mla = None
        if p.get("qk_nope_head_dim"):  # vLLM's test for an MLA model
            _require(p, ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"), where)
            mla = MlaArgs(int(p["kv_lora_rank"]), int(p["qk_nope_head_dim"]), int(p["qk_rope_head_dim"]),
                          int(p["v_head_dim"]), _opt_int(p.get("q_lora_rank")))
        n_heads = int(p["n_heads"])
        vision = p.get("vision_encoder") or (p.get("multimodal") or {}).get("vision_encoder_args")
        yarn = _native_yarn(p.get("yarn"), where)
        if mla is not None and yarn is not None and yarn.attention_factor is None:
            # MLA models run DeepSeek's YaRN (vLLM's reading of these files): cos and
            # sin keep magnitude mscale/mscale_all_dim = 1, the softmax scale takes
            # mscale_all_dim's correction squared instead.
            yarn = dataclasses.replace(yarn, mscale=1.0)
        return cls(
            dim=int(p["dim"]),
            n_layers=int(p["n_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(p.get("n_kv_heads", n_heads)),
            head_dim=mla.qk_head_dim if mla else int(p.get("head_dim") or p["dim"] // n_heads),
            hidden_dim=int(p["hidden_dim"]),
            vocab_size=int(p["vocab_size"]),
            norm_eps=float(p.get("norm_eps", 1e-5)),
            rope_theta=float(p.get("rope_theta", 10000.0)),
            yarn=yarn,
            query_scaling=_native_query_scaling(p.get("llama_4_scaling"), where),
            sliding_window=_window(p.get("sliding_window"), where),
            tied_embeddings=bool(p.get("tied_embeddings", False)),
            moe=moe,
            mla=mla,
            max_seq_len=int(p.get("max_seq_len") or p.get("max_position_embeddings") or DEFAULT_NATIVE_CONTEXT),
            vision=VisionArgs.from_native(vision, int(p["dim"]), where) if vision else None,
            extra={k: p[k] for k in ("lora", "quantization") if k in p},
        )

    @classmethod
    def from_hf_config(cls, c: dict[str, Any], where: str = "config.json") -> "ModelArgs":
        """Hugging Face ``config.json`` of a checkpoint in ``HF_ARCHITECTURES``. A
        vision-language checkpoint (``Mistral3ForConditionalGeneration``) gives its
        language model's arguments, with the vision part kept in ``vision``."""
        archs = c.get("architectures") or []
        arch = archs[0] if archs else None
        if arch not in HF_ARCHITECTURES:
            known = ", ".join(sorted(HF_ARCHITECTURES))
            raise ConfigError(
                f"unknown architecture {arch!r} (model_type {c.get('model_type')!r}); galerne loads {known}",
                path=where,
            )
        if arch in MULTIMODAL_ARCHITECTURES:
            text = c.get("text_config")
            if not isinstance(text, dict):
                raise ConfigError(f"{arch} needs a text_config object", path=where)
            kind = text.get("model_type", "mistral")
            inner = TEXT_MODEL_TYPES.get(kind)
            if inner is None:
                raise ConfigError(
                    f"text_config.model_type {kind!r} is not supported; galerne loads {', '.join(sorted(TEXT_MODEL_TYPES))}",
                    path=where,
                )
            if "tie_word_embeddings" not in text and "tie_word_embeddings" in c:
                text = {**text, "tie_word_embeddings": c["tie_word_embeddings"]}  # said once, at the top
            args = cls.from_hf_config({**text, "architectures": [inner]}, f"{where} (text_config)")
            quant = {"quantization_config": c["quantization_config"]} if c.get("quantization_config") else {}
            return dataclasses.replace(args, vision=VisionArgs.from_hf(c, args.dim, args.norm_eps, where),
                                       extra={**args.extra, **quant})
        _require(c, ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"), where)
        act = c.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"hidden_act {act!r} is not supported (only 'silu')", path=where)
        for flag in ("attention_bias", "mlp_bias"):
            if c.get(flag):
                raise ConfigError(f"{flag}=true is not supported", path=where)
        n_layers = int(c["num_hidden_layers"])
        n_heads = int(c["num_attention_heads"])
        moe = mla = None
        head_dim = int(c.get("head_dim") or c["hidden_size"] // n_heads)
        rope_fraction = 1.0
        if arch == "MixtralForCausalLM":
            moe = MoeArgs(int(c.get("num_local_experts", 8)), int(c.get("num_experts_per_tok", 2)))
        elif arch == "Mistral4ForCausalLM":
            mla, moe = _hf_mla(c, where)
            head_dim = mla.qk_head_dim
            rope_fraction = mla.qk_rope_head_dim / head_dim
        rope_theta, yarn, query_scaling = _hf_rope(c, where, rope_fraction)
        window = c.get("sliding_window")
        if arch == "Mistral4ForCausalLM":
            window = None
        elif arch in ("MistralForCausalLM", "MixtralForCausalLM", "Ministral3ForCausalLM"):
            # transformers ignores sliding_window when use_sliding_window is False
            # (Qwen-style configs); Mistral configs do not carry the flag.
            if c.get("use_sliding_window") is False:
                window = None
        elif arch == "MinistralForCausalLM":
            window = _layer_windows(c, n_layers, where)
        else:
            window = None  # Llama attends to everything
        eos = c.get("eos_token_id")
        return cls(
            dim=int(c["hidden_size"]),
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=n_heads if mla else int(c.get("num_key_value_heads") or n_heads),
            head_dim=head_dim,
            hidden_dim=int(c["intermediate_size"]),
            vocab_size=int(c["vocab_size"]),
            norm_eps=float(c.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            yarn=yarn,
            query_scaling=query_scaling,
            sliding_window=_window(window, where),
            tied_embeddings=bool(c.get("tie_word_embeddings", False)),
            moe=moe,
            mla=mla,
            max_seq_len=int(c.get("max_position_embeddings") or DEFAULT_NATIVE_CONTEXT),
            bos_token_id=c.get("bos_token_id"),
            eos_token_id=eos[0] if isinstance(eos, list) else eos,
            extra={k: c[k] for k in ("quantization_config",) if c.get(k)},
        )

    # ------------------------------------------------------------------ writers

    def to_params_json(self, with_vision: bool = False) -> dict[str, Any]:
        """``params.json``; ``with_vision``: with the ``vision_encoder`` (a checkpoint
        written with its vision tensors)."""
        p: dict[str, Any] = {
            "dim": self.dim,
            "n_layers": self.n_layers,
            "head_dim": self.head_dim,
            "hidden_dim": self.hidden_dim,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "norm_eps": self.norm_eps,
            "vocab_size": self.vocab_size,
            "rope_theta": self.rope_theta,
            "max_seq_len": self.max_seq_len,
        }
        if self.sliding_window is not None:
            sw = self.sliding_window
            p["sliding_window"] = list(sw) if isinstance(sw, tuple) else sw
        if self.tied_embeddings:
            p["tied_embeddings"] = True
        if self.mla:
            m = self.mla
            p.update(q_lora_rank=m.q_lora_rank, kv_lora_rank=m.kv_lora_rank, qk_nope_head_dim=m.qk_nope_head_dim,
                     qk_rope_head_dim=m.qk_rope_head_dim, v_head_dim=m.v_head_dim)
        if self.moe:
            e = self.moe
            p["moe"] = {"num_experts": e.num_experts, "num_experts_per_tok": e.num_experts_per_tok}
            if not e.mixtral:
                if not e.normalize:
                    raise ConfigError("unnormalised expert weights have no params.json spelling")
                p["moe"].update(num_shared_experts=e.num_shared_experts, expert_hidden_dim=e.expert_hidden_dim or self.hidden_dim,
                                first_k_dense_replace=e.first_k_dense_replace, routed_scale=e.routed_scale,
                                num_expert_groups=e.num_expert_groups, num_expert_groups_per_tok=e.num_expert_groups_per_tok)
        if self.yarn and self.mla:
            y = self.yarn
            if not y.truncate or y.magnitude != 1.0 or y.mscale_all_dim != 1.0:
                raise ConfigError("this YaRN configuration (truncate, mscale or attention_factor) has no params.json spelling")
            p["yarn"] = {"factor": y.factor, "original_max_position_embeddings": y.original_max_position_embeddings,
                         "beta": y.beta_fast, "alpha": y.beta_slow}
        elif self.yarn:
            y = self.yarn
            if not y.truncate or y.magnitude not in (1.0, yarn_mscale(y.factor)):
                raise ConfigError("this YaRN configuration (truncate, mscale or attention_factor) has no params.json spelling")
            p["yarn"] = {"factor": y.factor, "original_max_position_embeddings": y.original_max_position_embeddings,
                         "beta": y.beta_fast, "alpha": y.beta_slow, "apply_scale": y.magnitude != 1.0}
        if self.query_scaling:
            q = self.query_scaling
            p["llama_4_scaling"] = {"beta": q.beta, "original_max_position_embeddings": q.original_max_position_embeddings}
        if with_vision and self.vision is not None:
            p["vision_encoder"] = self.vision.to_native()
        return p

    def to_hf_config(self, dtype: str = "bfloat16", with_vision: bool = False) -> dict[str, Any]:
        """The language model's config; ``with_vision``: the vision-language one around
        it (``VisionArgs.to_hf``), for a checkpoint written with its vision tensors."""
        if with_vision and self.vision is not None:
            return self.vision.to_hf(self.to_hf_config(dtype), dtype)
        sw = self.sliding_window
        per_layer = isinstance(sw, tuple) and len(set(sw)) > 1
        if self.mla:
            arch, kind = "Mistral4ForCausalLM", "mistral4"
        elif self.moe:
            if not self.moe.mixtral:
                raise ConfigError("a mixture of experts with Mistral 4's routing needs multi-head latent attention "
                                  "to be written as a Hugging Face config (Mistral4ForCausalLM)")
            arch, kind = "MixtralForCausalLM", "mixtral"
        elif self.yarn or self.query_scaling:
            arch, kind = "Ministral3ForCausalLM", "ministral3"
        elif per_layer:
            arch, kind = "MinistralForCausalLM", "ministral"
        else:
            arch, kind = "MistralForCausalLM", "mistral"
        if per_layer and arch != "MinistralForCausalLM":
            raise ConfigError(f"a per-layer sliding_window cannot be written as a Hugging Face {arch} config")
        windows = {w for w in sw} - {None} if isinstance(sw, tuple) else {sw} - {None}
        if len(windows) > 1:
            raise ConfigError("sliding windows of several sizes cannot be written as a Hugging Face config")
        window = next(iter(windows), None)
        c: dict[str, Any] = {
            "architectures": [arch],
            "model_type": kind,
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.hidden_dim,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "sliding_window": window,
            "tie_word_embeddings": self.tied_embeddings,
            "max_position_embeddings": self.max_seq_len,
            "hidden_act": "silu",
            "attention_dropout": 0.0,
            "bos_token_id": self.bos_token_id if self.bos_token_id is not None else 1,
            "eos_token_id": self.eos_token_id if self.eos_token_id is not None else 2,
            "torch_dtype": dtype,
        }
        if per_layer:
            c["layer_types"] = ["full_attention" if w is None else "sliding_attention" for w in sw]
        if self.mla:
            m, e = self.mla, self.moe
            c.update(kv_lora_rank=m.kv_lora_rank, q_lora_rank=m.q_lora_rank, qk_nope_head_dim=m.qk_nope_head_dim,
                     qk_rope_head_dim=m.qk_rope_head_dim, v_head_dim=m.v_head_dim, rope_interleave=m.rope_interleave,
                     attention_bias=False)
            del c["sliding_window"]
            if e is None:  # transformers' Mistral4 always has experts: every layer dense
                e = MoeArgs(1, 1, first_k_dense_replace=self.n_layers)
            c.update(n_routed_experts=e.num_experts, num_experts_per_tok=e.num_experts_per_tok,
                     n_shared_experts=e.num_shared_experts, moe_intermediate_size=e.expert_hidden_dim or self.hidden_dim,
                     n_group=e.num_expert_groups, topk_group=e.num_expert_groups_per_tok,
                     routed_scaling_factor=e.routed_scale, norm_topk_prob=e.normalize,
                     first_k_dense_replace=e.first_k_dense_replace)
        elif self.moe:
            c["num_local_experts"] = self.moe.num_experts
            c["num_experts_per_tok"] = self.moe.num_experts_per_tok
        if self.yarn or self.query_scaling or self.mla:
            rp: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
            if self.yarn:
                y = self.yarn
                rp.update(rope_type="yarn", factor=y.factor,
                          original_max_position_embeddings=y.original_max_position_embeddings,
                          beta_fast=y.beta_fast, beta_slow=y.beta_slow, truncate=y.truncate)
                for k in ("mscale", "mscale_all_dim", "attention_factor"):
                    if getattr(y, k) is not None:
                        rp[k] = getattr(y, k)
            if self.query_scaling:
                rp["llama_4_scaling_beta"] = self.query_scaling.beta
                rp.setdefault("original_max_position_embeddings", self.query_scaling.original_max_position_embeddings)
            if self.mla:
                rp["partial_rotary_factor"] = self.mla.qk_rope_head_dim / self.mla.qk_head_dim
            del c["rope_theta"]
            c["rope_parameters"] = rp
        return c


def _require(d: dict[str, Any], keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if d.get(k) is None]
    if missing:
        raise ConfigError(f"missing required field(s): {', '.join(missing)}", path=where)


def _window(value: Any, where: str) -> int | tuple[int | None, ...] | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        out = tuple(None if v is None else _window(v, where) for v in value)
        return out  # type: ignore[return-value]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"sliding_window must be a positive int, a per-layer list or null, got {value!r}", path=where)
    return value


def _hf_rope(c: dict[str, Any], where: str, rope_fraction: float = 1.0
             ) -> tuple[float, YarnArgs | None, QueryScaling | None]:
    """(rope_theta, YaRN, llama-4 query scaling) from transformers 5's
    ``rope_parameters`` or the older ``rope_theta`` + ``rope_scaling`` fields.
    ``rope_fraction``: the part of head_dim the architecture rotates (MLA's
    qk_rope_head_dim / head_dim); a ``partial_rotary_factor`` must say the same."""
    rp = c.get("rope_parameters")
    if not isinstance(rp, dict):
        rp = dict(c.get("rope_scaling") or {})
        rp.setdefault("rope_theta", c.get("rope_theta", 10000.0))
    theta = float(rp.get("rope_theta", c.get("rope_theta", 10000.0)))
    kind = rp.get("rope_type", rp.get("type")) or "default"
    yarn = None
    if kind == "yarn":
        orig = rp.get("original_max_position_embeddings")
        if orig is None:
            raise ConfigError("rope_type 'yarn' needs original_max_position_embeddings", path=where)
        factor = rp.get("factor")
        if factor is None:  # transformers: the ratio of the context lengths
            factor = float(c.get("max_position_embeddings") or DEFAULT_NATIVE_CONTEXT) / float(orig)
        yarn = YarnArgs(
            factor=float(factor), original_max_position_embeddings=int(orig),
            beta_fast=float(rp.get("beta_fast") or 32.0), beta_slow=float(rp.get("beta_slow") or 1.0),
            mscale=_opt_float(rp.get("mscale")), mscale_all_dim=_opt_float(rp.get("mscale_all_dim")),
            attention_factor=_opt_float(rp.get("attention_factor")), truncate=bool(rp.get("truncate", True)),
        )
    elif kind != "default":
        raise ConfigError(f"rope_type {kind!r} is not supported (default and yarn are)", path=where)
    partial = rp.get("partial_rotary_factor")
    if partial is not None and abs(float(partial) - rope_fraction) > 1e-6:
        raise ConfigError(f"partial_rotary_factor {partial} is not supported for this architecture "
                          f"(it rotates {rope_fraction:g} of each head)", path=where)
    query_scaling = None
    beta = rp.get("llama_4_scaling_beta")
    if beta is not None:
        orig = rp.get("original_max_position_embeddings")
        if orig is None:
            raise ConfigError("llama_4_scaling_beta needs original_max_position_embeddings", path=where)
        query_scaling = QueryScaling(float(beta), int(orig))
    return theta, yarn, query_scaling


def _opt_float(v: Any) -> float | None:
    return None if v is None else float(v)


def _opt_int(v: Any) -> int | None:
    return None if v is None else int(v)


def _hf_mla(c: dict[str, Any], where: str) -> tuple[MlaArgs, MoeArgs | None]:
    """Mistral4ForCausalLM's attention and MoE fields (transformers' defaults)."""
    _require(c, ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"), where)
    mla = MlaArgs(int(c["kv_lora_rank"]), int(c["qk_nope_head_dim"]), int(c["qk_rope_head_dim"]),
                  int(c["v_head_dim"]), _opt_int(c.get("q_lora_rank")), bool(c.get("rope_interleave", True)))
    n_experts = c.get("n_routed_experts", c.get("num_local_experts"))
    if not n_experts or int(c.get("first_k_dense_replace") or 0) >= int(c["num_hidden_layers"]):
        return mla, None  # every layer dense
    moe = MoeArgs(
        num_experts=int(n_experts), num_experts_per_tok=int(c.get("num_experts_per_tok") or 4),
        num_shared_experts=int(c.get("n_shared_experts") or 0),
        expert_hidden_dim=int(c["moe_intermediate_size"]) if c.get("moe_intermediate_size") else None,
        num_expert_groups=int(c.get("n_group") or 1), num_expert_groups_per_tok=int(c.get("topk_group") or 1),
        routed_scale=float(c.get("routed_scaling_factor", 1.0)), normalize=bool(c.get("norm_topk_prob", True)),
        first_k_dense_replace=int(c.get("first_k_dense_replace") or 0),
    )
    return mla, moe


def _native_moe(m: Any, where: str) -> MoeArgs | None:
    """params.json's ``moe`` (Mixtral's two keys; Mistral 4's as vLLM maps them)."""
    if not m:
        return None
    if not isinstance(m, dict):
        raise ConfigError(f"moe must be an object, got {m!r}", path=where)
    _require(m, ("num_experts", "num_experts_per_tok"), f"{where} (moe)")
    if m.get("route_every_n", 1) != 1:
        raise ConfigError("moe.route_every_n other than 1 is not supported", path=where)
    return MoeArgs(
        num_experts=int(m["num_experts"]), num_experts_per_tok=int(m["num_experts_per_tok"]),
        num_shared_experts=int(m.get("num_shared_experts") or 0),
        expert_hidden_dim=_opt_int(m.get("expert_hidden_dim")),
        num_expert_groups=int(m.get("num_expert_groups") or 1),
        num_expert_groups_per_tok=int(m.get("num_expert_groups_per_tok") or 1),
        routed_scale=float(m.get("routed_scale", 1.0)),
        first_k_dense_replace=int(m.get("first_k_dense_replace") or 0),
    )


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction (transformers' ``get_mscale``)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _native_yarn(y: Any, where: str) -> YarnArgs | None:
    """params.json's ``yarn`` (keys as vLLM's Mistral reader maps them: ``beta`` is
    beta_fast, ``alpha`` beta_slow, ``apply_scale: false`` an attention factor of 1)."""
    if not y:
        return None
    if not isinstance(y, dict):
        raise ConfigError(f"yarn must be an object, got {y!r}", path=where)
    _require(y, ("factor", "original_max_position_embeddings"), f"{where} (yarn)")
    unknown = set(y) - {"factor", "original_max_position_embeddings", "beta", "alpha", "apply_scale"}
    if unknown:
        raise ConfigError(f"unknown yarn key(s): {', '.join(sorted(unknown))}", path=where)
    return YarnArgs(
        factor=float(y["factor"]), original_max_position_embeddings=int(y["original_max_position_embeddings"]),
        beta_fast=float(y.get("beta", 32.0)), beta_slow=float(y.get("alpha", 1.0)),
        mscale_all_dim=1.0, attention_factor=None if y.get("apply_scale", True) else 1.0,
    )


def _native_query_scaling(q: Any, where: str) -> QueryScaling | None:
    if not q:
        return None
    if not isinstance(q, dict):
        raise ConfigError(f"llama_4_scaling must be an object, got {q!r}", path=where)
    _require(q, ("beta", "original_max_position_embeddings"), f"{where} (llama_4_scaling)")
    return QueryScaling(float(q["beta"]), int(q["original_max_position_embeddings"]))


def _layer_windows(c: dict[str, Any], n_layers: int, where: str) -> list[int | None] | int | None:
    """Ministral's ``layer_types``: the window on "sliding_attention" layers only."""
    window, types = c.get("sliding_window"), c.get("layer_types")
    if types is None:
        return window
    if not isinstance(types, list) or len(types) != n_layers:
        raise ConfigError(f"layer_types must list the {n_layers} layers", path=where)
    bad = sorted({t for t in types if t not in ("sliding_attention", "full_attention")})
    if bad:
        raise ConfigError(f"unknown layer type(s) {', '.join(map(repr, bad))}", path=where)
    return [window if t == "sliding_attention" else None for t in types]
