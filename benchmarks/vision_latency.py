"""Images in: the vision encoder's time per image and a one-image prompt's latency,
galerne beside transformers on the same random weights, in one run.

The model is ``cpu-125m``'s decoder (benchmarks/common.py) inside a
``Mistral3ForConditionalGeneration`` whose Pixtral encoder has the same size (768 wide,
12 layers, 12 heads, SwiGLU of 2048, patches of 16 pixels), with the multimodal
tokenizer mistral-common ships (``mistral_instruct_tokenizer_241114.model.v7m1``:
Pixtral Large's image format, patches of 16, no merging). Images are random pixels,
resized by mistral-common as a real request's are.

1. Encoder: the ``(--side)``-pixel square image through the encoder and projector,
   galerne's ``VisionModel`` against transformers' ``get_image_features`` (median of
   ``--repeats``, the two interleaved).
2. End to end: one user message (a line of text and the image) answered with
   ``--new-tokens`` greedy tokens, through ``LLM.chat`` (its prefill, the encoder on the
   way, then decode through the CPU kernel), against transformers' ``generate`` on the
   same prompt ids and pixels: time to the first token and in all.

    python benchmarks/vision_latency.py                  # 512 x 512 (1024 image tokens)
    python benchmarks/vision_latency.py --side 1024      # Pixtral's largest image
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import shutil
import time

import numpy as np
import torch
import transformers
from common import CACHE, SHAPES, machine, median, report
from PIL import Image

from galerne import LLM, SamplingParams

TOKENIZER = "mistral_instruct_tokenizer_241114.model.v7m1"


def checkpoint():
    folder = CACHE / "cpu-125m-vision-float32"
    if (folder / "model.safetensors").exists():
        return folder
    import mistral_common

    shape = dict(SHAPES["cpu-125m"])
    text = transformers.MistralConfig(**shape, max_position_embeddings=32768, rope_theta=1e6, sliding_window=None,
                                      bos_token_id=1, eos_token_id=2)
    vision = transformers.PixtralVisionConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                                              num_attention_heads=12, head_dim=64, patch_size=16, image_size=1024,
                                              hidden_act="silu")
    config = transformers.Mistral3Config(text_config=text, vision_config=vision, image_token_index=10,
                                         spatial_merge_size=1, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.Mistral3ForConditionalGeneration(config).eval()
    tmp = folder.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    shutil.copy(__import__("pathlib").Path(mistral_common.__file__).parent / "data" / TOKENIZER, tmp / "tokenizer.model.v7m1")
    tmp.rename(folder)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", type=int, default=512, help="the image's side in pixels (square)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=16)
    args = ap.parse_args()
    folder = checkpoint()
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (args.side, args.side, 3), dtype=np.uint8)).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    messages = [{"role": "user", "content": [{"type": "text", "text": "Describe this picture in one sentence."},
                                             {"type": "image_url", "image_url": {"url": url}}]}]

    llm = LLM(folder, device="cpu", dtype="float32")
    ref = transformers.Mistral3ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    ids, images = llm.tokenizer.encode_chat_with_images(messages)
    pixels = images[0].pixels
    print(f"image {args.side}x{args.side} -> {pixels.shape[2]}x{pixels.shape[1]} pixels, prompt of {len(ids)} tokens "
          f"({sum(t == 10 for t in ids)} image tokens)")

    # 1. The encoder (and projector), one image.
    ours, theirs = [], []
    size = torch.tensor([list(pixels.shape[1:])])
    with torch.inference_mode():
        for _ in range(args.repeats + 1):
            t = time.perf_counter()
            a = llm.vision([pixels])[0]
            ours.append(time.perf_counter() - t)
            t = time.perf_counter()
            b = ref.model.get_image_features(pixel_values=pixels[None], image_sizes=size).pooler_output[0]
            theirs.append(time.perf_counter() - t)
    assert (a - b).abs().max() < 1e-3, "the two encoders disagree"
    enc_ours, enc_theirs = median(ours[1:]), median(theirs[1:])

    # 2. End to end: a one-image prompt answered.
    params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    e2e_ours, ttft_ours, e2e_theirs, ttft_theirs, tokens = [], [], [], [], None
    for _ in range(args.repeats):
        llm.engine.runner.encoder_cache.clear()  # no help from an earlier round
        llm.engine.block_manager.reset_prefix_cache()
        request = llm.validate_chat(messages, params)
        t = time.perf_counter()
        first = None
        out = []
        engine = llm.engine
        rid = engine.add_request(request)
        done = False
        while not done:
            for o in engine.step():
                if o.request_id == rid:
                    if first is None and o.token_ids:
                        first = time.perf_counter() - t
                    out += o.token_ids
                    done = o.finish_reason is not None
        e2e_ours.append(time.perf_counter() - t)
        ttft_ours.append(first)
        tokens = out
        with torch.inference_mode():
            inputs = dict(input_ids=torch.tensor([ids]), pixel_values=pixels[None], image_sizes=size)
            t = time.perf_counter()
            ref(**inputs, logits_to_keep=1)  # the prefill alone (last row's logits, as generate does)
            ttft_theirs.append(time.perf_counter() - t)
            t = time.perf_counter()
            gen = ref.generate(**inputs, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                               do_sample=False, pad_token_id=0)
            e2e_theirs.append(time.perf_counter() - t)
    same = gen[0, len(ids):].tolist() == tokens
    figures = {
        "side": args.side, "prompt_tokens": len(ids), "new_tokens": args.new_tokens, "same_tokens": same,
        "encoder_s": {"galerne": enc_ours, "transformers": enc_theirs, "speedup": enc_theirs / enc_ours},
        "ttft_s": {"galerne": median(ttft_ours), "transformers": median(ttft_theirs),
                   "speedup": median(ttft_theirs) / median(ttft_ours)},
        "e2e_s": {"galerne": median(e2e_ours), "transformers": median(e2e_theirs),
                  "speedup": median(e2e_theirs) / median(e2e_ours)},
    }
    print(json.dumps(figures, indent=1))
    print(machine().get("cpu"))
    report("vision_latency", figures)


if __name__ == "__main__":
    main()
