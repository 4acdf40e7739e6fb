"""One dataclass describes every model of the family, read from the files shipped
with the weights: Mistral's ``params.json`` or Hugging Face's ``config.json``.

Nothing is guessed from a path name. Fields a file leaves out get the default the
upstream reference implementation uses (mistral-inference for ``params.json``,
transformers for ``config.json``) and the defaults are written here, once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError

# params.json has no context-length field for most releases; mistral-inference
# does not bound positions, and Mistral's own model cards give 32k for 7B v0.3.
DEFAULT_NATIVE_CONTEXT = 32768

# HF architectures we load through the same code (they differ only in names we map
# or in fields we read below).
HF_ARCHITECTURES = {"MistralForCausalLM", "MixtralForCausalLM", "LlamaForCausalLM"}


@dataclass(frozen=True)
class MoeArgs:
    num_experts: int
    num_experts_per_tok: int


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
    # None (full attention), one int for every layer, or one entry per layer
    # (None in the list = that layer attends to everything).
    sliding_window: int | tuple[int | None, ...] | None = None
    tied_embeddings: bool = False
    moe: MoeArgs | None = None
    max_seq_len: int = DEFAULT_NATIVE_CONTEXT
    # Token ids from the config, used only when the tokenizer does not say.
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
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

    @property
    def n_params(self) -> int:
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        ffn = 3 * self.dim * self.hidden_dim
        if self.moe:
            ffn = ffn * self.moe.num_experts + self.dim * self.moe.num_experts
        per_layer = attn + ffn + 2 * self.dim
        emb = self.vocab_size * self.dim * (1 if self.tied_embeddings else 2)
        return self.n_layers * per_layer + emb + self.dim

    # ------------------------------------------------------------------ readers

    @classmethod
    def from_params_json(cls, p: dict[str, Any], where: str = "params.json") -> "ModelArgs":
        """Mistral-native ``params.json`` (mistral-inference's field names)."""
        _require(p, ("dim", "n_layers", "n_heads", "hidden_dim", "vocab_size"), where)
        if p.get("vision_encoder"):
            raise ConfigError("vision models are not supported yet (params.json has vision_encoder)", path=where)
        moe = None
        if p.get("moe"):
            m = p["moe"]
            _require(m, ("num_experts", "num_experts_per_tok"), f"{where} (moe)")
            moe = MoeArgs(int(m["num_experts"]), int(m["num_experts_per_tok"]))
        n_heads = int(p["n_heads"])
        return cls(
            dim=int(p["dim"]),
            n_layers=int(p["n_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(p.get("n_kv_heads", n_heads)),
            head_dim=int(p.get("head_dim") or p["dim"] // n_heads),
            hidden_dim=int(p["hidden_dim"]),
            vocab_size=int(p["vocab_size"]),
            norm_eps=float(p.get("norm_eps", 1e-5)),
            rope_theta=float(p.get("rope_theta", 10000.0)),
            sliding_window=_window(p.get("sliding_window"), where),
            tied_embeddings=bool(p.get("tied_embeddings", False)),
            moe=moe,
            max_seq_len=int(p.get("max_seq_len") or p.get("max_position_embeddings") or DEFAULT_NATIVE_CONTEXT),
            extra={k: p[k] for k in ("lora", "quantization") if k in p},
        )

    @classmethod
    def from_hf_config(cls, c: dict[str, Any], where: str = "config.json") -> "ModelArgs":
        """Hugging Face ``config.json`` of a Mistral, Mixtral or Llama checkpoint."""
        archs = c.get("architectures") or []
        arch = archs[0] if archs else None
        if arch not in HF_ARCHITECTURES:
            known = ", ".join(sorted(HF_ARCHITECTURES))
            raise ConfigError(
                f"unknown architecture {arch!r} (model_type {c.get('model_type')!r}); galerne loads {known}",
                path=where,
            )
        _require(c, ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"), where)
        act = c.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"hidden_act {act!r} is not supported (only 'silu')", path=where)
        for flag in ("attention_bias", "mlp_bias"):
            if c.get(flag):
                raise ConfigError(f"{flag}=true is not supported", path=where)
        rope_theta, scaling = _hf_rope(c)
        if scaling is not None:
            raise ConfigError(f"rope scaling {scaling!r} is not supported yet", path=where)
        n_heads = int(c["num_attention_heads"])
        moe = None
        if arch == "MixtralForCausalLM":
            moe = MoeArgs(int(c.get("num_local_experts", 8)), int(c.get("num_experts_per_tok", 2)))
        window = c.get("sliding_window")
        if arch == "MistralForCausalLM" or arch == "MixtralForCausalLM":
            # transformers ignores sliding_window when use_sliding_window is False
            # (Qwen-style configs); Mistral configs do not carry the flag.
            if c.get("use_sliding_window") is False:
                window = None
        else:
            window = None  # Llama attends to everything
        eos = c.get("eos_token_id")
        return cls(
            dim=int(c["hidden_size"]),
            n_layers=int(c["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(c.get("num_key_value_heads") or n_heads),
            head_dim=int(c.get("head_dim") or c["hidden_size"] // n_heads),
            hidden_dim=int(c["intermediate_size"]),
            vocab_size=int(c["vocab_size"]),
            norm_eps=float(c.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            sliding_window=_window(window, where),
            tied_embeddings=bool(c.get("tie_word_embeddings", False)),
            moe=moe,
            max_seq_len=int(c.get("max_position_embeddings") or DEFAULT_NATIVE_CONTEXT),
            bos_token_id=c.get("bos_token_id"),
            eos_token_id=eos[0] if isinstance(eos, list) else eos,
        )

    # ------------------------------------------------------------------ writers

    def to_params_json(self) -> dict[str, Any]:
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
        if self.moe:
            p["moe"] = dataclasses.asdict(self.moe)
        return p

    def to_hf_config(self, dtype: str = "bfloat16") -> dict[str, Any]:
        if isinstance(self.sliding_window, tuple):
            windows = {w for w in self.sliding_window}
            if len(windows) != 1:
                raise ConfigError("a per-layer sliding_window cannot be written as a Hugging Face Mistral config")
            window = windows.pop()
        else:
            window = self.sliding_window
        c: dict[str, Any] = {
            "architectures": ["MixtralForCausalLM" if self.moe else "MistralForCausalLM"],
            "model_type": "mixtral" if self.moe else "mistral",
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
        if self.moe:
            c["num_local_experts"] = self.moe.num_experts
            c["num_experts_per_tok"] = self.moe.num_experts_per_tok
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


def _hf_rope(c: dict[str, Any]) -> tuple[float, Any]:
    """(rope_theta, scaling or None) from either the classic fields or transformers
    5's ``rope_parameters`` dict."""
    rp = c.get("rope_parameters")
    if isinstance(rp, dict):
        theta = float(rp.get("rope_theta", c.get("rope_theta", 10000.0)))
        kind = rp.get("rope_type", "default")
        return theta, None if kind == "default" else rp
    scaling = c.get("rope_scaling")
    if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
        return float(c.get("rope_theta", 10000.0)), scaling
    return float(c.get("rope_theta", 10000.0)), None
