"""Images in prompts: the Pixtral encoder and projector against transformers'
Mistral3ForConditionalGeneration and LlavaForConditionalGeneration (Pixtral 12B's layout),
both checkpoint layouts, with mistral-common's real image preprocessing, through the
paged engine (chunked prefill, prefix cache, batches); and images read safely."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from conftest import vision_tekken, write_native
from PIL import Image

from galerne import LLM, SamplingParams
from galerne.engine.sequence import Sequence
from galerne.errors import InvalidParameter, ModelLoadError
from galerne.images import ImagePolicy, load_image


def data_uri(image: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def picture(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def user(*parts) -> list[dict]:
    content = [{"type": "text", "text": p} if isinstance(p, str) else {"type": "image_url", "image_url": {"url": data_uri(p)}}
               for p in parts]
    return [{"role": "user", "content": content}]


def reference_logits(ref, ids: list[int], images) -> torch.Tensor:
    """transformers' logits for a prompt, its images padded into one batch as its
    processor pads them (image_sizes gives each one's own size)."""
    with torch.no_grad():
        if not images:
            return ref(input_ids=torch.tensor([ids])).logits[0].float()
        h = max(im.pixels.shape[1] for im in images)
        w = max(im.pixels.shape[2] for im in images)
        pixels = torch.zeros(len(images), 3, h, w)
        for k, im in enumerate(images):
            pixels[k, :, : im.pixels.shape[1], : im.pixels.shape[2]] = im.pixels
        sizes = torch.tensor([list(im.pixels.shape[1:]) for im in images])
        return ref(input_ids=torch.tensor([ids]), pixel_values=pixels, image_sizes=sizes).logits[0].float()


PROMPTS = {
    "one image": lambda: user("What is in this picture?", picture(40, 24, 0)),
    "several images": lambda: user("Compare", picture(64, 64, 1), "with", picture(17, 50, 2), picture(9, 9, 3)),
}


# Pixtral 12B's native layout is Mistral Small's without the norm and merger: the
# native reader is the same code, tested on the mistral3 model.
@pytest.mark.parametrize("kind,layout", [("mistral3", "hf"), ("mistral3", "native"), ("llava", "hf")])
@pytest.mark.parametrize("prompt", list(PROMPTS))
def test_logits_equal_transformers_through_the_paged_engine(vision_factory, tmp_path, kind, layout, prompt):
    """Every prompt position's log-probabilities (the top 5 and the prompt's own token)
    and the greedy answer's, from a prefill in chunks of 16 tokens over blocks of 4."""
    folder, ref = vision_factory(kind)
    if layout == "native":
        folder = write_native(ref, tmp_path / "native")
        vision_tekken(folder)
    llm = LLM(folder, device="cpu", dtype="float32", block_size=4, max_num_batched_tokens=16,
              enable_prefix_caching=False, quantized_activations="float")
    assert llm.vision is not None
    messages = PROMPTS[prompt]()
    ids, images = llm.tokenizer.encode_chat_with_images(messages)
    assert len(images) == sum(p["type"] == "image_url" for p in messages[0]["content"])
    want = torch.log_softmax(reference_logits(ref, ids, images), -1)
    out = llm.chat(messages, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, prompt_logprobs=5,
                                            logprobs=5))[0]
    for i, entry in enumerate(out.prompt_logprobs[1:], start=1):
        assert abs(entry.logprob - want[i - 1, ids[i]].item()) < 1e-4, i
        for tok, lp in entry.top:
            assert abs(lp - want[i - 1, tok].item()) < 1e-4, (i, tok)
    # The answer: transformers' greedy continuation of the same inputs.
    full = ids + out.token_ids
    assert out.token_ids[0] == int(want[-1].argmax())
    again = torch.log_softmax(reference_logits(ref, full, images), -1)
    for k, tok in enumerate(out.token_ids):
        assert tok == int(again[len(ids) - 1 + k].argmax())


def test_score_gives_the_logits_of_every_position(vision_factory):
    folder, ref = vision_factory("mistral3")
    llm = LLM(folder, device="cpu", dtype="float32")
    ids, images = llm.tokenizer.encode_chat_with_images(PROMPTS["several images"]())
    got = llm.score(ids, images=images)
    want = reference_logits(ref, ids, images)
    assert (got - want).abs().max() < 1e-4
    # Without its images the same ids give other logits: the rows really came from the images.
    assert (llm.score(ids) - want).abs().max() > 1e-2


