"""Settings: every knob has one home here, one default and one description.

One mechanism turns a settings dataclass (nested ones too, as the fine-tuning config)
into command-line flags and back, and reads every source the same way:

* ``add_arguments`` makes one flag per field (``--max-num-seqs``; nested keys
  ``--lora.rank`` and ``--lora-rank``). A list field's flag is repeatable; a boolean
  flag takes an optional value (``--prefix-caching``, ``--prefix-caching false``, the
  value only when it is a boolean word: use ``config.ArgumentParser``) and has a
  ``--no-`` form.
* ``from_args`` resolves the values: flags win over the environment variable
  ``GALERNE_<FIELD>``, which wins over the field's default.
* ``parse_values`` reads a mapping (the fine-tuning YAML file) into the same typed
  values, and ``build`` makes the dataclass of them.

Every value goes through ``coerce``, which knows the field's real type (from
``typing.get_type_hints``): text from a flag or a variable is parsed ("8" is an int,
"1e-4" a float, "false" a bool, "none" an absent Optional value). A wrong value is a
:class:`~galerne.errors.ConfigError` naming the key and where it came from (the file,
"command line", or the environment variable); so is a range check of the dataclass
(its ``InvalidParameter``) on a value from one of them.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError, InvalidParameter
from .sampling.params import MISTRAL_DEFAULT_TEMPERATURE, SamplingParams


def setting(default: Any, help: str, *, flag: str | None = None, choices: tuple | None = None, sep: str | None = None) -> Any:
    """A settings field. ``flag``: its flag, when not ``--<name>``; ``choices``: the values
    allowed; ``sep``: for a list field, the separator of items in one text value (a flag's
    or a variable's; without one, a text value is one item)."""
    metadata = {"help": help, "flag": flag, "choices": choices, "sep": sep}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


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
    quantization: str | None = setting(None, "quantize the weights at load: q8_0 (8 bits), q4_k or q4_0 (4.5 bits); "
                                             "activations stay in --dtype (default: as stored; a folder written by "
                                             "`galerne quantize` or a GGUF file loads as it is stored)",
                                       choices=("q8_0", "q4_0", "q4_k"))

    def llm_kwargs(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class EngineSettings:
    """The paged engine: KV cache size, batch limits."""

    block_size: int = setting(16, "tokens per KV-cache block")
    kv_cache_gb: float | None = setting(None, "KV cache size in GB (default: 2 GB on CPU, from --gpu-memory-utilization on GPU)")
    kv_cache_dtype: str = setting("auto", "what the KV cache stores: auto (the model's dtype), float32, bfloat16, float16, "
                                          "fp8 (e4m3; fp8_e5m2 for more range), int8 (with a scale per token and head): "
                                          "8 bits hold 2x (bf16 models) or 4x (float32) the tokens in the same memory. "
                                          "Converted caches are read through torch ops (no CPU decode kernel, no "
                                          "Triton kernel or CUDA graphs): slower steps",
                                  choices=("auto", "float32", "bfloat16", "float16", "fp8", "fp8_e4m3", "fp8_e5m2", "int8"))
    quantized_activations: str = setting("int8", "how block-quantized weights (q8_0, q4_0, q4_k) multiply on the CPU: "
                                                 "int8 (the inputs rounded to 8 bits per block of 32, integer dot "
                                                 "products: llama.cpp's way, faster decode) or float (float32 inputs: "
                                                 "exactly the dequantized weights' products)", choices=("int8", "float"))
    huge_pages: bool = setting(False, "on the CPU, hold the weights and the KV cache in 2 MB pages (Linux's transparent "
                                      "huge pages, where the kernel allows them): decode steps 1-4% shorter (measured), "
                                      "for a load that copies the weights once instead of mapping them (seconds per "
                                      "GB on a VM whose memory is cold): for long-running servers",
                               flag="--huge-pages")
    gpu_memory_utilization: float = setting(0.90, "fraction of the GPU's memory galerne may use (weights + activations + KV cache)")
    max_num_seqs: int = setting(256, "most sequences running at once")
    max_num_batched_tokens: int = setting(2048, "token budget of one step (prefill chunks + decodes)")
    enable_prefix_caching: bool = setting(True, "reuse the KV blocks of a shared prompt prefix", flag="--prefix-caching")
    enforce_eager: bool = setting(False, "every step through torch ops: no CUDA graphs (GPU), no native decode kernel (CPU)")
    max_loras: int = setting(8, "adapter slots: most LoRA adapters served unmerged in one step; more may be loaded, "
                                "kept in host memory and swapped in least recently used first (0: none served "
                                "unmerged); the slots take device memory from the first adapter loaded on")
    max_lora_rank: int = setting(64, "largest rank of an adapter served unmerged (the slots are this wide)")
    max_background_seqs: int | None = setting(None, "in a step that also computes interactive requests, most sequences "
                                                    "of low-priority work (batch jobs) it computes; the others keep "
                                                    "their place and KV cache for the next step. Lower: interactive "
                                                    "latency nearer an idle server's, batches slower; 0: batch work "
                                                    "runs only between requests (default: 0 on CPU, where every row of "
                                                    "a step costs time; no cap on GPU)")

    def __post_init__(self) -> None:
        if self.quantized_activations not in ("int8", "float"):
            raise InvalidParameter("quantized_activations", f"must be int8 or float, got {self.quantized_activations!r}")
        if self.max_background_seqs is not None and self.max_background_seqs < 0:
            raise InvalidParameter("max_background_seqs", f"must be >= 0, got {self.max_background_seqs}")
        if self.max_loras < 0:
            raise InvalidParameter("max_loras", f"must be >= 0, got {self.max_loras}")
        if self.max_lora_rank < 1:
            raise InvalidParameter("max_lora_rank", f"must be >= 1, got {self.max_lora_rank}")


def _neutral(name: str) -> Any:
    """SamplingParams' default for ``name``: the one source of the neutral sampling defaults."""
    return SamplingParams.__dataclass_fields__[name].default


# The command line's length limit. SamplingParams (and the API) have none: a request runs
# until EOS, a stop string or the end of the context. But a base model may never write
# EOS, and a bare `galerne generate` on one would then run to the end of a 32k-token
# context (minutes to hours on a CPU): the CLI stops at this many unless --max-tokens
# says otherwise (`--max-tokens none`: no limit).
CLI_MAX_TOKENS = 256


@dataclass
class SamplingSettings:
    """Sampling flags of ``galerne generate`` and ``galerne chat`` (the API takes the same
    fields per request). The defaults are SamplingParams' but two: the temperature Mistral
    recommends (as ``galerne chat`` talks to instruct models) and ``CLI_MAX_TOKENS``."""

    temperature: float = setting(MISTRAL_DEFAULT_TEMPERATURE, "sampling temperature, 0 = greedy; the default is the one "
                                 "Mistral recommends and its API applies (SamplingParams and the OpenAI API default to "
                                 f"{_neutral('temperature')})")
    top_p: float = setting(_neutral("top_p"), "nucleus sampling: keep the smallest set of tokens with this probability mass")
    top_k: int = setting(_neutral("top_k"), "keep only the k most likely tokens (0 = off)")
    seed: int | None = setting(_neutral("seed"), "random seed for reproducible sampling (default: none, a random draw)")
    stop: tuple[str, ...] = setting(_neutral("stop"), "stop string, not included in the output (repeatable)")
    max_tokens: int | None = setting(CLI_MAX_TOKENS, "most tokens to generate (none: until the end-of-sequence token or "
                                     "the end of the context; a limit by default, as a base model may never stop)")
    ignore_eos: bool = setting(_neutral("ignore_eos"), "keep generating after the end-of-sequence token")

    def __post_init__(self) -> None:
        self.params()  # values out of range are an error of the flag (or variable) that gave them

    def params(self) -> SamplingParams:
        return SamplingParams(**dataclasses.asdict(self))


# What the server accepts as an adapter's name (``--lora NAME=PATH``, ``lora_name``): it
# becomes a model id, in URLs (/v1/models/NAME) and in logs, so no spaces, slashes or
# control characters; the colon lets fine-tuned ids read as Mistral's (ft:base:suffix:id).
ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
ADAPTER_NAME_RULE = "1 to 64 of the characters A-Z a-z 0-9 . _ : - (the first a letter or digit)"


@dataclass
class ServerSettings:
    """The HTTP API server (``galerne serve``)."""

    host: str = setting("127.0.0.1", "address to listen on; a non-loopback one needs an API key (or --allow-no-auth)")
    port: int = setting(8000, "TCP port to listen on")
    api_key: list[str] = setting([], "API key clients must send as 'Authorization: Bearer KEY' (repeatable, "
                                     "or comma-separated); none: no authentication", sep=",")
    allow_no_auth: bool = setting(False, "allow listening on a non-loopback address without an API key")
    served_model_name: list[str] = setting([], "model id the API shows and accepts (repeatable, or comma-separated: the "
                                               "first is the id, the others aliases; default: the model folder's name or Hub id)", sep=",")
    max_queued_requests: int = setting(256, "most requests waiting for a slot in the engine; past it, 429 with Retry-After")
    drain_timeout: float = setting(60.0, "seconds a shutdown (SIGTERM) waits for in-flight requests to finish")
    max_body_mb: float = setting(2.0, "largest request body, in MiB; past it, 413")
    header_timeout: float = setting(10.0, "seconds a connection has to send a request's headers (from its first byte, "
                                          "or from connecting); past it, the connection is closed")
    body_timeout: float = setting(30.0, "seconds a client has to send a request's body once its headers are in; past it, 408")
    max_connections: int = setting(1024, "most open connections (lowered to what the open-file limit allows); past it, "
                                          "the connection idle the longest is closed, or the new one refused if none is idle")
    allowed_origin: list[str] = setting([], "origin (scheme://host[:port]) whose web pages may call the server "
                                            "(CORS); repeatable or comma-separated; '*': any", sep=",")
    allowed_host: list[str] = setting([], "without an API key, a Host name the server answers to besides localhost, "
                                          "127.0.0.1, [::1] and --host; repeatable or comma-separated; '*': any", sep=",")
    lora: list[str] = setting([], "LoRA adapter served unmerged from the start, as NAME=PATH (a PEFT folder, or a Mistral "
                                  "lora.safetensors); requests pick it with \"model\": NAME; repeatable")
    lora_dir: list[str] = setting([], "folder the API may load adapters from at run time (POST /v1/load_lora_adapter; "
                                      "their paths must lie inside one, symlinks resolved); repeatable; none: run-time "
                                      "loading is off")
    data_dir: str = setting("", "folder of the platform's state: uploaded files, fine-tuning runs, fine-tuned adapters, "
                                "batch outputs and the SQLite database (default: $XDG_DATA_HOME/galerne, else "
                                "~/.local/share/galerne)")
    database_url: str = setting("", "where file and job records live: sqlite:///PATH or postgresql://USER:PASS@HOST/DB "
                                    "(default: SQLite in --data-dir); servers sharing one PostgreSQL store share files, "
                                    "jobs and fine-tuned models")
    ray_address: str = setting("", "run fine-tuning jobs on this Ray cluster as Ray Jobs (its dashboard address, e.g. "
                                   "http://HEAD:8265) instead of in a worker process on this machine")
    max_upload_mb: float = setting(512.0, "largest file POST /v1/files takes, in MiB; past it, 413")
    max_running_jobs: int = setting(1, "fine-tuning jobs trained at once by this server, each in its own worker process")
    job_nproc: int = setting(1, "processes (GPUs) per fine-tuning job; above 1 the worker runs under torchrun")
    allow_image_urls: bool = setting(False, "fetch the http(s) URLs of image parts (off: images come inline as base64 "
                                            "data URIs, so that the server never reaches into the network it sits in)")
    max_image_mb: float = setting(10.0, "largest image a request may hold, in MiB (encoded); a body with images must "
                                        "also fit --max-body-mb")
    image_url_timeout: float = setting(10.0, "seconds an image URL has to download in full (--allow-image-urls)")
    batch_concurrency: int = setting(16, "requests of a batch job the engine runs at once, at low priority beside "
                                         "interactive ones (which always go first); the rest of the batch waits in "
                                         "its file, never in the engine's queue")
    console: bool = setting(True, "serve the browser console (chat, compare, data, fine-tuning) at /, with the API's "
                                  "keys (--no-console: the API only)")

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise InvalidParameter("port", f"must be in 0..65535, got {self.port}")
        if self.max_queued_requests < 1:
            raise InvalidParameter("max_queued_requests", f"must be at least 1, got {self.max_queued_requests}")
        if self.drain_timeout < 0:
            raise InvalidParameter("drain_timeout", f"must be >= 0, got {self.drain_timeout}")
        for i, key in enumerate(self.api_key):
            if not key or key != key.strip():
                raise InvalidParameter(f"api_key[{i}]", "must be non-empty, without surrounding spaces")
        for name in ("max_body_mb", "header_timeout", "body_timeout"):
            if not getattr(self, name) > 0:
                raise InvalidParameter(name, f"must be > 0, got {getattr(self, name)}")
        if not 1 <= self.batch_concurrency <= 4096:
            raise InvalidParameter("batch_concurrency", f"must be in 1..4096, got {self.batch_concurrency}")
        for name in ("max_running_jobs", "job_nproc"):
            if getattr(self, name) < 1:
                raise InvalidParameter(name, f"must be at least 1, got {getattr(self, name)}")
        for name in ("max_image_mb", "image_url_timeout"):
            if not getattr(self, name) > 0:
                raise InvalidParameter(name, f"must be > 0, got {getattr(self, name)}")
        if not self.max_upload_mb > 0:
            raise InvalidParameter("max_upload_mb", f"must be > 0, got {self.max_upload_mb}")
        if self.database_url and not re.match(r"(sqlite|postgres|postgresql)(\+\w+)?://", self.database_url):
            raise InvalidParameter("database_url", "must start with sqlite:/// or postgresql://")
        if self.max_connections < 1:
            raise InvalidParameter("max_connections", f"must be at least 1, got {self.max_connections}")
        for i, origin in enumerate(self.allowed_origin):
            if origin not in ("*", "null") and not re.fullmatch(r"https?://[^/\s]+", origin):
                raise InvalidParameter(f"allowed_origin[{i}]", f"must be scheme://host[:port] (no path), '*' or 'null', "
                                                               f"got {origin!r}")
        for i, host in enumerate(self.allowed_host):
            if not host or "/" in host or host != host.strip():
                raise InvalidParameter(f"allowed_host[{i}]", f"must be a host name (no scheme, no path), got {host!r}")
        names: set[str] = set()
        for i, item in enumerate(self.lora):
            name, eq, path = item.partition("=")
            if not eq or not path:
                raise InvalidParameter(f"lora[{i}]", f"must be NAME=PATH, got {item!r}")
            if not ADAPTER_NAME.fullmatch(name):
                raise InvalidParameter(f"lora[{i}]", f"the name must be {ADAPTER_NAME_RULE}, got {name!r}")
            if name in names:
                raise InvalidParameter(f"lora[{i}]", f"two adapters named {name!r}")
            names.add(name)
        for i, folder in enumerate(self.lora_dir):
            if not folder or not os.path.isdir(folder):
                raise InvalidParameter(f"lora_dir[{i}]", f"must be an existing folder, got {folder!r}")

    @property
    def lora_adapters(self) -> dict[str, str]:
        """The ``--lora`` adapters: name -> path."""
        return dict(item.partition("=")[::2] for item in self.lora)

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)


# --------------------------------------------------------------------------- the mechanism

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")

# A value and where it came from (a file, "command line", an environment variable; None: code).
Sourced = tuple[Any, str | None]


def coerce(value: Any, hint: Any, key: str, source: str | None = None, *, text: bool = False,
           choices: tuple | None = None, sep: str | None = None) -> Any:
    """``value`` as type ``hint`` (bool, int, float, str, X | None, list[str], tuple[str, ...]).

    ``text``: the value may be text to parse, as a flag's or a variable's (so "8" is an
    int, "false" a bool, "none" or "" an absent Optional value, and a list's text is split
    on ``sep``). Without it (a YAML value) only a float may be written as text ("1e-4",
    which YAML reads as a string) and a list as one ``sep``-separated string. A value of
    another type, or not in ``choices``, is a ConfigError naming ``key`` and ``source``."""
    def fail(message: str) -> typing.NoReturn:
        raise ConfigError(f"{key}: {message}", path=source)

    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(inner) != 1:
            raise TypeError(f"unsupported settings type {hint!r}")
        if value is None or (text and isinstance(value, str) and value.strip().lower() in ("", "none")):
            return None
        return coerce(value, inner[0], key, source, text=text, choices=choices, sep=sep)
    if origin in (list, tuple):
        items = _items(value, text, sep)
        if items is None:
            fail(f"must be a list of strings, got {value!r}")
        return tuple(items) if origin is tuple else items
    if hint is bool:
        if isinstance(value, bool):
            return value
        if text and isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        fail(f"must be true or false, got {value!r}")
    if hint is int:
        out = value if isinstance(value, int) and not isinstance(value, bool) else None
        if out is None and text and isinstance(value, str):
            try:
                out = int(value.strip())
            except ValueError:
                pass
        if out is None:
            fail(f"must be an integer, got {value!r}")
    elif hint is float:
        out = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
        if out is None and isinstance(value, str):  # YAML, too, reads 1e-4 (no dot) as a string
            try:
                out = float(value.strip())
            except ValueError:
                pass
        if out is None or not math.isfinite(out):
            fail(f"must be a number, got {value!r}")
    elif hint is str:
        if isinstance(value, str):
            out = value
        elif isinstance(value, bool) and choices is not None and {"true", "false"} <= set(choices):
            out = "true" if value else "false"  # YAML's `checkpoint: true` for a field of words
        elif isinstance(value, (int, float)) and not isinstance(value, bool):  # YAML: `run_dir: 2024`
            out = str(value)
        else:
            fail(f"must be a string, got {value!r}")
    else:
        raise TypeError(f"unsupported settings type {hint!r}")
    if choices is not None and out not in choices:
        fail(f"must be one of {', '.join(map(str, choices))}, got {value!r}")
    return out


def _items(value: Any, text: bool, sep: str | None) -> list[str] | None:
    """A list value's strings (None: not a list of strings). One string, or (text) each
    string of a repeated flag, is split on ``sep``: items stripped, empty ones dropped."""
    if isinstance(value, str):
        value = [value]
        text = True
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        return None
    if not (text and sep):
        return list(value)
    return [item.strip() for v in value for item in v.split(sep) if item.strip()]


@dataclass(frozen=True)
class _Leaf:
    """A field that holds a value (not a nested dataclass), by its dotted key."""

    key: str
    hint: Any
    field: dataclasses.Field

    @property
    def default(self) -> Any:
        f = self.field
        return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default

    @property
    def env(self) -> str:
        return "GALERNE_" + self.key.replace(".", "_").upper()

    @property
    def flags(self) -> list[str]:
        dotted = self.field.metadata.get("flag") or "--" + self.key.replace("_", "-")
        return [dotted] if "." not in dotted else [dotted, dotted.replace(".", "-")]

    def coerce(self, value: Any, source: str | None, *, text: bool) -> Any:
        return coerce(value, self.hint, self.key, source, text=text,
                      choices=self.field.metadata.get("choices"), sep=self.field.metadata.get("sep"))


def _is_settings(hint: Any) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


def _leaves(cls: type, prefix: str = "") -> list[_Leaf]:
    hints = typing.get_type_hints(cls)
    out: list[_Leaf] = []
    for f in dataclasses.fields(cls):
        if _is_settings(hints[f.name]):
            out += _leaves(hints[f.name], f"{prefix}{f.name}.")
        else:
            out.append(_Leaf(prefix + f.name, hints[f.name], f))
    return out


def parse_values(cls: type, values: Mapping[str, Any], source: str | None, *, text: bool = False,
                 prefix: str = "") -> dict[str, Sourced]:
    """A (nested) mapping of ``cls``'s keys, e.g. a YAML file's, as typed values by dotted
    key. ``text``: values may be text to parse (see ``coerce``). An unknown key, at any
    level, is an error naming it and ``source``."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: must be a mapping of keys, got {values!r}", path=source)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out: dict[str, Sourced] = {}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in fields:
            raise ConfigError(f"{key}: unknown key (known here: {', '.join(sorted(fields))})", path=source)
        if _is_settings(hints[name]):
            out.update(parse_values(hints[name], {} if value is None else value, source, text=text, prefix=key + "."))
        else:
            out[key] = (_Leaf(key, hints[name], fields[name]).coerce(value, source, text=text), source)
    return out


def env_values(cls: type) -> dict[str, Sourced]:
    """The ``GALERNE_<KEY>`` environment variables set for ``cls``'s fields, typed."""
    out: dict[str, Sourced] = {}
    for leaf in _leaves(cls):
        raw = os.environ.get(leaf.env)
        if raw is not None:
            source = f"environment variable {leaf.env}"
            out[leaf.key] = (leaf.coerce(raw, source, text=True), source)
    return out


def build(cls: type, values: Mapping[str, Sourced], prefix: str = ""):
    """``cls`` (nested dataclasses too) from typed values by dotted key; defaults for the
    others. A range check of the dataclass that fails (``InvalidParameter``) on a given
    value becomes a ConfigError naming where that value came from."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        if _is_settings(hints[f.name]):
            kwargs[f.name] = build(hints[f.name], values, key + ".")
        elif key in values:
            kwargs[f.name] = values[key][0]
    try:
        return cls(**kwargs)
    except InvalidParameter as e:
        _, source = values.get(prefix + e.field.partition("[")[0], (None, None))
        if source is None:
            raise
        raise ConfigError(str(e), path=source) from None


# --------------------------------------------------------------------------- flags


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(value)
    return repr(value) if value == "" else str(value)


class _BoolFlag(argparse.Action):
    """A boolean flag: ``--flag`` (true), ``--flag VALUE`` / ``--flag=VALUE`` (parsed by
    ``coerce``). ``ArgumentParser`` joins a value to its flag only when the next word is
    a boolean, so that ``--enforce-eager ./model`` leaves ./model to MODEL."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs="?", const="true", **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, for ``add_arguments``' boolean flags (its subcommands' parsers are
    of this class too): ``--flag`` takes the next word as its value only when that word is
    a boolean (true/false, yes/no, on/off, 1/0)."""

    def parse_known_args(self, args=None, namespace=None):
        import sys

        args = list(sys.argv[1:] if args is None else args)
        flags = {o for a in self._actions if isinstance(a, _BoolFlag) for o in a.option_strings}
        out: list[str] = []
        i = 0
        while i < len(args):
            word = args[i]
            if word == "--":
                out += args[i:]
                break
            if word in flags:
                following = args[i + 1] if i + 1 < len(args) else None
                if following is not None and following.strip().lower() in _TRUE + _FALSE:
                    word, i = f"{word}={following}", i + 1
                else:
                    word = f"{word}=true"
            out.append(word)
            i += 1
        return super().parse_known_args(out, namespace)


def add_arguments(parser: argparse.ArgumentParser, cls: type, *, env: bool = True) -> None:
    """One flag per field of ``cls`` (``--lora.rank`` and ``--lora-rank`` for nested keys),
    with the field's description and default. Flags keep their text (None when not given):
    ``from_args`` parses it, so that a bad value is an error naming the key, not a usage
    error. ``env``: the fields are also read from ``GALERNE_<KEY>`` (said in the help)."""
    for leaf in _leaves(cls):
        meta, default, flags = leaf.field.metadata, leaf.default, leaf.flags
        notes = [] if default is None or default == [] or default == () else [f"default: {_show(default)}"]
        kwargs: dict[str, Any] = dict(dest=leaf.key, default=None, metavar=leaf.key.rpartition(".")[2].upper())
        if leaf.hint is bool:
            # --flag, --flag VALUE (parsed by coerce), and --no-flag, which takes no value
            # (so that `--no-flag MODEL` leaves MODEL to the positional argument).
            negative = "--no-" + flags[-1][2:]
            if default:
                notes.append(f"{negative}: false")
            kwargs.update(action=_BoolFlag, metavar="BOOL")
            parser.add_argument(negative, dest=leaf.key, action="store_const", const=False, default=None,
                                help=argparse.SUPPRESS)
        elif typing.get_origin(leaf.hint) in (list, tuple):
            kwargs.update(action="append")
        elif meta.get("choices"):
            kwargs.update(metavar="{" + ",".join(meta["choices"]) + "}")
        help_text = meta["help"] + (f" ({'; '.join(notes)})" if notes else "") + (f" [env {leaf.env}]" if env else "")
        parser.add_argument(*flags, help=help_text.replace("%", "%%"), **kwargs)


def args_given(cls: type, ns: argparse.Namespace) -> dict[str, Any]:
    """The flags of ``cls`` given on the command line, as a nested mapping of their text."""
    out: dict[str, Any] = {}
    for leaf in _leaves(cls):
        value = getattr(ns, leaf.key, None)
        if value is None:
            continue
        *path, name = leaf.key.split(".")
        node = out
        for part in path:
            node = node.setdefault(part, {})
        node[name] = value
    return out


def from_args(cls: type, ns: argparse.Namespace, *, env: bool = True):
    """``cls`` from the parsed flags; fields without a flag from their ``GALERNE_<KEY>``
    variable (``env``), else their default."""
    values = env_values(cls) if env else {}
    values.update(parse_values(cls, args_given(cls, ns), "command line", text=True))
    return build(cls, values)
