"""Model weights in transparent huge pages (CPU, Linux).

A decode step reads every weight once, so its speed is the memory bandwidth, and
with 4 KB pages streaming 500 MB a step also walks 120,000 page-table entries.
Linux backs anonymous memory with 2 MB pages where the program asks for them
(``/sys/kernel/mm/transparent_hugepage/enabled`` at ``madvise``, the common
default) or everywhere (``always``); torch's allocator never asks. Measured on a
2-core Xeon: ``tensor.sum()`` over 512 MB reads 20.5 GB/s in 4 KB pages and 28.7
in 2 MB pages; the CPU decode kernel, whose rows are prefetched, gains less: its
step on cpu-125m is 1.2% shorter in float32, 4.2% in bfloat16 and 1.6% in q4_0
(``benchmarks/huge_pages.py``). The engine does this only with ``--huge-pages``
(``EngineSettings.huge_pages``): the weights are then copied at load instead of
mapped (docs/engine.md).

:func:`move_to_huge_pages` copies a module's CPU parameters and buffers into one
private anonymous mapping advised ``MADV_HUGEPAGE`` before it is touched, one
tensor at a time, keeping tied tensors tied. A tensor that viewed a file's pages
(safetensors and GGUF files are mapped, as llama.cpp maps them) gives those pages
back once copied, so the peak is the model plus its largest tensor. :func:`zeros`
gives a zeroed tensor in huge pages (the KV cache), whose pages are only taken as
they are first written."""

from __future__ import annotations

import bisect
import ctypes
import logging
import mmap
import weakref
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20
ALIGN = 64  # each tensor's start: a cache line (the kernel's vector loads)
MIN_BYTES = 16 << 20  # below this the few TLB misses don't matter: no mapping of its own
_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_mode() -> str:
    """The kernel's transparent huge page mode: "always", "madvise", "never", or
    "unavailable" (not Linux, or no such setting)."""
    try:
        text = _SETTING.read_text()
    except OSError:
        return "unavailable"
    chosen = [w[1:-1] for w in text.split() if w.startswith("[")]
    return chosen[0] if chosen else "unavailable"


def available() -> bool:
    return thp_mode() in ("always", "madvise") and hasattr(mmap, "MADV_HUGEPAGE")


_arenas: list[tuple[int, int]] = []  # the address ranges of the live arenas


def arena(nbytes: int) -> torch.Tensor:
    """``nbytes`` zeroed bytes (uint8) in a private anonymous mapping advised for huge
    pages, starting on a 2 MB boundary. The tensor keeps the mapping alive."""
    m = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.madvise(mmap.MADV_HUGEPAGE)  # before any page is touched: the faults then take 2 MB pages
    whole = torch.frombuffer(m, dtype=torch.uint8)
    span = (whole.data_ptr(), whole.data_ptr() + len(m))
    _arenas.append(span)
    weakref.finalize(m, _arenas.remove, span)
    skip = -whole.data_ptr() % HUGE_PAGE
    return whole[skip: skip + nbytes]


