"""What a vision-language checkpoint says of its encoder and projector (``VisionArgs``),
read from either layout; the modules are in ``models/vision.py``. No torch here: the
model's arguments (``models/args.py``) hold one."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError

# mistral-common's ids for the image tokens of tekken.json (Pixtral and later), used
# when a config does not name them.
IMG, IMG_BREAK, IMG_END = 10, 12, 13


@dataclass(frozen=True)
class VisionArgs:
    """A vision-language checkpoint's encoder and projector, from either layout."""

    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    patch_size: int
    image_size: int  # the longest side, in pixels, an image is resized to at most
    text_dim: int  # the decoder's width: the projector's output
    num_channels: int = 3
    rope_theta: float = 10000.0
    head_dim: int | None = None  # None: hidden_size // n_heads
    act: str = "silu"  # the encoder's MLP ("silu": SwiGLU; transformers also allows "gelu")
    image_token_id: int = IMG
    image_break_token_id: int = IMG_BREAK
    image_end_token_id: int = IMG_END
    spatial_merge_size: int = 1
    patch_merger: bool = False
    pre_norm: bool = False  # the RMSNorm before the projector
    pre_norm_eps: float = 1e-5
    adapter_bias: bool = True
    # The encoder layers whose output the projector takes: all (None), or the first N
    # (transformers' vision_feature_layer: -1 is all, -2 all but the last).
    feature_layers: int | None = None

    def __post_init__(self) -> None:
        if self.hidden_size % self.n_heads:
            raise ConfigError(f"vision encoder: hidden_size ({self.hidden_size}) must be a multiple of "
                              f"num_attention_heads ({self.n_heads})")
        if self.dim_per_head % 4:
            raise ConfigError(f"vision encoder: head_dim ({self.dim_per_head}) must be a multiple of 4 "
                              "(2-D rotary embedding)")
        if self.act not in ("silu", "gelu"):
            raise ConfigError(f"vision encoder: hidden_act {self.act!r} is not supported (silu or gelu)")
        if self.spatial_merge_size < 1 or self.patch_size < 1 or self.image_size < self.patch_size:
            raise ConfigError("vision encoder: patch_size, image_size and spatial_merge_size must be positive, "
                              "image_size at least patch_size")

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.n_heads

    @property
    def token_pixels(self) -> int:
        """The side, in pixels, of the square one image token stands for."""
        return self.patch_size * self.spatial_merge_size

    @classmethod
    def from_native(cls, v: dict[str, Any], text_dim: int, where: str = "params.json") -> "VisionArgs":
        """``params.json``'s ``vision_encoder`` (mistral-inference's field names)."""
        missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                               "patch_size") if v.get(k) is None]
        if missing or (v.get("image_size") is None and v.get("max_image_size") is None):
            raise ConfigError(f"vision_encoder: missing field(s) {', '.join(missing) or 'image_size'}", path=where)
        projector = v.get("mm_projector_id") or ""
        if projector not in ("", "patch_merge"):
            raise ConfigError(f"vision_encoder.mm_projector_id {projector!r} is not supported ('patch_merge')",
                              path=where)
        return cls(
            hidden_size=int(v["hidden_size"]), intermediate_size=int(v["intermediate_size"]),
            n_layers=int(v["num_hidden_layers"]), n_heads=int(v["num_attention_heads"]),
            patch_size=int(v["patch_size"]), image_size=int(v.get("image_size") or v["max_image_size"]),
            text_dim=text_dim, num_channels=int(v.get("num_channels", 3)),
            rope_theta=float(v.get("rope_theta", 10000.0)),
            image_token_id=int(v.get("image_token_id", IMG)),
            image_break_token_id=int(v.get("image_break_token_id", IMG_BREAK)),
            image_end_token_id=int(v.get("image_end_token_id", IMG_END)),
            spatial_merge_size=int(v.get("spatial_merge_size", 1)),
            patch_merger=projector == "patch_merge",
            pre_norm=bool(v.get("add_pre_mm_projector_layer_norm", False)),
            adapter_bias=bool(v.get("adapter_bias", True)),
        )

    @classmethod
    def from_hf(cls, c: dict[str, Any], text_dim: int, text_eps: float, where: str = "config.json") -> "VisionArgs":
        """A ``Mistral3ForConditionalGeneration`` or ``LlavaForConditionalGeneration``
        (Pixtral 12B) config: its ``vision_config`` and projector fields, with
        transformers' defaults."""
        arch = (c.get("architectures") or [None])[0]
        v = c.get("vision_config") or {}
        if v.get("model_type", "pixtral") != "pixtral":
            raise ConfigError(f"vision_config.model_type {v.get('model_type')!r} is not supported (pixtral)", path=where)
        llava = arch == "LlavaForConditionalGeneration"
        n_layers = int(v.get("num_hidden_layers", 24))
        layer = c.get("vision_feature_layer", -2 if llava else -1)
        if not isinstance(layer, int) or not -n_layers - 1 <= layer <= n_layers:
            raise ConfigError(f"vision_feature_layer {layer!r} is not supported (one layer's index, in "
                              f"{-n_layers - 1}..{n_layers})", path=where)
        rope = v.get("rope_parameters") or {}
        hidden, heads = int(v.get("hidden_size", 1024)), int(v.get("num_attention_heads", 16))
        if llava and c.get("vision_feature_select_strategy", "full") != "full":
            raise ConfigError("vision_feature_select_strategy must be 'full' for a Pixtral encoder", path=where)
        return cls(
            hidden_size=hidden, intermediate_size=int(v.get("intermediate_size", 4096)),
            n_layers=n_layers, n_heads=heads, feature_layers=layer % (n_layers + 1),
            patch_size=int(v.get("patch_size", 16)), image_size=int(v.get("image_size", 1024)),
            text_dim=text_dim, num_channels=int(v.get("num_channels", 3)),
            rope_theta=float(rope.get("rope_theta", v.get("rope_theta", 10000.0))),
            head_dim=int(v.get("head_dim") or hidden // heads), act=str(v.get("hidden_act", "gelu")),
            image_token_id=int(c.get("image_token_index", c.get("image_token_id", IMG))),
            spatial_merge_size=1 if llava else int(c.get("spatial_merge_size", 2)),
            patch_merger=not llava, pre_norm=not llava, pre_norm_eps=text_eps,
            adapter_bias=bool(c.get("multimodal_projector_bias", llava)),
        )

    def to_native(self) -> dict[str, Any]:
        """``params.json``'s ``vision_encoder`` (mistral-inference's field names)."""
        if self.act != "silu" or self.feature_layers not in (None, self.n_layers) or (
                self.head_dim not in (None, self.hidden_size // self.n_heads)):
            raise ConfigError("this vision encoder (its activation, feature layer or head size) has no params.json "
                              "spelling")
        return {
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size, "num_channels": self.num_channels,
            "num_hidden_layers": self.n_layers, "num_attention_heads": self.n_heads, "patch_size": self.patch_size,
            "image_size": self.image_size, "rope_theta": self.rope_theta, "image_token_id": self.image_token_id,
            "image_break_token_id": self.image_break_token_id, "image_end_token_id": self.image_end_token_id,
            "adapter_bias": self.adapter_bias, "spatial_merge_size": self.spatial_merge_size,
            "add_pre_mm_projector_layer_norm": self.pre_norm,
            "mm_projector_id": "patch_merge" if self.patch_merger else "",
        }

    def to_hf(self, text: dict[str, Any], dtype: str) -> dict[str, Any]:
        """The whole ``config.json`` around the language model's ``text`` config:
        ``Mistral3ForConditionalGeneration`` (projector norm and patch merger, Mistral
        Small 3.1's) or ``LlavaForConditionalGeneration`` (neither, Pixtral 12B's)."""
        vision = {"model_type": "pixtral", "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
                  "num_hidden_layers": self.n_layers, "num_attention_heads": self.n_heads,
                  "head_dim": self.dim_per_head, "num_channels": self.num_channels, "patch_size": self.patch_size,
                  "image_size": self.image_size, "hidden_act": self.act,
                  "rope_parameters": {"rope_type": "axial", "rope_theta": self.rope_theta}}
        layer = -1 if self.feature_layers in (None, self.n_layers) else self.feature_layers
        text = {k: v for k, v in text.items() if k not in ("architectures", "torch_dtype")}
        common = {"vision_config": vision, "text_config": text, "image_token_index": self.image_token_id,
                  "projector_hidden_act": "gelu", "multimodal_projector_bias": self.adapter_bias,
                  "vision_feature_layer": layer, "tie_word_embeddings": text.get("tie_word_embeddings", False),
                  "torch_dtype": dtype}
        if self.patch_merger and self.pre_norm:
            return {"architectures": ["Mistral3ForConditionalGeneration"], "model_type": "mistral3",
                    "spatial_merge_size": self.spatial_merge_size, **common}
        if not self.patch_merger and not self.pre_norm:
            return {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
                    "vision_feature_select_strategy": "full", **common}
        raise ConfigError("a vision projector with only one of the norm and the patch merger has no Hugging Face "
                          "config (Mistral3 has both, Llava neither)")

    def with_tokens(self, *, img: int | None, img_break: int | None, img_end: int | None) -> "VisionArgs":
        """These args with the tokenizer's image token ids where it has them."""
        return dataclasses.replace(self, image_token_id=self.image_token_id if img is None else img,
                                   image_break_token_id=self.image_break_token_id if img_break is None else img_break,
                                   image_end_token_id=self.image_end_token_id if img_end is None else img_end)
