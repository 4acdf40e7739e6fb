"""Settings: every knob has one home here, one default and one description.

CLI flags are generated from these dataclasses (``add_arguments``), and each
field can also be set by an environment variable named ``GALERNE_<FIELD>``
(flags win over the environment, the environment over the default).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any


def setting(default: Any, help: str, *, flag: str | None = None, choices: tuple | None = None, sep: str | None = None) -> Any:
    """A settings field. ``sep``: for list fields, the separator of items in the env var
    (without one, the env var is a single item)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, "flag": flag, "choices": choices, "sep": sep})
    return field(default=default, metadata={"help": help, "flag": flag, "choices": choices, "sep": sep})


@dataclass
class ModelSettings:
    """How to load a model (shared by generate, chat, serve, ...)."""

    dtype: str = setting("auto", "weight and activation dtype: auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16, float16")
    device: str = setting("auto", "device: auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    tokenizer: str | None = setting(None, "tokenizer file or folder (default: the model folder)")
    max_model_len: int | None = setting(None, "context length to allow (default: the model's own)")
    layout: str | None = setting(None, "checkpoint layout when a folder holds both (default: Mistral-native first)", choices=("mistral", "hf"))
    revision: str | None = setting(None, "Hub revision, when MODEL is a Hugging Face Hub id")
    adapter: str | None = setting(None, "LoRA adapter to apply, merged into the weights at load (PEFT folder, or Mistral lora.safetensors)")

    def llm_kwargs(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class EngineSettings:
    """The paged engine: KV cache size, batch limits."""

    block_size: int = setting(16, "tokens per KV-cache block")
    kv_cache_gb: float | None = setting(None, "KV cache size in GB (default: 2 GB on CPU, from --gpu-memory-utilization on GPU)")
    gpu_memory_utilization: float = setting(0.90, "fraction of the GPU's memory galerne may use (weights + activations + KV cache)")
    max_num_seqs: int = setting(256, "most sequences running at once")
    max_num_batched_tokens: int = setting(2048, "token budget of one step (prefill chunks + decodes)")
    enable_prefix_caching: bool = setting(True, "reuse the KV blocks of a shared prompt prefix", flag="--prefix-caching")
    enforce_eager: bool = setting(False, "every step through torch ops: no CUDA graphs (GPU), no native decode kernel (CPU)")


@dataclass
class SamplingSettings:
    """Sampling flags of the CLI (the API takes the same fields per request)."""

    max_tokens: int | None = setting(256, "maximum tokens to generate")
    temperature: float = setting(0.7, "sampling temperature (0 = greedy)")
    top_p: float = setting(1.0, "nucleus sampling: keep the smallest set of tokens with this probability mass")
    top_k: int = setting(0, "keep only the k most likely tokens (0 = off)")
    seed: int | None = setting(None, "random seed for reproducible sampling")
    stop: list[str] = setting(None, "stop string (repeatable)")
    ignore_eos: bool = setting(False, "keep generating after the end-of-sequence token")


@dataclass
class ServerSettings:
    """The HTTP API server (``galerne serve``)."""

    host: str = setting("127.0.0.1", "address to listen on; a non-loopback one needs an API key (or --allow-no-auth)")
    port: int = setting(8000, "TCP port to listen on")
    api_key: list[str] = setting([], "API key clients must send as 'Authorization: Bearer KEY' (repeatable; "
                                     "the env var takes a comma-separated list); none: no authentication", sep=",")
    allow_no_auth: bool = setting(False, "allow listening on a non-loopback address without an API key")
    served_model_name: list[str] = setting([], "model id the API shows and accepts (repeatable: the first is the id, "
                                               "the others aliases; default: the model folder's name or Hub id)", sep=",")
    max_queued_requests: int = setting(256, "most requests waiting for a slot in the engine; past it, 429 with Retry-After")
    drain_timeout: float = setting(60.0, "seconds a shutdown (SIGTERM) waits for in-flight requests to finish")

    def __post_init__(self) -> None:
        from .errors import InvalidParameter

        if not 0 <= self.port <= 65535:
            raise InvalidParameter("port", f"must be in 0..65535, got {self.port}")
        if self.max_queued_requests < 1:
            raise InvalidParameter("max_queued_requests", f"must be at least 1, got {self.max_queued_requests}")
        if self.drain_timeout < 0:
            raise InvalidParameter("drain_timeout", f"must be >= 0, got {self.drain_timeout}")
        for i, key in enumerate(self.api_key):
            if not key or key != key.strip():
                raise InvalidParameter(f"api_key[{i}]", "must be non-empty, without surrounding spaces")


def _type_of(f: dataclasses.Field) -> type:
    t = str(f.type)
    if "int" in t and "float" not in t:
        return int
    if "float" in t:
        return float
    return str


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    for f in dataclasses.fields(cls):
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        env = f"GALERNE_{f.name.upper()}"
        default = os.environ.get(env, f.default)
        help_text = f"{f.metadata['help']} [env {env}]"
        if str(f.type) == "bool":
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=_truthy(default), help=help_text)
        elif str(f.type).startswith("list"):
            # No default here: appended flags would add to it. from_args fills in the env var.
            parser.add_argument(flag, dest=f.name, action="append", default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, type=_type_of(f), default=default if default is None else _type_of(f)(default),
                                choices=f.metadata.get("choices"), help=help_text)


def from_args(cls: type, ns: argparse.Namespace):
    values = {}
    for f in dataclasses.fields(cls):
        value = getattr(ns, f.name)
        if value is None and str(f.type).startswith("list"):
            value = _env_list(f)
        values[f.name] = value
    return cls(**values)


def _env_list(f: dataclasses.Field) -> list[str] | None:
    """A list field's env var (flags win: only used when no flag was given)."""
    raw = os.environ.get(f"GALERNE_{f.name.upper()}")
    if raw is None:
        return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    sep = f.metadata.get("sep")
    items = raw.split(sep) if sep else [raw]
    return [item.strip() for item in items if item.strip()] if sep else items


def _truthy(v: Any) -> bool:
    return v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes", "on")
