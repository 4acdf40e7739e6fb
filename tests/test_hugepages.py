"""Weights and the KV cache in transparent huge pages (galerne/hugepages.py)."""

from __future__ import annotations

import mmap

import pytest
import torch
from torch import nn

from galerne import hugepages

needs_thp = pytest.mark.skipif(not hugepages.available(),
                               reason=f"transparent huge pages are {hugepages.thp_mode()} on this kernel")

MB = 1 << 20


def _smaps(address: int) -> dict[str, int]:
    """The /proc/self/smaps fields (kB) of the mapping holding ``address``."""
    fields: dict[str, int] = {}
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and head.endswith(":") and len(line.split()) >= 2 and line.split()[1].isdigit():
                fields[head[:-1]] = int(line.split()[1])
    return fields


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(4096, 1024)  # 16 MB
        self.out = nn.Linear(1024, 4096, bias=False)
        self.out.weight = self.emb.weight
        self.mid = nn.Linear(1024, 2048, bias=False)  # 8 MB
        self.register_buffer("blocks", torch.randint(0, 255, (3000, 1024), dtype=torch.uint8))
        self.small = nn.Parameter(torch.randn(7))


@needs_thp
def test_move_keeps_values_parameters_and_ties_and_takes_huge_pages():
    torch.manual_seed(0)
    m = Tied()
    params = dict(m.named_parameters())
    before = {k: v.clone() for k, v in m.state_dict().items()}
    moved = hugepages.move_to_huge_pages(m)
    assert moved == 16 * MB + 8 * MB + 3000 * 1024 + 64  # the tied pair once; each start on 64 bytes
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert dict(m.named_parameters()) == params  # the same Parameter objects
    assert m.out.weight is m.emb.weight
    ptrs = {m.emb.weight.data_ptr(), m.mid.weight.data_ptr(), m.blocks.data_ptr(), m.small.data_ptr()}
    assert all(hugepages.in_arena(p) for p in ptrs)
    assert all(p % hugepages.ALIGN == 0 for p in ptrs)
    assert _smaps(m.emb.weight.data_ptr()).get("AnonHugePages", 0) >= 16 * 1024
    assert hugepages.move_to_huge_pages(m) == 0  # already there: nothing copied twice
    y = m.out(m.emb(torch.tensor([1, 2, 3])))
    m.mid.weight.data.add_(1)  # writable, and only this tensor changes
    assert torch.equal(m.mid.weight, before["mid.weight"] + 1) and torch.equal(m.out(m.emb(torch.tensor([1, 2, 3]))), y)


def _mapped(path, data: torch.Tensor) -> torch.Tensor:
    """``data`` written to ``path`` and viewed through a private (copy-on-write) map of
    the file, as the safetensors loader maps quantized blocks."""
    path.write_bytes(data.numpy().tobytes())
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    return torch.frombuffer(mm, dtype=torch.float32)


@needs_thp
def test_a_file_mapped_tensor_gives_its_pages_back_and_still_reads(tmp_path):
    data = torch.randn(64 * MB // 4)
    mapped = _mapped(tmp_path / "w.bin", data)
    m = nn.Module()
    m.w = nn.Parameter(mapped, requires_grad=False)
    assert torch.equal(m.w, data)  # every page read: resident
    assert _smaps(mapped.data_ptr())["Rss"] >= 60 * 1024
    hugepages.move_to_huge_pages(m)
    assert torch.equal(m.w, data)
    assert _smaps(mapped.data_ptr())["Rss"] < 1024  # the file's pages left this process ...
    assert torch.equal(mapped, data)  # ... and come back from the file when read


@needs_thp
def test_a_written_page_of_a_private_file_mapping_is_kept(tmp_path):
    path = tmp_path / "w.bin"
    mapped = _mapped(path, torch.zeros(32 * MB // 4))
    mapped[12345] = 7.0  # this process's own copy of that page, not the file's
    m = nn.Module()
    m.register_buffer("w", mapped)
    hugepages.move_to_huge_pages(m)
    assert m.w[12345] == 7.0 and mapped[12345] == 7.0  # not dropped back to the file's zero
    assert path.read_bytes()[12345 * 4: 12346 * 4] == b"\0\0\0\0"  # and the file never written


def test_zeros_is_zeros_on_every_path():
    for shape, dtype in [((2, 3), torch.float32), ((4, 1024, 1024), torch.bfloat16), ((5, 1 << 20), torch.int8)]:
        t = hugepages.zeros(shape, dtype=dtype)
        assert t.shape == shape and t.dtype == dtype and not t.any()
        t.fill_(1)
        assert int(t.sum()) == t.numel()
    assert hugepages.zeros((8 * MB,), dtype=torch.float32, device="meta").device.type == "meta"


def test_nothing_moves_without_huge_pages(monkeypatch):
    monkeypatch.setattr(hugepages, "thp_mode", lambda: "never")
    m = Tied()
    ptr = m.emb.weight.data_ptr()
    assert hugepages.move_to_huge_pages(m) == 0 and m.emb.weight.data_ptr() == ptr
    assert not hugepages.in_arena(hugepages.zeros((8 * MB,), dtype=torch.float32).data_ptr())


def test_thp_mode_reads_the_bracketed_choice(tmp_path, monkeypatch):
    setting = tmp_path / "enabled"
    monkeypatch.setattr(hugepages, "_SETTING", setting)
    assert hugepages.thp_mode() == "unavailable"
    setting.write_text("always [madvise] never\n")
    assert hugepages.thp_mode() == "madvise"
    setting.write_text("[never]\n")
    assert hugepages.thp_mode() == "never" and not hugepages.available()


@needs_thp
def test_the_engine_serves_from_huge_pages():
    from galerne import LLM, SamplingParams

    llm = LLM("galerne-mini", device="cpu", kv_cache_gb=0.1, huge_pages=True)
    out = llm.generate([[1, 5, 9]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    model = llm.engine.runner.model
    assert hugepages.in_arena(model.output.weight.data_ptr())
    assert all(hugepages.in_arena(p.data_ptr()) for p in model.layers[0].parameters())
    assert hugepages.in_arena(llm.engine.runner.cache.k.data_ptr())
    assert len(out[0].outputs[0].token_ids) == 4


def test_huge_pages_off_by_default_keeps_the_weights_where_they_are():
    from galerne import LLM, SamplingParams

    on = LLM("galerne-mini", device="cpu", kv_cache_gb=0.1, huge_pages=True)
    off = LLM("galerne-mini", device="cpu", kv_cache_gb=0.1)
    ptr = off.model.output.weight.data_ptr()
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    assert off.generate([[1, 5, 9]], params)[0].outputs[0].token_ids == on.generate([[1, 5, 9]], params)[0].outputs[0].token_ids
    assert off.model.output.weight.data_ptr() == ptr and not hugepages.in_arena(ptr)
    assert not hugepages.in_arena(off.engine.runner.cache.k.data_ptr())
