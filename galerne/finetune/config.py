"""``galerne finetune`` settings: mistral-finetune's YAML keys, plus a few of galerne's.

One dataclass per section; each field has one default and one description. The same
fields are the command's flags (``--max-steps 10``, ``--lora.rank 8`` or ``--lora-rank 8``),
and flags win over the YAML file. Unknown keys, at any level, and values of the wrong
type are a :class:`~galerne.errors.ConfigError` that names the key (and the file).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from galerne.errors import ConfigError
from galerne.models.lora import DEFAULT_TARGETS


def _f(default: Any, help: str) -> Any:
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class DataConfig:
    instruct_data: str = _f("", "instruct JSONL files: comma-separated 'path' or 'path:weight' (weights mix the sources)")
    data: str = _f("", "pretraining JSONL files ({'text': ...}), same syntax; mixed with instruct_data by weight")
    eval_instruct_data: str = _f("", "evaluation JSONL files, comma-separated (weights ignored)")
    shuffle: bool = _f(True, "shuffle each source at every epoch (seeded)")


@dataclass
class LoraConfig:
    enable: bool = _f(True, "train a LoRA adapter; false: train every weight of the model")
    rank: int = _f(16, "LoRA rank")
    scaling: float = _f(2.0, "LoRA scaling (alpha / rank), as mistral-finetune")
    dropout: float = _f(0.0, "dropout on the LoRA input")
    targets: list[str] = _f(list(DEFAULT_TARGETS), "linear layers to adapt (default: every linear layer of the blocks)")


@dataclass
class OptimConfig:
    lr: float = _f(1e-4, "peak learning rate (AdamW, betas 0.9, 0.95)")
    weight_decay: float = _f(0.1, "AdamW weight decay")
    pct_start: float = _f(0.05, "fraction of max_steps spent warming up linearly; then cosine decay to 0")


@dataclass
class FinetuneConfig:
    model_id_or_path: str = _f("", "base model folder or Hugging Face Hub id (required)")
    run_dir: str = _f("", "output folder: metrics, checkpoints, adapter (required)")
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    seq_len: int = _f(2048, "tokens per packed training sequence")
    batch_size: int = _f(1, "sequences per micro-batch, per process")
    num_microbatches: int = _f(1, "micro-batches accumulated per optimizer step, per process")
    max_steps: int = _f(100, "optimizer steps")
    seed: int = _f(0, "seed of the LoRA init, data order and dropout")
    log_freq: int = _f(1, "write a metrics line every N steps")
    eval_freq: int = _f(0, "evaluate every N steps (0: only at the end); needs data.eval_instruct_data")
    ckpt_freq: int = _f(0, "save a checkpoint every N steps, and at the end (0: none but on Ctrl-C)")
    num_ckpt_keep: int = _f(3, "checkpoints kept (the newest)")
    save_adapters: bool = _f(True, "write the final adapter (LoRA) or model (full) into run_dir")
    skip_bad_lines: bool = _f(False, "skip (and count) invalid data lines instead of refusing the data")
    grad_clip: float = _f(1.0, "clip the gradient norm to this (0: no clipping)")
    checkpoint: bool = _f(True, "activation checkpointing of the transformer blocks (less memory, ~30% more compute)")
    dtype: str = _f("auto", "auto (bfloat16 autocast on CUDA with float32 trainable weights; float32 on CPU), float32, bfloat16")
    device: str = _f("auto", "auto (cuda if available, else cpu), cpu, cuda, cuda:N (under torchrun: the local rank's GPU)")

    def __post_init__(self) -> None:
        self.check()

    def check(self, path: str | None = None) -> None:
        """Range checks (types are checked when parsing)."""
        positive = ("seq_len", "batch_size", "num_microbatches", "max_steps", "log_freq", "num_ckpt_keep")
        for name in positive:
            if getattr(self, name) < 1:
                _fail(name, f"must be at least 1, got {getattr(self, name)}", path)
        for name in ("eval_freq", "ckpt_freq"):
            if getattr(self, name) < 0:
                _fail(name, f"must be >= 0, got {getattr(self, name)}", path)
        if self.lora.rank < 1:
            _fail("lora.rank", f"must be at least 1, got {self.lora.rank}", path)
        if not 0 <= self.lora.dropout < 1:
            _fail("lora.dropout", f"must be in [0, 1), got {self.lora.dropout}", path)
        if not self.lora.targets:
            _fail("lora.targets", "must name at least one linear layer", path)
        if not 0 <= self.optim.pct_start <= 1:
            _fail("optim.pct_start", f"must be in [0, 1], got {self.optim.pct_start}", path)
        if self.optim.lr <= 0:
            _fail("optim.lr", f"must be positive, got {self.optim.lr}", path)
        if self.grad_clip < 0:
            _fail("grad_clip", f"must be >= 0, got {self.grad_clip}", path)
        if self.dtype not in ("auto", "float32", "fp32", "bfloat16", "bf16"):
            _fail("dtype", f"must be auto, float32 or bfloat16, got {self.dtype!r}", path)

    def require_paths(self, path: str | None = None) -> None:
        """What a run needs but a partial config (tests, flags-only) may lack."""
        if not self.model_id_or_path:
            _fail("model_id_or_path", "is required", path)
        if not self.run_dir:
            _fail("run_dir", "is required", path)
        if not (self.data.instruct_data or self.data.data):
            _fail("data.instruct_data", "no training data: set data.instruct_data and/or data.data", path)

    @property
    def warmup_steps(self) -> int:
        return int(self.optim.pct_start * self.max_steps)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _fail(key: str, message: str, path: str | None) -> typing.NoReturn:
    raise ConfigError(f"{key}: {message}", path=path)


# --------------------------------------------------------------------------- parsing


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, hint: Any, key: str, path: str | None, *, from_text: bool) -> Any:
    """``value`` as type ``hint``; ``from_text``: a CLI string (so "8" is an int)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key, path, from_text=from_text)
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            _fail(key, f"must be a list of strings, got {value!r}", path)
        return list(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if from_text and isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        _fail(key, f"must be true or false, got {value!r}", path)
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if from_text and isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        _fail(key, f"must be an integer, got {value!r}", path)
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        _fail(key, f"must be a number, got {value!r}", path)
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        _fail(key, f"must be a string, got {value!r}", path)
    raise TypeError(f"unsupported config type {hint!r}")


def _build(cls: type, values: dict[str, Any], prefix: str, path: str | None, *, from_text: bool = False):
    if not isinstance(values, dict):
        _fail(prefix.rstrip(".") or "config", f"must be a mapping of keys, got {values!r}", path)
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in names:
            known = ", ".join(sorted(names))
            _fail(full, f"unknown key (known here: {known})", path)
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value if value is not None else {}, f"{full}.", path, from_text=from_text)
        else:
            kwargs[key] = _coerce(value, hint, full, path, from_text=from_text)
    if cls is FinetuneConfig:
        obj = cls.__new__(cls)
        for f in dataclasses.fields(cls):
            setattr(obj, f.name, kwargs[f.name] if f.name in kwargs else _default(f))
        obj.check(path)
        return obj
    return cls(**kwargs)


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> FinetuneConfig:
    """The YAML file at ``path`` (None: defaults only), with ``overrides`` (nested dict of
    already-typed or CLI-string values) on top. Errors name the key and the file."""
    raw: dict[str, Any] = {}
    where = str(path) if path is not None else None
    if path is not None:
        raw = _read_yaml(Path(path))
    typed = _typed_overrides(overrides or {})
    return _build(FinetuneConfig, _merge(raw, typed), "", where)


