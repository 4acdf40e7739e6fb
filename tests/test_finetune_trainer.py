"""galerne finetune's trainer on a tiny model: data checks, loss, eval, metrics, checkpoints,
exact resume, Ctrl-C, outputs (LoRA adapters in both layouts, or a full model)."""

from __future__ import annotations

import json
import math
import os
import signal
from collections import Counter

import pytest
import torch

from galerne.cli import main
from galerne.errors import ConfigError
from galerne.finetune.config import load_config
from galerne.finetune.data import DataError, Sample, encode_sample, pack
from galerne.finetune.train import batch_loss
from galerne.finetune.trainer import checkpoint_dirs, sample_stream, train
from galerne.finetune.validate import validate_files
from galerne.models.lora import apply_lora, lora_state_dict
from galerne.tokenizer import Tokenizer
from galerne.weights.adapters import load_adapter
from galerne.weights.loader import load_model

CAPITALS = [("Bretagne", "Rennes"), ("Normandie", "Rouen"), ("Alsace", "Strasbourg"), ("Provence", "Marseille"),
            ("Corse", "Ajaccio"), ("Savoie", "Chambéry"), ("Bourgogne", "Dijon"), ("Auvergne", "Clermont-Ferrand")]


def conversation(region: str, city: str) -> str:
    return json.dumps({"messages": [{"role": "user", "content": f"What is the capital of {region}?"},
                                    {"role": "assistant", "content": f"{city}."}]})


