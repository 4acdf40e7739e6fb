"""Quantized weights (galerne.quant): the block formats against llama.cpp's reference,
each scheme's error bound, quantizing at load, `galerne quantize` folders, and
adapters served on a quantized base."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import numpy as np
import pytest
import torch

from galerne import LLM, SamplingParams
from galerne.errors import ModelLoadError
from galerne.models.quant import QuantEmbedding, QuantLinear
from galerne.quant import SCHEMES, dequantize, quantize
from galerne.quant.plan import quantize_model_, tensor_scheme
from galerne.weights.export import quantize_checkpoint
from galerne.weights.loader import load_model

from conftest import build_hf

gguf_quants = pytest.importorskip("gguf.quants")

# hidden 256 and intermediate 512: every matrix fits q4_k's 256-weight super-blocks.
WIDE = dict(hidden_size=256, intermediate_size=512)
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


def weights(kind: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        w = torch.randn(64, 1024, generator=g)
    elif kind == "heavy":  # Student-t with 3 degrees of freedom: outliers, as trained weights have
        w = torch.randn(64, 1024, generator=g) / torch.sqrt(torch.rand(64, 1024, generator=g).clamp(min=1e-3) * 3)
    else:  # an offset: the blocks' values all of one sign
        w = torch.rand(64, 1024, generator=g) + 0.5
    w[0, :256] = 0  # all-zero blocks
    w[1, :32] = 0.25  # a constant block
    return w


@pytest.mark.parametrize("name", ["q8_0", "q4_0"])
def test_blocks_are_llama_cpps_byte_for_byte(name):
    """q8_0 and q4_0 give exactly the bytes of llama.cpp's reference quantizer (the gguf
    package's port), and dequantize to exactly its values."""
    s = SCHEMES[name]
    for kind in ("normal", "heavy", "offset"):
        w = weights(kind)
        ours = quantize(w, s)
        ref = gguf_quants.quantize(w.numpy(), s.ggml_type)
        assert np.array_equal(ours.numpy(), ref), kind
        assert np.array_equal(dequantize(ours, s, w.shape[1]).numpy(), gguf_quants.dequantize(ref, s.ggml_type)), kind


@pytest.mark.parametrize("name", ["q4_k", "q5_k", "q6_k"])
def test_k_quant_blocks_read_as_llama_cpp_reads_them(name):
    """Random K-quant blocks (finite float16 scales, every bit pattern elsewhere) and,
    for q4_k, galerne's own: dequantized exactly as llama.cpp's reference."""
    s = SCHEMES[name]
    g = torch.Generator().manual_seed(1)
    q = torch.randint(0, 256, (16, 4 * s.block_bytes), generator=g, dtype=torch.uint8)
    blocks = q.view(16, 4, s.block_bytes)
    scales = (torch.rand(16, 4, 2, generator=g) * 0.1).to(torch.float16).view(torch.uint8).reshape(16, 4, 4)
    if name == "q6_k":  # its scale is the block's last 2 bytes
        blocks[..., -2:] = scales[..., :2]
    else:
        blocks[..., :4] = scales
    if name == "q4_k":
        q = torch.cat([q, quantize(weights("heavy")[:16], s)], 1)
    ref = gguf_quants.dequantize(q.numpy(), s.ggml_type)
    assert np.array_equal(dequantize(q, s, ref.shape[1]).numpy(), ref)


@pytest.mark.parametrize("kind", ["normal", "heavy", "offset"])
def test_each_scheme_within_its_error_bound(kind):
    """q8_0: half a step (a block's largest magnitude / 127) plus the float16 rounding of
    the scale; q4_0: one step (largest magnitude / 8: the value of the other sign may be
    clipped at +7); q4_k: a step of its sub-block (range / 15) plus the rounding of its
    6-bit scale and min against the super-block's largest range (range / 63), and a
    smaller error than q4_0 overall."""
    w = weights(kind)
    blocks = w.reshape(-1, 32)
    err = {n: (dequantize(quantize(w, n), n, w.shape[1]) - w).reshape(-1, 32) for n in ("q8_0", "q4_0", "q4_k")}
    amax = blocks.abs().amax(1, keepdim=True)
    assert (err["q8_0"].abs() <= amax / 127 * (0.5 + 127 * 2.0**-11) + 1e-7).all()
    assert (err["q4_0"].abs() <= amax / 8 * (1 + 8 * 2.0**-11) + 1e-7).all()
    span = (blocks.amax(1) - blocks.amin(1).clamp(max=0)).reshape(-1, 8)
    widest = span.amax(1, keepdim=True)
    assert (err["q4_k"].abs().amax(1).reshape(-1, 8) <= span / 15 + widest / 63 + 1e-6).all()
    rms = {n: e.pow(2).mean().sqrt() / w.pow(2).mean().sqrt() for n, e in err.items()}
    assert rms["q8_0"] < 0.01 and rms["q4_k"] < rms["q4_0"] < 0.15, rms


def test_rows_the_blocks_do_not_divide_are_refused():
    with pytest.raises(ValueError, match="multiple"):
        quantize(torch.randn(4, 100), "q8_0")
    with pytest.raises(ValueError, match="256"):
        quantize(torch.randn(4, 288), "q4_k")


