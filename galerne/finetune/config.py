"""``galerne finetune`` settings: mistral-finetune's YAML keys, plus a few of galerne's.

One dataclass per section; each field has one default and one description. The same
fields are the command's flags (``--max-steps 10``, ``--lora.rank 8`` or ``--lora-rank 8``),
and flags win over the YAML file. Both are read by the settings mechanism of
``galerne.config`` (the one of the server's flags, without environment variables), so
a value is coerced the same way from either. Unknown keys, at any level, and values of
the wrong type are a :class:`~galerne.errors.ConfigError` that names the key (and the
file, or "command line").
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from galerne.config import add_arguments, args_given, build, parse_values, setting
from galerne.errors import ConfigError, InvalidParameter
from galerne.finetune.validate import MAX_LINE_BYTES
from galerne.models.lora import DEFAULT_TARGETS


@dataclass
class DataConfig:
    instruct_data: str = setting("", "instruct JSONL files: comma-separated 'path' or 'path:weight' (weights mix the sources)")
    data: str = setting("", "pretraining JSONL files ({'text': ...}), same syntax; mixed with instruct_data by weight")
    eval_instruct_data: str = setting("", "evaluation JSONL files, comma-separated (weights ignored)")
    shuffle: bool = setting(True, "shuffle each source at every epoch (seeded)")
    max_line_bytes: int = setting(MAX_LINE_BYTES, "longest data line read; a longer one is an invalid line, "
                                                  "skipped in chunks without being read whole")


@dataclass
class LoraConfig:
    enable: bool = setting(True, "train a LoRA adapter; false: train every weight of the model")
    rank: int = setting(16, "LoRA rank")
    scaling: float = setting(2.0, "LoRA scaling (alpha / rank), as mistral-finetune")
    dropout: float = setting(0.0, "dropout on the LoRA input")
    targets: list[str] = setting(list(DEFAULT_TARGETS), "linear layers to adapt, a list or comma-separated (default: every "
                                                        "linear layer of the blocks)", sep=",")


@dataclass
class OptimConfig:
    lr: float = setting(1e-4, "peak learning rate (AdamW, betas 0.9, 0.95)")
    weight_decay: float = setting(0.1, "AdamW weight decay")
    pct_start: float = setting(0.05, "fraction of max_steps spent warming up linearly; then cosine decay to 0")


@dataclass
class FinetuneConfig:
    model_id_or_path: str = setting("", "base model folder or Hugging Face Hub id (required)")
    run_dir: str = setting("", "output folder: metrics, checkpoints, adapter (required)")
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    seq_len: int = setting(2048, "tokens per packed training sequence")
    batch_size: int = setting(1, "sequences per micro-batch, per process")
    num_microbatches: int = setting(1, "micro-batches accumulated per optimizer step, per process")
    max_steps: int = setting(100, "optimizer steps")
    seed: int = setting(0, "seed of the LoRA init, data order and dropout")
    log_freq: int = setting(1, "write a metrics line every N steps")
    eval_freq: int = setting(0, "evaluate every N steps (0: only at the end); needs data.eval_instruct_data")
    ckpt_freq: int = setting(0, "save a checkpoint every N steps, and at the end (0: none but on Ctrl-C)")
    num_ckpt_keep: int = setting(3, "checkpoints kept (the newest)")
    save_adapters: bool = setting(True, "write the final adapter (LoRA) or model (full) into run_dir")
    skip_bad_lines: bool = setting(False, "skip (and count) invalid data lines instead of refusing the data")
    grad_clip: float = setting(1.0, "clip the gradient norm to this (0: no clipping)")
    checkpoint: str = setting("auto", "activation checkpointing of the transformer blocks (less memory, ~30% more "
                                      "compute for each checkpointed block): auto (the fewest blocks that make a step "
                                      "fit in the device's free memory, or max_memory_gb; logged), true (every block), "
                                      "false (none)", choices=("auto", "true", "false"))
    max_memory_gb: float = setting(0.0, "memory the run may hold on its device, for checkpoint: auto (0: the device's "
                                        "free memory: CUDA's free memory, the system's available memory on CPU)")
    dtype: str = setting("auto", "auto (bfloat16 autocast on CUDA with float32 trainable weights; float32 on CPU), float32, bfloat16")
    device: str = setting("auto", "auto (cuda if available, else cpu), cpu, cuda, cuda:N (under torchrun: the local rank's GPU)")

    def __post_init__(self) -> None:
        """Range checks (types are checked when parsing). A value out of range is an
        InvalidParameter naming the key (and, from ``load_config``, a ConfigError that
        names the file or the command line it came from)."""
        positive = ("seq_len", "batch_size", "num_microbatches", "max_steps", "log_freq", "num_ckpt_keep",
                    "data.max_line_bytes")
        for name in positive:
            value = _get(self, name)
            if value < 1:
                raise InvalidParameter(name, f"must be at least 1, got {value}")
        for name in ("eval_freq", "ckpt_freq"):
            if getattr(self, name) < 0:
                raise InvalidParameter(name, f"must be >= 0, got {getattr(self, name)}")
        if self.lora.rank < 1:
            raise InvalidParameter("lora.rank", f"must be at least 1, got {self.lora.rank}")
        if not 0 <= self.lora.dropout < 1:
            raise InvalidParameter("lora.dropout", f"must be in [0, 1), got {self.lora.dropout}")
        if not self.lora.targets:
            raise InvalidParameter("lora.targets", "must name at least one linear layer")
        if not 0 <= self.optim.pct_start <= 1:
            raise InvalidParameter("optim.pct_start", f"must be in [0, 1], got {self.optim.pct_start}")
        if self.optim.lr <= 0:
            raise InvalidParameter("optim.lr", f"must be positive, got {self.optim.lr}")
        if self.optim.weight_decay < 0:
            raise InvalidParameter("optim.weight_decay", f"must be >= 0, got {self.optim.weight_decay}")
        if self.lora.scaling <= 0:
            raise InvalidParameter("lora.scaling", f"must be positive, got {self.lora.scaling}")
        if self.max_memory_gb < 0:
            raise InvalidParameter("max_memory_gb", f"must be >= 0, got {self.max_memory_gb}")
        if self.grad_clip < 0:
            raise InvalidParameter("grad_clip", f"must be >= 0, got {self.grad_clip}")
        if self.dtype not in ("auto", "float32", "fp32", "bfloat16", "bf16"):
            raise InvalidParameter("dtype", f"must be auto, float32 or bfloat16, got {self.dtype!r}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise InvalidParameter("device", f"must be auto, cpu, cuda or cuda:N, got {self.device!r}")

    def require_paths(self) -> None:
        """What a run needs but a partial config (tests, flags-only) may lack."""
        if not self.model_id_or_path:
            raise ConfigError("model_id_or_path: is required")
        if not self.run_dir:
            raise ConfigError("run_dir: is required")
        if not (self.data.instruct_data or self.data.data):
            raise ConfigError("data.instruct_data: no training data: set data.instruct_data and/or data.data")

    @property
    def warmup_steps(self) -> int:
        return int(self.optim.pct_start * self.max_steps)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


# --------------------------------------------------------------------------- parsing


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> FinetuneConfig:
    """The YAML file at ``path`` (None: defaults only), with ``overrides`` (nested dict of
    already-typed or CLI-string values) on top. Errors name the key and the file (or
    "command line" for an override)."""
    where = str(path) if path is not None else None
    values = parse_values(FinetuneConfig, _read_yaml(Path(path)), where) if path is not None else {}
    values.update(parse_values(FinetuneConfig, overrides or {}, "command line", text=True))
    return build(FinetuneConfig, values)


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read: {e.strerror}", path=str(path)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"bad YAML: {e}", path=str(path)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("the config must be a mapping of keys", path=str(path))
    return data


def config_yaml(cfg: FinetuneConfig) -> str:
    """``cfg`` as a YAML config file that ``load_config`` reads back."""
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------- data sources


@dataclass(frozen=True)
class Source:
    path: str
    weight: float


def parse_sources(spec: str, key: str = "data.instruct_data") -> list[Source]:
    """``"a.jsonl:2,b.jsonl"`` -> [Source(a.jsonl, 2.0), Source(b.jsonl, 1.0)] (mistral-finetune's syntax)."""
    out = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        path, weight = item, 1.0
        head, sep, tail = item.rpartition(":")
        if sep and head:
            try:
                weight = float(tail)
                path = head
            except ValueError:
                pass  # a ':' that is part of the path
        if not (math.isfinite(weight) and weight > 0):
            raise ConfigError(f"{key}: weight of {path} must be positive, got {weight:g}")
        out.append(Source(path, weight))
    return out


# --------------------------------------------------------------------------- CLI flags


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per key: ``--max-steps``, ``--lora.rank`` (also ``--lora-rank``), ... Values
    are parsed like YAML values; booleans take an optional value (``--lora.enable false``).
    No environment variables: the YAML file is the place of a run's settings."""
    add_arguments(parser, FinetuneConfig, env=False)


def overrides_from_args(ns: argparse.Namespace) -> dict[str, Any]:
    """The config flags that were given, as a nested dict of strings."""
    return args_given(FinetuneConfig, ns)
