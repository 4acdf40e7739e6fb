"""galerne merge: the merged checkpoint scores like the base model with its adapter."""

from __future__ import annotations

import pytest
import torch

from galerne import LLM
from galerne.cli import main
from galerne.models.lora import apply_lora, lora_modules
from galerne.weights.adapters import adapter_spec, save_adapter


@pytest.mark.parametrize("adapter_layout, to", [("peft", "mistral"), ("mistral", "hf")])
def test_merged_checkpoint_equals_base_plus_adapter(tiny_factory, tmp_path, adapter_layout, to, capsys):
    folder, _ = tiny_factory("mistral")
    llm = LLM(folder, device="cpu")
    torch.manual_seed(0)
    apply_lora(llm.model, rank=4, alpha=8, targets=("wq", "wk", "wo", "w2"))
    with torch.no_grad():
        for m in lora_modules(llm.model).values():
            m.lora_B.weight.normal_(std=0.05)  # a trained-looking, non-zero update
    ids = list(range(10, 40))
    expected = llm.score(ids)
    save_adapter(llm.model, tmp_path / "adapter", layout=adapter_layout)
    assert adapter_spec(tmp_path / "adapter") == (4, ("w2", "wk", "wo", "wq"))

    assert main(["merge", str(folder), str(tmp_path / "adapter"), str(tmp_path / "merged"), "--to", to]) == 0
    assert "merged" in capsys.readouterr().out
    merged = LLM(tmp_path / "merged", device="cpu")
    assert (merged.score(ids) - expected).abs().max().item() < 1e-4
    assert (tmp_path / "merged" / "tokenizer.model.v3").exists()


def test_merge_refuses_a_missing_adapter(tiny_factory, tmp_path, capsys):
    folder, _ = tiny_factory("mistral")
    assert main(["merge", str(folder), str(tmp_path / "nothing"), str(tmp_path / "out")]) == 1
    assert "galerne: error:" in capsys.readouterr().err


def _trained_adapter(folder, path, layout):
    llm = LLM(folder, device="cpu")
    torch.manual_seed(1)
    apply_lora(llm.model, rank=4, alpha=8, targets=("wq", "wv", "w1", "w3"))
    with torch.no_grad():
        for m in lora_modules(llm.model).values():
            m.lora_B.weight.normal_(std=0.05)
    save_adapter(llm.model, path, layout=layout)
    return llm


@pytest.mark.parametrize("layout", ["peft", "mistral"])
def test_llm_with_adapter_scores_and_generates_like_the_trained_model(tiny_factory, tmp_path, layout):
    folder, _ = tiny_factory("mistral")
    trained = _trained_adapter(folder, tmp_path / "a", layout)
    ids = list(range(5, 30))
    served = LLM(folder, device="cpu", adapter=tmp_path / "a")
    assert (served.score(ids) - trained.score(ids)).abs().max().item() < 1e-4
    plain = LLM(folder, device="cpu")
    assert (plain.score(ids) - trained.score(ids)).abs().max().item() > 1e-3  # the adapter changes something
    from galerne import SamplingParams

    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    assert served.generate([ids], greedy)[0].token_ids == trained.generate([ids], greedy)[0].token_ids


def test_cli_generate_with_adapter(tiny_factory, tmp_path, capsys):
    folder, _ = tiny_factory("mistral")
    trained = _trained_adapter(folder, tmp_path / "a", "peft")
    from galerne import SamplingParams

    want = trained.generate(["Hello"], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0].text
    assert main(["generate", str(folder), "--adapter", str(tmp_path / "a"), "--prompt", "Hello",
                 "--max-tokens", "8", "--temperature", "0", "--ignore-eos", "--device", "cpu"]) == 0
    assert capsys.readouterr().out == want + "\n"


def test_adapter_of_another_shape_is_refused(tiny_factory, tmp_path, capsys):
    folder, _ = tiny_factory("mistral")
    other, _ = tiny_factory("head-dim")
    _trained_adapter(other, tmp_path / "a", "mistral")
    assert main(["generate", str(folder), "--adapter", str(tmp_path / "a"), "--prompt", "x", "--max-tokens", "2"]) == 1
    err = capsys.readouterr().err
    assert "galerne: error:" in err and "lora" in err.lower()
