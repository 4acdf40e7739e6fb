"""The Triton paged-attention kernel against the plain PyTorch reference.

Without CUDA the kernel runs under Triton's interpreter (TRITON_INTERPRET=1,
set before triton is imported) on CPU tensors, with tiny shapes, in seconds;
with CUDA the same tests run the compiled kernel on the GPU.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import triton_interpreted

# Without CUDA the kernels run under Triton's interpreter on CPU tensors; with CUDA
# they compile and run there (conftest.triton_interpreted).
ta, INTERPRET = triton_interpreted("galerne.engine.triton_attention", "_unified_attention_kernel")
paged_attention = ta.paged_attention
plan_paged_attention = ta.plan_paged_attention
reference_paged_attention = ta.reference_paged_attention

DEVICES = ["cpu"] if INTERPRET else ["cuda"]
# The interpreter's numpy calls warn by the hundred.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def make_batch(
    q_lens, seq_lens, H=4, K=2, hd=64, block_size=16, window=None, dtype=torch.float32,
    device="cpu", extra_blocks=3, seed=0,
):
    """A paged cache holding each sequence's keys in shuffled, non-contiguous blocks.

    With a window, blocks out of every query's window get -1 in the table and
    their cache contents are NaN: reading them would poison the output.
    """
    g = torch.Generator().manual_seed(seed)
    B = len(q_lens)
    n_blocks = [-(-L // block_size) for L in seq_lens]
    max_blocks = max(n_blocks) + 1
    total = sum(n_blocks) + extra_blocks
    perm = torch.randperm(total, generator=g)
    k_cache = torch.randn(total, block_size, K, hd, generator=g)
    v_cache = torch.randn(total, block_size, K, hd, generator=g)
    tables = torch.full((B, max_blocks), 10_000, dtype=torch.int32)  # garbage past the end
    used = 0
    for b, nb in enumerate(n_blocks):
        tables[b, :nb] = perm[used:used + nb].to(torch.int32)
        used += nb
        if window is not None:
            first_query = seq_lens[b] - q_lens[b]
            lo = max(0, first_query - window + 1)  # first key any query of b sees
            for j in range(lo // block_size):
                k_cache[tables[b, j]] = float("nan")
                v_cache[tables[b, j]] = float("nan")
                tables[b, j] = -1
    for blk in perm[used:]:  # unused blocks: NaN too
        k_cache[blk] = float("nan")
        v_cache[blk] = float("nan")
    # Unwritten slots past each sequence's end in its last block: NaN.
    for b, nb in enumerate(n_blocks):
        tail = seq_lens[b] - (nb - 1) * block_size
        k_cache[tables[b, nb - 1], tail:] = float("nan")
        v_cache[tables[b, nb - 1], tail:] = float("nan")
    T = sum(q_lens)
    q = torch.randn(T, H, hd, generator=g)
    qsl = torch.zeros(B + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(torch.tensor(q_lens), 0)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    return (
        q.to(device, dtype), k_cache.to(device, dtype), v_cache.to(device, dtype),
        tables.to(device), qsl.to(device), lens.to(device),
    )


def check(q_lens, seq_lens, *, H=4, K=2, hd=64, block_size=16, window=None, device="cpu",
          dtype=torch.float32, atol=1e-4, max_query_len=None, **plan_kw):
    q, kc, vc, bt, qsl, lens = make_batch(
        q_lens, seq_lens, H=H, K=K, hd=hd, block_size=block_size, window=window, dtype=dtype, device=device,
    )
    scale = hd ** -0.5
    ref = reference_paged_attention(q.float(), kc.float(), vc.float(), bt, qsl, lens, window, scale)
    plan = None
    if plan_kw:
        plan = plan_paged_attention(qsl, q.shape[0], H, K, hd, max_query_len or max(q_lens), **plan_kw)
    poisoned = torch.full_like(q, float("nan"))  # every element must be written
    out = paged_attention(q, kc, vc, bt, qsl, lens, window, scale, max_query_len=max_query_len, plan=plan, out=poisoned)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=0 if dtype == torch.float32 else atol)
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_decode_batch(device):
    # Several sequences, different lengths (block-aligned or not), one new token each.
    check([1, 1, 1, 1], [1, 16, 37, 70], device=device, max_query_len=1)


@pytest.mark.parametrize("device", DEVICES)
def test_prefill(device):
    check([20, 7], [20, 7], device=device)


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_prefill_and_decodes(device):
    # A prefill chunk continuing a cached prefix, a fresh prefill, and decodes.
    check([1, 23, 1, 9, 1], [41, 50, 5, 9, 17], device=device, max_query_len=23)


@pytest.mark.parametrize("device", DEVICES)
def test_chunk_continues_cached_sequence(device):
    check([13], [45], device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("q_lens,seq_lens", [([1, 1], [60, 7]), ([12, 1], [70, 53])])
def test_sliding_window(device, q_lens, seq_lens):
    # Window shorter than the context: the first blocks are -1 and full of NaN.
    check(q_lens, seq_lens, window=19, device=device)


@pytest.mark.parametrize("device", DEVICES)
def test_unmasked_tiles(device):
    # Small tiles in long contexts: tiles wholly visible to every row of a program
    # take the unmasked path, the rest (window edge, diagonal) the masked one.
    check([5, 1, 20], [100, 80, 60], tile=16, block_m=16, device=device)
    check([5, 1, 20], [100, 80, 60], window=50, tile=16, block_m=16, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("H,K,hd", [(2, 2, 64), (8, 2, 64), (4, 4, 128), (8, 2, 128), (6, 2, 64)])
def test_gqa_and_head_dims(device, H, K, hd):
    check([1, 10, 1], [30, 25, 3], H=H, K=K, hd=hd, device=device)


@pytest.mark.parametrize("device", DEVICES)
def test_block_size_and_tiles(device):
    # Tiles smaller and larger than a cache block; several query blocks per sequence.
    check([1, 20], [40, 33], block_size=32, tile=16, block_m=16, device=device)
    check([1, 20], [40, 33], block_size=8, tile=32, block_m=32, window=11, device=device)


@pytest.mark.parametrize("device", DEVICES)
def test_split_keys(device):
    # Flash-decoding: each sequence's key range cut among programs, then merged.
    check([1, 1, 1], [3, 50, 90], device=device, max_query_len=1, num_splits=3)
    check([1, 5], [80, 40], window=30, device=device, num_splits=4)
    check([1, 3], [100, 90], window=40, tile=16, device=device, num_splits=2)


@pytest.mark.parametrize("device", DEVICES)
def test_half_precision(device):
    check([1, 9, 1], [30, 25, 44], dtype=torch.float16, atol=2e-2, device=device)
    # Triton 3.6's interpreter computes bf16 tl.dot on the raw bits (garbage):
    # bf16 is checked compiled only.
    if device == "cuda":
        check([1, 9, 1], [30, 25, 44], dtype=torch.bfloat16, atol=2e-2, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("K", [1, 4])
def test_matches_sdpa_dense(device, K):
    """One sequence prefilled at once equals causal SDPA over dense k/v."""
    H, hd, L, block_size = 4, 64, 37, 16
    g = torch.Generator().manual_seed(1)
    q = torch.randn(L, H, hd, generator=g)
    k = torch.randn(L, K, hd, generator=g)
    v = torch.randn(L, K, hd, generator=g)
    n_blocks = -(-L // block_size)
    order = torch.tensor([2, 0, 1], dtype=torch.int32)[:n_blocks]  # non-contiguous placement
    k_cache = torch.zeros(n_blocks, block_size, K, hd)
    v_cache = torch.zeros(n_blocks, block_size, K, hd)
    for j in range(n_blocks):
        k_cache[order[j], : min(block_size, L - j * block_size)] = k[j * block_size:(j + 1) * block_size]
        v_cache[order[j], : min(block_size, L - j * block_size)] = v[j * block_size:(j + 1) * block_size]
    tables = order[None]
    qsl = torch.tensor([0, L], dtype=torch.int32)
    lens = torch.tensor([L], dtype=torch.int32)
    args = [x.to(device) for x in (q, k_cache, v_cache, tables, qsl, lens)]
    out = paged_attention(*args, None, hd ** -0.5, max_query_len=L)
    expected = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        is_causal=True, enable_gqa=K != H,
    )[0].transpose(0, 1)
    torch.testing.assert_close(out.cpu(), expected, atol=1e-4, rtol=0)


def test_plan_has_no_sync_shapes():
    """With max_query_len the program count depends on shapes only (graph capture)."""
    qsl = torch.tensor([0, 1, 2, 3], dtype=torch.int32)
    plan = plan_paged_attention(qsl, 3, 32, 8, 128, max_query_len=1)
    assert plan.block_m == 16 and plan.block_q == 4 and plan.num_programs == 3
    assert plan.prog_map is None  # decode: program i = sequence i, nothing launched
    qsl = torch.tensor([0, 5, 6], dtype=torch.int32)
    plan = plan_paged_attention(qsl, 6, 4, 2, 64, max_query_len=5, block_m=16)  # block_q 8
    assert plan.num_programs == 2 and plan.prog_map is None
    qsl = torch.tensor([0, 5, 6, 26], dtype=torch.int32)
    plan = plan_paged_attention(qsl, 26, 4, 2, 64, max_query_len=20, block_m=16)  # block_q 8
    # min(26 // 8 + 3, 3 * cdiv(20, 8)) = 6 programs; sequence 2 needs 3, one spare.
    assert plan.num_programs == 6
    assert plan.prog_map.tolist() == [[0, 0], [1, 0], [2, 0], [2, 1], [2, 2], [2, 3]]


# ------------------------------------------------------------------ latent caches (MLA)


def check_latent(q_lens, seq_lens, *, H=4, r=32, p=16, device="cpu", max_query_len=None, **plan_kw):
    """One kv "head" of r + p key dims whose values are a view of the first r: the
    layout of a multi-head latent attention cache (galerne/models/mla.py)."""
    q, kc, _, bt, qsl, lens = make_batch(q_lens, seq_lens, H=H, K=1, hd=r + p, device=device)
    vc = kc[..., :r]  # the same memory, as PagedKVCache keeps it
    scale = 0.37  # not (r + p) ** -0.5: MLA scores with its own head size's scale
    ref = reference_paged_attention(q.float(), kc.float(), vc.float(), bt, qsl, lens, None, scale)
    plan = plan_paged_attention(qsl, q.shape[0], H, 1, r, max_query_len or max(q_lens), **plan_kw) if plan_kw else None
    out = paged_attention(q, kc, vc, bt, qsl, lens, None, scale, max_query_len=max_query_len, plan=plan)
    assert out.shape == (q.shape[0], H, r) and torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_latent_cache_prefill_chunks_and_decodes(device):
    check_latent([1, 23, 1, 9], [41, 50, 5, 9], device=device, max_query_len=23)
    check_latent([1, 1, 1], [3, 50, 90], H=8, r=64, p=32, device=device, max_query_len=1, num_splits=3)


def test_latent_engine_step_through_the_kernel_equals_torch(tiny_factory):
    """A Mistral 4 model's whole forward over a paged latent cache: the Triton backend
    (compiled on CUDA, interpreted here) gives the torch backend's hidden states."""
    from galerne import LLM
    from galerne.engine.paged import BatchMetadata, PagedKVCache, TorchPagedAttention, TritonPagedAttention

    device = "cpu" if INTERPRET else "cuda"
    folder, _ = tiny_factory("mistral4")
    model = LLM(folder, device=device, dtype="float32", enforce_eager=True).model
    args = model.args
    g = torch.Generator().manual_seed(3)
    entries = [([2, 0, 5], 9, 3), ([1, 4], 0, 7), ([3, 6], 5, 1)]  # a chunk after a prefix, a prefill, a decode
    caches = []
    for backend in (TorchPagedAttention, TritonPagedAttention):
        torch.manual_seed(0)
        cache = PagedKVCache(args, 8, 4, torch.float32, torch.device(device))
        cache.k.copy_(torch.randn(cache.k.shape, generator=g.manual_seed(4)))
        meta = BatchMetadata.build(entries, 4, torch.device(device))
        tokens = torch.randint(3, 1000, (11,), generator=g.manual_seed(5)).to(device)
        with torch.inference_mode():
            caches.append((model(tokens, meta.positions, backend(cache, meta)), cache.k.clone()))
    torch.testing.assert_close(caches[1][0], caches[0][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(caches[1][1], caches[0][1])