def test_plan_keeps_the_output_at_8_bits_and_falls_back_where_blocks_do_not_fit(caplog):
    s = SCHEMES["q4_k"]
    assert tensor_scheme("layers.3.attention.wq.weight", (256, 512), s).name == "q4_k"
    assert tensor_scheme("output.weight", (1000, 512), s).name == "q8_0"
    assert tensor_scheme("tok_embeddings.weight", (1000, 512), s).name == "q4_k"
    assert tensor_scheme("layers.0.attention_norm.weight", (512,), s) is None
    assert tensor_scheme("layers.0.feed_forward.experts.0.w1.weight", (64, 512), s).name == "q4_k"
    assert tensor_scheme("layers.0.feed_forward.gate.weight", (8, 512), s) is None
    assert tensor_scheme("layers.0.attention.wq_a.weight", (64, 512), s) is None
    # q4_k's mix (llama.cpp's Q4_K_S): v of the first 4 layers, w2 of the first eighth, at 8 bits.
    assert tensor_scheme("layers.3.attention.wv.weight", (256, 512), s, 32).name == "q8_0"
    assert tensor_scheme("layers.4.attention.wv.weight", (256, 512), s, 32).name == "q4_k"
    assert tensor_scheme("layers.3.feed_forward.w2.weight", (256, 512), s, 32).name == "q8_0"
    assert tensor_scheme("layers.4.feed_forward.w2.weight", (256, 512), s, 32).name == "q4_k"
    assert tensor_scheme("layers.3.feed_forward.experts.5.w2.weight", (256, 512), s, 32).name == "q8_0"
    assert tensor_scheme("layers.3.feed_forward.experts.5.w1.weight", (256, 512), s, 32).name == "q4_k"
    assert tensor_scheme("layers.0.attention.wv.weight", (256, 512), SCHEMES["q4_0"], 32).name == "q4_0"
    with caplog.at_level(logging.INFO, logger="galerne.quant.plan"):
        assert tensor_scheme("layers.0.feed_forward.w2.weight", (256, 96), s).name == "q8_0"
        assert tensor_scheme("layers.0.feed_forward.w2.weight", (256, 100), s) is None
    assert "don't fit q4_k" in caplog.text and "kept in float" in caplog.text


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wide")
    build_hf("mistral", folder, seed=5, **WIDE)
    return folder


@pytest.mark.parametrize("name", ["q8_0", "q4_0", "q4_k"])
def test_quantizing_at_load_equals_quantizing_the_built_model(wide, name):
    """One tensor at a time as the checkpoint is read, or the whole model after: the
    same modules and bytes (q/k rows permuted from the HF layout before quantizing)."""
    streamed, _ = load_model(wide, device="cpu", quantization=name)
    after, _ = load_model(wide, device="cpu")
    done = quantize_model_(after, name)
    a, b = streamed.state_dict(), after.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert isinstance(streamed.tok_embeddings, QuantEmbedding) and isinstance(streamed.layers[1].feed_forward.w2, QuantLinear)
    assert streamed.output.scheme.name == ("q8_0" if name != "q8_0" else name)
    assert len(done) == 2 * 7 + 2
    # Norms stay float parameters: the engine reads the model's dtype from them.
    assert {p.dtype for p in streamed.parameters()} == {torch.float32}


def test_quantized_model_computes_with_its_dequantized_weights(wide):
    """A quantized layer is its dequantized weight: the model's logits equal those of
    the float model whose weights are replaced by their dequantized values."""
    q, _ = load_model(wide, device="cpu", quantization="q4_0")
    ref, _ = load_model(wide, device="cpu")
    with torch.no_grad():
        for name, m in q.named_modules():
            if isinstance(m, QuantLinear):
                ref.get_submodule(name).weight.copy_(dequantize(m.qweight, m.scheme, m.in_features))
            elif isinstance(m, QuantEmbedding):
                ref.get_submodule(name).weight.copy_(dequantize(m.qweight, m.scheme, m.embedding_dim))
    from galerne.tokenizer import Tokenizer

    tok = Tokenizer.from_path(wide)
    ids = list(range(5, 40))
    a = LLM.from_model(q, tok).score(ids)
    b = LLM.from_model(ref, tok).score(ids)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", ["hf", "mistral"])
