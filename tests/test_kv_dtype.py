"""--kv-cache-dtype: the KV cache stored in fewer bits (bf16, fp16, fp8, int8 with
per-token scales), read back in the model's dtype by the attention."""

from __future__ import annotations

import pytest
import torch

from galerne import LLM, SamplingParams
from galerne.engine.paged import PagedKVCache
from galerne.errors import ConfigError

PROMPTS = [list(range(5, 5 + n)) for n in (40, 7, 23)]
PARAMS = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=0)


@pytest.fixture(scope="module")
def reference(tiny_mistral):
    folder = tiny_mistral[0]
    return folder, LLM(folder, device="cpu", block_size=4).generate(PROMPTS, PARAMS)


@pytest.mark.parametrize("kind,tol", [("bfloat16", 0.2), ("float16", 0.05), ("int8", 0.2), ("fp8", 0.5),
                                      ("fp8_e5m2", 1.0)])
def test_a_converted_cache_stays_near_the_float_one(reference, kind, tol):
    """Each token's logprob under the converted cache, computed after the same tokens,
    stays within the format's precision of the float32 cache's (teacher-forced, so
    that one near-tie flipping does not move every later token)."""
    folder, ref = reference
    llm = LLM(folder, device="cpu", block_size=4, kv_cache_dtype=kind)
    assert llm.engine.cache.k.dtype == {"bfloat16": torch.bfloat16, "float16": torch.float16, "int8": torch.int8,
                                        "fp8": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}[kind]
    forced = [p + r.token_ids for p, r in zip(PROMPTS, ref)]
    got = llm.generate(forced, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0))
    want = LLM(folder, device="cpu", block_size=4).generate(forced, SamplingParams(max_tokens=1, temperature=0,
                                                                                   prompt_logprobs=0))
    for g, w, p in zip(got, want, PROMPTS):
        diffs = [abs(a.logprob - b.logprob) for a, b in zip(g.prompt_logprobs[1:], w.prompt_logprobs[1:])]
        assert max(diffs) < tol, (kind, max(diffs))
        assert max(diffs) > 0 or kind == "float32"  # the cache really is converted


def test_int8_holds_about_four_times_the_tokens_of_float32(tiny_mistral):
    """4x less its scales: 3.9x at head_dim 128, 3.2x at this tiny model's 16."""
    folder = tiny_mistral[0]
    full = LLM(folder, device="cpu", kv_cache_gb=0.01, enable_prefix_caching=False)
    small = LLM(folder, device="cpu", kv_cache_gb=0.01, kv_cache_dtype="int8", enable_prefix_caching=False)
    args = full.model.args
    hd = args.head_dim
    assert PagedKVCache.bytes_per_token(args, torch.int8) * 4 * hd == PagedKVCache.bytes_per_token(args, torch.float32) * (hd + 4)
    ratio = small.engine.cache.num_blocks / full.engine.cache.num_blocks
    assert ratio == pytest.approx(4 * hd / (hd + 4), rel=0.01)
    # Decoding through a converted cache does not use the CPU kernel (torch ops convert as they read).
    assert small.engine.runner.cpu_decoder is None


def test_latent_attention_caches_convert_too(tiny_factory):
    folder, _ = tiny_factory("mistral4")
    ref = LLM(folder, device="cpu", block_size=4).generate(PROMPTS[:2], PARAMS)
    for kind in ("int8", "bfloat16"):
        got = LLM(folder, device="cpu", block_size=4, kv_cache_dtype=kind).generate(PROMPTS[:2], PARAMS)
        for g, r in zip(got, ref):
            assert max(abs(a - b) for a, b in zip(g.outputs[0].logprobs[:1], r.outputs[0].logprobs[:1])) < 0.05


def test_unknown_kv_cache_dtype_is_refused(tiny_mistral):
    from galerne.config import EngineSettings, add_arguments, from_args, ArgumentParser

    p = ArgumentParser()
    add_arguments(p, EngineSettings)
    with pytest.raises((ConfigError, SystemExit)):
        from_args(EngineSettings, p.parse_args(["--kv-cache-dtype", "int4"]))
