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

MISTRAL4 = dict(
    num_hidden_layers=2, num_key_value_heads=4, first_k_dense_replace=1, moe_intermediate_size=32,
    n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=2, n_shared_experts=1,
    routed_scaling_factor=1.5, q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16,
    v_head_dim=16, rope_parameters=dict(
        rope_type="yarn", rope_theta=10000.0, factor=32.0, original_max_position_embeddings=16,
        beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0, llama_4_scaling_beta=0.1))

# name -> (transformers config class, config kwargs)
TINY = {
    "mistral": ("MistralConfig", dict()),
    "mistral-window": ("MistralConfig", dict(sliding_window=16)),
    "head-dim": ("MistralConfig", dict(head_dim=32)),  # 4 heads x 32 != hidden 64
    "tied": ("MistralConfig", dict(tie_word_embeddings=True)),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
    "llama": ("LlamaConfig", dict()),
    # Ministral 3: YaRN and llama-4 query scaling, with a small original context so
    # that the tests' prompts reach past it (scaling steps at positions 16, 32, ...).
    "ministral3": ("Ministral3Config", dict(rope_parameters=dict(
        rope_type="yarn", rope_theta=1e6, factor=32.0, original_max_position_embeddings=16,
        beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0, llama_4_scaling_beta=0.1))),
    # YaRN's default magnitude (no mscale): cos and sin scaled by 0.1 ln(factor) + 1.
    "ministral3-mscale": ("Ministral3Config", dict(rope_parameters=dict(
        rope_type="yarn", rope_theta=1e6, factor=32.0, original_max_position_embeddings=16,
        llama_4_scaling_beta=0.2))),
    # The older Ministral: a sliding window on some layers only.
    "ministral": ("MinistralConfig", dict(head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"])),
    # Vision-language checkpoints (Mistral Small 3.x, Ministral 3): the text path.
    "mistral3": ("Mistral3Config", dict(text="MistralConfig")),
    "mistral3-ministral3": ("Mistral3Config", dict(text="Ministral3Config")),
    # Mistral 4: latent attention, MoE with a shared expert and grouped routing (8
    # experts in 2 groups, 1 group per token), a dense first layer, YaRN on the rotary
    # part with a small original context and llama-4 query scaling.
    "mistral4": ("Mistral4Config", dict(MISTRAL4)),
    "mistral4-no-q-lora": ("Mistral4Config", dict(MISTRAL4, q_lora_rank=None)),
    "mistral3-mistral4": ("Mistral3Config", dict(text="Mistral4Config")),
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
    extra = dict(extra)
    text = extra.pop("text", None)
    if text is not None:  # a vision-language model around a text model of kind `text`
        inner = next(v for v in TINY.values() if v[0] == text)[1]  # the first kind of that class
        text_config = getattr(transformers, text)(**{**kwargs, **inner, **overrides})
        vision = transformers.PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                  num_attention_heads=2, image_size=32, patch_size=8, head_dim=16)
        config = getattr(transformers, cls_name)(text_config=text_config, vision_config=vision,
                                                 tie_word_embeddings=False)
        torch.manual_seed(seed)
        model = transformers.Mistral3ForConditionalGeneration(config).eval()
        model.generation_config.eos_token_id = None
        model.save_pretrained(folder)
        _eager_experts(model)
        shutil.copy(V3_TOKENIZER, folder / "tokenizer.model.v3")
        return model
    kwargs.update(extra)
    kwargs.update(overrides)
    config = getattr(transformers, cls_name)(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name.replace("Config", "ForCausalLM"))(config).eval()
    model.generation_config.eos_token_id = None  # compare full-length greedy runs
    model.save_pretrained(folder)
    shutil.copy(V3_TOKENIZER, folder / "tokenizer.model.v3")
    _eager_experts(model)
    return model


def _eager_experts(model) -> None:
    """transformers' packed experts default to ``torch._grouped_mm``, whose float32
    results are about 1e-4 off on a tiny Mistral 4 (float64 says so); its per-expert
    loop is as exact as a float32 reference can be."""
    if getattr(model.config.get_text_config(), "model_type", None) == "mistral4":
        model.set_experts_implementation("eager")


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
