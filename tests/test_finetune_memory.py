"""checkpoint: auto: the activation estimate against what autograd really keeps, and the
plan's choice for given memory sizes."""

from __future__ import annotations

import pytest
import torch

from galerne.finetune.memory import GB, block_bytes_per_token, plan_checkpointing
from galerne.models.args import ModelArgs
from galerne.models.attention import NoCacheAttention
from galerne.models.lora import apply_lora
from galerne.models.transformer import Transformer


def saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves for the backward while ``fn`` runs."""
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lora", [0, 8])
def test_block_estimate_matches_what_autograd_saves(lora, dtype):
    args = ModelArgs(dim=256, n_layers=2, n_heads=8, n_kv_heads=2, head_dim=32, hidden_dim=512, vocab_size=300)
    torch.manual_seed(0)
    model = Transformer(args).to(dtype)
    if lora:
        apply_lora(model, lora, 2 * lora)
    else:
        model.requires_grad_(True)
    T = 512
    backend = NoCacheAttention([T])
    x = torch.randn(T, args.dim, dtype=dtype, requires_grad=True)
    from galerne.models.layers import model_rope

    rope = model_rope(args, backend.positions, x.dtype)
    measured = saved_bytes(lambda: model.layers[0](x, rope, backend))
    estimate = block_bytes_per_token(args, dtype.itemsize, lora, 7 if lora else 0) * T
    # weights saved by the matmuls are not activations: leave them out of the measure
    weights = sum(p.numel() * p.element_size() for p in model.layers[0].parameters())
    assert estimate == pytest.approx(measured - weights, rel=0.1)


def test_mistral_7b_bf16_estimate():
    args = ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, hidden_dim=14336, vocab_size=32768)
    per_token = block_bytes_per_token(args, 2, 16)
    assert 190_000 < per_token < 200_000  # the module docstring's worked example
    assert per_token * 4096 * 32 / GB == pytest.approx(25.5, abs=0.2)


def test_plan_none_when_everything_fits():
    plan = plan_checkpointing(n_layers=32, block_bytes=GB, input_bytes=GB // 100, fixed_bytes=2 * GB,
                              available_bytes=100 * GB)
    assert plan.blocks == 0 and "fit" in plan.reason


def test_plan_the_fewest_blocks_that_fit():
    # 32 blocks of 0.8 GB, 32 MB inputs; 24 GB with 14.5 GB held and 0.5 GB fixed: 9 GB
    # (less 10%) for activations.
    block, inp = int(0.8 * GB), int(0.032 * GB)
    plan = plan_checkpointing(n_layers=32, block_bytes=block, input_bytes=inp, fixed_bytes=int(0.5 * GB),
                              available_bytes=int(9.5 * GB))
    budget = 9.5 * GB * 0.9 - 0.5 * GB
    k = plan.blocks

    def need(k):
        return (32 - k) * block + k * inp + (block if k else 0)

    assert need(k) <= budget < need(k - 1)
    assert 0 < k < 32 and f"checkpointing {k} blocks" in plan.reason


def test_plan_all_blocks_when_short():
    plan = plan_checkpointing(n_layers=4, block_bytes=GB, input_bytes=GB // 10, fixed_bytes=0, available_bytes=GB)
    assert plan.blocks == 4 and "NOT fit" in plan.reason


def test_checkpoint_setting_values(tmp_path):
    from galerne.errors import ConfigError
    from galerne.finetune.config import load_config

    yaml = tmp_path / "c.yaml"
    for text, want in (("checkpoint: true", "true"), ("checkpoint: false", "false"), ("checkpoint: auto", "auto"), ("", "auto")):
        yaml.write_text(text + "\n")
        assert load_config(yaml).checkpoint == want
    assert load_config(None, {"checkpoint": "false"}).checkpoint == "false"
    yaml.write_text("checkpoint: sometimes\n")
    with pytest.raises(ConfigError, match="checkpoint: must be one of auto, true, false"):
        load_config(yaml)
    with pytest.raises(ConfigError, match="max_memory_gb"):
        load_config(None, {"max_memory_gb": "-1"})


@pytest.mark.parametrize("setting, limit_gb, want", [("true", 0, 2), ("false", 0, 0), ("auto", 0, 0), ("auto", 1e-3, 2)])
def test_trainer_checkpoints_what_the_setting_or_the_memory_says(tiny_factory, setting, limit_gb, want, caplog):
    """auto: none with the machine's free memory (a tiny model fits); every block under a
    1 MB limit (the loaded model alone exceeds it)."""
    import logging

    from galerne.finetune.config import load_config
    from galerne.finetune.trainer import build_model

    cfg = load_config(None, {"model_id_or_path": str(tiny_factory("mistral")[0]), "checkpoint": setting,
                             "max_memory_gb": str(limit_gb), "seq_len": "64", "device": "cpu"})
    with caplog.at_level(logging.INFO, logger="galerne.finetune.trainer"):
        model, _ = build_model(cfg, tiny_factory("mistral")[0], torch.device("cpu"))
    assert len(model.layers) == 2
    assert sum(getattr(b, "_galerne_checkpointed", False) for b in model.layers) == want
    if setting == "auto":
        assert f"checkpointing {want} of 2 blocks on cpu" in caplog.text