def test_batch_and_prefix_cache_keep_the_images_apart(vision_factory):
    """Two prompts whose ids are the same but whose images differ never share KV blocks;
    the same prompt twice does (and gives the same answer); a batch equals each alone."""
    folder, _ = vision_factory("mistral3")
    llm = LLM(folder, device="cpu", dtype="float32", block_size=4, max_num_batched_tokens=32,
              quantized_activations="float")
    a, b = user("Describe", picture(32, 32, 7)), user("Describe", picture(32, 32, 8))
    ids_a, _ = llm.tokenizer.encode_chat_with_images(a)
    ids_b, _ = llm.tokenizer.encode_chat_with_images(b)
    assert ids_a == ids_b  # same sizes: only the images differ
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1)
    alone = [llm.chat(m, params)[0] for m in (a, b)]
    assert alone[0].outputs[0].logprobs != alone[1].outputs[0].logprobs
    # What the prefix cache holds now, for each prompt with its own images.
    bm = llm.engine.block_manager
    hits = {}
    for name, m in (("a", a), ("b", b), ("c", user("Describe", picture(32, 32, 9)))):
        ids, images = llm.tokenizer.encode_chat_with_images(m)
        hits[name] = bm.get_cached_prefix(Sequence(ids, params, images=tuple(images)))[1]
    first = images[0].offset
    assert hits["a"] >= len(ids) - 4 and hits["b"] >= len(ids) - 4  # each its own blocks
    assert hits["c"] <= first  # a third image shares only the blocks before it
    again = llm.chat(a, params)[0]
    assert again.token_ids == alone[0].token_ids
    assert again.outputs[0].logprobs == pytest.approx(alone[0].outputs[0].logprobs, abs=1e-4)
    together = llm.chat([a, b], params)
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]


def test_a_text_model_and_a_text_tokenizer_refuse_images(tiny_factory, vision_factory, tmp_path):
    folder, _ = tiny_factory("mistral")
    llm = LLM(folder, device="cpu", dtype="float32")
    with pytest.raises(InvalidParameter, match=r"messages\[0\]\.content\[1\]\.image_url.*no image format"):
        llm.chat(user("hi", picture(8, 8, 0)))
    # A vision model with a tokenizer whose image format is not the encoder's: refused at load.
    vfolder, _ = vision_factory("mistral3")
    other = tmp_path / "other"
    other.mkdir()
    for f in vfolder.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    vision_tekken(other, merge=1)
    with pytest.raises(ModelLoadError, match="image format"):
        LLM(other, device="cpu", dtype="float32")


