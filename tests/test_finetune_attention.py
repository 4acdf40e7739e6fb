"""Document masking for packed training sequences: the per-document kernel (and, on CUDA,
FlashAttention's variable-length kernel) equals the dense (T, T) mask, outputs and
gradients, with several documents, sliding windows and grouped KV heads."""

from __future__ import annotations

import pytest
import torch

from galerne.models.attention import NoCacheAttention, _varlen_attn
from galerne.models.lora import apply_lora
from galerne.weights.loader import load_model

SEQLENS = [5, 17, 1, 9, 32]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (FlashAttention's varlen kernel)")


def qkv(heads, kv_heads, hd=16, seqlens=SEQLENS, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    T = sum(seqlens)
    make = lambda h: torch.randn(T, h, hd, generator=g).to(device=device, dtype=dtype).requires_grad_(True)  # noqa: E731
    return make(heads), make(kv_heads), make(kv_heads)


def run(kernel, q, k, v, window, scale=None, seqlens=SEQLENS):
    for t in (q, k, v):
        t.grad = None
    backend = NoCacheAttention(seqlens, q.device, kernel=kernel)
    out = backend.attend(0, q, k, v, window, scale=scale)
    g = torch.Generator().manual_seed(1)
    out.backward(torch.randn(out.shape, generator=g).to(out))
    return out.detach(), [t.grad.clone() for t in (q, k, v)]


@pytest.mark.parametrize("window", [None, 4, 17, 100], ids=lambda w: f"window{w}")
@pytest.mark.parametrize("heads", [(4, 4), (6, 2)], ids=["mha", "gqa"])
def test_documents_equal_dense_mask(window, heads):
    q, k, v = qkv(*heads)
    want, want_grads = run("dense", q, k, v, window, scale=0.3)
    got, got_grads = run("documents", q, k, v, window, scale=0.3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for a, b, name in zip(got_grads, want_grads, "qkv"):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_one_document_cut_by_the_window():
    q, k, v = qkv(4, 2, seqlens=[40])
    want, want_grads = run("dense", q, k, v, 8, seqlens=[40])
    got, got_grads = run("documents", q, k, v, 8, seqlens=[40])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_documents_never_see_each_other():
    """Changing a document's keys and values changes no other document's output."""
    q, k, v = qkv(4, 2)
    before = NoCacheAttention(SEQLENS, kernel="documents").attend(0, q, k, v, None)
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[5:22] += 1.0
    v2[5:22] -= 2.0
    after = NoCacheAttention(SEQLENS, kernel="documents").attend(0, q, k2, v2, None)
    torch.testing.assert_close(after[:5], before[:5])
    torch.testing.assert_close(after[22:], before[22:])
    assert not torch.allclose(after[5:22], before[5:22])


def test_model_gradients_equal_with_either_kernel(tiny_factory):
    """A whole model (LoRA, packed documents): the loss gradients do not depend on the kernel."""
    model, _ = load_model(tiny_factory("mistral")[0], dtype="float32", device="cpu", progress=False)
    torch.manual_seed(0)
    apply_lora(model, 4, 8)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B.weight"):
                p.normal_(0, 0.02)
    g = torch.Generator().manual_seed(2)
    seqlens = [7, 12, 3, 10]
    tokens = torch.randint(3, model.args.vocab_size, (sum(seqlens),), generator=g)
    results = []
    for kernel in ("dense", "documents"):
        model.zero_grad(set_to_none=True)
        backend = NoCacheAttention(seqlens, kernel=kernel)
        hidden = model(tokens, backend.positions, backend)
        hidden.square().mean().backward()
        results.append((hidden.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (h1, g1), (h2, g2) = results
    torch.testing.assert_close(h2, h1, rtol=1e-5, atol=1e-5)
    for n in g1:
        torch.testing.assert_close(g2[n], g1[n], rtol=1e-4, atol=1e-6, msg=n)


def test_cpu_default_is_the_dense_mask_and_bad_kernel_is_refused():
    q, k, v = qkv(4, 2)
    assert NoCacheAttention(SEQLENS)._pick(q, v) == "dense"
    with pytest.raises(ValueError, match="kernel"):
        NoCacheAttention(SEQLENS, kernel="flash")


def cuda_heads() -> tuple[int, int]:
    """Grouped KV heads where this torch's varlen_attn takes them (2.11+), else as many as q's."""
    fn, params = _varlen_attn()
    if fn is None:
        pytest.skip(f"torch {torch.__version__} has no torch.nn.attention.varlen")
    return (8, 2) if "enable_gqa" in params else (8, 8)


@cuda
@pytest.mark.parametrize("window", [None, 4, 17], ids=lambda w: f"window{w}")
def test_varlen_equals_dense_on_cuda_bf16(window):
    q, k, v = qkv(*cuda_heads(), hd=64, dtype=torch.bfloat16, device="cuda")
    assert NoCacheAttention(SEQLENS, "cuda")._pick(q, v) == "varlen"
    want, want_grads = run("dense", q, k, v, window)
    got, got_grads = run("varlen", q, k, v, window)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-2)


@cuda
def test_varlen_under_autocast_takes_float32_inputs():
    q, k, v = qkv(*cuda_heads(), hd=64, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        backend = NoCacheAttention(SEQLENS, "cuda")
        assert backend._pick(q, v) == "varlen"
        got = backend.attend(0, q, k, v, 8)
    want = NoCacheAttention(SEQLENS, "cuda", kernel="dense").attend(0, q, k, v, 8)
    torch.testing.assert_close(got.float(), want, rtol=3e-2, atol=3e-2)
