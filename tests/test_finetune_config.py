"""galerne finetune's config: mistral-finetune's YAML keys, errors that name the key, flags over YAML."""

from __future__ import annotations

import pytest

from galerne.cli import build_parser, main
from galerne.errors import ConfigError
from galerne.finetune.config import (
    FinetuneConfig,
    load_config,
    overrides_from_args,
    parse_sources,
)

MISTRAL_FINETUNE_YAML = """\
data:
  instruct_data: "/data/ultrachat_chunk_train.jsonl"
  data: "/data/pretrain.jsonl:0.5"
  eval_instruct_data: "/data/ultrachat_chunk_eval.jsonl"
model_id_or_path: "/models/mistral_7b"
lora:
  rank: 64
seq_len: 32768
batch_size: 1
max_steps: 300
optim:
  lr: 6.e-5
  weight_decay: 0.1
  pct_start: 0.05
seed: 0
log_freq: 1
eval_freq: 100
no_eval: False
ckpt_freq: 100
save_adapters: True
run_dir: "/runs/test"
"""


def write(tmp_path, text: str):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_mistral_finetune_example_keys(tmp_path):
    # mistral-finetune's example, minus the one key we do not have (no_eval: eval runs when
    # eval data is given).
    cfg = load_config(write(tmp_path, MISTRAL_FINETUNE_YAML.replace("no_eval: False\n", "")))
    assert cfg.lora.rank == 64 and cfg.lora.enable and cfg.optim.lr == 6e-5
    assert cfg.seq_len == 32768 and cfg.eval_freq == 100 and cfg.save_adapters
    assert cfg.lora.targets == ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]  # default: every linear layer
    assert cfg.dtype == "auto" and cfg.checkpoint == "auto" and cfg.max_memory_gb == 0 and not cfg.skip_bad_lines
    assert cfg.warmup_steps == 15


@pytest.mark.parametrize("text, key", [
    (MISTRAL_FINETUNE_YAML, "no_eval"),
    ("lora:\n  rank: 4\n  alpha: 8\n", "lora.alpha"),
    ("optim:\n  lr: 1e-4\n  betas: [0.9, 0.95]\n", "optim.betas"),
    ("data:\n  instruct: {shuffle: true}\n", "data.instruct"),
])
def test_unknown_key_is_an_error_naming_it_and_the_file(tmp_path, text, key):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(path) in str(e.value) and f"{key}: unknown key" in str(e.value)


@pytest.mark.parametrize("text, key", [
    ("lora:\n  rank: four\n", "lora.rank"),
    ("max_steps: 1.5\n", "max_steps"),
    ("lora:\n  enable: maybe\n", "lora.enable"),
    ("optim:\n  lr: fast\n", "optim.lr"),
    ("lora: 8\n", "lora"),
    ("seq_len: 0\n", "seq_len"),
    ("data:\n  max_line_bytes: 0\n", "data.max_line_bytes"),
    ("device: gpu\n", "device"),
    ("optim:\n  weight_decay: -0.1\n", "optim.weight_decay"),
    ("lora:\n  scaling: 0\n", "lora.scaling"),
])
def test_wrong_type_or_range_names_the_field(tmp_path, text, key):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(path) in str(e.value) and f"{key}: " in str(e.value)