def zeros(shape, *, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """``torch.zeros``, in huge pages on the CPU where they are available and the
    tensor is big enough (its pages are then taken as they are first written, not
    all at once)."""
    nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    if torch.device(device).type != "cpu" or not available() or nbytes < MIN_BYTES:
        return torch.zeros(shape, dtype=dtype, device=device)
    return arena(nbytes).view(dtype).view(shape)


def _maps() -> list[tuple[int, int, bool]]:
    """(start, end, is a file) of this process's mappings, sorted (``/proc/self/maps``)."""
    ranges = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                lo, hi = parts[0].split("-")
                # A path names a file; [heap], [stack], [anon:...] and no name are anonymous.
                ranges.append((int(lo, 16), int(hi, 16), len(parts) == 6 and not parts[5].startswith("[")))
    except OSError:
        pass
    return sorted(ranges)


def in_arena(address: int) -> bool:
    """Whether ``address`` lies in a live mapping made by :func:`arena`."""
    return any(lo <= address < hi for lo, hi in _arenas)


def _find(ranges, address: int):
    i = bisect.bisect_right(ranges, (address, float("inf"))) - 1
    return ranges[i] if i >= 0 and ranges[i][0] <= address < ranges[i][1] else None


_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4


def _release_file_pages(address: int, nbytes: int) -> None:
    """Drop the pages of a file mapping in [address, address + nbytes) from this
    process (the page cache keeps them; a read faults them back in from the file),
    so that copying a mapped tensor does not hold the file's pages and the copy at
    once. Only when every page there that is present is the file's own: a private
    mapping's page that was written is this process's only copy, and stays."""
    lo = -(-address // _PAGE) * _PAGE
    hi = (address + nbytes) // _PAGE * _PAGE
    if hi <= lo:
        return
    try:
        with open("/proc/self/pagemap", "rb") as f:  # 8 bytes a page: bit 63 present, bit 61 a file's page
            f.seek(lo // _PAGE * 8)
            entries = torch.frombuffer(bytearray(f.read((hi - lo) // _PAGE * 8)), dtype=torch.int64)
    except OSError:
        return
    present = entries < 0
    if bool((present & ((entries >> 61) & 1 == 0)).any()):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), ctypes.c_int(_MADV_DONTNEED))


def tensors(module: nn.Module):
    """(owner module, attribute name, is parameter, tensor) of every parameter and buffer."""
    for owner in module.modules():
        for name, p in owner.named_parameters(recurse=False):
            yield owner, name, True, p
        for name, b in owner.named_buffers(recurse=False):
            if b is not None:
                yield owner, name, False, b


def replace(owner: nn.Module, name: str, is_param: bool, old: torch.Tensor, new: torch.Tensor) -> None:
    """Put ``new`` where :func:`tensors` found ``old``: a parameter keeps its Parameter
    object (optimizers, hooks, the CPU kernel's lookups), a buffer is reassigned."""
    if is_param:
        old.data = new
    else:
        owner._buffers[name] = new


def move_to_huge_pages(module: nn.Module) -> int:
    """Copy ``module``'s contiguous CPU parameters and buffers into one huge-page
    mapping, in place: the modules keep their Parameter objects, whose ``.data`` is
    now a view of the mapping. Tied tensors stay tied; tensors already in such a
    mapping stay where they are. A tensor that viewed a file's pages (safetensors and
    GGUF files are mapped) gives those pages back once copied, so the peak is the
    model plus one tensor. Returns the bytes moved: 0 when huge pages aren't
    available, or the tensors are too small to gain."""
    if not available():
        return 0
    maps = _maps()
    seen: dict[tuple[int, int, torch.dtype, tuple], int] = {}  # tied tensors: one copy
    plan = []
    total = 0
    for owner, name, is_param, t in tensors(module):
        if t.device.type != "cpu" or not t.is_contiguous() or t.numel() == 0 or t.is_quantized \
                or in_arena(t.data_ptr()):
            continue
        key = (t.data_ptr(), t.numel(), t.dtype, tuple(t.shape))
        if key not in seen:
            seen[key] = total
            total += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
        plan.append((owner, name, is_param, t, seen[key]))
    if total < MIN_BYTES:
        return 0
    space = arena(total)
    done: set[int] = set()
    plan.reverse()
    while plan:  # popped, so each old tensor is freed once copied
        owner, name, is_param, t, offset = plan.pop()
        nbytes = t.numel() * t.element_size()
        new = space[offset: offset + nbytes].view(t.dtype).view(t.shape)
        if offset not in done:
            new.copy_(t)
            done.add(offset)
            where = _find(maps, t.data_ptr())
            if where is not None and where[2]:
                _release_file_pages(t.data_ptr(), nbytes)
        replace(owner, name, is_param, t, new)
    log.debug("weights in huge pages: %.1f MB", total / 2**20)
    return total
