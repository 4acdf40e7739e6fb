"""Today's Mistral models beyond test_parity's logits and greedy runs: the paged engine
with batching and chunked prefill, both namings of vision-language checkpoints, the
converter's round trip, and configs refused by name."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_hf, fp8_copy, write_native
from safetensors.torch import load_file, save_file

from galerne import LLM, SamplingParams
from galerne.errors import ConfigError
from galerne.models.args import ModelArgs
from galerne.weights.export import convert

KINDS = ["ministral3", "ministral", "mistral3-ministral3"]


def reference_greedy(ref, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("kind", KINDS)
def test_batched_chunked_prefill_equals_transformers(tiny_factory, kind):
    """Prompts of different lengths in one batch, each prefilled over several 16-token
    chunks, decoding past YaRN's original context (16) and the 8-token window."""
    folder, ref = tiny_factory(kind)
    llm = LLM(folder, device="cpu", dtype="float32", block_size=4, max_num_batched_tokens=16)
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, 32768, (n,), generator=g).tolist() for n in (5, 23, 41, 70)]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    got = [o.token_ids for o in llm.generate(prompts, params)]
    assert got == [reference_greedy(ref, p, 40) for p in prompts]


def test_transformers5_naming_of_a_vision_checkpoint_loads(tiny_factory, tmp_path):
    """transformers 5 keeps ``model.language_model.*`` and ``lm_head`` in memory (and some
    tools save it that way); 4.x files say ``language_model.model.*``: both load."""
    folder, ref = tiny_factory("mistral3")
    out = tmp_path / "m"
    out.mkdir()
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text((folder / "config.json").read_text())
    (out / "tokenizer.model.v3").write_bytes((folder / "tokenizer.model.v3").read_bytes())
    assert any(k.startswith("model.language_model.") for k in load_file(str(out / "model.safetensors")))
    a = LLM(out, device="cpu", dtype="float32").score(list(range(3, 40)))
    b = LLM(folder, device="cpu", dtype="float32").score(list(range(3, 40)))
    assert torch.equal(a, b)


def test_the_vision_encoder_loads_from_the_native_layout(tiny_factory, tmp_path):
    """The encoder and projector load with the language model (their parity with
    transformers: tests/test_vision.py)."""
    _, ref = tiny_factory("mistral3")
    native = write_native(ref, tmp_path / "native")
    llm = LLM(native, device="cpu", dtype="float32")
    assert llm.model.args.vision is not None and llm.model.args.vision.image_token_id == 10
    assert llm.vision is not None and llm.vision.args.spatial_merge_size == 2
    # Its tokenizer (tokenizer.model.v3) has no image format: text only.
    assert not llm.tokenizer.takes_images


@pytest.mark.parametrize("kind", ["ministral3", "ministral3-mscale", "ministral", "mistral3-ministral3"])
def test_convert_round_trip_keeps_rope_windows_and_weights(tiny_factory, tmp_path, kind):
    folder, _ = tiny_factory(kind)
    native = convert(folder, tmp_path / "native", "mistral")
    back = convert(native, tmp_path / "hf", "hf")
    first, second = (ModelArgs.from_hf_config(json.loads((folder / "config.json").read_text())),
                     ModelArgs.from_hf_config(json.loads((back / "config.json").read_text())))
    for field in ("rope_theta", "sliding_window", "query_scaling", "dim", "n_layers", "max_seq_len"):
        assert getattr(first, field) == getattr(second, field), field
    if first.yarn:
        assert second.yarn.magnitude == pytest.approx(first.yarn.magnitude)
        assert (second.yarn.factor, second.yarn.beta_fast, second.yarn.beta_slow) == (
            first.yarn.factor, first.yarn.beta_fast, first.yarn.beta_slow)
    ids = list(range(3, 60))
    a = LLM(folder, device="cpu", dtype="float32").score(ids)
    assert torch.equal(LLM(native, device="cpu", dtype="float32").score(ids), a)
    assert torch.equal(LLM(back, device="cpu", dtype="float32").score(ids), a)
    config = json.loads((back / "config.json").read_text())
    if kind.startswith("mistral3"):  # the vision-language model, its encoder kept
        assert config["architectures"] == ["Mistral3ForConditionalGeneration"]
        assert config["text_config"]["model_type"] == "ministral3"
    else:
        assert config["architectures"][0] == {"ministral": "MinistralForCausalLM"}.get(kind, "Ministral3ForCausalLM")


def test_native_yarn_apply_scale(tmp_path):
    """params.json's ``apply_scale: false`` (what Ministral 3 ships) means cos and sin
    are not rescaled; without it, YaRN's 0.1 ln(factor) + 1 applies (vLLM's reading)."""
    base = {"dim": 64, "n_layers": 1, "n_heads": 4, "hidden_dim": 128, "vocab_size": 100, "rope_theta": 1e6,
            "llama_4_scaling": {"beta": 0.1, "original_max_position_embeddings": 16384}}
    yarn = {"factor": 16, "original_max_position_embeddings": 16384, "beta": 32, "alpha": 1}
    off = ModelArgs.from_params_json({**base, "yarn": {**yarn, "apply_scale": False}})
    on = ModelArgs.from_params_json({**base, "yarn": yarn})
    assert off.yarn.magnitude == 1.0
    assert on.yarn.magnitude == pytest.approx(0.1 * torch.log(torch.tensor(16.0)).item() + 1)
    assert off.query_scaling.beta == 0.1 and off.query_scaling.original_max_position_embeddings == 16384


