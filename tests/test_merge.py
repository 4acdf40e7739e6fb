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
