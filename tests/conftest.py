"""Tiny random models built with transformers (our numerical reference), saved as
real checkpoint folders with a real Mistral tokenizer from mistral-common."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import mistral_common
import pytest
import torch

# The servers the tests start keep their platform state (files, jobs, the SQLite store) in
# $XDG_DATA_HOME/galerne: a folder of this test session's, never the user's.
if "GALERNE_TEST_KEEP_DATA_HOME" not in os.environ:
    import atexit
    import tempfile

    os.environ["XDG_DATA_HOME"] = tempfile.mkdtemp(prefix="galerne-test-data-")
    atexit.register(shutil.rmtree, os.environ["XDG_DATA_HOME"], ignore_errors=True)

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
                                                  num_attention_heads=2, image_size=32, patch_size=8, head_dim=16,
                                                  hidden_act="silu")  # as Mistral's releases have it
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


def _cached(tmp_path_factory, build):
    """kind -> (folder, transformers model), ``build(kind, folder)`` once per kind."""
    cache: dict[str, tuple[Path, object]] = {}

    def get(kind: str):
        if kind not in cache:
            folder = tmp_path_factory.mktemp(kind)
            cache[kind] = (folder, build(kind, folder))
        return cache[kind]

    return get


@pytest.fixture(scope="session")
def tiny_factory(tmp_path_factory):
    """Cached builder: tiny_factory(kind) -> (folder, transformers model)."""
    return _cached(tmp_path_factory, build_hf)


@pytest.fixture(scope="session")
def vision_factory(tmp_path_factory):
    """Cached builder of the tiny vision-language models: vision_factory("mistral3" or
    "llava") -> (folder, transformers model)."""
    return _cached(tmp_path_factory, lambda kind, folder: build_vision_hf(kind, folder))


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


# ------------------------------------------------------------------ Mistral-native folders

# Hugging Face -> Mistral-native names of a dense layer, written here independently
# of galerne's own table (galerne/weights/names.py) so that the two check each other.
_NATIVE_LAYER = {
    "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2", "mlp.up_proj": "feed_forward.w3",
}


def _interleave_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """HF's rotate-halves rows of one q/k projection -> Mistral's interleaved pairs."""
    rows, cols = w.shape
    return w.view(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def write_native(ref, folder: Path) -> Path:
    """Write transformers model ``ref`` (a dense Mistral-family model, or a
    Mistral3ForConditionalGeneration around one) as a Mistral-native folder:
    params.json with Mistral's keys (``yarn``, ``llama_4_scaling``, per-layer
    ``sliding_window``, ``vision_encoder``) and consolidated.safetensors."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    cfg = ref.config
    text = getattr(cfg, "text_config", None) or cfg
    out: dict[str, torch.Tensor] = {}
    for name, t in ref.state_dict().items():
        name = name.replace("model.language_model.", "model.")
        if name == "lm_head.weight":
            out["output.weight"] = t
        elif name == "model.embed_tokens.weight":
            out["tok_embeddings.weight"] = t
        elif name == "model.norm.weight":
            out["norm.weight"] = t
        elif name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            module, _, suffix = rest.rpartition(".")
            native = _NATIVE_LAYER[module]
            if native == "attention.wq":
                t = _interleave_rows(t, text.num_attention_heads)
            elif native == "attention.wk":
                t = _interleave_rows(t, text.num_key_value_heads)
            out[f"layers.{i}.{native}.{suffix}"] = t
        else:
            native, t = native_vision_name(name, t, cfg.vision_config.num_attention_heads)
            out[native] = t
    save_file({k: v.contiguous() for k, v in out.items()}, str(folder / "consolidated.safetensors"))
    params = {
        "dim": text.hidden_size, "n_layers": text.num_hidden_layers, "head_dim": text.head_dim,
        "hidden_dim": text.intermediate_size, "n_heads": text.num_attention_heads,
        "n_kv_heads": text.num_key_value_heads, "norm_eps": text.rms_norm_eps, "vocab_size": text.vocab_size,
        "max_seq_len": text.max_position_embeddings, "rope_theta": text.rope_parameters["rope_theta"],
    }
    rp = text.rope_parameters
    if rp.get("rope_type") == "yarn":
        magnitude_one = rp.get("mscale") and rp.get("mscale") == rp.get("mscale_all_dim")
        params["yarn"] = {"factor": rp["factor"], "original_max_position_embeddings": rp["original_max_position_embeddings"],
                          "beta": rp.get("beta_fast", 32.0), "alpha": rp.get("beta_slow", 1.0)}
        if magnitude_one:
            params["yarn"]["apply_scale"] = False
    if rp.get("llama_4_scaling_beta") is not None:
        params["llama_4_scaling"] = {"beta": rp["llama_4_scaling_beta"],
                                     "original_max_position_embeddings": rp["original_max_position_embeddings"]}
    types = getattr(text, "layer_types", None)
    if getattr(text, "sliding_window", None):
        params["sliding_window"] = ([text.sliding_window if t == "sliding_attention" else None for t in types]
                                    if types else text.sliding_window)
    if getattr(cfg, "vision_config", None) is not None:
        v = cfg.vision_config
        params["vision_encoder"] = {
            "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size, "num_channels": 3,
            "num_hidden_layers": v.num_hidden_layers, "num_attention_heads": v.num_attention_heads,
            "patch_size": v.patch_size, "image_size": v.image_size, "rope_theta": v.rope_parameters["rope_theta"],
            "image_token_id": cfg.image_token_index, "image_break_token_id": 12, "image_end_token_id": 13,
            "adapter_bias": bool(cfg.multimodal_projector_bias), "spatial_merge_size": cfg.spatial_merge_size,
            "add_pre_mm_projector_layer_norm": True, "mm_projector_id": "patch_merge"}
    (folder / "params.json").write_text(json.dumps(params, indent=1))
    shutil.copy(V3_TOKENIZER, folder / "tokenizer.model.v3")
    return folder


