"""LoRA: a transformation of a built model, its merge, its gradients, and adapters
saved in Mistral's and PEFT's layouts (the latter checked against PEFT itself)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from galerne.errors import ModelLoadError
from galerne.models.attention import NoCacheAttention
from galerne.models.lora import LoRALinear, apply_lora, lora_state_dict, merge_lora
from galerne.weights.adapters import load_adapter, save_adapter
from galerne.weights.loader import load_model

TOKENS = [1, 5, 300, 42, 7777, 12, 900, 31000, 64, 3, 11, 2024]
RANK, ALPHA = 4, 8.0


def score(model, tokens=TOKENS) -> torch.Tensor:
    ids = torch.tensor(tokens)
    hidden = model(ids, torch.arange(len(tokens)), NoCacheAttention([len(tokens)]))
    return model.logits(hidden).float()


def fresh(folder):
    model, _ = load_model(folder, dtype="float32", device="cpu", progress=False)
    return model.eval()


def randomize_lora(model, seed=0, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in lora_state_dict(model).values():
            t.copy_(torch.randn(t.shape, generator=g) * std)


@pytest.fixture(scope="module")
def tiny(tiny_factory):
    return tiny_factory("mistral")[0]


def test_apply_lora_structure_and_zero_init(tiny):
    model = fresh(tiny)
    base_wq = model.layers[0].attention.wq.weight
    sd_before = set(model.state_dict())
    with torch.no_grad():
        ref = score(model)
    apply_lora(model, RANK, ALPHA)
    wq = model.layers[0].attention.wq
    assert isinstance(wq, LoRALinear) and wq.base.weight is base_wq and wq.scaling == ALPHA / RANK
    assert wq.lora_A.weight.shape == (RANK, 64) and wq.lora_B.weight.shape == (base_wq.shape[0], RANK)
    assert type(model.output) is torch.nn.Linear
    # the base weights keep their names; LoRA adds mistral-finetune's names
    sd = model.state_dict()
    assert sd_before <= set(sd) and "layers.0.attention.wq.lora_A.weight" in sd
    assert set(sd) - sd_before == set(lora_state_dict(model))
    assert len(lora_state_dict(model)) == 2 * 7 * model.args.n_layers
    # a state dict from before the swap loads into the LoRA model (base keys only)
    model.load_state_dict(sd, strict=True)
    with torch.no_grad():
        assert torch.equal(score(model), ref)  # B = 0: exactly the base model
        randomize_lora(model)
        assert (score(model) - ref).abs().max() > 1e-3


def test_merge_equals_unmerged(tiny):
    model = apply_lora(fresh(tiny), RANK, ALPHA)
    randomize_lora(model)
    with torch.no_grad():
        unmerged = score(model)
        merge_lora(model)
        merged = score(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert type(model.layers[1].feed_forward.w2) is torch.nn.Linear
    assert (merged - unmerged).abs().max() < 1e-5 * max(1.0, unmerged.abs().max().item())


def test_only_lora_params_train(tiny):
    model = apply_lora(fresh(tiny), RANK, ALPHA, dropout=0.1)
    randomize_lora(model)
    model.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert trainable == {n for n in lora_state_dict(model)}
    logits = score(model)
    torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(TOKENS[1:])).backward()
    for n, p in model.named_parameters():
        if n in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n


def test_peft_layout_matches_peft(tiny, tmp_path):
    peft = pytest.importorskip("peft")
    import transformers

    model = apply_lora(fresh(tiny), RANK, ALPHA)
    randomize_lora(model, seed=1)
    save_adapter(model, tmp_path / "peft", layout="peft", base_model_name_or_path=str(tiny))
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == RANK and cfg["lora_alpha"] == ALPHA
    assert set(cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    names = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in names

    # A fresh transformers model from the same folder: the shared fixture stays untouched.
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    hf = peft.PeftModel.from_pretrained(hf, tmp_path / "peft").eval()
    with torch.no_grad():
        ref = hf(torch.tensor([TOKENS])).logits[0].float()
        ours = score(model)
        base = score(merge_lora(fresh(tiny)))
    assert (ref - base).abs().max() > 1e-3  # the adapter matters
    assert (ours - ref).abs().max() < 1e-4

    # and back: the PEFT files load into a fresh galerne LoRA model, identical tensors
    other = apply_lora(fresh(tiny), RANK, 2 * ALPHA)
    assert load_adapter(other, tmp_path / "peft") == "peft"
    assert other.layers[0].attention.wq.scaling == ALPHA / RANK
    for (n, a), (m, b) in zip(lora_state_dict(model).items(), lora_state_dict(other).items()):
        assert n == m and torch.equal(a, b), n


def test_mistral_layout_round_trip(tiny, tmp_path):
    model = apply_lora(fresh(tiny), RANK, ALPHA)
    randomize_lora(model, seed=2)
    path = save_adapter(model, tmp_path, layout="mistral")
    assert path.name == "lora.safetensors"
    with safe_open(str(path), framework="pt") as f:
        assert "layers.0.attention.wq.lora_A.weight" in set(f.keys())
        assert f.metadata()["r"] == str(RANK)
    other = apply_lora(fresh(tiny), RANK, ALPHA)
    assert load_adapter(other, tmp_path) == "mistral"
    a, b = lora_state_dict(model), lora_state_dict(other)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        assert torch.equal(score(model), score(other))


def test_bad_adapters_raise(tiny, tmp_path):
    model = apply_lora(fresh(tiny), RANK, ALPHA)
    tensors = {k: v.clone() for k, v in lora_state_dict(model).items()}
    bad = "layers.1.feed_forward.w2.lora_B.weight"
    tensors[bad] = torch.zeros(7, RANK)
    save_file(tensors, str(tmp_path / "lora.safetensors"))
    with pytest.raises(ModelLoadError, match="lora.safetensors") as e:
        load_adapter(model, tmp_path)
    assert e.value.tensor == bad and bad in str(e.value)

    del tensors[bad]
    save_file(tensors, str(tmp_path / "lora.safetensors"))
    with pytest.raises(ModelLoadError) as e:
        load_adapter(model, tmp_path)
    assert e.value.tensor == bad  # missing

    with pytest.raises(ModelLoadError, match="apply_lora"):
        load_adapter(fresh(tiny), tmp_path)

    # PEFT layout, wrong shape on a rotary-permuted tensor
    save_adapter(model, tmp_path / "peft", layout="peft")
    f = tmp_path / "peft" / "adapter_model.safetensors"
    t = load_file(f)
    name = "base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"
    t[name] = torch.zeros(3, RANK)
    save_file(t, str(f))
    with pytest.raises(ModelLoadError, match="adapter_model.safetensors") as e:
        load_adapter(model, tmp_path / "peft")
    assert e.value.tensor == name
