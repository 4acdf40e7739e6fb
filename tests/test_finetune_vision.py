"""Fine-tuning on data with images: the chat format's image_url parts in user messages
(mistral-finetune's format has none), encoded by mistral-common; the language model
(LoRA or all weights) and the projector learn, the encoder stays frozen; the projector
travels with the adapter and is served with it."""

from __future__ import annotations

import json

import pytest
import torch
from test_vision import PROMPTS, data_uri, picture, reference_logits

from galerne import LLM, SamplingParams
from galerne.finetune.config import load_config
from galerne.finetune.data import DataError, encode_sample, pack
from galerne.finetune.train import batch_loss
from galerne.finetune.trainer import train
from galerne.tokenizer import Tokenizer
from galerne.weights.adapters import PROJECTOR_FILE
from galerne.weights.loader import load_model, load_vision


def line(question: str, image, answer: str) -> dict:
    return {"messages": [
        {"role": "user", "content": [{"type": "text", "text": question},
                                     {"type": "image_url", "image_url": {"url": data_uri(image)}}]},
        {"role": "assistant", "content": answer}]}


@pytest.fixture(scope="module")
def vision(vision_factory):
    return vision_factory("mistral3")


def test_a_line_with_images_encodes_as_a_request_does(vision):
    folder, _ = vision
    tok = Tokenizer.from_path(folder)
    row = line("What colour?", picture(40, 24, 0), "Red.")
    sample = encode_sample(tok, row)
    ids, images = tok.encode_chat_with_images(row["messages"][:1])
    assert sample.tokens[: len(ids)] == ids  # the prompt part is the request's
    assert len(sample.images) == 1 and sample.images[0].offset == images[0].offset
    assert torch.equal(sample.images[0].pixels, images[0].pixels) and sample.images[0].digest == images[0].digest
    im = sample.images[0]
    assert all(w == 0 for w in sample.weights[: im.end])  # image tokens are not trained on
    assert sum(w > 0 for w in sample.weights) == len(sample.tokens) - len(ids)
    # Packed after another sample, its span moves with it.
    first = encode_sample(tok, line("And this?", picture(16, 16, 1), "Blue."))
    packed = pack([first, sample], 512)[0]
    assert [i.offset for i in packed.images] == [first.images[0].offset, len(first.tokens) + im.offset]


def test_bad_image_lines_name_the_part(vision, tiny_factory):
    folder, _ = vision
    tok = Tokenizer.from_path(folder)
    bad = line("What?", picture(8, 8, 0), "x")
    bad["messages"][0]["content"][1]["image_url"]["url"] = "data:image/png;base64,@@"
    with pytest.raises(DataError, match=r"messages\[0\]\.content\[1\]\.image_url: the data URI's payload is not valid base64"):
        encode_sample(tok, bad)
    url = line("What?", picture(8, 8, 0), "x")
    url["messages"][0]["content"][1]["image_url"]["url"] = "http://example.com/a.png"
    with pytest.raises(DataError, match="not fetched"):
        encode_sample(tok, url)
    thinking = {"messages": [{"role": "user", "content": [{"type": "thinking", "thinking": "x"}]},
                             {"role": "assistant", "content": "y"}]}
    with pytest.raises(DataError, match="text or image_url parts"):
        encode_sample(tok, thinking)
    text_folder, _ = tiny_factory("mistral")
    with pytest.raises(DataError, match="no image format"):
        encode_sample(Tokenizer.from_path(text_folder), line("What?", picture(8, 8, 0), "x"))


def test_the_training_loss_is_transformers_and_only_the_projector_learns(vision):
    """batch_loss of a packed sequence with two image lines equals the cross-entropy of
    transformers' Mistral3ForConditionalGeneration on the same ids and pixels; its gradient
    reaches the projector and never the encoder."""
    folder, ref = vision
    tok = Tokenizer.from_path(folder)
    samples = [encode_sample(tok, line("What colour?", picture(40, 24, 0), "Red, mostly.")),
               encode_sample(tok, line("And here?", picture(24, 48, 1), "Blue."))]
    model, ckpt = load_model(folder, dtype="float32", device="cpu")
    v = load_vision(ckpt, dtype=torch.float32, device=torch.device("cpu"))
    params = v.train_projector()
    total, weight = 0.0, 0.0
    for s in samples:  # transformers, one sample at a time
        logits = reference_logits(ref, s.tokens, s.images)
        ce = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(s.tokens[1:]), reduction="none")
        w = torch.tensor(s.weights[1:])
        total, weight = total + float((ce * w).sum()), weight + float(w.sum())
    batch = pack(samples, 256)[0]
    loss, w = batch_loss(model, batch, vision=v)
    assert float(w) == weight and float(loss) == pytest.approx(total, rel=1e-5)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert all(p.grad is None for p in v.vision_encoder.parameters())


