"""examples/bakery: the example's LoRA run on galerne-mini (about 4 minutes on 2 cores) learns
the bakery's facts well enough to answer most held-out questions (worded unlike any training
question)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def test_adapter_answers_most_heldout_questions(tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("bakery_run", ROOT / "examples" / "bakery" / "run.py")
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    monkeypatch.chdir(ROOT)
    before, after = run.main(["--run-dir", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert "galerne-mini + bakery adapter" in out
    assert after > before
    assert after >= 7, out  # most of the 12
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
