"""The Triton batched-LoRA kernels (shrink + expand) against a row-by-row reference,
and MultiLoRALinear through them against its torch path.

Without CUDA the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set
before triton is imported) on CPU tensors, with tiny shapes; with CUDA the same
tests run the compiled kernels on the GPU.
"""

import pytest
import torch
from conftest import triton_interpreted
from torch import nn

tk, INTERPRET = triton_interpreted("galerne.kernels.triton_lora", "_shrink_kernel")

from galerne.models.lora import LoRARows, MultiLoRALinear  # noqa: E402

DEVICE = "cpu" if INTERPRET else "cuda"
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

S, K, N = 4, 150, 130  # slots; in and out, not multiples of any tile (64, 128)
LOW_SLOT, LOW_RANK = 3, 3  # a slot whose adapter has a rank below R (zero-padded)


def layout(T: int) -> torch.Tensor:
    """Slots of T rows: a run of slot 1 (a prefill chunk, two row blocks of 16 at
    T=37), base rows, and scattered rows of the others. T=5: [1, -1, 0, 3, -1]; past
    37, slot 2."""
    if T == 1:
        return torch.tensor([2], dtype=torch.int32)
    if T == 5:
        return torch.tensor([1, -1, 0, 3, -1], dtype=torch.int32)
    if T == 20:  # a block of base rows and slot 2, then a partial block of slot 2 alone
        return torch.tensor([-1] * 4 + [2] * 16, dtype=torch.int32)
    slots = torch.full((T,), -1, dtype=torch.int32)
    slots[:20] = 1
    slots[22:26] = -1
    slots[20], slots[21] = 0, 3
    tail = torch.tensor([2, -1, 0, 0, 3, 2, -1, 1, 1, 2, 0], dtype=torch.int32)[: T - 26]
    slots[26 : 26 + len(tail)] = tail
    slots[37:] = 2  # T > 37: a long chunk of slot 2
    return slots


PAD = 16  # rows past T in every buffer: a row block reading or writing past T shows


