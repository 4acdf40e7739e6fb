"""galerne finetune under torchrun: 2 CPU processes (gloo; DDP for LoRA, FSDP2 for full
weights) train exactly like 1 process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from galerne.finetune.config import load_config
from galerne.finetune.trainer import train

pytestmark = pytest.mark.slow  # torchrun starts 2 processes that each import torch and load the model

CAPITALS = [("Bretagne", "Rennes"), ("Normandie", "Rouen"), ("Alsace", "Strasbourg"), ("Provence", "Marseille"),
            ("Corse", "Ajaccio"), ("Savoie", "Chambéry"), ("Bourgogne", "Dijon"), ("Lorraine", "Metz")]


def conversation(region: str, city: str) -> str:
    return json.dumps({"messages": [{"role": "user", "content": f"Capital of {region}?"},
                                    {"role": "assistant", "content": f"{city}."}]})


def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r], [r["eval_loss"] for r in rows if "eval_loss" in r]


def grad_norms(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["grad_norm"] for r in rows if "grad_norm" in r]


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_two_processes_equal_one(tiny_factory, tmp_path, lora):
    tiny = tiny_factory("mistral")[0]
    (tmp_path / "train.jsonl").write_text("".join(conversation(r, c) + "\n" for r, c in CAPITALS[:6]))
    (tmp_path / "text.jsonl").write_text("".join(json.dumps({"text": f"{c}, capitale de {r}."}) + "\n" for r, c in CAPITALS))
    (tmp_path / "eval.jsonl").write_text("".join(conversation(r, c) + "\n" for r, c in CAPITALS[6:]))
    yaml = tmp_path / "config.yaml"
    yaml.write_text(f"""\
model_id_or_path: {tiny}
data:
  instruct_data: {tmp_path / 'train.jsonl'}
  data: {tmp_path / 'text.jsonl'}:0.5
  eval_instruct_data: {tmp_path / 'eval.jsonl'}
lora:
  enable: {str(lora).lower()}
  rank: 4
optim:
  lr: {0.01 if lora else 0.001}
seq_len: 32
batch_size: 2
max_steps: 3
ckpt_freq: 3
checkpoint: {str(not lora).lower()}
""")  # full weights: FSDP2 units recompute their checkpointed activations after the all-gather
    # One process, global batch = 2 sequences x 2 micro-batches.
    one = train(load_config(yaml, {"run_dir": str(tmp_path / "one"), "num_microbatches": "2"}))
    # Two processes, 2 sequences x 1 micro-batch each.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "galerne.cli", "finetune", str(yaml), "--run-dir", str(tmp_path / "two"), "--num-microbatches", "1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("trained 3 steps") == 1  # process 0 reports

    two_losses, two_eval = losses(tmp_path / "two")
    one_losses, one_eval = losses(tmp_path / "one")
    assert one_losses == pytest.approx(one.losses, abs=0)
    assert two_losses == pytest.approx(one_losses, abs=1e-4)
    assert two_eval == pytest.approx(one_eval, abs=1e-4)
    # gradients summed over processes, not averaged (Adam alone would hide a factor)
    assert grad_norms(tmp_path / "two") == pytest.approx(grad_norms(tmp_path / "one"), rel=1e-4)
    ckpts = sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir())
    assert ckpts == ["checkpoint_000003"]
    state = json.loads((tmp_path / "two" / "checkpoints" / "checkpoint_000003" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["sequences"] == 12
    assert state["fsdp"] is (not lora)  # full weights: sharded with FSDP2; LoRA: DDP
    assert (tmp_path / "two" / ("adapter" if lora else "model")).is_dir()
    if not lora:  # the shards gathered into the base's layout: the weights of one process
        from safetensors.torch import load_file

        for sub in ("model", "checkpoints/checkpoint_000003"):
            a, b = (sorted((tmp_path / run / sub).glob("*.safetensors")) for run in ("one", "two"))
            assert [f.name for f in a] == [f.name for f in b] and a
            for fa, fb in zip(a, b):
                ta, tb = load_file(fa), load_file(fb)
                assert ta.keys() == tb.keys()
                for k in ta:
                    torch.testing.assert_close(tb[k].float(), ta[k].float(), rtol=1e-3, atol=1e-5, msg=k)


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_two_processes_resume_exactly(tiny_factory, tmp_path, lora):
    """Per-process RNG states (dropout), the data position and (full weights, FSDP2) the
    sharded weights and AdamW state survive a resume under torchrun."""
    tiny = tiny_factory("mistral")[0]
    (tmp_path / "train.jsonl").write_text("".join(conversation(r, c) + "\n" for r, c in CAPITALS))
    yaml = tmp_path / "config.yaml"
    adapter = "lora:\n  rank: 4\n  dropout: 0.1\noptim:\n  lr: 0.01\n" if lora else "lora:\n  enable: false\noptim:\n  lr: 0.001\n"
    yaml.write_text(f"model_id_or_path: {tiny}\nrun_dir: {tmp_path / 'run'}\ndata:\n  instruct_data: {tmp_path / 'train.jsonl'}\n"
                    f"{adapter}seq_len: 32\nmax_steps: 4\nckpt_freq: 2\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "galerne.cli", "finetune", str(yaml)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    whole, _ = losses(tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoints" / "checkpoint_000002"
    proc = subprocess.run([*cmd, "--resume", str(ckpt)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed, _ = losses(tmp_path / "run")  # lines after step 2 were replaced by the resumed run's
    assert len(whole) == 4 and resumed == pytest.approx(whole, abs=1e-6)