def test_images_are_read_under_the_policy():
    policy = ImagePolicy(max_bytes=2000, max_pixels=10_000, max_side=500)
    small = data_uri(picture(20, 10, 0))
    loaded = load_image(small, policy, "f")
    assert loaded.image.size == (20, 10) and len(loaded.digest) == 64
    cases = {
        "data:image/png;base64,%%%notbase64": "not valid base64",
        "data:text/plain;base64,aGVsbG8=": "not an image",
        "data:image/png;base64," + base64.b64encode(b"hello, not an image").decode(): "supported format",
        data_uri(picture(200, 60, 0)): "over the limit",  # too many bytes
        "http://169.254.169.254/latest/meta-data/": "--allow-image-urls",
        "file:///etc/passwd": "unsupported image URL scheme 'file'",
        "just text": "not a URL",
    }
    for url, message in cases.items():
        with pytest.raises(InvalidParameter, match=message):
            load_image(url, policy, "f")
    # Decompression bombs: small PNGs whose headers say 9000 x 9000 (ours) and 30000 x 30000
    # (PIL's own bound), refused from the header.
    for side, message in ((9000, "9000x9000 pixels is over the limits"), (30000, "dimensions are over the limits")):
        bomb = io.BytesIO()
        Image.new("1", (side, side)).save(bomb, format="PNG")
        assert len(bomb.getvalue()) < 200_000
        with pytest.raises(InvalidParameter, match=message):
            load_image("data:image/png;base64," + base64.b64encode(bomb.getvalue()).decode(), ImagePolicy(), "f")
    # Truncated data: the header reads, the pixels do not.
    whole = base64.b64decode(data_uri(picture(64, 64, 1)).split(",", 1)[1])
    with pytest.raises(InvalidParameter, match="truncated or corrupt"):
        load_image("data:image/png;base64," + base64.b64encode(whole[: len(whole) // 2]).decode(), ImagePolicy(), "f")


def test_vision_args_from_both_layouts(vision_factory, tmp_path):
    from galerne.models.args import ModelArgs

    folder, ref = vision_factory("mistral3")
    hf = ModelArgs.from_hf_config(json.loads((folder / "config.json").read_text())).vision
    native = ModelArgs.from_params_json(json.loads((write_native(ref, tmp_path / "n") / "params.json").read_text())).vision
    for field in ("hidden_size", "intermediate_size", "n_layers", "n_heads", "patch_size", "image_size", "text_dim",
                  "rope_theta", "spatial_merge_size", "patch_merger", "pre_norm", "adapter_bias", "image_token_id"):
        assert getattr(hf, field) == getattr(native, field), field
    assert hf.pre_norm and hf.patch_merger and hf.spatial_merge_size == 2 and not hf.adapter_bias
    _, llava = vision_factory("llava")
    lv = ModelArgs.from_hf_config(llava.config.to_dict()).vision
    assert not lv.patch_merger and not lv.pre_norm and lv.adapter_bias and lv.spatial_merge_size == 1


@pytest.mark.parametrize("kind", ["mistral3", "llava"])
def test_convert_keeps_the_vision_encoder_and_transformers_loads_the_result(vision_factory, tmp_path, kind):
    """HF -> native -> HF round trips are bit-identical, vision tensors included, and the
    written HF folder is one transformers loads and runs to the same logits."""
    import transformers
    from safetensors.torch import load_file

    from galerne.weights.export import convert

    folder, ref = vision_factory(kind)
    native = convert(folder, tmp_path / "native", "mistral")
    params = json.loads((native / "params.json").read_text())
    assert params["vision_encoder"]["spatial_merge_size"] == (2 if kind == "mistral3" else 1)
    assert any(k.startswith("vision_encoder.transformer.layers.1.attention.wq") for k in
               load_file(str(native / "consolidated.safetensors")))
    back = convert(native, tmp_path / "hf", "hf")
    # The names transformers' save_pretrained wrote, and the same tensors.
    first, second = load_file(str(folder / "model.safetensors")), load_file(str(back / "model.safetensors"))
    assert set(first) == set(second)
    assert all(torch.equal(first[k], second[k]) for k in first)
    cls = transformers.Mistral3ForConditionalGeneration if kind == "mistral3" else transformers.LlavaForConditionalGeneration
    again = cls.from_pretrained(back, dtype=torch.float32).eval()
    llm = LLM(back, device="cpu", dtype="float32")
    ids, images = llm.tokenizer.encode_chat_with_images(PROMPTS["one image"]())
    assert torch.equal(reference_logits(again, ids, images), reference_logits(ref, ids, images))
    assert (llm.score(ids, images=images) - reference_logits(ref, ids, images)).abs().max() < 1e-4


def test_preempted_sequences_with_images_recompute_the_same_answer(vision_factory):
    """A KV cache for about half the batch: sequences are preempted (their KV dropped)
    and recomputed, their images encoded again or taken from the encoder cache."""
    folder, _ = vision_factory("mistral3")
    convos = [user(f"Picture {k}", picture(32 + 8 * k, 48, 20 + k)) for k in range(6)]
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    expected = [o.token_ids for o in LLM(folder, device="cpu", dtype="float32").chat(convos, params)]
    per_block = 2 * 2 * 4 * 2 * 16 * 4  # k+v, layers, block, kv heads, head_dim, fp32
    small = LLM(folder, device="cpu", dtype="float32", block_size=4, kv_cache_gb=per_block * 60 / 1e9)
    small.engine.runner.encoder_cache.max_bytes = 0  # every recompute encodes its image again
    assert [o.token_ids for o in small.chat(convos, params)] == expected
    assert small.engine.stats()["num_preemptions"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_images_match_transformers(vision_factory):
    """The encoder and a prompt with images on the GPU (float32, the Triton paged
    attention), against transformers on the CPU."""
    folder, ref = vision_factory("mistral3")
    llm = LLM(folder, device="cuda", dtype="float32", block_size=16)
    messages = PROMPTS["several images"]()
    ids, images = llm.tokenizer.encode_chat_with_images(messages)
    want = torch.log_softmax(reference_logits(ref, ids, images), -1)
    assert (llm.score(ids, images=images).cpu() - reference_logits(ref, ids, images)).abs().max() < 1e-3
    out = llm.chat(messages, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=1))[0]
    assert out.token_ids[0] == int(want[-1].argmax())