def fp8_copy(src: Path, out: Path, *, scale_name: str = "weight_scale_inv", activation_scale: bool = False) -> Path:
    """Copy the dense HF folder ``src`` to ``out`` as an FP8 checkpoint the way Ministral 3
    and Devstral 2 ship: attention and MLP weights in float8 e4m3 with one scale per
    tensor (``weight_block_size: null``), optional static activation scales, the rest
    (embeddings, norms, output head) as they were."""
    from safetensors.torch import load_file, save_file

    from galerne.weights.fp8 import quantize

    tensors = {}
    for name, t in load_file(str(src / "model.safetensors")).items():
        if ".self_attn." in name or ".mlp." in name:
            tensors[name], tensors[name.replace("weight", scale_name)] = quantize(t, None)
            if activation_scale:
                tensors[name.replace("weight", "activation_scale")] = torch.tensor(0.5)
        else:
            tensors[name] = t
    out.mkdir(parents=True)
    save_file(tensors, str(out / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": None,
                                     "activation_scheme": "static" if activation_scale else "dynamic",
                                     "modules_to_not_convert": ["lm_head"]}
    (out / "config.json").write_text(json.dumps(config))
    shutil.copy(V3_TOKENIZER, out / "tokenizer.model.v3")
    return out


# ------------------------------------------------------------------ Triton kernels on a CPU


def triton_interpreted(module_name: str, kernel: str):
    """Import galerne's Triton module ``module_name`` for the tests: compiled on CUDA;
    without CUDA, under Triton's interpreter on CPU tensors. The interpreter flag is read
    when a kernel is decorated, so it is set before triton is (re)imported: if triton was
    imported earlier in this process without it (the engine, collected first), its Python
    modules (not the C extension) are imported again, and ``module_name`` reloaded when
    its ``kernel`` is not an interpreted function. Returns (module, interpreted); skips
    the calling test module when triton is not installed."""
    import importlib
    import sys

    interpret = not torch.cuda.is_available()
    if interpret:
        os.environ["TRITON_INTERPRET"] = "1"
        if "triton" in sys.modules and type(getattr(sys.modules.get(module_name), kernel, None)).__name__ != \
                "InterpretedFunction":
            for name in [n for n in sys.modules if n.split(".")[0] == "triton" and not n.startswith("triton._C")]:
                del sys.modules[name]
    pytest.importorskip("triton")
    module = importlib.import_module(module_name)
    if interpret and type(getattr(module, kernel)).__name__ != "InterpretedFunction":
        module = importlib.reload(module)  # the same module object: its importers see the new kernels
    return module, interpret


# ------------------------------------------------------------------ a PostgreSQL cluster, once


@pytest.fixture(scope="session")
def postgres_cluster():
    """A throwaway PostgreSQL cluster (tests/pgcluster.py), stopped and removed at the end;
    skips, with the reason, where PostgreSQL is not installed or cannot start."""
    from pgcluster import PgCluster, PgUnavailable

    cluster = PgCluster()
    try:
        cluster.start()
    except PgUnavailable as e:
        pytest.skip(f"no PostgreSQL for the tests: {e}")
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def postgres_url(postgres_cluster):
    """A ``postgresql://`` URL of a database of this session (``postgres_cluster.new_database()``
    gives a fresh one)."""
    return postgres_cluster.new_database("session")


# ------------------------------------------------------------------ vision-language models

# tekken.json of Pixtral (v3, with an image config): the image format the tiny vision
# models below are built for is written into a copy of it.
PIXTRAL_TEKKEN = TOKENIZERS / "tekken_240911.json"
# The encoder of the tiny vision models: patches of 8 pixels, images up to 64 pixels a
# side (8 x 8 patches), heads of 16 (the 2-D rotary splits each in quarters).
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, head_dim=16,
                   image_size=64, patch_size=8, hidden_act="silu", initializer_range=0.2)


