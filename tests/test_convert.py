"""galerne convert: either layout, bit-identical round trips."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from galerne.cli import main
from galerne.weights.export import convert


@pytest.mark.parametrize("kind", ["mistral-window", "mixtral", "head-dim"])
def test_hf_to_mistral_to_hf_is_bit_identical(kind, tiny_factory, tmp_path):
    src, _ = tiny_factory(kind)
    convert(src, tmp_path / "native", "mistral")
    convert(tmp_path / "native", tmp_path / "back", "hf")
    a, b = load_file(src / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    # The native folder has Mistral's names and the q/k rows permuted (not a copy).
    native = load_file(tmp_path / "native" / "consolidated.safetensors")
    assert "layers.0.attention.wq.weight" in native and "tok_embeddings.weight" in native
    assert not torch.equal(native["layers.0.attention.wq.weight"], a["model.layers.0.self_attn.q_proj.weight"])
    params = json.loads((tmp_path / "native" / "params.json").read_text())
    cfg = json.loads((src / "config.json").read_text())
    assert params["dim"] == cfg["hidden_size"] and params["n_kv_heads"] == cfg["num_key_value_heads"]
    assert (tmp_path / "native" / "tokenizer.model.v3").exists()


def test_mistral_to_hf_to_mistral_is_bit_identical(tiny_factory, tmp_path):
    src, _ = tiny_factory("mixtral")
    convert(src, tmp_path / "n1", "mistral")
    convert(tmp_path / "n1", tmp_path / "hf", "hf")
    convert(tmp_path / "hf", tmp_path / "n2", "mistral")
    a, b = load_file(tmp_path / "n1" / "consolidated.safetensors"), load_file(tmp_path / "n2" / "consolidated.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "n1" / "params.json").read_text()) == json.loads((tmp_path / "n2" / "params.json").read_text())


def test_convert_cli_with_dtype(tiny_factory, tmp_path, capsys):
    src, _ = tiny_factory("mistral")
    assert main(["convert", str(src), str(tmp_path / "bf16"), "--to", "mistral", "--dtype", "bfloat16"]) == 0
    t = load_file(tmp_path / "bf16" / "consolidated.safetensors")
    assert all(v.dtype == torch.bfloat16 for v in t.values())
    assert "wrote mistral checkpoint" in capsys.readouterr().out


def test_convert_refuses_a_non_empty_destination(tiny_factory, tmp_path, capsys):
    src, _ = tiny_factory("mistral")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("user data")
    assert main(["convert", str(src), str(tmp_path / "out"), "--to", "hf"]) == 1
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "out" / "keep.txt").read_text() == "user data"


def test_hf_output_is_sharded_with_an_index(tiny_factory, tmp_path, monkeypatch):
    import galerne.weights.export as export
    from galerne import LLM

    monkeypatch.setattr(export, "HF_SHARD_BYTES", 3_000_000)  # force several shards
    src, _ = tiny_factory("mistral")
    convert(src, tmp_path / "sharded", "hf")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((tmp_path / "sharded" / s).exists() for s in shards)
    a, b = LLM(src, device="cpu"), LLM(tmp_path / "sharded", device="cpu")
    ids = list(range(5, 30))
    assert torch.equal(a.score(ids), b.score(ids))