def make(T: int, R: int, dtype=torch.float32, seed=0):
    """x, A, B, slot_of_row, out on DEVICE, the row tensors views of buffers PAD rows
    longer (the last row's slot there: a block reading past T would see one slot);
    base rows of x are NaN (never read)."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(S, R, K, generator=g) / K**0.5
    B = torch.randn(S, N, R, generator=g) / R**0.5
    A[LOW_SLOT, LOW_RANK:] = 0
    B[LOW_SLOT, :, LOW_RANK:] = 0
    x = torch.randn(T + PAD, K, generator=g)
    slots = layout(T)
    slots = torch.cat([slots, slots[-1:].expand(PAD)])
    x[:T][slots[:T] < 0] = float("nan")
    out = torch.randn(T + PAD, N, generator=g)
    x, A, B, out = (t.to(DEVICE, dtype) for t in (x, A, B, out))
    return x[:T], A, B, slots.to(DEVICE)[:T], out[:T]


def padded_clone(out: torch.Tensor) -> torch.Tensor:
    """A copy of ``out`` that is again a view of a longer buffer, its padding 7."""
    buf = torch.full((out.shape[0] + PAD, out.shape[1]), 7.0, dtype=out.dtype, device=out.device)
    buf[: out.shape[0]] = out
    return buf[: out.shape[0]]


def check(T, R, dtype=torch.float32, atol=1e-4, **kw):
    x, A, B, slots, out = make(T, R, dtype)
    want = tk.reference_lora_delta(x, A, B, slots, out.clone())
    got = tk.lora_delta(x, A, B, slots, padded_clone(out), **kw)
    assert got.untyped_storage().nbytes() > got.nbytes  # still the view
    pad = torch.as_strided(got, (PAD, N), got.stride(), got.storage_offset() + T * got.stride(0))
    assert (pad == 7).all()  # nothing written past T
    base = slots < 0
    assert torch.equal(got[base], out[base])  # base rows: untouched, bit for bit
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=0)
    assert (got[~base] != out[~base]).any()


@pytest.mark.parametrize("T", [1, 5, 20, 37])
@pytest.mark.parametrize("R", [8, 16, 20])
@pytest.mark.parametrize("block_t", [1, 16])
def test_matches_reference_fp32(T, R, block_t):
    check(T, R, block_t=block_t, split_k=1)


@pytest.mark.parametrize("T,block_t", [(5, 1), (37, 16)])
def test_split_k_accumulates(T, block_t):
    check(T, 20, block_t=block_t, split_k=3)  # 3 splits of 64 over in = 150


@pytest.mark.parametrize("T,block_t", [(5, 1), (37, 16)])
def test_matches_reference_fp16(T, block_t):
    check(T, 16, torch.float16, atol=2e-2, block_t=block_t)


@pytest.mark.parametrize("T,block_t", [
    (5, 1), (5, 16),  # rows of mixed slots: GEMVs
    pytest.param(37, 16, marks=pytest.mark.skipif(INTERPRET, reason="the interpreter's bf16 tl.dot is garbage")),
    pytest.param(200, 16, marks=pytest.mark.skipif(INTERPRET, reason="the interpreter's bf16 tl.dot is garbage")),
])
def test_matches_reference_bf16(T, block_t):
    check(T, 16, torch.bfloat16, atol=5e-2, block_t=block_t)


def test_max_rank_reads_only_the_first_ranks():
    """Slots whose ranks are <= max_rank: the padding past it is never needed."""
    x, A, B, slots, out = make(37, 20)
    A[:, 12:] = 0
    B[:, :, 12:] = 0
    want = tk.reference_lora_delta(x, A, B, slots, out.clone())
    A[:, 12:] = float("nan")  # past max_rank: never read
    B[:, :, 12:] = float("nan")
    for block_t in (1, 16):
        got = tk.lora_delta(x, A, B, slots, out.clone(), max_rank=12, block_t=block_t)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_all_base_rows_and_empty_batch():
    x, A, B, slots, out = make(37, 8)
    slots.fill_(-1)
    for block_t in (1, 16):
        assert torch.equal(tk.lora_delta(x, A, B, slots, out.clone(), block_t=block_t), out)
    empty = tk.lora_delta(x[:0], A, B, slots[:0], out[:0])
    assert empty.shape == (0, N)


def multi_lora_linear(kernel: str, ranks=(4, 0, 8, 2), R=8, seed=0) -> MultiLoRALinear:
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(K, N, bias=False)
    with torch.no_grad():
        base.weight.copy_(torch.randn(N, K, generator=g) / K**0.5)
    m = MultiLoRALinear(base, LoRARows(kernel), max_loras=len(ranks), max_rank=R).to(DEVICE)
    for slot, r in enumerate(ranks):
        if r:
            m.set_slot(slot, torch.randn(r, K, generator=g), torch.randn(N, r, generator=g), scaling=0.5)
    return m


@pytest.mark.parametrize("seq_slots,q_lens", [
    ([2, -1, 0, 2, 3, 1], [1, 1, 1, 1, 1, 1]),  # decode, several adapters (one empty here): GEMV per row
    ([0, 0, 0, -1], [20, 1, 1, 4]),  # a chunk and decodes of one adapter: row blocks
    ([2, -1, 0], [17, 3, 18]),  # chunks of two adapters around base rows: mixed blocks
    ([-1, 1], [16, 20]),  # a block of base rows, then a chunk ending in a partial block
])
def test_multi_lora_linear_triton_equals_torch(seq_slots, q_lens):
    torch_path, triton_path = multi_lora_linear("torch"), multi_lora_linear("triton")
    x = torch.randn(sum(q_lens), K, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    for m in (torch_path, triton_path):
        m.rows.set(seq_slots, q_lens, torch.device(DEVICE))
    with torch.no_grad():
        want, got = torch_path(x), triton_path(x)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    torch_path.rows.clear()
    assert torch.equal(torch_path(x), x @ torch_path.base.weight.T)  # no rows set: the base


def test_auto_uses_torch_on_cpu_tensors():
    m = multi_lora_linear("auto")
    assert m._use_triton(torch.zeros(2, K)) is False
    assert multi_lora_linear("triton")._use_triton(torch.zeros(2, K, device=DEVICE))
    with pytest.raises(ValueError):
        LoRARows("cuda")


@pytest.mark.skipif(INTERPRET, reason="CUDA graphs need CUDA")
def test_cuda_graph_replay_follows_slot_of_row():
    """Captured once, the launch reads the slots (and x) from the device when replayed."""
    x, A, B, slots, out = make(37, 16)
    x = torch.nan_to_num(x)
    y = out.clone()
    torch.cuda.synchronize()
    tk.lora_delta(x, A, B, slots, y, block_t=16)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tk.lora_delta(x, A, B, slots, y, block_t=16)
    for seed in range(3):
        new = torch.randint(-1, S, (37,), generator=torch.Generator().manual_seed(seed), dtype=torch.int32)
        slots.copy_(new.to(DEVICE))
        y.copy_(out)
        graph.replay()
        want = tk.reference_lora_delta(x, A, B, slots, out.clone())
        torch.testing.assert_close(y, want, atol=1e-4, rtol=0)


def test_mean_run_is_weighted_by_rows():
    rows = LoRARows()
    rows.set([0] + list(range(1, 5)), [12, 1, 1, 1, 1], torch.device("cpu"))  # a chunk, 4 decodes
    assert rows.mean_run == (12 * 12 + 4) / 16
    rows.set([0, 0, -1, 0], [3, 5, 2, 1], torch.device("cpu"))  # runs 8 and 1
    assert rows.mean_run == (64 + 1) / 9
    rows.clear()
    assert rows.mean_run == 0


def test_engine_steps_through_the_kernel_equal_torch_ops(tiny_mistral, tmp_path, monkeypatch):
    """Chunked prefills next to decodes of two adapters and the base, every step through
    the forward (no CPU decode kernel, no CUDA graphs): the same tokens and logprobs
    with the Triton kernel as with torch ops."""
    from test_multi_lora import GREEDY, SPECS, make_adapter

    from galerne import LLM

    folder = tiny_mistral[0]
    paths = {n: make_adapter(folder, tmp_path / n, *SPECS[n], seed=i) for i, n in enumerate(("a", "b"), start=1)}
    prompts = [list(range(10, 10 + n)) for n in (21, 5, 12)]
    names = ["a", None, "b"]
    calls, kernel_call = [], tk.lora_delta

    def spy(x, *args, **kw):
        calls.append(x.shape[0])
        return kernel_call(x, *args, **kw)

    monkeypatch.setattr(tk, "lora_delta", spy)
    outs = {}
    for kernel in ("torch", "triton"):
        llm = LLM(folder, device=DEVICE, adapters=paths, max_num_batched_tokens=16, max_loras=2, enforce_eager=True)
        llm.engine.runner.cpu_decoder = None
        llm.engine.runner.lora.rows.kernel = kernel
        outs[kernel] = llm.generate(prompts, GREEDY, adapter=names)
        assert bool(calls) == (kernel == "triton")
    for got, want in zip(outs["triton"], outs["torch"]):
        assert got.token_ids == want.token_ids
        diff = max(abs(x - y) for x, y in zip(got.outputs[0].logprobs, want.outputs[0].logprobs))
        assert diff < 1e-4