def vision_tekken(folder: Path, *, patch: int = 8, max_size: int = 64, merge: int = 2) -> Path:
    """Pixtral's tekken.json with the given image format, as ``folder/tekken.json``."""
    data = json.loads(PIXTRAL_TEKKEN.read_text())
    data["image"] = {"image_patch_size": patch, "max_image_size": max_size, "spatial_merge_size": merge}
    (folder / "tekken.json").write_text(json.dumps(data))
    return folder / "tekken.json"


def build_vision_hf(kind: str, folder: Path, seed: int = 0):
    """A tiny random vision-language model saved in ``folder`` with its tekken.json:
    "mistral3" (Mistral Small 3.1's layout: projector norm, 2x2 patch merger, no biases)
    or "llava" (Pixtral 12B's Hugging Face layout: no merger, biased projector)."""
    import transformers

    text = transformers.MistralConfig(
        vocab_size=131072, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1,
        eos_token_id=2, initializer_range=0.2, head_dim=16)
    vision = transformers.PixtralVisionConfig(**TINY_VISION)
    torch.manual_seed(seed)
    if kind == "mistral3":
        config = transformers.Mistral3Config(text_config=text, vision_config=vision, image_token_index=10,
                                             spatial_merge_size=2, tie_word_embeddings=False)
        model = transformers.Mistral3ForConditionalGeneration(config).eval()
    else:
        config = transformers.LlavaConfig(text_config=text, vision_config=vision, image_token_index=10,
                                          projector_hidden_act="gelu", multimodal_projector_bias=True,
                                          vision_feature_layer=-1, vision_feature_select_strategy="full",
                                          tie_word_embeddings=False)  # as Pixtral 12B's config.json says
        model = transformers.LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # transformers initialises norms to 1: random ones test that each is applied
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "ln_pre" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.2)
    model.generation_config.eos_token_id = None
    model.save_pretrained(folder)
    vision_tekken(folder, merge=2 if kind == "mistral3" else 1)
    return model


# Pixtral's native names (mistral-inference / vLLM), from transformers 5's in memory.
_NATIVE_VISION_NAMES = {
    "model.vision_tower.": "vision_encoder.", "model.multi_modal_projector.norm.": "pre_mm_projector_norm.",
    "model.multi_modal_projector.patch_merger.": "patch_merger.",
    "model.multi_modal_projector.linear_1.": "vision_language_adapter.w_in.",
    "model.multi_modal_projector.linear_2.": "vision_language_adapter.w_out.",
}
_NATIVE_VISION_LAYER = {"attention.q_proj": "attention.wq", "attention.k_proj": "attention.wk",
                        "attention.v_proj": "attention.wv", "attention.o_proj": "attention.wo",
                        "feed_forward.gate_proj": "feed_forward.w1", "feed_forward.down_proj": "feed_forward.w2",
                        "feed_forward.up_proj": "feed_forward.w3"}


def native_vision_name(name: str, t: torch.Tensor, heads: int) -> tuple[str, torch.Tensor]:
    """A transformers vision tensor -> its Mistral-native name, q/k rows interleaved."""
    prefix = next(p for p in _NATIVE_VISION_NAMES if name.startswith(p))
    out = _NATIVE_VISION_NAMES[prefix] + name[len(prefix):]
    for hf, native in _NATIVE_VISION_LAYER.items():
        if f".{hf}." in out:
            out = out.replace(f".{hf}.", f".{native}.")
            if hf in ("attention.q_proj", "attention.k_proj"):
                t = _interleave_rows(t, heads)
    return out, t
