"""Quantized weights (q8_0, q4_0, q4_k) in galerne's native CPU decode kernel.

The kernel reads each matrix in its block scheme and multiplies float32
activations by the weights it decodes: its logits must be those of the torch path,
which dequantizes the weight (``galerne.quant.dequantize``) and multiplies in
float32, up to the order of the sums. With int8_dot (``--quantized-activations
int8``), block matrices take inputs rounded to int8 per block of 32: the reference is
then ``cpu.int8_reference`` in torch ops. The shapes mix the formats on purpose: with hidden 256 and an intermediate
size of 288, q4_k's w2 (rows of 288) falls back to q8_0, and a head size of 18
leaves wo's rows (108) to no scheme at all: float32 next to blocks in one step.
"""

from __future__ import annotations

import copy
import platform

import pytest
import torch

from galerne import LLM, SamplingParams
from galerne.kernels import cpu as cpu_kernels
from galerne.models.quant import QuantLinear
from galerne.quant import SCHEMES as SCHEMES_ALL
from galerne.quant import dequantize, quantize
from galerne.quant.plan import quantize_model_
from galerne.tokenizer import Tokenizer
from galerne.weights.loader import load_model

from conftest import build_hf, has_compiler
from test_cpu_kernel import BLOCK, SlotLoRA, one_step

pytestmark = pytest.mark.skipif(not has_compiler(), reason="no C++ compiler to build the kernel with")

SCHEMES = ("q8_0", "q4_0", "q4_k")
MIXED = dict(hidden_size=256, intermediate_size=288, num_attention_heads=6, num_key_value_heads=2, head_dim=18)
# Grouped heads (8 over 2) whose rows are all q4_k's 256, and a sliding window.
WINDOW = dict(hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=2, head_dim=32,
              sliding_window=6)
LENS = {"one": [5], "ten": [4, 0, 7, 37, 12, 3, 20, 9, 1, 30]}  # ten: tiles of 4, 4, 2


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("quant-mixed")
    build_hf("mistral", folder, seed=11, **MIXED)
    return folder


@pytest.fixture(scope="module")
def window_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("quant-window")
    build_hf("mistral", folder, seed=12, **WINDOW)
    return folder


_QUANTIZED: dict = {}


def quantized(folder, scheme: str, dtype: str = "float32"):
    """The model of ``folder`` quantized with ``scheme`` (a copy: quantizing q4_k's
    32768-row embedding takes seconds, done once per module), and what was quantized."""
    key = (str(folder), scheme, dtype)
    if key not in _QUANTIZED:
        model = LLM(folder, device="cpu", dtype=dtype).model
        _QUANTIZED[key] = model, quantize_model_(model, scheme)
    model, done = _QUANTIZED[key]
    model = copy.deepcopy(model)
    assert cpu_kernels.unsupported(model, model.norm.weight.dtype) is None
    return model, done


