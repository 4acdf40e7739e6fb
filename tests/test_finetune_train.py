"""The training loop: weighted, chunked loss; packing equals one-by-one; a tiny model learns."""

from __future__ import annotations

import pytest
import torch

from galerne import LLM
from galerne.finetune.data import PackedBatch, encode_sample, pack
from galerne.finetune.train import batch_loss, lr_factor, train_steps, weighted_loss
from galerne.models.attention import NoCacheAttention
from galerne.models.lora import apply_lora, lora_state_dict
from galerne.sampling.params import SamplingParams
from galerne.tokenizer import Tokenizer
from galerne.weights.loader import load_model

RANK, ALPHA = 8, 16.0
CONVERSATION = {"messages": [
    {"role": "user", "content": "What is the capital of Bretagne?"},
    {"role": "assistant", "content": "Rennes."},
]}


@pytest.fixture(scope="module")
def tiny(tiny_factory):
    return tiny_factory("mistral")[0]


@pytest.fixture(scope="module")
def tokenizer(tiny):
    return Tokenizer.from_path(tiny)


def lora_model(folder, seed=0):
    model, _ = load_model(folder, dtype="float32", device="cpu", progress=False)
    torch.manual_seed(seed)  # lora_A's init
    apply_lora(model, RANK, ALPHA)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # B != 0, so that the gradients of A are not all zero
        for name, t in lora_state_dict(model).items():
            if name.endswith("lora_B.weight"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.02)
    return model.eval()


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_masked_targets_do_not_contribute(tiny, tokenizer):
    model = lora_model(tiny)
    sample = encode_sample(tokenizer, CONVERSATION)
    assert 0 < sample.trained_tokens < len(sample)
    # Weight-0 targets in a trailing document (padding): document masking keeps them from
    # being inputs to any trained prediction, so only their (zero) weights touch the loss.
    batch = pack([sample], len(sample) + 6, pad_id=0)[0]
    other = PackedBatch(list(batch.tokens), list(batch.weights), list(batch.seqlens))
    for i, w in enumerate(other.weights):
        if w == 0 and i >= len(sample):
            other.tokens[i] = 1000 + i
    assert other.tokens != batch.tokens
    grads = []
    for b in (batch, other):
        model.zero_grad(set_to_none=True)
        loss, _ = batch_loss(model, b)
        loss.backward()
        grads.append(lora_grads(model))
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=0, atol=0, msg=n)

    # Within a document a weight-0 token is also an input; on fixed hidden states, changing
    # every weight-0 target leaves the loss and its gradient exactly unchanged.
    tokens = torch.tensor(sample.tokens)
    weights = torch.tensor(sample.weights)
    hidden = torch.randn(len(sample), model.args.dim, requires_grad=True)
    changed = tokens.clone()
    changed[weights == 0] = (changed[weights == 0] + 17) % model.args.vocab_size
    hgrads = []
    for t in (tokens, changed):
        hidden.grad = None
        loss, w = weighted_loss(model, hidden, t, weights, chunk=4)
        loss.backward()
        hgrads.append((loss.detach(), hidden.grad.clone()))
    assert torch.equal(hgrads[0][0], hgrads[1][0])
    assert torch.equal(hgrads[0][1], hgrads[1][1])


def test_packing_equals_one_by_one(tiny, tokenizer):
    model = lora_model(tiny)
    a = encode_sample(tokenizer, CONVERSATION)
    b = encode_sample(tokenizer, {"text": "Le chat dort sur le canapé depuis ce matin."})
    packed = pack([a, b], len(a) + len(b) + 3)
    assert len(packed) == 1 and packed[0].seqlens == [len(a), len(b), 3]
    with torch.no_grad():
        loss_p, w_p = batch_loss(model, packed[0])
        alone = [batch_loss(model, PackedBatch(s.tokens, s.weights, [len(s)])) for s in (a, b)]
    assert w_p.item() == sum(w.item() for _, w in alone) == a.trained_tokens + b.trained_tokens
    torch.testing.assert_close(loss_p, sum(l for l, _ in alone), rtol=1e-5, atol=1e-5)
    # positions restart per document
    backend = NoCacheAttention(packed[0].seqlens)
    assert backend.positions[len(a)].item() == 0


def test_chunked_equals_unchunked(tiny, tokenizer):
    model = lora_model(tiny)
    s = encode_sample(tokenizer, {"text": "Un texte un peu plus long pour couper en morceaux, encore et encore."})
    tokens, weights = torch.tensor(s.tokens), torch.tensor(s.weights)
    results = []
    for chunk in (7, 10**9):
        model.zero_grad(set_to_none=True)
        backend = NoCacheAttention([len(s)])
        hidden = model(tokens, backend.positions, backend)
        loss, w = weighted_loss(model, hidden, tokens, weights, chunk=chunk)
        loss.backward()
        results.append((loss.detach(), w, lora_grads(model)))
    (l1, w1, g1), (l2, w2, g2) = results
    assert w1 == w2
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-5)
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], rtol=1e-4, atol=1e-6, msg=n)


def test_lr_schedule():
    assert lr_factor(0, 4, 20) == 0.25 and lr_factor(3, 4, 20) == 1.0
    assert lr_factor(4, 4, 20) == 1.0 and lr_factor(20, 4, 20) == pytest.approx(0.0)
    # Cosine decay over steps 4..20: a quarter of the way, (1 + cos(pi / 4)) / 2 (a linear
    # decay would give 0.75); halfway, 0.5.
    assert lr_factor(8, 4, 20) == pytest.approx(0.853553, abs=1e-6)
    assert lr_factor(12, 4, 20) == pytest.approx(0.5)


def test_loss_falls_and_model_learns_the_answer(tiny, tokenizer):
    model = lora_model(tiny)
    sample = encode_sample(tokenizer, CONVERSATION)
    batches = pack([sample], len(sample))
    runs = [train_steps(lora_model(tiny), batches, lr=1e-2, max_steps=3, seed=3) for _ in range(2)]
    assert runs[0] == runs[1]  # deterministic
    losses = train_steps(model, batches, lr=1e-2, warmup_steps=5, max_steps=60, seed=0)
    assert len(losses) == 60
    assert losses[-1] < 0.1 * losses[0], losses
    model.eval()
    llm = LLM.from_model(model, tokenizer)
    prompt = tokenizer.encode_chat([CONVERSATION["messages"][0]])
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=16))[0]
    assert out.text.strip() == "Rennes."
    assert out.outputs[0].finish_reason == "stop"
