"""Tiny random models built with transformers (our numerical reference), saved as
real checkpoint folders with a real Mistral tokenizer from mistral-common."""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import mistral_common
import pytest
import torch

TOKENIZERS = Path(mistral_common.__file__).parent / "data"
V3_TOKENIZER = TOKENIZERS / "mistral_instruct_tokenizer_240323.model.v3"
VOCAB = 32768  # the v3 tokenizer's
# The SentencePiece tokenizers mistral-common ships, by version.
SPM_TOKENIZERS = {
    "v1": TOKENIZERS / "tokenizer.model.v1",
    "v2": TOKENIZERS / "mistral_instruct_tokenizer_240216.model.v2",
    "v3": V3_TOKENIZER,
    "v7": TOKENIZERS / "mistral_instruct_tokenizer_241114.model.v7",
}
# Every tekken version mistral-common knows (tekken began with v3).
TEKKEN_VERSIONS = ("v3", "v7", "v11", "v13", "v15")
TEKKEN_SPECIAL = 100  # special tokens of the small tekken files (real ones have 1000)
TEKKEN_WORDS = 1000  # their first ranks of the shipped vocabulary (256 bytes, then merges)
# Tokenizer v15's model settings, as a reasoning model's tekken.json declares them.
REASONING_SETTINGS = {"reasoning_effort": {"values": ["none", "high"], "default": "high"}}


def tekken_file(folder: Path, version: str, *, think: bool = True, settings: dict | None = None,
                name: str = "tekken.json") -> Path:
    """A small tekken.json of ``version`` (vocabulary of TEKKEN_SPECIAL + TEKKEN_WORDS):
    the shipped vocabulary's first ranks (a BPE prefix is a BPE), and as special tokens
    v3/v7's fixed list, or, from v11 on, every token mistral-common names, ``[THINK]`` and
    ``[/THINK]`` only with ``think``; v15 with model ``settings`` (default:
    REASONING_SETTINGS; ``{}``: none)."""
    import json

    from mistral_common.tokens.tokenizers.base import SpecialTokens
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    data = json.loads((TOKENIZERS / "tekken_240911.json").read_text())
    names = [str(t["token_str"].value) for t in Tekkenizer.DEPRECATED_SPECIAL_TOKENS]
    if version not in ("v3", "v7"):
        names += [t.value for t in SpecialTokens if t.value not in names
                  and (think or t.value not in ("[THINK]", "[/THINK]"))]
    data["special_tokens"] = [{"rank": i, "token_str": t, "is_control": True} for i, t in enumerate(names)]
    data["vocab"] = data["vocab"][:TEKKEN_WORDS]
    data["config"].update(version=version, num_vocab_tokens=TEKKEN_WORDS, default_vocab_size=TEKKEN_SPECIAL + TEKKEN_WORDS,
                          default_num_special_tokens=TEKKEN_SPECIAL)
    data.pop("image", None)
    if version == "v15":
        settings = REASONING_SETTINGS if settings is None else settings
        if settings:
            data["model_settings_builder"] = settings
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(json.dumps(data))
    return path

# name -> (transformers config class, config kwargs)
TINY = {
    "mistral": ("MistralConfig", dict()),
    "mistral-window": ("MistralConfig", dict(sliding_window=16)),
    "head-dim": ("MistralConfig", dict(head_dim=32)),  # 4 heads x 32 != hidden 64
    "tied": ("MistralConfig", dict(tie_word_embeddings=True)),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
    "llama": ("LlamaConfig", dict()),
}


def build_hf(kind: str, folder: Path, seed: int = 0, **overrides):
    """Save a tiny random transformers model of ``kind`` in ``folder``; return it."""
    import transformers

    cls_name, extra = TINY[kind]
    kwargs = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_id=2,
        # Wide weights spread the logits, so that greedy argmaxes are not near-ties
        # that float rounding could flip.
        initializer_range=0.2,
    )
    kwargs.update(extra)
    kwargs.update(overrides)
    config = getattr(transformers, cls_name)(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name.replace("Config", "ForCausalLM"))(config).eval()
    model.generation_config.eos_token_id = None  # compare full-length greedy runs
    model.save_pretrained(folder)
    shutil.copy(V3_TOKENIZER, folder / "tokenizer.model.v3")
    return model


@pytest.fixture(scope="session")
def tiny_factory(tmp_path_factory):
    """Cached builder: tiny_factory(kind) -> (folder, transformers model)."""
    cache: dict[str, tuple[Path, object]] = {}

    def get(kind: str):
        if kind not in cache:
            folder = tmp_path_factory.mktemp(kind)
            cache[kind] = (folder, build_hf(kind, folder))
        return cache[kind]

    return get


@pytest.fixture(scope="session")
def tiny_mistral(tiny_factory):
    return tiny_factory("mistral")


# ------------------------------------------------------------------ the CPU kernel, once

KERNEL = pytest.StashKey[str]()


def model_prompt_logprobs(llm, ids: list[int]) -> tuple[torch.Tensor, list[float], list[int]]:
    """What the model says of a prompt, from ``LLM.score`` (no cache, no engine): the
    (len, vocab) log-softmax table, and each token's logprob and rank (1: the model's
    best guess) given the tokens before it, from the second token on."""
    table = torch.log_softmax(llm.score(ids), dim=-1)
    actual = table[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    ranks = (table[:-1] > actual[:, None]).sum(dim=1) + 1
    return table, actual.tolist(), ranks.tolist()


def has_compiler() -> bool:
    return shutil.which("c++") is not None or shutil.which("g++") is not None


def pytest_collection_finish(session):
    """Build (or load from the disk cache) galerne's native CPU decode kernel once,
    before the first test: every LLM on the CPU in this process then finds it in
    ``galerne.kernels.cpu._built``, and the subprocesses the tests start (``galerne
    serve``, torchrun) find it in the same disk cache (they inherit this environment,
    hence the same ``$XDG_CACHE_HOME``). A first build on this machine (about 30 s)
    is reported in the summary instead of hiding in a random test's time. Without a
    compiler nothing is tried: the kernel tests skip, the others decode with torch ops."""
    if session.config.option.collectonly or not session.items or not has_compiler():
        return
    if os.environ.get("GALERNE_CPU_KERNELS", "1") == "0":
        return
    from galerne.kernels import cpu as cpu_kernels

    warnings: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())
    logger = logging.getLogger(cpu_kernels.__name__)
    logger.addHandler(handler)
    start = time.perf_counter()
    try:
        ext = cpu_kernels.load()
    finally:
        logger.removeHandler(handler)
    seconds = time.perf_counter() - start
    session.config.stash[KERNEL] = (
        f"ready in {seconds:.1f} s, in {cpu_kernels.cache_dir()}" if ext is not None
        else f"unavailable, the tests decode with torch ops: {'; '.join(warnings)}")


def pytest_terminal_summary(terminalreporter, config):
    if KERNEL in config.stash:
        terminalreporter.write_line(f"galerne CPU kernel, built or loaded once before the tests: {config.stash[KERNEL]}")