def assert_logits_close(got, expected):
    """1e-4 of the logits' scale: the kernel and torch sum in different orders."""
    assert got.shape == expected.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def assert_kv_close(ours, ref):
    for a, b in ((ours.k, ref.k), (ours.v, ref.v)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


# ------------------------------------------------------------------ dequantize


def _weights(rows: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, n, generator=g) * torch.rand(rows, 1, generator=g) * 4
    w[3] = 0  # a zero row: zero scales
    w[5, :40] = 1e-3  # tiny weights next to large ones
    w[6] *= 1e4  # scales that need float16's range
    return w


@pytest.mark.parametrize("scheme", SCHEMES)
def test_dequantize_equals_the_torch_dequantize_exactly(scheme):
    ext = cpu_kernels.load()
    q = quantize(_weights(77, 512, seed=1), scheme)
    got = ext.dequantize(q, scheme, 512, 2)
    assert got.dtype == torch.float32 and got.shape == (77, 512)
    assert torch.equal(got, dequantize(q, scheme, 512))
    with pytest.raises(RuntimeError, match="bytes"):
        ext.dequantize(q[:, :-2].contiguous(), scheme, 512, 2)


def test_quant_linear_dequantizes_through_the_kernel(monkeypatch):
    q = quantize(_weights(40, 256, seed=2), "q4_k")
    layer = QuantLinear(q, "q4_k", 256)
    calls = []
    real = cpu_kernels.dequantize
    monkeypatch.setattr(cpu_kernels, "dequantize", lambda *a: calls.append(a) or real(*a))
    x = torch.randn(40, 256)  # past GEMV_MAX_ROWS: a prefill's chunk
    torch.testing.assert_close(layer(x), x @ dequantize(q, "q4_k", 256).T, rtol=1e-5, atol=1e-5)
    assert calls and calls[0][0] is q


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quant_linear_multiplies_a_few_rows_by_the_kernels_gemv(scheme, monkeypatch):
    q = quantize(_weights(77, 512, seed=3), scheme)
    layer = QuantLinear(q, scheme, 512)
    dense = dequantize(q, scheme, 512)
    monkeypatch.setattr(cpu_kernels, "dequantize", lambda *a: pytest.fail("a few rows need no dense weight"))
    for shape in ((1, 512), (2, 3, 512), (32, 512)):
        x = torch.randn(shape)
        y = layer(x)
        assert y.shape == (*shape[:-1], 77)
        torch.testing.assert_close(y, x @ dense.T, rtol=1e-5, atol=1e-5 * (x @ dense.T).abs().max().item())


# ------------------------------------------------------------------ one decode step


@pytest.mark.parametrize("lens", LENS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantized_step_equals_dequantize_then_matmul(mixed_folder, scheme, lens):
    model, done = quantized(mixed_folder, scheme)
    assert done["layers.0.feed_forward.w2.weight"] == ("q8_0" if scheme == "q4_k" else scheme)
    assert "layers.0.attention.wo.weight" not in done  # rows of 108: float32 among the blocks
    got, expected, ours, ref = one_step(model, LENS[lens], seed=3)
    assert_logits_close(got, expected)
    assert_kv_close(ours, ref)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantized_step_with_grouped_heads_and_a_window(window_folder, scheme):
    model, done = quantized(window_folder, scheme)
    assert model.args.window(0) == 6 and set(done.values()) <= {scheme, "q8_0"}
    got, expected, ours, ref = one_step(model, [3, 6, 29, 0, 11], seed=4)  # inside, at and past the window
    assert_logits_close(got, expected)
    assert_kv_close(ours, ref)


def add_quant_lora(model, seed: int = 0, slots: int = 3, rank: int = 18):
    """SlotLoRA (test_cpu_kernel's stand-in for MultiLoRALinear) around every linear
    of layer 0 and wq, w2 of the others, on quantized bases."""
    g = torch.Generator().manual_seed(seed)
    for i, layer in enumerate(model.layers):
        owners = {"wq": layer.attention, "wk": layer.attention, "wv": layer.attention, "wo": layer.attention,
                  "w1": layer.feed_forward, "w3": layer.feed_forward, "w2": layer.feed_forward}
        for target, owner in owners.items():
            if i > 0 and target not in ("wq", "w2"):
                continue
            base = getattr(owner, target)
            out, n = (base.out_features, base.in_features)
            a = 0.3 * torch.randn(slots, rank, n, generator=g)
            b = 0.2 * torch.randn(slots, out, rank, generator=g)
            setattr(owner, target, SlotLoRA(base, a, b))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_adapter_slots_on_a_quantized_base(mixed_folder, scheme):
    lens, slots = LENS["ten"], [2, -1, 0, 0, 1, -1, 2, 0, 1, 0]
    model, _ = quantized(mixed_folder, scheme)
    plain, _, _, _ = one_step(model, lens, seed=5)
    plain = plain.clone()
    add_quant_lora(model)
    assert cpu_kernels.unsupported(model, torch.float32) is None
    got, expected, ours, ref = one_step(model, lens, seed=5, slots=slots)
    assert_logits_close(got, expected)
    assert_kv_close(ours, ref)
    for row, s in enumerate(slots):  # the adapters matter
        if s >= 0:
            assert (got[row] - plain[row]).abs().max() > 0.1 * plain[row].abs().max()


def test_bfloat16_activations_on_quantized_weights(mixed_folder):
    model, _ = quantized(mixed_folder, "q4_0", dtype="bfloat16")
    got, expected, _, _ = one_step(model, [0, 9, 30, 4, 17], seed=2)
    # Float32 activations in the kernel, bf16 ones (rounded at every op) in torch: close.
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 2 / 3


def test_schemes_the_kernel_does_not_read_use_the_torch_path(mixed_folder):
    model, _ = quantized(mixed_folder, "q4_0")
    model.layers[1].feed_forward.w1.scheme = SCHEMES_ALL["q6_k"]  # read by torch only
    assert cpu_kernels.unsupported(model, torch.float32) == "q6_k weights (the kernel reads q8_0, q4_0, q4_k)"


def test_bad_quantized_shapes_are_refused(mixed_folder):
    model, _ = quantized(mixed_folder, "q8_0")
    layer = model.layers[0].feed_forward
    layer.w1 = QuantLinear(layer.w1.qweight[:, :-34].contiguous(), "q8_0", 224)
    with pytest.raises(RuntimeError, match="where 288 rows of 256 weights were expected"):
        one_step(model, [3])


# ------------------------------------------------------------------ int8 activations

INT8 = ("q8_0", "q4_0", "q4_k")


def _inputs(m: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, n, generator=g) * torch.rand(m, 1, generator=g) * 3
    x[0, :32] = 0  # a block of zeros: dx is 0
    x[-1, 32:64] = 1e-3
    x[-1, 40] = 50  # one large value among small ones: they round to 0
    return x


def test_rounding_the_inputs():
    x = _inputs(3, 128, seed=1)
    q, dx = cpu_kernels.round_activations(x)
    assert q.shape == (3, 4, 32) and dx.shape == (3, 4, 1)
    assert torch.equal(q[0, 0], torch.zeros(32, dtype=q.dtype)) and dx[0, 0].item() == 0
    assert q.abs().max() == 127 and (q.abs().amax(-1) == 127).sum() == 11  # every block but the zero one
    assert ((q * dx - x.reshape(3, 4, 32)).abs() <= dx / 2 * (1 + 1e-6)).all()  # within half a step
    assert (q[2, 1] != 0).sum() == 1  # the small values next to 50
    q, dx = cpu_kernels.round_activations(torch.cat([x, x], 1), 256)  # q4_k's: one scale per 256
    assert q.shape == (3, 1, 256) and (q.abs().amax(-1) == 127).all() and torch.equal(dx[:, 0], x.abs().amax(1, keepdim=True) / 127)


@pytest.mark.parametrize("scheme", INT8)
def test_int8_gemv_equals_rounded_inputs_times_the_dequantized_weights(scheme):
    """What --quantized-activations int8 computes: the inputs rounded per block of 32,
    times the dequantized weights, in float64 torch ops, to float32's rounding. The
    float path differs from it by far more: the test tells the two apart."""
    ext = cpu_kernels.load()
    sizes = (256, 768) if scheme == "q4_k" else (96, 512, 768)  # 3 blocks: an odd one alone
    for n in sizes:
        q = quantize(_weights(77, n, seed=n), scheme)
        for m in (1, 2, 3, 5, 9):  # tiles of 1, 2, 3 and 4 sequences
            x = _inputs(m, n, seed=m)
            ref = cpu_kernels.int8_reference(x, q, scheme, n)
            got = ext.linear(x, q, scheme, n, 2, True)
            tol = 1e-5 * ref.abs().max().item()
            torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=tol)
            assert (ext.linear(x, q, scheme, n, 2, False).double() - ref).abs().max() > 20 * tol


@pytest.fixture
def int8_torch_layers(monkeypatch):
    """QuantLinear's block layers computing cpu.int8_reference (torch ops): the torch side
    of one_step then computes what the kernel's int8 path should, independently."""
    real = QuantLinear.forward

    def forward(self, x):
        if self.scheme.name not in INT8:
            return real(self, x)
        rows = x.reshape(-1, self.in_features)
        y = cpu_kernels.int8_reference(rows, self.qweight, self.scheme, self.in_features)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    monkeypatch.setattr(QuantLinear, "forward", forward)


@pytest.mark.parametrize("scheme", INT8)
def test_int8_step_equals_the_torch_path_on_rounded_inputs(mixed_folder, scheme, int8_torch_layers):
    """One sequence. (Rounding to int8 is not continuous: a value the kernel and torch
    compute 1 ulp apart can round to neighbouring integers, and that moves this tiny
    random model's logits by 1-4%, as a 3e-7 relative nudge of torch's own inputs does.
    These contexts have no such tie; the batch is checked against them below.)"""
    model, _ = quantized(mixed_folder, scheme)
    for n, seed in ((5, 3), (37, 4)):
        got, expected, ours, ref = one_step(model, [n], seed=seed, int8_dot=True)
        assert_logits_close(got, expected)
        assert_kv_close(ours, ref)


@pytest.mark.parametrize("scheme", INT8)
def test_int8_batch_rows_equal_each_sequence_alone(mixed_folder, scheme):
    """The tiles of 4, 3, 2 and 1 sequences (q4_0's of 4 go as two of 2) compute each
    row as a batch of one does, to the bit: the integer sums are exact and every row
    takes its float operations in the same order."""
    from galerne.engine.paged import PagedKVCache

    model, _ = quantized(mixed_folder, scheme)
    lens = LENS["ten"] + [15]  # 11: tiles of 4, 4, 3
    g = torch.Generator().manual_seed(9)
    per = -(-(max(lens) + 1) // BLOCK)  # blocks per sequence
    cache = PagedKVCache(model.args, per * len(lens), BLOCK, torch.float32, torch.device("cpu"))
    cache.k.copy_(torch.randn(cache.k.shape, generator=g))
    cache.v.copy_(torch.randn(cache.v.shape, generator=g))
    entries = [(list(range(per * i, per * (i + 1))), n, 1) for i, n in enumerate(lens)]
    tokens = torch.randint(3, model.args.vocab_size, (len(lens),), generator=g).tolist()
    decoder = cpu_kernels.CpuDecoder.create(model, cache.k, cache.v, int8_dot=True)
    batch = decoder(tokens, entries).clone()
    for i in range(len(lens)):
        assert torch.equal(decoder([tokens[i]], [entries[i]])[0], batch[i]), i


@pytest.mark.parametrize("scheme", INT8)
def test_int8_inputs_stay_within_half_a_step(scheme):
    """Against float32 inputs, an output moves by at most half of each block's step dx
    times the block's sum of |w| (what rounding each input costs), and by less on
    average: the errors of a block's inputs cancel."""
    ext = cpu_kernels.load()
    n = 768
    q = quantize(_weights(77, n, seed=5), scheme)
    w = dequantize(q, scheme, n).double()
    x = _inputs(9, n, seed=6)
    block = cpu_kernels.input_block(scheme)  # q4_k's inputs share a scale per 256
    _, dx = cpu_kernels.round_activations(x, block)
    bound = (dx[..., 0].double() / 2) @ w.abs().reshape(77, n // block, block).sum(-1).T  # (9, 77)
    err = (ext.linear(x, q, scheme, n, 2, True).double() - ext.linear(x, q, scheme, n, 2, False).double()).abs()
    assert (err <= bound * (1 + 1e-4) + 1e-5).all()
    assert err.mean() < 0.1 * bound.mean()


def test_quantized_activations_setting():
    from galerne.config import EngineSettings
    from galerne.errors import InvalidParameter

    assert EngineSettings().quantized_activations == "int8"
    with pytest.raises(InvalidParameter, match="quantized_activations.*int8 or float"):
        EngineSettings(quantized_activations="int4")


# ------------------------------------------------------------------ the AVX2 build


@pytest.mark.slow  # a build of the kernel for another ISA (about 40 s the first time)
@pytest.mark.skipif(platform.machine() != "x86_64", reason="the AVX2 baseline is an x86-64 level")
@pytest.mark.parametrize("scheme", SCHEMES)
def test_the_avx2_build(mixed_folder, scheme):
    """Built for x86-64-v3 (AVX2 + FMA, no AVX512), the kernel runs the 8-wide paths
    that laptops and AMD servers run, which a native build here never does."""
    ext = cpu_kernels._build(march="x86-64-v3")
    q = quantize(_weights(77, 512, seed=1), scheme)
    assert torch.equal(ext.dequantize(q, scheme, 512, 2), dequantize(q, scheme, 512))
    model, _ = quantized(mixed_folder, scheme)
    got, expected, ours, ref = one_step(model, LENS["ten"], seed=6, ext=ext)
    assert_logits_close(got, expected)
    assert_kv_close(ours, ref)
    add_quant_lora(model)
    got, expected, _, _ = one_step(model, LENS["ten"], seed=6, ext=ext, slots=[2, -1, 0, 0, 1, -1, 2, 0, 1, 0])
    assert_logits_close(got, expected)
    if scheme in INT8:  # the AVX2 integer dot products (vpmaddubsw)
        for n, m in ((512, 1), (768, 5)):
            q = quantize(_weights(77, n, seed=n), scheme)
            x = _inputs(m, n, seed=m)
            ref = cpu_kernels.int8_reference(x, q, scheme, n)
            torch.testing.assert_close(ext.linear(x, q, scheme, n, 2, True).double(), ref, rtol=1e-5,
                                       atol=1e-5 * ref.abs().max().item())


# ------------------------------------------------------------------ end to end


@pytest.mark.parametrize("activations", ["float", "int8"])
def test_quantized_generation_equals_the_torch_path(mixed_folder, activations):
    """The kernel's steps against the torch path's (QuantLinear, whose few-row products
    round the inputs to int8 as the kernel does when --quantized-activations is int8).
    With int8, a tie that rounds apart (see above) sends this random model's greedy
    paths apart for good, and moves a logprob by a few percent: with int8, the first
    decode step's token (the second) is compared, its logprobs to 0.1."""
    model, _ = load_model(mixed_folder, dtype="float32", device="cpu", quantization="q4_0")  # quantized at load

    def llm(**engine):
        return LLM.from_model(copy.deepcopy(model), Tokenizer.from_path(mixed_folder / "tokenizer.model.v3"),
                              block_size=BLOCK, quantized_activations=activations, **engine)

    fast, eager = llm(), llm(enforce_eager=True)
    assert fast.engine.runner.int8_dot == (activations == "int8")
    assert eager.engine.runner.cpu_decoder is None  # (the engine is made on first use)
    assert all(m.int8_dot == (activations == "int8") for m in eager.model.modules() if isinstance(m, QuantLinear))
    assert fast.engine.runner.cpu_decoder is not None and eager.engine.runner.cpu_decoder is None
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 32768, (n,), generator=g).tolist() for n in (5, 23, 11)]
    params = SamplingParams(temperature=0, max_tokens=16 if activations == "float" else 2, ignore_eos=True, logprobs=3)
    a, b = fast.generate(prompts, params), eager.generate(prompts, params)
    for x, y in zip(a, b):
        assert x.token_ids == y.token_ids
        tol = 1e-4 if activations == "float" else 0.1
        torch.testing.assert_close(torch.tensor(x.outputs[0].logprobs), torch.tensor(y.outputs[0].logprobs),
                                   rtol=tol, atol=tol)