@pytest.mark.parametrize("config, message", [
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}}, "rope_type 'llama3'"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 8.0}}, "original_max_position_embeddings"),
    ({"architectures": ["MinistralForCausalLM"], "sliding_window": 8, "layer_types": ["sliding_attention"]},
     "layer_types must list the 2 layers"),
    ({"architectures": ["MinistralForCausalLM"], "sliding_window": 8, "layer_types": ["chunked", "full_attention"]},
     "unknown layer type(s) 'chunked'"),
    ({"architectures": ["Mistral3ForConditionalGeneration"], "text_config": {"model_type": "qwen2"}},
     "text_config.model_type 'qwen2' is not supported"),
    ({"architectures": ["Qwen2ForCausalLM"]}, "unknown architecture 'Qwen2ForCausalLM'"),
])
def test_configs_it_cannot_run_are_refused_by_name(config, message):
    base = {"architectures": ["Ministral3ForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "intermediate_size": 128, "vocab_size": 100}
    with pytest.raises(ConfigError) as e:
        ModelArgs.from_hf_config({**base, **config}, "config.json")
    assert message in str(e.value) and "config.json" in str(e.value)


def test_native_unknown_yarn_key_is_named():
    with pytest.raises(ConfigError, match="unknown yarn key.*'?temperature"):
        ModelArgs.from_params_json({"dim": 64, "n_layers": 1, "n_heads": 4, "hidden_dim": 128, "vocab_size": 100,
                                    "yarn": {"factor": 4, "original_max_position_embeddings": 16, "temperature": 1}})


def test_a_long_prompt_past_many_scaling_steps_equals_transformers(tmp_path):
    """300 positions over an original context of 16: 18 llama-4 scaling steps, YaRN
    interpolation far past the original context, through the paged engine and the kernel."""
    ref = build_hf("ministral3", tmp_path, seed=7)
    llm = LLM(tmp_path, device="cpu", dtype="float32", block_size=16)
    g = torch.Generator().manual_seed(12)
    prompt = torch.randint(3, 32768, (280,), generator=g).tolist()
    assert llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0].token_ids == \
        reference_greedy(ref, prompt, 24)


@pytest.mark.parametrize("scale_name", ["weight_scale_inv", "weight_scale"])
def test_fp8_dense_checkpoint_with_tensor_scales(tiny_factory, tmp_path, scale_name):
    """Ministral 3 and Devstral 2 ship FP8 like this: per-tensor scales
    (``weight_block_size: null``), static activation scales (not needed once
    dequantized), the output head left in bf16 (``modules_to_not_convert``)."""
    folder, _ = tiny_factory("ministral3")
    fp8_folder = fp8_copy(folder, tmp_path / "fp8", scale_name=scale_name, activation_scale=True)
    plain = {}
    tensors = load_file(str(fp8_folder / "model.safetensors"))
    for name, t in tensors.items():
        if t.dtype == torch.float8_e4m3fn:
            plain[name] = t.float() * tensors[name.replace("weight", scale_name)]
        elif not name.endswith(("_scale", "_scale_inv")):
            plain[name] = t
    (tmp_path / "plain").mkdir()
    save_file(plain, str(tmp_path / "plain" / "model.safetensors"))
    (tmp_path / "plain" / "config.json").write_text((folder / "config.json").read_text())
    (tmp_path / "plain" / "tokenizer.model.v3").write_bytes((folder / "tokenizer.model.v3").read_bytes())
    ids = list(range(3, 50))
    fp8 = LLM(fp8_folder, device="cpu", dtype="float32")
    assert torch.equal(fp8.score(ids), LLM(tmp_path / "plain", device="cpu", dtype="float32").score(ids))
    assert fp8.model.layers[0].attention.wq.weight.dtype == torch.float32
    if scale_name == "weight_scale_inv":  # transformers' fine-grained FP8 spelling: it dequantizes on a CPU too
        import transformers

        ref = transformers.Ministral3ForCausalLM.from_pretrained(fp8_folder, dtype=torch.float32).eval()
        with torch.no_grad():
            expected = ref(torch.tensor([ids])).logits[0].float()
        assert (fp8.score(ids) - expected).abs().max().item() < 1e-4


def test_fp8_dense_checkpoint_kept_in_fp8(tiny_factory, tmp_path):
    """Kept as stored (an FP8 GPU's load; dequantized per call here): the q/k rows are
    permuted to Mistral's rotary layout in FP8, the per-tensor scale follows, and the
    logits equal the model dequantized at load."""
    from galerne.models.quant import Fp8Linear
    from galerne.weights.loader import load_model

    folder, _ = tiny_factory("ministral3")
    out = fp8_copy(folder, tmp_path / "fp8")
    kept, _ = load_model(out, dtype="float32", device="cpu", keep_fp8=True)
    assert isinstance(kept.layers[1].attention.wq, Fp8Linear) and isinstance(kept.layers[0].feed_forward.w2, Fp8Linear)
    loaded = LLM(out, device="cpu", dtype="float32")
    ids = list(range(3, 50))
    assert torch.equal(LLM.from_model(kept, loaded.tokenizer).score(ids), loaded.score(ids))