@pytest.mark.parametrize("text, key, value", [
    ("optim:\n  lr: .nan\n", "optim.lr", "nan"),  # YAML's NaN: no comparison fails on it
    ("optim:\n  lr: .inf\n", "optim.lr", "inf"),
    ("optim:\n  weight_decay: .nan\n", "optim.weight_decay", "nan"),
    ("optim:\n  pct_start: .NaN\n", "optim.pct_start", "nan"),
    ("grad_clip: .nan\n", "grad_clip", "nan"),
    ("lora:\n  scaling: -.inf\n", "lora.scaling", "-inf"),
    ("lora:\n  dropout: .nan\n", "lora.dropout", "nan"),
])
def test_nan_and_infinity_are_refused_in_one_line(tmp_path, capsys, text, key, value):
    # (galerne.config's coercion of a float setting refuses them, for every command)
    path = write(tmp_path, "model_id_or_path: x\nrun_dir: y\n" + text)
    assert main(["finetune", str(path)]) == 1
    err = capsys.readouterr().err
    assert err == f"galerne: error: {path}: {key}: must be a number, got {value}\n"
    ns = build_parser().parse_args(["finetune", str(write(tmp_path, "")), f"--{key.replace('_', '-')}={value}"])
    with pytest.raises(ConfigError, match=f"command line: {key}: must be a number, got '{value}'"):
        load_config(ns.config, overrides_from_args(ns))


def test_yaml_scientific_notation_without_dot_is_a_float(tmp_path):
    # YAML 1.1 reads "1e-4" as a string; mistral-finetune users write it.
    assert load_config(write(tmp_path, "optim:\n  lr: 1e-4\n")).optim.lr == 1e-4


def test_flags_override_yaml(tmp_path):
    path = write(tmp_path, "max_steps: 100\nlora:\n  rank: 64\n  dropout: 0.1\nskip_bad_lines: false\n")
    for argv in (["--max-steps", "10", "--lora.rank", "8", "--skip-bad-lines", "--lora.enable", "false"],
                 ["--max-steps", "10", "--lora-rank", "8", "--skip-bad-lines", "true", "--lora-enable", "no"]):
        ns = build_parser().parse_args(["finetune", str(path), *argv])
        cfg = load_config(ns.config, overrides_from_args(ns))
        assert cfg.max_steps == 10 and cfg.lora.rank == 8 and cfg.skip_bad_lines and not cfg.lora.enable
        assert cfg.lora.dropout == 0.1  # untouched keys keep the YAML's value
    ns = build_parser().parse_args(["finetune", str(path), "--lora.targets", "wq,wv", "--optim.lr", "3e-4"])
    cfg = load_config(ns.config, overrides_from_args(ns))
    assert cfg.lora.targets == ["wq", "wv"] and cfg.optim.lr == 3e-4
    ns = build_parser().parse_args(["finetune", str(path), "--max-steps", "ten"])
    with pytest.raises(ConfigError, match="command line: max_steps: must be an integer"):
        load_config(ns.config, overrides_from_args(ns))


def test_every_key_has_a_flag():
    import dataclasses

    help_text = build_parser()._subparsers._group_actions[0].choices["finetune"].format_help()

    def keys(cls, prefix=""):
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(f.default_factory) if f.default_factory is not dataclasses.MISSING else False:
                yield from keys(f.default_factory, f"{prefix}{f.name}.")
            else:
                yield prefix + f.name

    for key in keys(FinetuneConfig):
        assert "--" + key.replace("_", "-") in help_text, key


def test_sources_with_weights():
    assert [(s.path, s.weight) for s in parse_sources("a.jsonl:2, b.jsonl ,c:d.jsonl:0.5")] == [
        ("a.jsonl", 2.0), ("b.jsonl", 1.0), ("c:d.jsonl", 0.5)]
    for weight in ("0", "-1", "nan", "inf"):
        with pytest.raises(ConfigError, match="weight of a.jsonl must be positive"):
            parse_sources(f"a.jsonl:{weight}")


def test_cli_prints_one_line_for_a_bad_config(tmp_path, capsys):
    path = write(tmp_path, "model_id_or_path: x\nrun_dir: y\nlora:\n  rnak: 8\n")
    assert main(["finetune", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("galerne: error: ") and "lora.rnak: unknown key" in err and "Traceback" not in err
    assert err.count("\n") == 1
    path = write(tmp_path, "run_dir: y\n")
    assert main(["finetune", str(path)]) == 1
    assert "model_id_or_path: is required" in capsys.readouterr().err