def test_quantize_command_writes_a_folder_that_loads_as_stored(wide, tmp_path, layout):
    dst = tmp_path / "q"
    out = subprocess.run([sys.executable, "-m", "galerne.cli", "quantize", str(wide), str(dst), "--scheme", "q4_k",
                          "--to", layout], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "q4_k, 4.5 bits a weight" in out.stdout
    config = json.loads((dst / ("params.json" if layout == "mistral" else "config.json")).read_text())
    q = config["quantization" if layout == "mistral" else "quantization_config"]
    assert q["quant_method"] == "galerne" and q["scheme"] == "q4_k"
    assert q["tensors"][("output.weight" if layout == "mistral" else "lm_head.weight")] == "q8_0"
    assert (dst / "tokenizer.model.v3").is_file()
    # About 4.5 / 32 of the float32 size: embedding and output dominate a tiny model (8.5 bits for the output).
    src_bytes = sum(p.stat().st_size for p in wide.glob("*.safetensors"))
    dst_bytes = sum(p.stat().st_size for p in dst.glob("*.safetensors"))
    assert dst_bytes < src_bytes * 0.25
    stored, _ = load_model(dst, device="cpu")
    at_load, _ = load_model(wide, device="cpu", quantization="q4_k")
    a, b = stored.state_dict(), at_load.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert LLM(dst, device="cpu").generate([[1, 7, 8, 9]], GREEDY)[0].token_ids == \
        LLM(wide, device="cpu", quantization="q4_k").generate([[1, 7, 8, 9]], GREEDY)[0].token_ids


def test_quantize_refusals(wide, tmp_path):
    dst = quantize_checkpoint(wide, tmp_path / "q", "q8_0")
    with pytest.raises(ModelLoadError, match="already quantized"):
        quantize_checkpoint(dst, tmp_path / "again", "q4_0")
    with pytest.raises(ModelLoadError, match="already quantized \\(q8_0\\)"):
        load_model(dst, device="cpu", quantization="q4_0")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(ModelLoadError, match="not empty"):
        quantize_checkpoint(wide, tmp_path / "full", "q8_0")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    gguf_file = tmp_path / "m.gguf"
    gguf_file.write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(ModelLoadError, match="--to gguf --scheme q4_0"):
        quantize_checkpoint(gguf_file, tmp_path / "from-gguf", "q4_0")
    from galerne.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown quantization scheme 'q3'"):
        load_model(wide, device="cpu", quantization="q3")


def test_adapters_serve_unmerged_on_a_quantized_base(wide, tmp_path):
    """An adapter on a q4_0 base, unmerged, gives what it gives merged into the float
    weights that are the base's dequantized values; --adapter with --quantization
    merges first, then quantizes."""
    from test_multi_lora import make_adapter

    path = make_adapter(wide, tmp_path / "ad", 4, ("wq", "wv", "w2"), "peft", seed=3)
    served = LLM(wide, device="cpu", quantization="q4_0", adapters={"ad": path}, quantized_activations="float")
    assert isinstance(served.model.layers[0].attention.wq.base, QuantLinear)
    ref = LLM(wide, device="cpu", adapters={"ad": path})
    with torch.no_grad():
        for name, m in served.model.named_modules():
            if isinstance(m, QuantLinear):
                target = ref.model.get_submodule(name)
                target = getattr(target, "base", target)
                target.weight.copy_(dequantize(m.qweight, m.scheme, m.in_features))
            elif isinstance(m, QuantEmbedding):
                ref.model.get_submodule(name).weight.copy_(dequantize(m.qweight, m.scheme, m.embedding_dim))
    prompts = [[1, 5, 6, 7, 8], [1, 9, 10]]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=0)
    a = served.generate(prompts, params, adapter="ad")
    b = ref.generate(prompts, params, adapter="ad")
    for x, y in zip(a, b):
        assert x.token_ids == y.token_ids
        np.testing.assert_allclose(x.outputs[0].logprobs, y.outputs[0].logprobs, rtol=1e-4, atol=1e-4)
    merged = LLM(wide, device="cpu", quantization="q8_0", adapter=path)
    assert isinstance(merged.model.layers[0].attention.wq, QuantLinear)


@pytest.mark.parametrize("name", ["q4_0", "q4_k"])
def test_int4_matmul_operands_are_the_blocks(name):
    """What the CUDA path hands torch's int4 matmul (values, scales and zeros) is the
    scheme's weight: checked through the CPU twin of that matmul, in bfloat16."""
    from galerne.models.quant import int4_operands

    w = weights("heavy")[:, :512]
    q = quantize(w, name)
    vals, sz = int4_operands(q, SCHEMES[name], 512)
    ref = dequantize(q, name, 512)
    torch.testing.assert_close(((vals - 8) * sz[..., 0].T.repeat_interleave(32, 1) + sz[..., 1].T.repeat_interleave(32, 1)),
                               ref, rtol=1e-5, atol=1e-5)
    x = torch.randn(5, 512)
    y = torch._weight_int4pack_mm_for_cpu(x, torch._convert_weight_to_int4pack_for_cpu(vals, 8), 32, sz)
    torch.testing.assert_close(y, x @ ref.T, rtol=0.02, atol=0.05 * (x @ ref.T).abs().max().item() / 10)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["q4_0", "q4_k"])
def test_int4_on_cuda_matches_the_dequantized_weight(name):
    w = weights("normal")[:, :1024].cuda()
    layer = QuantLinear(quantize(w, name), name, 1024, torch.bfloat16)
    x = torch.randn(3, 1024, device="cuda", dtype=torch.bfloat16)
    ref = x.float() @ dequantize(layer.qweight, name, 1024).T
    torch.testing.assert_close(layer(x).float(), ref, rtol=0.02, atol=0.02 * ref.abs().max().item())
