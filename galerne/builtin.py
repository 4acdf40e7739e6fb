"""The built-in model, galerne-mini, shipped inside the package.

``galerne serve`` and ``galerne chat`` with no model use it, and ``"galerne-mini"`` names
it wherever a model path is accepted (a local folder of that name wins). It is a small
Mistral-architecture model trained from scratch by galerne's own training code
(``recipes/galerne_mini/``); see its MODEL_CARD.md for what it can and cannot do.
"""

from __future__ import annotations

from pathlib import Path

from .errors import ModelLoadError

BUILTIN_NAME = "galerne-mini"
BUILTIN_PATH = Path(__file__).resolve().parent / "assets" / BUILTIN_NAME


def builtin_model_path() -> Path:
    """The folder of galerne-mini; a clear error if this install lacks it."""
    if not (BUILTIN_PATH / "config.json").is_file():
        raise ModelLoadError(
            f"the built-in {BUILTIN_NAME} is missing from this install (expected its files in the folder); "
            "reinstall galerne, or give a model folder",
            path=str(BUILTIN_PATH),
        )
    return BUILTIN_PATH
