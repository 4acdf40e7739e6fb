"""The CUDA path (Triton paged attention, CUDA graphs for decode) gives the CPU's
tokens. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from galerne import LLM, SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 32768, (int(k),), generator=g).tolist() for k in torch.randint(5, 80, (n,), generator=g)]


@pytest.mark.parametrize("kind", ["mistral", "mistral-window", "ministral3", "ministral", "mistral3-ministral3"])
def test_cuda_engine_matches_cpu(tiny_factory, kind):
    folder, _ = tiny_factory(kind)
    ps = _prompts(5)  # 5 decodes run in the graph of 8: exercises the padding rows
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    expected = [o.token_ids for o in LLM(folder, device="cpu", block_size=16).generate(ps, params)]
    graphs = LLM(folder, device="cuda", dtype="float32", block_size=16)
    assert graphs.engine.runner.graphs is not None
    assert [o.token_ids for o in graphs.generate(ps, params)] == expected
    eager = LLM(folder, device="cuda", dtype="float32", block_size=16, enforce_eager=True)
    assert [o.token_ids for o in eager.generate(ps, params)] == expected
    bm = graphs.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_cuda_latent_cache_matches_cpu(tiny_factory):
    """Mistral 4's latent cache on the GPU (torch paged path) gives the CPU's tokens."""
    folder, _ = tiny_factory("mistral4")
    ps = _prompts(5)
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    expected = [o.token_ids for o in LLM(folder, device="cpu", block_size=16).generate(ps, params)]
    gpu = LLM(folder, device="cuda", dtype="float32", block_size=16, max_num_batched_tokens=64)
    assert gpu.engine.cache.latent and gpu.engine.runner.graphs is None
    assert [o.token_ids for o in gpu.generate(ps, params)] == expected


def test_cuda_fp8_checkpoint_is_kept_in_fp8_and_multiplied_in_fp8(tiny_factory, tmp_path):
    """An FP8 GPU keeps Ministral 3's per-tensor FP8 weights and multiplies them with
    torch._scaled_mm (activations quantized per row): logits close to the weights
    dequantized at load (FP8 activations cost a few percent per product)."""
    from conftest import fp8_copy

    from galerne.models.quant import Fp8Linear, fp8_matmul_supported

    if not fp8_matmul_supported(torch.device("cuda")):
        pytest.skip("this GPU has no FP8 matmul (compute capability < 8.9)")
    folder, _ = tiny_factory("ministral3")
    fp8 = fp8_copy(folder, tmp_path / "fp8")
    gpu = LLM(fp8, device="cuda", dtype="bfloat16")
    layers = [m for m in gpu.model.modules() if isinstance(m, Fp8Linear)]
    assert layers and all(m.scaled_mm and m.weight.dtype == torch.float8_e4m3fn for m in layers)
    ids = list(range(3, 60))
    got = gpu.score(ids).float().cpu()
    expected = LLM(fp8, device="cpu", dtype="float32").score(ids)
    assert torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0) > 0.99
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    assert len(gpu.generate([ids], params)[0].token_ids) == 16