def _typed_overrides(overrides: dict[str, Any], cls: type = FinetuneConfig, prefix: str = "") -> dict[str, Any]:
    hints = _hints(cls)
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        if key not in hints:
            _fail(f"{prefix}{key}", "unknown key", "command line")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                _fail(f"{prefix}{key}", "is a section: set its keys", "command line")
            out[key] = _typed_overrides(value, hint, f"{prefix}{key}.")
        else:
            out[key] = _coerce(value, hint, f"{prefix}{key}", "command line", from_text=True)
    return out


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


def dump_config(cfg: FinetuneConfig, path: str | Path) -> None:
    import yaml

    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


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
        if weight <= 0:
            raise ConfigError(f"{key}: weight of {path} must be positive, got {weight:g}")
        out.append(Source(path, weight))
    return out


# --------------------------------------------------------------------------- CLI flags


def _leaves(cls: type = FinetuneConfig, prefix: str = "") -> list[tuple[str, Any, dataclasses.Field]]:
    hints = _hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += _leaves(hints[f.name], f"{prefix}{f.name}.")
        else:
            out.append((f"{prefix}{f.name}", hints[f.name], f))
    return out


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per key: ``--max-steps``, ``--lora.rank`` (also ``--lora-rank``), ...
    Values are parsed like YAML values; booleans take an optional value (``--lora.enable false``)."""
    for key, hint, f in _leaves():
        dotted = "--" + key.replace("_", "-")
        flags = [dotted] if "." not in key else [dotted, dotted.replace(".", "-")]
        kwargs: dict[str, Any] = dict(dest="cfg:" + key, default=None, help=f"{f.metadata['help']} (default: {_show(_default(f))})".replace("%", "%%"))
        if hint is bool:
            kwargs.update(nargs="?", const="true", metavar="BOOL")
        else:
            kwargs.update(metavar=key.rpartition(".")[2].upper())
        parser.add_argument(*flags, **kwargs)


def _show(v: Any) -> str:
    if isinstance(v, list):
        return ",".join(v)
    return repr(v) if v == "" else str(v)


def overrides_from_args(ns: argparse.Namespace) -> dict[str, Any]:
    """The config flags that were given, as a nested dict of strings."""
    out: dict[str, Any] = {}
    for name, value in vars(ns).items():
        if not name.startswith("cfg:") or value is None:
            continue
        parts = name[4:].split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out
