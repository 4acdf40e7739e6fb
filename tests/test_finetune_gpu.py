"""Fine-tuning on CUDA (bf16 autocast, FlashAttention's varlen kernel for packed
documents, the fused chunked loss) trains like the CPU's float32 path: the same losses
within bf16 tolerance, on a tiny random model. Skipped without CUDA."""

from __future__ import annotations

import json

import pytest
import torch

from galerne.finetune.config import load_config
from galerne.finetune.trainer import train
from galerne.models.attention import NoCacheAttention, _varlen_attn

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CAPITALS = [("Bretagne", "Rennes"), ("Normandie", "Rouen"), ("Alsace", "Strasbourg"), ("Provence", "Marseille"),
            ("Corse", "Ajaccio"), ("Savoie", "Chambéry"), ("Bourgogne", "Dijon"), ("Lorraine", "Metz")]


def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_cuda_bf16_losses_equal_cpu_fp32(tiny_factory, tmp_path, monkeypatch, lora):
    folder = tiny_factory("mistral-window")[0]  # a sliding window shorter than seq_len
    lines = [json.dumps({"messages": [{"role": "user", "content": f"Capital of {r}?"},
                                      {"role": "assistant", "content": f"{c}."}]}) for r, c in CAPITALS]
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    picked: list[str] = []
    pick = NoCacheAttention._pick

    def spy(self, q, v):
        kernel = pick(self, q, v)
        if q.is_cuda:
            picked.append(kernel)
        return kernel

    monkeypatch.setattr(NoCacheAttention, "_pick", spy)
    runs = {}
    for device in ("cpu", "cuda"):
        cfg = load_config(None, {
            "model_id_or_path": str(folder), "run_dir": str(tmp_path / device), "device": device,
            "data": {"instruct_data": str(tmp_path / "train.jsonl")}, "seq_len": 64, "batch_size": 2,
            "max_steps": 4, "lora": {"enable": lora, "rank": 4}, "optim": {"lr": 5e-3 if lora else 1e-3},
            "dtype": "float32" if device == "cpu" else "auto", "save_adapters": False})
        train(cfg)
        runs[device] = losses(tmp_path / device)
    assert len(runs["cpu"]) == 4
    # bf16 matmuls: the first loss (same weights) within 1%; Adam's sign-like first updates
    # let the rounding grow a little over the next steps.
    assert runs["cuda"][0] == pytest.approx(runs["cpu"][0], rel=1e-2)
    assert runs["cuda"] == pytest.approx(runs["cpu"], rel=3e-2)
    # packed documents on CUDA: FlashAttention's varlen kernel (or per-document SDPA), never a (T, T) mask
    assert picked and "dense" not in picked
    fn, params = _varlen_attn()
    if fn is not None and "enable_gqa" in params:
        assert set(picked) == {"varlen"}
