"""Mistral 4 (Mistral Small 4): latent attention, MoE with shared experts and grouped
routing, FP8 checkpoints. Parity with transformers on tiny random models, in both
layouts, and the paged engine's latent cache."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import V3_TOKENIZER
from safetensors.torch import load_file, save_file

from galerne import LLM, SamplingParams
from galerne.engine.paged import PagedKVCache
from galerne.models.args import ModelArgs, MoeArgs
from galerne.models.moe import route
from galerne.weights.export import convert
from galerne.weights.fp8 import dequantize, quantize

GREEDY = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)

# transformers' Mistral 4 names -> Mistral's native names (the table of transformers'
# own test of native loading, written here independently of galerne's converter).
_NATIVE = {
    "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_a_proj": "attention.wq_a", "self_attn.q_a_layernorm": "attention.q_a_norm",
    "self_attn.q_b_proj": "attention.wq_b", "self_attn.q_proj": "attention.wq",
    "self_attn.kv_a_proj_with_mqa": "attention.wkv_a_with_mqa", "self_attn.kv_a_layernorm": "attention.kv_a_norm",
    "self_attn.kv_b_proj": "attention.wkv_b", "self_attn.o_proj": "attention.wo",
    "mlp.gate": "gate", "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3", "mlp.shared_experts.gate_proj": "shared_experts.w1",
    "mlp.shared_experts.down_proj": "shared_experts.w2", "mlp.shared_experts.up_proj": "shared_experts.w3",
}


def native_state_dict(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in hf.items():
        name = name.replace("model.language_model.", "model.")
        top = {"lm_head.weight": "output.weight", "model.embed_tokens.weight": "tok_embeddings.weight",
               "model.norm.weight": "norm.weight"}
        if name in top:
            out[top[name]] = t
            continue
        if not name.startswith("model.layers."):
            continue  # the vision tower
        _, _, i, rest = name.split(".", 3)
        if rest == "mlp.experts.gate_up_proj":
            half = t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"layers.{i}.experts.{e}.w1.weight"] = t[e, :half].clone()
                out[f"layers.{i}.experts.{e}.w3.weight"] = t[e, half:].clone()
        elif rest == "mlp.experts.down_proj":
            for e in range(t.shape[0]):
                out[f"layers.{i}.experts.{e}.w2.weight"] = t[e].clone()
        else:
            module, suffix = rest.rsplit(".", 1)
            out[f"layers.{i}.{_NATIVE[module]}.{suffix}"] = t
    return out


def native_params(config: dict) -> dict:
    c = config.get("text_config", config)
    rp = c["rope_parameters"]
    return {
        "dim": c["hidden_size"], "n_layers": c["num_hidden_layers"], "hidden_dim": c["intermediate_size"],
        "n_heads": c["num_attention_heads"], "n_kv_heads": c["num_attention_heads"], "norm_eps": c["rms_norm_eps"],
        "head_dim": c["qk_nope_head_dim"] + c["qk_rope_head_dim"], "vocab_size": c["vocab_size"],
        "max_position_embeddings": c["max_position_embeddings"], "rope_theta": rp["rope_theta"],
        "q_lora_rank": c["q_lora_rank"], "kv_lora_rank": c["kv_lora_rank"], "qk_nope_head_dim": c["qk_nope_head_dim"],
        "qk_rope_head_dim": c["qk_rope_head_dim"], "v_head_dim": c["v_head_dim"],
        "moe": {"num_experts": c["n_routed_experts"], "num_experts_per_tok": c["num_experts_per_tok"],
                "expert_hidden_dim": c["moe_intermediate_size"], "first_k_dense_replace": c["first_k_dense_replace"],
                "num_shared_experts": c["n_shared_experts"], "routed_scale": c["routed_scaling_factor"],
                "num_expert_groups": c["n_group"], "num_expert_groups_per_tok": c["topk_group"]},
        "yarn": {"factor": rp["factor"], "original_max_position_embeddings": rp["original_max_position_embeddings"],
                 "beta": rp["beta_fast"], "alpha": rp["beta_slow"]},
        "llama_4_scaling": {"beta": rp["llama_4_scaling_beta"],
                            "original_max_position_embeddings": rp["original_max_position_embeddings"]},
    }


def write_native(src, dst) -> None:
    dst.mkdir(parents=True)
    save_file(native_state_dict(load_file(src / "model.safetensors")), str(dst / "consolidated.safetensors"))
    (dst / "params.json").write_text(json.dumps(native_params(json.loads((src / "config.json").read_text()))))
    shutil.copy(V3_TOKENIZER, dst / "tokenizer.model.v3")


KINDS = ["mistral4", "mistral4-no-q-lora", "mistral3-mistral4", "native", "converted"]


@pytest.fixture(scope="module", params=KINDS)
def pair(request, tiny_factory, tmp_path_factory):
    kind = request.param
    if kind == "native":  # written by this test from the HF weights
        src, ref = tiny_factory("mistral4")
        folder = tmp_path_factory.mktemp("m4native") / "m"
        write_native(src, folder)
    elif kind == "converted":  # galerne convert: HF -> native -> HF
        src, ref = tiny_factory("mistral4-no-q-lora")
        base = tmp_path_factory.mktemp("m4conv")
        convert(src, base / "native", "mistral")
        folder = convert(base / "native", base / "hf", "hf")
    else:
        folder, ref = tiny_factory(kind)
    return kind, LLM(folder, dtype="float32", device="cpu", block_size=4), ref


def _hf_logits(ref, ids):
    with torch.no_grad():
        return ref(ids[None]).logits[0].float()


def _hf_greedy(ref, prompt, n=64):
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_score_matches_transformers(pair):
    _, llm, ref = pair
    assert llm.model.args.mla is not None and llm.engine.cache.latent
    ids = torch.randint(3, 32768, (48,), generator=torch.Generator().manual_seed(1))  # past the 16-token YaRN context
    ours = llm.score(ids.tolist())
    assert (ours - _hf_logits(ref, ids)).abs().max().item() < 1e-4


def test_greedy_64_tokens_match_transformers(pair):
    _, llm, ref = pair
    prompt = torch.randint(3, 32768, (20,), generator=torch.Generator().manual_seed(2)).tolist()
    got = llm.generate([prompt], GREEDY)[0]
    assert got.token_ids == _hf_greedy(ref, prompt)


def test_batch_with_chunked_prefill_matches_transformers(tiny_factory):
    folder, ref = tiny_factory("mistral4")
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 32768, (n,), generator=g).tolist() for n in (5, 23, 41, 12)]
    llm = LLM(folder, dtype="float32", device="cpu", block_size=4, max_num_batched_tokens=16)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    got = [o.token_ids for o in llm.generate(prompts, params)]
    assert got == [_hf_greedy(ref, p, 24) for p in prompts]
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_latent_cache_layout_and_size(tiny_factory):
    folder, _ = tiny_factory("mistral4")
    llm = LLM(folder, dtype="float32", device="cpu", block_size=4)
    cache, args = llm.engine.cache, llm.model.args
    m = args.mla
    assert cache.k.shape[1:] == (cache.num_blocks, 4, 1, m.kv_lora_rank + m.qk_rope_head_dim)
    assert cache.v.data_ptr() == cache.k.data_ptr() and cache.v.shape[-1] == m.kv_lora_rank  # a view, stored once
    per_block = cache.k.numel() * cache.k.element_size() // cache.num_blocks
    assert PagedKVCache.bytes_per_block(args, 4, torch.float32) == per_block
    assert llm.engine.runner.cpu_decoder is None  # the native CPU kernel has no MLA: torch ops


def test_routing_worked_example():
    # The example of galerne/models/moe.py: the second group wins on its two best scores.
    probs = torch.tensor([[0.30, 0.05, 0.02, 0.01, 0.20, 0.19, 0.13, 0.10]])
    moe = MoeArgs(8, 2, num_expert_groups=2, num_expert_groups_per_tok=1, routed_scale=2.0)
    weights, idx = route(probs.log(), moe)
    assert sorted(idx[0].tolist()) == [4, 5]
    assert torch.allclose(weights[0].sum(), torch.tensor(2.0))  # renormalised, then scaled
    # Mixtral's routing (the defaults) is a softmax over the chosen logits.
    logits = torch.randn(5, 8)
    w, i = route(logits, MoeArgs(8, 2))
    top = logits.topk(2, dim=-1)
    assert torch.equal(i, top.indices)
    assert torch.allclose(w, top.values.softmax(-1), atol=1e-6)


def test_convert_round_trips(tiny_factory, tmp_path):
    src, _ = tiny_factory("mistral4")
    convert(src, tmp_path / "native", "mistral")
    convert(tmp_path / "native", tmp_path / "back", "hf")
    a, b = load_file(src / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert a.keys() == b.keys()  # packed experts written back packed
    assert all(torch.equal(a[k], b[k]) for k in a)
    native = load_file(tmp_path / "native" / "consolidated.safetensors")
    expected = native_state_dict(a)
    assert native.keys() == expected.keys() and all(torch.equal(native[k], expected[k]) for k in native)
    params = json.loads((tmp_path / "native" / "params.json").read_text())
    assert params["moe"]["num_expert_groups"] == 2 and params["kv_lora_rank"] == 32
    assert ModelArgs.from_params_json(params) == ModelArgs.from_params_json(native_params(
        json.loads((src / "config.json").read_text())))


# ------------------------------------------------------------------ FP8

QUANTIZED_HF = ("self_attn.", "mlp.experts.", "mlp.shared_experts.", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
QUANTIZED_NATIVE = (".attention.w", ".experts.", ".shared_experts.", ".feed_forward.")


def _fp8_folders(src, tmp_path, layout: str, experts: bool = True):
    """(FP8 folder, the same weights dequantized here in plain torch) from an HF
    folder: HF with 128 x 128 block scales (every tiny weight fits one block),
    native with one scale per tensor; ``experts``: quantize the routed experts too."""
    sd = load_file(src / "model.safetensors")
    config = json.loads((src / "config.json").read_text())
    if layout == "mistral":
        sd = native_state_dict(sd)
    quantized, plain = {}, {}
    for name, t in sd.items():
        if (t.dim() < 2 or not any(q in name for q in (QUANTIZED_HF if layout == "hf" else QUANTIZED_NATIVE))
                or (not experts and "mlp.experts." in name)):
            quantized[name] = plain[name] = t
            continue
        w, s = quantize(t, (128, 128) if layout == "hf" else None)
        plain[name] = w.float() * s  # s: (..., 1, 1) or a scalar
        quantized[name] = w
        if layout == "hf":
            quantized[name + "_scale_inv"] = s  # X.weight_scale_inv, or ...experts.gate_up_proj_scale_inv
        else:
            quantized[name.removesuffix(".weight") + ".qscale_weight"] = s
            quantized[name.removesuffix(".weight") + ".qscale_act"] = torch.tensor(1.0)  # unused once dequantized
    fp8, ref = tmp_path / f"fp8-{layout}", tmp_path / f"plain-{layout}"
    for folder, tensors in ((fp8, quantized), (ref, plain)):
        folder.mkdir()
        shutil.copy(V3_TOKENIZER, folder / "tokenizer.model.v3")
        if layout == "hf":
            save_file(tensors, str(folder / "model.safetensors"))
            c = dict(config)
            if folder == fp8:
                c["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128],
                                            "activation_scheme": "dynamic"}
            (folder / "config.json").write_text(json.dumps(c))
        else:
            save_file(tensors, str(folder / "consolidated.safetensors"))
            params = native_params(config)
            if folder == fp8:
                params["quantization"] = {"qformat_weight": "fp8_e4m3", "qscheme_act": "TENSOR"}
            (folder / "params.json").write_text(json.dumps(params))
    return fp8, ref


@pytest.mark.parametrize("layout", ["hf", "mistral"])
def test_fp8_checkpoint_dequantizes_at_load(tiny_factory, tmp_path, layout):
    src, _ = tiny_factory("mistral4")
    fp8, plain = _fp8_folders(src, tmp_path, layout)
    a, b = LLM(fp8, dtype="float32", device="cpu"), LLM(plain, dtype="float32", device="cpu")
    ids = list(range(5, 45))
    assert torch.equal(a.score(ids), b.score(ids))
    # ... and near the unquantized model (the tiny random model amplifies FP8's
    # rounding: its wide weights are chosen to spread logits, not to be smooth).
    full = LLM(src, dtype="float32", device="cpu").score(ids)
    assert torch.nn.functional.cosine_similarity(a.score(ids).flatten(), full.flatten(), dim=0) > 0.95


def test_fp8_matches_transformers(tiny_factory, tmp_path):
    """transformers dequantizes a fine-grained FP8 checkpoint on a CPU: same logits.
    Its routed experts stay unquantized here: transformers 5.24 loads packed FP8
    experts on a CPU without their ``gate_up_proj_scale_inv`` (reported as unexpected
    keys, the raw FP8 values used as weights); galerne's dequantization of those is
    checked against plain torch above."""
    import transformers

    src, _ = tiny_factory("mistral4")
    fp8, _ = _fp8_folders(src, tmp_path, "hf", experts=False)
    ref = transformers.Mistral4ForCausalLM.from_pretrained(fp8, dtype=torch.float32).eval()
    ref.set_experts_implementation("eager")
    ids = torch.arange(5, 45)
    ours = LLM(fp8, dtype="float32", device="cpu").score(ids.tolist())
    assert (ours - _hf_logits(ref, ids)).abs().max().item() < 1e-4


def test_block_scales_with_partial_blocks():
    # A (320, 200) weight (Mistral Small 4's wkv_a_with_mqa has 256 + 64 rows) has a
    # (3, 2) grid of 128 x 128 blocks, the last ones partial.
    w = torch.randn(320, 200) * torch.linspace(0.01, 10, 200)
    q, s = quantize(w, (128, 128))
    assert s.shape == (3, 2)
    expected = torch.empty_like(w)
    for r in range(3):
        for c in range(2):
            rows, cols = slice(128 * r, 128 * (r + 1)), slice(128 * c, 128 * (c + 1))
            expected[rows, cols] = q[rows, cols].float() * s[r, c]
    assert torch.equal(dequantize(q, s, (128, 128)), expected)
    # e4m3: 3 mantissa bits; below 2^-6 of 448 x scale, subnormals spaced 2^-9 x scale.
    assert ((expected - w).abs() <= w.abs() * 2**-4 + s.max() * 2**-10).all()


# ------------------------------------------------------------------ FP8 kept as stored


@pytest.mark.parametrize("layout", ["hf", "mistral"])
def test_fp8_kept_in_fp8_equals_dequantized_at_load(tiny_factory, tmp_path, layout):
    """What a GPU with FP8 matmuls loads (``keep_fp8``): the linear layers hold the
    checkpoint's float8 weights and scales, dequantize per call (block scales), and
    give the model dequantized at load exactly, through the paged engine too."""
    from galerne.models.quant import Fp8Linear
    from galerne.weights.loader import load_model

    src, _ = tiny_factory("mistral4")
    fp8, _ = _fp8_folders(src, tmp_path, layout)
    kept, _ = load_model(fp8, dtype="float32", device="cpu", keep_fp8=True)
    layers = [m for m in kept.modules() if isinstance(m, Fp8Linear)]
    assert layers and all(m.weight.dtype == torch.float8_e4m3fn and not m.scaled_mm for m in layers)
    assert isinstance(kept.layers[0].attention.wkv_b, Fp8Linear)  # read by pieces in the absorbed path
    loaded = LLM(fp8, dtype="float32", device="cpu")
    ids = list(range(5, 45))
    ours = LLM.from_model(kept, loaded.tokenizer, block_size=4)
    assert torch.equal(ours.score(ids), loaded.score(ids))
    prompt = [[5, 6, 7, 8, 9] * 3]
    assert ours.generate(prompt, GREEDY)[0].token_ids == loaded.generate(prompt, GREEDY)[0].token_ids


def test_kept_fp8_weights_split_and_permute_with_their_scales():
    from galerne.weights.fp8 import Fp8Weight
    from galerne.weights.names import split_packed, to_native_rows

    w = torch.randn(2, 512, 256)  # two experts, gate and up of 256 rows each: two block rows apiece
    q, s = quantize(w, (128, 128))
    parts = dict(split_packed("gate_up_proj", "0", Fp8Weight(q, s, (128, 128))))
    for e in range(2):
        for name, rows in (("w1", slice(0, 256)), ("w3", slice(256, 512))):
            got = parts[f"layers.0.feed_forward.experts.{e}.{name}.weight"]
            assert isinstance(got, Fp8Weight) and got.scale.shape == (2, 2)
            assert torch.equal(got.dense(), dequantize(q[e], s[e], (128, 128))[rows])
    # A row permutation within 128-row heads stays inside each block row: scales follow.
    q2, s2 = quantize(torch.randn(256, 128), (128, 128))
    kept = Fp8Weight(q2, s2, (128, 128)).permuted_rows(lambda t: to_native_rows(t, 2), 128)
    assert isinstance(kept, Fp8Weight)
    assert torch.equal(kept.dense(), to_native_rows(dequantize(q2, s2, (128, 128)), 2))
    # Heads of 64 rows in blocks of 128: also inside (two heads per block row).
    assert isinstance(Fp8Weight(q2, s2, (128, 128)).permuted_rows(lambda t: to_native_rows(t, 4), 64), Fp8Weight)
    # Rows cut inside a block: dequantized rather than mis-scaled.
    half = Fp8Weight(q2, s2, (128, 128)).rows(0, 100)
    assert torch.equal(half, dequantize(q2, s2, (128, 128))[:100])


def test_fp8_matmul_path_is_close_to_the_dequantized_weights():
    """The per-tensor FP8 matmul (``torch._scaled_mm``, activations quantized per row):
    what an FP8 GPU runs, checked here on the CPU, which has the same op."""
    from galerne.models.quant import Fp8Linear

    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(96, 64, generator=g), torch.randn(5, 7, 64, generator=g)
    q, s = quantize(w, None)
    fast, slow = Fp8Linear(q, s, None, scaled_mm=True), Fp8Linear(q, s, None, scaled_mm=False)
    got, expected = fast(x), slow(x)
    assert got.shape == (5, 7, 96) and got.dtype == x.dtype
    # e4m3 keeps 3 mantissa bits per activation: a few percent per product, averaged out.
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()
    assert torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0) > 0.999
    with pytest.raises(ValueError, match="per-tensor"):
        Fp8Linear(*quantize(w, (32, 32)), (32, 32), scaled_mm=True)