@pytest.mark.slow
def test_lora_on_images_trains_and_serves_the_projector(vision, tmp_path):
    """A LoRA run on image data writes the projector beside the adapter; served unmerged
    (per request) the adapter's sequences use it, and give what the merged model gives."""
    folder, _ = vision
    rows = [line(q, picture(32, 32, k), a) for k, (q, a) in
            enumerate([("Colour?", "Red."), ("Shape?", "Square."), ("Size?", "Small."), ("Mood?", "Calm.")])]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(None, {"model_id_or_path": str(folder), "run_dir": str(tmp_path / "run"),
                             "data": {"instruct_data": str(data), "eval_instruct_data": str(data)},
                             "seq_len": 256, "max_steps": 8, "eval_freq": 8, "lora": {"rank": 4},
                             "optim": {"lr": 1e-2}})
    result = train(cfg, progress_bar=False)
    assert result.losses[-1] < result.losses[0] and result.eval is not None
    out = result.output
    assert (out / PROJECTOR_FILE).is_file() and (out / "adapter_model.safetensors").is_file()
    base = LLM(folder, device="cpu", dtype="float32", adapters={"ft": out}, quantized_activations="float")
    merged = LLM(folder, device="cpu", dtype="float32", adapter=out, quantized_activations="float")
    trained = {k: v for k, v in merged.vision.projector_state().items()}
    before = base.vision.projector_state()
    assert any(not torch.equal(trained[k], before[k]) for k in trained)  # the projector learned
    assert all(torch.equal(a, b) for a, b in zip(merged.vision.vision_encoder.state_dict().values(),
                                                  base.vision.vision_encoder.state_dict().values()))  # not the encoder
    messages = rows[0]["messages"][:1]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=1)
    unmerged = base.chat(messages, params, adapter="ft")[0]
    alone = merged.chat(messages, params)[0]
    assert unmerged.token_ids == alone.token_ids
    assert unmerged.outputs[0].logprobs == pytest.approx(alone.outputs[0].logprobs, abs=1e-3)
    # The base, asked the same, runs through the base projector: other numbers.
    plain = base.chat(messages, params)[0]
    assert plain.outputs[0].logprobs != pytest.approx(unmerged.outputs[0].logprobs, abs=1e-3)


@pytest.mark.slow
def test_full_weights_on_images_write_a_vision_checkpoint(vision, tmp_path):
    folder, _ = vision
    rows = [line("Colour?", picture(32, 32, k), "Red.") for k in range(2)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(None, {"model_id_or_path": str(folder), "run_dir": str(tmp_path / "run"),
                             "data": {"instruct_data": str(data)}, "seq_len": 256, "max_steps": 2,
                             "lora": {"enable": False}, "optim": {"lr": 1e-4}})
    out = train(cfg, progress_bar=False).output
    llm = LLM(out, device="cpu", dtype="float32")
    assert llm.vision is not None and llm.tokenizer.takes_images
    ids, images = llm.tokenizer.encode_chat_with_images(PROMPTS["one image"]())
    assert llm.score(ids, images=images).shape == (len(ids), llm.model.args.vocab_size)


@pytest.mark.slow
def test_resume_on_images_restores_the_projector(vision, tmp_path):
    """Stopped at step 3 and resumed: the losses and the trained projector are an
    uninterrupted run's."""
    from safetensors.torch import load_file

    from galerne.finetune.trainer import checkpoint_dirs

    folder, _ = vision
    rows = [line(q, picture(24, 24, k), a) for k, (q, a) in enumerate([("Colour?", "Red."), ("Shape?", "Round.")])]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def cfg(run: str):
        return load_config(None, {"model_id_or_path": str(folder), "run_dir": str(tmp_path / run),
                                  "data": {"instruct_data": str(data)}, "seq_len": 256, "max_steps": 6,
                                  "ckpt_freq": 3, "lora": {"rank": 4}, "optim": {"lr": 1e-2}})

    full = train(cfg("full"), progress_bar=False)

    def stop_at_3(row):
        if row["step"] == 3:
            raise KeyboardInterrupt

    first = train(cfg("split"), on_log=stop_at_3, progress_bar=False)
    assert first.interrupted and (checkpoint_dirs(tmp_path / "split")[-1] / PROJECTOR_FILE).is_file()
    rest = train(cfg("split"), resume=True, progress_bar=False)
    torch.testing.assert_close(torch.tensor(first.losses + rest.losses), torch.tensor(full.losses), rtol=0, atol=1e-6)
    a, b = load_file(str(full.output / PROJECTOR_FILE)), load_file(str(rest.output / PROJECTOR_FILE))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