@pytest.fixture(scope="module")
def tiny(tiny_factory):
    return tiny_factory("mistral")[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    (root / "train.jsonl").write_text("".join(conversation(r, c) + "\n" for r, c in CAPITALS[:6]))
    (root / "more.jsonl").write_text("".join(json.dumps({"text": f"{c} est la capitale de {r}."}) + "\n" for r, c in CAPITALS))
    (root / "eval.jsonl").write_text("".join(conversation(r, c) + "\n" for r, c in CAPITALS[6:]))
    return root


def make_config(tiny, files, run_dir, **over):
    base = {
        "model_id_or_path": str(tiny), "run_dir": str(run_dir),
        "data": {"instruct_data": str(files / "train.jsonl"), "eval_instruct_data": str(files / "eval.jsonl")},
        "seq_len": 64, "max_steps": 6, "lora": {"rank": 4}, "optim": {"lr": 1e-2, "pct_start": 0.2},
    }
    for k, v in over.items():
        if isinstance(v, dict):
            base.setdefault(k, {}).update(v)
        else:
            base[k] = v
    return load_config(None, base)


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_invalid_data_is_refused_with_file_and_line(tiny, data, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(conversation("Bretagne", "Rennes") + "\n{oops\n"
                   + json.dumps({"messages": [{"role": "user", "content": "Hi"}]}) + "\n")
    cfg = make_config(tiny, data, tmp_path / "run", data={"instruct_data": f"{data / 'train.jsonl'},{bad}:2"})
    expected = [str(p) for p in validate_files([bad], Tokenizer.from_path(tiny), 64).problems]
    assert expected == [f"{bad}:2: bad JSON: Expecting property name enclosed in double quotes (column 2)",
                        f"{bad}:3: messages[0].role: the last message is from the user, not the assistant "
                        "(nothing to train on)"]
    with pytest.raises(DataError) as e:
        train(cfg)
    for line in expected:  # the same messages as `galerne data validate`
        assert line in str(e.value)
    assert "skip_bad_lines" in str(e.value)
    assert not (tmp_path / "run").exists()  # refused before anything is written

    yaml = tmp_path / "c.yaml"
    yaml.write_text(f"model_id_or_path: {tiny}\nrun_dir: {tmp_path / 'run'}\ndata:\n  instruct_data: {bad}\n")
    assert main(["finetune", str(yaml), "--seq-len", "64"]) == 1
    err = capsys.readouterr().err
    assert "galerne: error: 2 invalid line(s)" in err and expected[0] in err and "Traceback" not in err


def test_skip_bad_lines_counts_them(tiny, data, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(conversation("Bretagne", "Rennes") + "\nnot json\n\n" + conversation("Corse", "Ajaccio") + "\n")
    cfg = make_config(tiny, data, tmp_path / "run", max_steps=1, skip_bad_lines=True,
                      data={"instruct_data": str(bad), "eval_instruct_data": ""})
    result = train(cfg)
    assert result.skipped_lines == 2 and result.step == 1


def test_sources_are_mixed_by_weight_with_a_seeded_sampler():
    a = [Sample([1, i], [0, 1]) for i in range(5)]
    b = [Sample([2, i], [0, 1]) for i in range(7)]

    def draw(seed, n=4000):
        stream = sample_stream([(3.0, a), (1.0, b)], seed, shuffle=True)
        return [next(stream).tokens[0] for _ in range(n)]

    counts = Counter(draw(0))
    assert 0.72 < counts[1] / 4000 < 0.78  # 3:1
    assert draw(0) == draw(0) and draw(0) != draw(1)
    # each source goes through all its samples before repeating one (epochs)
    first = [s.tokens[1] for s in (next(it) for it in [sample_stream([(1.0, a)], 5, True)] * 5)]
    assert sorted(first) == list(range(5))


def test_loss_falls_eval_metrics_and_adapters(tiny, data, tmp_path):
    run_dir = tmp_path / "run"
    cfg = make_config(tiny, data, run_dir, max_steps=8, eval_freq=4, batch_size=2, log_freq=2,
                      optim={"lr": 3e-2}, data={"data": f"{data / 'more.jsonl'}:0.5"})
    result = train(cfg, progress_bar=False)
    assert len(result.losses) == 8 and result.losses[-1] < 0.7 * result.losses[0], result.losses

    rows = metrics(run_dir)
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in train_rows] == [2, 4, 6, 8] and [r["step"] for r in eval_rows] == [4, 8]
    for r in train_rows:
        assert set(r) == {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed"}
        assert r["tokens"] == r["step"] * 2 * 64 and r["tokens_per_s"] > 0
        assert r["loss"] == pytest.approx(result.losses[r["step"] - 1])
    for r in eval_rows:
        assert r["eval_perplexity"] == pytest.approx(math.exp(r["eval_loss"]), rel=1e-12)
    assert eval_rows[-1]["eval_loss"] < eval_rows[0]["eval_loss"]
    assert result.eval == {k: eval_rows[-1][k] for k in ("eval_loss", "eval_perplexity")}

    # Both adapter layouts load back into the same weights; with them, the eval loss on the
    # eval file (and not on the training data) is the one the run reported.
    adapters = []
    for path in (run_dir / "adapter", run_dir / "adapter" / "lora.safetensors"):
        model, _ = load_model(tiny, dtype="float32", device="cpu", progress=False)
        apply_lora(model, rank=4, alpha=8.0)
        layout = load_adapter(model, path)
        adapters.append((layout, model))
    assert [layout for layout, _ in adapters] == ["peft", "mistral"]
    (_, peft_model), (_, mistral_model) = adapters
    for name, t in lora_state_dict(peft_model).items():
        torch.testing.assert_close(t, lora_state_dict(mistral_model)[name], rtol=0, atol=0)
    tokenizer = Tokenizer.from_path(tiny)
    samples = [encode_sample(tokenizer, json.loads(line)) for line in (data / "eval.jsonl").read_text().splitlines()]
    with torch.no_grad():
        parts = [batch_loss(mistral_model.eval(), b) for b in pack(samples, 64, pad_id=tokenizer.eos_id)]
    eval_loss = sum(float(l) for l, _ in parts) / sum(float(w) for _, w in parts)
    assert eval_loss == pytest.approx(result.eval["eval_loss"], rel=1e-5)
    with open(run_dir / "adapter" / "adapter_config.json") as f:
        assert json.load(f)["r"] == 4


def test_resume_equals_an_uninterrupted_run(tiny, data, tmp_path):
    # Dropout (RNG), two weighted shuffled sources (data position), accumulation: all restored.
    over = dict(max_steps=6, ckpt_freq=3, batch_size=2, num_microbatches=2, lora={"rank": 4, "dropout": 0.1},
                data={"data": f"{data / 'more.jsonl'}:0.5", "eval_instruct_data": ""}, num_ckpt_keep=1)
    full = train(make_config(tiny, data, tmp_path / "full", **over))

    def stop_at_3(row):
        if row["step"] == 3:
            raise KeyboardInterrupt  # as Ctrl-C would, from anywhere

    run_dir = tmp_path / "split"
    first = train(make_config(tiny, data, run_dir, **over), on_log=stop_at_3)
    assert first.interrupted and first.step == 3 and first.output is None
    assert [p.name for p in checkpoint_dirs(run_dir)] == ["checkpoint_000003"]
    with pytest.raises(ConfigError, match="already holds a run"):
        train(make_config(tiny, data, run_dir, **over))
    rest = train(make_config(tiny, data, run_dir, **over), resume=True)
    assert rest.step == 6 and len(rest.losses) == 3
    torch.testing.assert_close(torch.tensor(first.losses + rest.losses), torch.tensor(full.losses), rtol=0, atol=1e-6)
    assert [r["loss"] for r in metrics(run_dir)] == pytest.approx(full.losses, abs=1e-6)
    assert [p.name for p in checkpoint_dirs(run_dir)] == ["checkpoint_000006"]  # num_ckpt_keep
    assert not list((run_dir / "checkpoints").glob(".tmp*"))

    # An explicit checkpoint folder; the run's data keys must not change.
    ckpt = checkpoint_dirs(tmp_path / "full")[-1]
    assert ckpt.name == "checkpoint_000006"
    with pytest.raises(ConfigError, match="lora.rank"):
        train(make_config(tiny, data, tmp_path / "full", **{**over, "lora": {"rank": 8}}), resume=ckpt)
    again = train(make_config(tiny, data, tmp_path / "full", **over), resume=ckpt)
    assert again.step == 6 and again.losses == []


def test_sigint_saves_a_checkpoint_of_the_last_step(tiny, data, tmp_path):
    def ctrl_c_at_2(row):
        if row["step"] == 2:
            os.kill(os.getpid(), signal.SIGINT)  # the handler asks the run to stop after this step

    run_dir = tmp_path / "run"
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a background job
    result = train(make_config(tiny, data, run_dir, max_steps=5), on_log=ctrl_c_at_2)
    assert result.interrupted and result.step == 2
    assert result.checkpoint == run_dir / "checkpoints" / "checkpoint_000002"
    state = json.loads((result.checkpoint / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["sequences"] == 2
    assert sorted(p.name for p in result.checkpoint.iterdir()) == [
        "config.yaml", "lora.safetensors", "optimizer.pt", "trainer_state.json", "trainer_state.pt"]
    assert not (run_dir / "adapter").exists()
    assert signal.getsignal(signal.SIGINT) is before  # restored


def test_full_weight_training(tiny, data, tmp_path):
    import transformers

    run_dir = tmp_path / "run"
    over = dict(max_steps=2, ckpt_freq=2, lora={"enable": False}, optim={"lr": 1e-3}, data={"eval_instruct_data": ""})
    result = train(make_config(tiny, data, run_dir, **over))
    assert result.output == run_dir / "model" and not (run_dir / "adapter").exists()
    base, _ = load_model(tiny, dtype="float32", device="cpu", progress=False)
    tuned, ckpt = load_model(run_dir / "model", dtype="float32", device="cpu", progress=False)
    assert ckpt.layout == "hf"  # the base's layout
    base_params = dict(base.named_parameters())
    for name, p in tuned.named_parameters():
        assert not torch.equal(p, base_params[name]), f"{name} was not trained"
    # transformers loads it too, with the same weights (its q/k rows permuted back).
    hf = transformers.AutoModelForCausalLM.from_pretrained(run_dir / "model")
    torch.testing.assert_close(hf.model.embed_tokens.weight, tuned.tok_embeddings.weight)
    assert (run_dir / "model" / "tokenizer.model.v3").is_file()
    # the checkpoint holds the full weights too, as a model folder
    ckpt_model, _ = load_model(result.checkpoint, dtype="float32", device="cpu", progress=False)
    for name, p in ckpt_model.named_parameters():
        torch.testing.assert_close(p, dict(tuned.named_parameters())[name])

    # resume restores the full weights (and the optimizer) too
    def stop_at_1(row):
        if row["step"] == 1:
            raise KeyboardInterrupt

    first = train(make_config(tiny, data, tmp_path / "split", **over), on_log=stop_at_1)
    assert (first.checkpoint / "consolidated.safetensors").is_file()
    rest = train(make_config(tiny, data, tmp_path / "split", **over), resume=True)
    assert first.losses + rest.losses == pytest.approx(result.losses, abs=1e-6)


def test_activation_checkpointing_changes_nothing_but_memory(tiny, data, tmp_path):
    runs = [train(make_config(tiny, data, tmp_path / str(on), max_steps=2, checkpoint=on, lora={"rank": 4, "dropout": 0.1},
                              data={"eval_instruct_data": ""}, save_adapters=False)) for on in (True, False)]
    assert runs[0].losses == pytest.approx(runs[1].losses, abs=1e-6)
    assert runs[0].output is None and not (tmp_path / "True" / "adapter").exists()


def test_ctrl_c_on_the_command(tiny, data, tmp_path):
    import subprocess
    import sys
    import time

    yaml = tmp_path / "config.yaml"
    run_dir = tmp_path / "run"
    yaml.write_text(f"model_id_or_path: {tiny}\nrun_dir: {run_dir}\nseq_len: 64\nmax_steps: 100000\n"
                    f"data:\n  instruct_data: {data / 'train.jsonl'}\nlora:\n  rank: 4\n")
    proc = subprocess.Popen([sys.executable, "-m", "galerne.cli", "finetune", str(yaml)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ((run_dir / "metrics.jsonl").is_file() and (run_dir / "metrics.jsonl").read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    steps = [r["step"] for r in metrics(run_dir)]
    ckpt = run_dir / "checkpoints" / f"checkpoint_{steps[-1]:06d}"
    assert ckpt.is_dir() and f"interrupted after step {steps[-1]}" in err and "Traceback" not in err
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == steps[-1]


def test_cuda_where_there_is_none_is_a_one_line_error(tiny, data, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    yaml = tmp_path / "c.yaml"
    run_dir = tmp_path / "run"
    yaml.write_text(f"model_id_or_path: {tiny}\nrun_dir: {run_dir}\ndevice: cuda\nseq_len: 64\n"
                    f"data:\n  instruct_data: {data / 'train.jsonl'}\n")
    assert main(["finetune", str(yaml)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("galerne: error: device: cuda: CUDA is not available (") and err.count("\n") == 1
    assert err.endswith("; use device: cpu, or auto\n")
    assert not run_dir.exists()


class _RunsCode:
    """Unpickled by a full torch.load, this would remove ``path``."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.remove, (self.path,))


def test_the_reason_of_a_weights_only_refusal():
    from galerne.finetune.trainer import _unpickler_reason

    # the two shapes of torch's message (a global not allowlisted; a blocked module)
    assert _unpickler_reason(
        "Weights only load failed. This file can still be loaded, to do so you have two options. \n\t(1) In PyTorch "
        "2.6, we changed the default.\n\t(2) Alternatively, to load with `weights_only=True` please check.\n\t"
        "WeightsUnpickler error: Unsupported global: GLOBAL x.Foo was not an allowed global by default. Please use "
        "`torch.serialization.add_safe_globals([x.Foo])`.\n\nCheck the documentation of torch.load to learn more."
    ) == "Unsupported global: GLOBAL x.Foo was not an allowed global by default"
    assert _unpickler_reason(
        "Weights only load failed. In PyTorch 2.6, we changed the default.\n\n\nTrying to load unsupported GLOBAL "
        "posix.remove whose module posix is blocked.\n\nCheck the documentation of torch.load to learn more."
    ) == "Trying to load unsupported GLOBAL posix.remove whose module posix is blocked"


def test_resume_refuses_a_checkpoint_that_is_not_weights_only(tiny, data, tmp_path, capsys):
    over = dict(max_steps=3, data={"eval_instruct_data": ""})

    def stop_at_1(row):
        if row["step"] == 1:
            raise KeyboardInterrupt

    run_dir = tmp_path / "run"
    first = train(make_config(tiny, data, run_dir, **over), on_log=stop_at_1)
    state = torch.load(first.checkpoint / "optimizer.pt", weights_only=True)
    marker = tmp_path / "marker"
    marker.write_text("still here")
    torch.save({**state, "extra": _RunsCode(marker)}, first.checkpoint / "optimizer.pt")
    with pytest.raises(ConfigError) as e:
        train(make_config(tiny, data, run_dir, **over), resume=True)
    message = str(e.value)
    assert message.startswith(f"{first.checkpoint / 'optimizer.pt'}: --resume: refused: not a weights-only file (")
    assert message.endswith("); galerne loads checkpoints with torch.load(weights_only=True), which runs no code from a file")
    assert "GLOBAL posix.remove" in message and "\n" not in message  # torch's reason, without its advice
    assert marker.read_text() == "still here"  # nothing in the file ran

    yaml = tmp_path / "c.yaml"
    yaml.write_text(f"model_id_or_path: {tiny}\nrun_dir: {run_dir}\nseq_len: 64\nmax_steps: 3\nlora:\n  rank: 4\n"
                    f"optim:\n  lr: 1.e-2\n  pct_start: 0.2\ndata:\n  instruct_data: {data / 'train.jsonl'}\n")
    torch.save(state, first.checkpoint / "optimizer.pt")
    (first.checkpoint / "trainer_state.pt").write_bytes(b"PK\x03\x04 cut short")
    capsys.readouterr()
    assert main(["finetune", str(yaml), "--resume"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"galerne: error: {first.checkpoint / 'trainer_state.pt'}: --resume: cannot read: ")
    assert err.count("\n") == 1 and "Traceback" not in err
    (first.checkpoint / "trainer_state.json").write_text("{}")
    with pytest.raises(ConfigError, match="trainer_state.json: --resume: cannot read: no number 'step'"):
        train(make_config(tiny, data, run_dir, **over), resume=True)


# --------------------------------------------------------------------------- run_dir: only what the run wrote


def _tree(root):
    """Every path under ``root``, relative, folders with a trailing /."""
    return sorted(p.relative_to(root).as_posix() + ("/" if p.is_dir() and not p.is_symlink() else "")
                  for p in root.rglob("*"))


def test_a_run_starts_only_in_a_new_or_empty_folder(tiny, data, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("# my own config, with comments\n")
    (run_dir / "notes.txt").write_text("mine\n")
    with pytest.raises(ConfigError) as e:
        train(make_config(tiny, data, run_dir, max_steps=1))
    assert str(e.value) == (f"run_dir: {run_dir} is not empty (config.yaml, notes.txt) and holds no galerne run "
                            "(galerne_run.json): choose a new or empty folder (a run never writes over files it did not create)")
    assert _tree(run_dir) == ["config.yaml", "notes.txt"] and (run_dir / "config.yaml").read_text().startswith("# my own")

    yaml = tmp_path / "c.yaml"
    yaml.write_text(f"model_id_or_path: {tiny}\nrun_dir: {run_dir}\nseq_len: 64\ndata:\n  instruct_data: {data / 'train.jsonl'}\n")
    capsys.readouterr()
    assert main(["finetune", str(yaml)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"galerne: error: run_dir: {run_dir} is not empty") and err.count("\n") == 1

    empty = tmp_path / "empty"
    empty.mkdir()
    result = train(make_config(tiny, data, empty, max_steps=1, data={"eval_instruct_data": ""}))
    assert result.step == 1 and (empty / "adapter" / "lora.safetensors").is_file()
    # The manifest lists every file and folder of the run, and nothing else.
    manifest = json.loads((empty / "galerne_run.json").read_text())["entries"]
    assert sorted(k + ("/" if v == "dir" else "") for k, v in manifest.items()) == [
        p for p in _tree(empty) if p != "galerne_run.json"]

    # A run that produced something is not started over.
    with pytest.raises(ConfigError, match="already holds a run .*it has no checkpoint to resume from: delete the folder"):
        train(make_config(tiny, data, empty, max_steps=1, data={"eval_instruct_data": ""}))


def test_a_symlinked_adapter_is_not_written_through(tiny, data, tmp_path):
    run_dir = tmp_path / "run"
    over = dict(max_steps=1, ckpt_freq=1, data={"eval_instruct_data": ""})
    train(make_config(tiny, data, run_dir, **over))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "adapter_model.safetensors").write_bytes(b"the user's precious adapter")
    for f in (run_dir / "adapter").iterdir():
        f.unlink()
    (run_dir / "adapter").rmdir()
    (run_dir / "adapter").symlink_to(elsewhere)
    with pytest.raises(ConfigError) as e:
        train(make_config(tiny, data, run_dir, **{**over, "max_steps": 2}), resume=True)
    assert str(e.value) == (f"run_dir: {run_dir} holds adapter, which no galerne run wrote (or a link now stands in "
                            "place of what it wrote): move it out of the run folder")
    assert _tree(elsewhere) == ["adapter_model.safetensors"]
    assert (elsewhere / "adapter_model.safetensors").read_bytes() == b"the user's precious adapter"
    (run_dir / "adapter").unlink()  # with the link gone, the run resumes and writes its own adapter
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "lo')  # a line cut short by a kill
    assert train(make_config(tiny, data, run_dir, **{**over, "max_steps": 2}), resume=True).step == 2
    assert [r["step"] for r in metrics(run_dir)] == [1, 2]
    assert sorted(p.name for p in (run_dir / "adapter").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "lora.safetensors"]
    assert _tree(elsewhere) == ["adapter_model.safetensors"]


def test_checkpoint_rotation_removes_only_what_the_run_wrote(tiny, data, tmp_path, caplog):
    run_dir = tmp_path / "run"

    def add_notes(row):
        if row["step"] == 2:  # checkpoint_000001 exists; the next save rotates it out
            (run_dir / "checkpoints" / "checkpoint_000001" / "notes.txt").write_text("why step 1 looked odd\n")

    cfg = make_config(tiny, data, run_dir, max_steps=3, ckpt_freq=1, num_ckpt_keep=1, data={"eval_instruct_data": ""})
    with caplog.at_level("WARNING", logger="galerne"):
        train(cfg, on_log=add_notes)
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["checkpoint_000001", "checkpoint_000003"]
    assert os.listdir(run_dir / "checkpoints" / "checkpoint_000001") == ["notes.txt"]  # the run's files went
    assert f"kept {run_dir / 'checkpoints' / 'checkpoint_000001'}: it holds files no galerne run wrote" in caplog.text
    # Resuming, the stranger is named before anything runs.
    with pytest.raises(ConfigError, match="holds checkpoints/checkpoint_000001/, which no galerne run wrote"):
        train(cfg, resume=True)


def test_a_run_dir_that_cannot_be_made_is_a_one_line_error(tiny, data, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    yaml = tmp_path / "c.yaml"
    yaml.write_text(f"model_id_or_path: {tiny}\nrun_dir: {tmp_path / 'afile' / 'run'}\nseq_len: 64\nmax_steps: 1\n"
                    f"data:\n  instruct_data: {data / 'train.jsonl'}\n")
    capsys.readouterr()
    assert main(["finetune", str(yaml)]) == 1
    err = capsys.readouterr().err
    assert err == f"galerne: error: {tmp_path / 'afile' / 'run'}: Not a directory\n"
