"""Bad model folders get one clear message naming the file and tensor, and the
CLI exits non-zero without a traceback."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from galerne import LLM
from galerne.cli import main
from galerne.errors import ConfigError, ModelLoadError, TokenizerError


@pytest.fixture
def folder(tiny_factory, tmp_path):
    src, _ = tiny_factory("mistral")
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


def _edit_weights(folder, fn):
    path = folder / "model.safetensors"
    sd = load_file(str(path))
    fn(sd)
    save_file(sd, str(path), metadata={"format": "pt"})


def test_no_weights(folder):
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"model.*no weights found"):
        LLM(folder)


def test_not_a_model_folder(tmp_path):
    with pytest.raises(ModelLoadError, match=r"no params.json \(Mistral-native\) or config.json"):
        LLM(tmp_path)


def test_missing_tensor(folder):
    _edit_weights(folder, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ModelLoadError, match=r"missing tensor\(s\) in the checkpoint: layers\.1\.feed_forward\.w3\.weight"):
        LLM(folder)


def test_unexpected_tensor(folder):
    _edit_weights(folder, lambda sd: sd.__setitem__("model.layers.0.self_attn.q_norm.weight", torch.ones(4)))
    with pytest.raises(ModelLoadError) as e:
        LLM(folder)
    assert "model.safetensors" in str(e.value) and "model.layers.0.self_attn.q_norm.weight" in str(e.value)


def test_tensor_of_a_layer_the_config_lacks(folder):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_hidden_layers"] = 1
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"model\.layers\.1\..*the config has no such weight"):
        LLM(folder)


def test_shape_disagrees_with_config(folder):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError) as e:
        LLM(folder)
    msg = str(e.value)
    assert "model.safetensors" in msg and "model.layers.0.mlp." in msg and "disagrees with the config (config.json)" in msg
    assert ("(64, 128)" in msg and "(64, 96)" in msg) or ("(128, 64)" in msg and "(96, 64)" in msg)


def test_unknown_architecture(folder):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    cfg["model_type"] = "gpt2"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"config.json: unknown architecture 'GPT2LMHeadModel'"):
        LLM(folder)


def test_unreadable_config(folder):
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"config.json: not valid JSON"):
        LLM(folder)


def test_corrupt_safetensors(folder):
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ModelLoadError, match=r"model.safetensors: cannot read safetensors file"):
        LLM(folder)


def test_unreadable_tokenizer(folder):
    (folder / "tokenizer.model.v3").write_bytes(b"this is not a sentencepiece model")
    with pytest.raises(TokenizerError, match=r"tokenizer.model.v3"):
        LLM(folder)


def test_pickle_loads_only_with_weights_only(folder, tiny_factory):
    sd = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save(sd, folder / "pytorch_model.bin")  # plain tensors: weights_only=True loads it
    ids = [1, 2, 3, 500, 7000, 31000]
    with torch.no_grad():  # the same weights as transformers' model saved them
        expected = tiny_factory("mistral")[1](torch.tensor([ids])).logits[0].float()
    assert (LLM(folder).score(ids) - expected).abs().max().item() < 1e-4


class Evil:  # an object whose unpickling would need arbitrary code
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickle_needing_code_is_refused(folder, capsys):
    (folder / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": Evil()}, folder / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match=r"pytorch_model.bin: refusing this pickle checkpoint"):
        LLM(folder)
    assert "pwned" not in capsys.readouterr().out


def test_native_shape_error_names_file_and_tensor(tiny_factory, tmp_path):
    from galerne.weights.export import convert

    src, _ = tiny_factory("mistral")
    convert(src, tmp_path / "n", "mistral")
    params = json.loads((tmp_path / "n" / "params.json").read_text())
    params["hidden_dim"] = 100
    (tmp_path / "n" / "params.json").write_text(json.dumps(params))
    with pytest.raises(ModelLoadError, match=r"consolidated.safetensors: tensor 'layers.0.feed_forward.w1.weight': shape"):
        LLM(tmp_path / "n")


def test_offline_hub_id_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    import importlib

    import huggingface_hub.constants

    importlib.reload(huggingface_hub.constants)
    try:
        with pytest.raises(ModelLoadError, match=r"not a local folder and the Hugging Face Hub cannot be reached"):
            LLM("mistralai/Mistral-7B-Instruct-v0.3")
    finally:  # the constants were read from this test's environment: read them again from the real one
        monkeypatch.undo()
        importlib.reload(huggingface_hub.constants)


def test_cli_error_is_one_line_and_non_zero(folder, capsys):
    (folder / "model.safetensors").unlink()
    code = main(["generate", str(folder), "--prompt", "hi"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("galerne: error: ") and "no weights found" in err and "Traceback" not in err
