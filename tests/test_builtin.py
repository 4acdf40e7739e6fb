"""galerne-mini, the built-in model: serve and chat with no model argument, offline, and
the model card's held-out perplexity re-measured."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from galerne.builtin import BUILTIN_PATH, builtin_model_path
from galerne.cli import main

ROOT = Path(__file__).resolve().parent.parent
# A few hundred of the most frequent English words: an answer in English uses some.
COMMON = set("""
a about after all also am an and any are as at be because been but by can could day do does
don't for from get go good had has have he hello her here hi him his how i i'm if in is it it's
just know like make me more my name no not now of on one or other our out people say she so some
than thank thanks that the their them then there these they think this time to too up us very
want was we well were what when where which who why will with would yes you your
""".split())


def english(text: str) -> bool:
    """Mostly ASCII letters, at least three words, and common English words among them."""
    words = re.findall(r"[A-Za-z']+", text)
    if len(words) < 3 or sum(c.isascii() for c in text) < 0.9 * len(text):
        return False
    return sum(w.lower() in COMMON for w in words) >= max(2, len(words) // 5)


def test_english_check_is_not_vacuous():
    assert english("I am a small language model, and I like to talk with you.")
    assert not english("Je suis un petit modèle de langue, très content de parler.")
    assert not english("def f(x): return x")
    assert not english("")


def test_the_package_ships_galerne_mini_small_and_sharded():
    folder = builtin_model_path()
    weights = sorted(folder.glob("*.safetensors"))
    assert weights and all(p.stat().st_size < 16 * 2**20 for p in weights)
    assert sum(p.stat().st_size for p in folder.iterdir()) < 40 * 10**6
    assert (folder / "tokenizer.model.v3").is_file() and (folder / "MODEL_CARD.md").is_file()
    card = (folder / "MODEL_CARD.md").read_text()
    for source in ("World English Bible", "Spurgeon", "fortune", "Python", "chatterbot"):
        assert source.lower() in card.lower()


@pytest.mark.slow  # a forward pass over the whole held-out set
def test_model_card_perplexity_within_5_percent():
    from galerne.finetune.data import encode_sample, pack_first_fit
    from galerne.finetune.evaluate import evaluate
    from galerne.tokenizer import Tokenizer
    from galerne.weights.loader import load_model

    folder = builtin_model_path()
    claimed = json.loads((folder / "recipe.json").read_text())["heldout_perplexity"]
    assert f"{claimed:.2f}" in (folder / "MODEL_CARD.md").read_text()
    tok = Tokenizer.from_path(folder)
    lines = (ROOT / "recipes" / "galerne_mini" / "heldout.jsonl").read_text().splitlines()
    samples = [encode_sample(tok, json.loads(line)) for line in lines if line.strip()]
    model, _ = load_model(folder, dtype="float32", device="cpu")
    measured = evaluate(model, pack_first_fit(samples, 2048)).perplexity
    assert abs(measured - claimed) <= 0.05 * claimed, (measured, claimed)


def _offline_env() -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("GALERNE_API_KEY", None)
    return env


def test_serve_with_no_model_answers_in_english_through_openai():
    from openai import OpenAI

    from galerne.kernels import cpu as cpu_kernels

    proc = subprocess.Popen([sys.executable, "-m", "galerne.cli", "serve", "--port", "0"],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=_offline_env())
    try:
        said = []
        for line in proc.stderr:
            said.append(line)
            if "serving" in line:
                break
        notice, serving = "".join(said[:-1]), said[-1] if said else ""
        assert "built-in galerne-mini" in notice, said
        if cpu_kernels._built.get("ext") is not None:  # built before the tests (conftest): on disk, not rebuilt
            assert "compiling galerne's CPU decode kernel" not in notice, said
        match = re.search(r"serving galerne-mini on (http://127\.0\.0\.1:\d+/v1)", serving)
        assert match, said
        client = OpenAI(base_url=match.group(1), api_key="unused")
        assert [m.id for m in client.models.list().data] == ["galerne-mini"]
        reply = client.chat.completions.create(model="galerne-mini", max_tokens=40, temperature=0,
                                               messages=[{"role": "user", "content": "Hello! Who are you?"}])
        text = reply.choices[0].message.content
        assert english(text), text
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_chat_with_no_model(capsys, monkeypatch):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("How are you today?\n"))
    assert main(["chat", "--temperature", "0", "--max-tokens", "40"]) == 0
    out = capsys.readouterr()
    assert "built-in galerne-mini" in out.err
    assert english(out.out), out.out


def test_galerne_mini_is_a_model_name(tmp_path, monkeypatch):
    from galerne.weights.loader import resolve_model_path

    monkeypatch.chdir(tmp_path)
    assert resolve_model_path("galerne-mini") == BUILTIN_PATH
    (tmp_path / "galerne-mini").mkdir()  # a local folder of that name wins
    assert resolve_model_path("galerne-mini") == Path("galerne-mini")


def test_missing_builtin_is_a_clear_error(monkeypatch, capsys):
    import galerne.builtin as builtin

    monkeypatch.setattr(builtin, "BUILTIN_PATH", Path("/nonexistent/galerne-mini"))
    assert main(["generate", "--prompt", "x"]) == 1
    assert "built-in galerne-mini is missing" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["serve", "chat", "generate"])
def test_model_argument_is_optional(kind):
    from galerne.cli import build_parser

    assert build_parser().parse_args([kind]).model is None
