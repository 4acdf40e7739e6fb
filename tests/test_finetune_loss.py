"""The fused, chunked cross-entropy (galerne.finetune.loss) equals plain autograd over the
whole logits: loss, gradient of the hidden states and of the output weight."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from galerne.finetune.loss import linear_cross_entropy
from galerne.finetune.train import weighted_loss
from galerne.models.attention import NoCacheAttention
from galerne.weights.loader import load_model


def reference(h, weight, t, w):
    return (F.cross_entropy((h @ weight.t()).float(), t, reduction="none") * w).sum()


def inputs(n=37, d=16, v=50, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g).to(dtype).requires_grad_(True)
    weight = (torch.randn(v, d, generator=g) * 0.3).to(dtype).requires_grad_(True)
    t = torch.randint(0, v, (n,), generator=g)
    w = torch.rand(n, generator=g)
    w[::5] = 0.0
    return h, weight, t, w


@pytest.mark.parametrize("chunk", [1, 8, 37, 1000])
def test_fused_equals_autograd(chunk):
    h, weight, t, w = inputs()
    ref = reference(h, weight, t, w)
    ref.backward(torch.tensor(0.7))
    ref_dh, ref_dw = h.grad.clone(), weight.grad.clone()
    h.grad = weight.grad = None
    out = linear_cross_entropy(h, weight, t, w, chunk=chunk)
    out.backward(torch.tensor(0.7))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad, ref_dh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weight.grad, ref_dw, rtol=1e-5, atol=1e-6)


def test_fused_only_computes_the_gradients_asked_for():
    h, weight, t, w = inputs()
    weight.requires_grad_(False)
    linear_cross_entropy(h, weight, t, w, chunk=8).backward()
    assert h.grad is not None and weight.grad is None
    with torch.no_grad():
        out = linear_cross_entropy(h, weight, t, w, chunk=8)
    torch.testing.assert_close(out, reference(h, weight, t, w).detach(), rtol=1e-5, atol=1e-5)


def test_fused_under_bf16_autocast_matches_autograd_under_autocast():
    """Autocast: bf16 matmuls, float32 softmax, as F.cross_entropy(logits.float()) there."""
    h, weight, t, w = inputs(n=64, d=32, v=300)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = reference(h, weight, t, w)
    ref.backward()
    ref_dh, ref_dw = h.grad.clone(), weight.grad.clone()
    h.grad = weight.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear_cross_entropy(h, weight, t, w, chunk=16)
    out.backward()
    assert out.dtype == torch.float32 and h.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)
    for got, want in ((h.grad, ref_dh), (weight.grad, ref_dw)):  # bf16 roundings differ element-wise
        assert (got - want).norm() / want.norm() < 1e-2


def test_bad_chunk_is_refused():
    h, weight, t, w = inputs()
    with pytest.raises(ValueError, match="chunk"):
        linear_cross_entropy(h, weight, t, w, chunk=0)


@pytest.fixture(scope="module")
def tiny(tiny_factory):
    return tiny_factory("mistral")[0]


def test_weighted_loss_fused_equals_one_piece_full_weights(tiny):
    """Full-weight training (the output projection is trained): every parameter's gradient
    is the same through the fused chunks as through one autograd piece."""
    model, _ = load_model(tiny, dtype="float32", device="cpu", progress=False)
    model.requires_grad_(True)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(3, model.args.vocab_size, (40,), generator=g)
    weights = (torch.rand(40, generator=g) > 0.3).float()
    grads = []
    for chunk, fused in ((None, True), (6, True), (6, False)):  # one piece, fused chunks, checkpointed chunks
        model.zero_grad(set_to_none=True)
        backend = NoCacheAttention([25, 15])
        hidden = model(tokens, backend.positions, backend)
        loss, total = weighted_loss(model, hidden, tokens, weights, chunk=chunk, fused=fused)
        (loss / total).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for other in grads[1:]:
        for n in grads[0]:
            torch.testing.assert_close(other[n], grads[0][n], rtol=1e-4, atol=1e-6, msg=n)
