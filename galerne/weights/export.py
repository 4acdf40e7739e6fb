"""Write a checkpoint in either layout: ``galerne convert SRC DST --to mistral|hf``
(``--to gguf``: ``weights/gguf.py``).

Tensors are renamed and q/k rows permuted by ``names.py`` only (pure re-indexing)
and keep their dtype unless asked otherwise, so HF -> Mistral -> HF gives back
bit-identical tensors.

Files are written one tensor at a time (``StreamingSafetensorsWriter``):
``safetensors.torch.save_file`` wants every tensor of a file in memory at once,
which for a 14.5 GB single ``consolidated.safetensors`` would need as much RAM.
The format is a length-prefixed JSON header followed by raw little-endian bytes,
so writing it in a stream is short and the result is read back by ``safetensors``.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import torch
from tqdm import tqdm

from ..errors import ModelLoadError
from .loader import _ST_TO_TORCH, Checkpoint, resolve_dtype, vision_native_items
from .names import (
    is_vision_tensor,
    native_to_hf,
    pack_experts,
    permute_for,
    permute_rows,
    to_native_file,
    vision_native_to_hf,
)

log = logging.getLogger(__name__)

_ST_DTYPES = {dt: code for code, dt in _ST_TO_TORCH.items()}
HF_SHARD_BYTES = 5 * 1024**3  # the Hub's usual shard size

# Files that travel with the weights: tokenizers and generation defaults.
_COMPANIONS = (
    "tekken.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "generation_config.json", "chat_template.jinja", "chat_template.json",
)


@dataclass
class _Entry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


class StreamingSafetensorsWriter:
    """Write a .safetensors file whose tensors (names, dtypes, shapes) are known in
    advance, one tensor at a time, in the announced order."""

    def __init__(self, path: Path, entries: list[_Entry], metadata: dict[str, str] | None = None):
        header: dict[str, dict] = {"__metadata__": metadata or {"format": "pt"}}  # type: ignore[dict-item]
        offset = 0
        for e in entries:
            if e.dtype not in _ST_DTYPES:
                raise ModelLoadError(f"dtype {e.dtype} cannot be stored in safetensors", tensor=e.name)
            header[e.name] = {"dtype": _ST_DTYPES[e.dtype], "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
            offset += e.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data must start 8-byte aligned
        self._order = [e.name for e in entries]
        self._expected = {e.name: e for e in entries}
        self._f = open(path, "wb")
        self._f.write(len(raw).to_bytes(8, "little"))
        self._f.write(raw)
        self._next = 0

    def write(self, name: str, t: torch.Tensor) -> None:
        want = self._order[self._next]
        e = self._expected[want]
        if name != want or t.dtype != e.dtype or tuple(t.shape) != e.shape:
            raise RuntimeError(f"tensor {name} {t.dtype} {tuple(t.shape)} written out of plan (expected {want})")
        self._f.write(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._order):
            raise RuntimeError(f"{len(self._order) - self._next} tensors were announced but not written")
        self._f.close()


def _prepare_destination(dst: str | Path, src: Path | None) -> Path:
    dst = Path(dst)
    if src is not None and dst.resolve() == src.resolve():
        raise ModelLoadError("the destination is the source folder", path=str(dst))
    if dst.exists() and any(dst.iterdir()):
        raise ModelLoadError("destination folder is not empty", path=str(dst))
    dst.mkdir(parents=True, exist_ok=True)
    return dst


def convert(
    src: str | Path, dst: str | Path, to: str, *, dtype: str | None = None, progress: bool | None = None,
    scheme: str | None = None,
) -> Path:
    """Convert the checkpoint in ``src`` to layout ``to``: "mistral" or "hf", a folder
    ``dst``; "gguf", the file ``dst``, its tensors in ``scheme`` (``weights.gguf.write_gguf``,
    which also reads a GGUF file: a GGUF converts to GGUF only, its tokenizer being
    inside it)."""
    if to == "gguf":
        from .gguf import write_gguf

        if dtype is not None:
            raise ModelLoadError("a GGUF file's types are chosen with the scheme (f32, f16, bf16, q8_0, ...), not dtype")
        return write_gguf(src, dst, scheme=scheme, progress=progress)
    if scheme is not None:
        raise ModelLoadError("a scheme applies to GGUF output only (--to gguf)")
    _check_layout(to)
    from .gguf import is_gguf

    if is_gguf(src):
        raise ModelLoadError("a GGUF file converts to GGUF only (--to gguf): its tokenizer is inside it", path=str(src))
    ckpt = Checkpoint.open(src)
    dst = _prepare_destination(dst, ckpt.folder)
    # Plan every file from the headers first (names, shapes, dtypes), then stream
    # the tensors through: only one tensor is in memory at a time. A vision-language
    # checkpoint's encoder and projector follow the language model.
    metas = ((native, meta) for _, _, native, meta in chain(ckpt.native_tensors(meta=True),
                                                            vision_native_items(ckpt, meta=True)))
    tensors = ((native, t) for _, _, native, t in chain(ckpt.native_tensors(), vision_native_items(ckpt)))
    return write_checkpoint(dst, to, ckpt.args, metas, tensors, companions_from=ckpt.folder, dtype=dtype, progress=progress,
                            with_vision=ckpt.args.vision is not None)


def save_model(
    model, dst: str | Path, to: str, *, companions_from: str | Path | None = None,
    dtype: str | None = None, progress: bool | None = None, shard_bytes: int | None = None,
    state_dict: dict[str, torch.Tensor] | None = None, vision=None,
) -> Path:
    """Write an in-memory model (e.g. with a LoRA adapter merged) as a checkpoint
    folder of layout ``to``; tokenizer files are copied from ``companions_from``.
    ``state_dict``: the tensors to write instead of ``model.state_dict()`` (the full
    weights gathered from FSDP shards). ``vision``: a vision-language model's encoder
    and projector (``models.vision.VisionModel``), written with it."""
    _check_layout(to)
    dst = _prepare_destination(dst, Path(companions_from) if companions_from else None)
    state = {k: v.detach() for k, v in (model.state_dict() if state_dict is None else state_dict).items()}
    if vision is not None:
        state.update((k, v.detach()) for k, v in vision.state_dict().items())
    metas = ((k, v.to("meta")) for k, v in state.items())
    return write_checkpoint(dst, to, model.args, metas, iter(state.items()),
                            companions_from=Path(companions_from) if companions_from else None, dtype=dtype, progress=progress,
                            shard_bytes=shard_bytes, with_vision=vision is not None)


def _check_layout(to: str) -> None:
    if to not in ("mistral", "hf"):
        raise ModelLoadError(f"unknown target layout {to!r} (use 'mistral' or 'hf')")


def quantize_checkpoint(src: str | Path, dst: str | Path, scheme: str, *, to: str | None = None,
                        progress: bool | None = None) -> Path:
    """Write the checkpoint in ``src`` quantized with block scheme ``scheme`` (q8_0, q4_0,
    q4_k: ``galerne.quant``) to ``dst``, in layout ``to`` (default: the source's). The
    tensors the scheme applies to (``quant.plan.tensor_scheme``) are stored as uint8
    blocks, the others as they are; the config says which (``quantization`` in
    params.json, ``quantization_config`` in config.json, ``quant_method: galerne``).
    One tensor is in memory at a time."""
    from ..quant import quantize
    from ..quant import scheme as find
    from ..quant.plan import stored_schemes, tensor_scheme

    target = find(scheme)
    from .gguf import is_gguf

    if is_gguf(src):
        raise ModelLoadError(f"a GGUF file: its tokenizer lives inside it, so quantize it into another GGUF file: "
                             f"galerne convert {src} OUT.gguf --to gguf --scheme {target.name}", path=str(src))
    ckpt = Checkpoint.open(src)
    to = to or ckpt.layout
    _check_layout(to)
    if stored_schemes(ckpt.args) is not None:
        raise ModelLoadError("this checkpoint is already quantized; quantize its float original", path=str(ckpt.folder))
    dst = _prepare_destination(dst, ckpt.folder)
    chosen: dict[str, str] = {}

    def planned(native: str, meta: torch.Tensor) -> torch.Tensor:
        s = tensor_scheme(native, tuple(meta.shape), target, ckpt.args.n_layers)
        if s is None:
            return meta
        chosen[native] = s.name
        return torch.empty(meta.shape[0], s.row_bytes(meta.shape[1]), dtype=torch.uint8, device="meta")

    # The vision encoder and projector stay in float (a small part of the bytes; the
    # encoder's quality matters for every image token).
    metas = [(native, planned(native, meta)) for _, _, native, meta in ckpt.native_tensors(meta=True)]
    metas += [(native, meta) for _, _, native, meta in vision_native_items(ckpt, meta=True)]
    tensors = ((native, quantize(t.float(), chosen[native]) if native in chosen else t)
               for _, _, native, t in chain(ckpt.native_tensors(), vision_native_items(ckpt)))
    names = {native: (to_native_file(native, ckpt.args) if to == "mistral" else native_to_hf(native, ckpt.args)[0])
             for native in chosen}
    cfg = {"quant_method": "galerne", "scheme": target.name, "tensors": {names[n]: s for n, s in chosen.items()}}
    key = "quantization" if to == "mistral" else "quantization_config"
    return write_checkpoint(dst, to, ckpt.args, iter(metas), tensors, companions_from=ckpt.folder, dtype=None,
                            progress=progress, config_extra={key: cfg}, with_vision=ckpt.args.vision is not None)


def write_checkpoint(dst: Path, to: str, a, metas, tensors, *, companions_from: Path | None, dtype: str | None,
                     progress: bool | None, shard_bytes: int | None = None, config_extra: dict | None = None,
                     with_vision: bool = False) -> Path:
    """Write (native name, tensor) items in layout ``to``: ``metas`` (shape/dtype-only
    tensors, for planning the files) and ``tensors`` must list the same names in
    the same order. ``config_extra``: keys added to the written config. ``with_vision``:
    the items include the vision encoder's and projector's, and the config is the
    vision-language one (Hugging Face: the names transformers' save_pretrained writes,
    ``language_model.model.*``, ``language_model.lm_head``, ``vision_tower.*``,
    ``multi_modal_projector.*``)."""
    cast = resolve_dtype(dtype, torch.device("cpu")) if dtype else None
    v = a.vision if with_vision else None

    def target(native: str, t: torch.Tensor) -> tuple[str, torch.Tensor]:
        if to == "mistral":
            return to_native_file(native, a), t
        if v is not None and is_vision_tensor(native):
            name, rotary = vision_native_to_hf(native)  # type: ignore[misc]
            return name, permute_rows(t, rotary, v.n_heads, v.n_heads, to="hf")
        name, rotary = native_to_hf(native, a)  # type: ignore[misc]
        if v is not None:
            name = "language_model." + name
        return name, permute_for(a, t, rotary, to="hf")

    def kept(items):
        items = ((n, t) for n, t in items if not (n == "output.weight" and a.tied_embeddings))
        if to == "hf" and a.mla is not None:
            # transformers' Mistral 4 reads its routed experts packed, one tensor per layer.
            items = pack_experts(items, a)
        return items

    entries = [_Entry(name, cast or t.dtype, tuple(t.shape)) for native, meta in kept(metas) for name, t in [target(native, meta)]]
    files = _plan_files(entries, to, shard_bytes)
    by_name = {e.name: f for f, group in files.items() for e in group}
    writers = {f: StreamingSafetensorsWriter(dst / f, group) for f, group in files.items()}
    # Tensors arrive in the planned order, so each writer receives its tensors in
    # the order it announced.
    for native, t in tqdm(kept(tensors), total=len(entries), desc=f"writing {to} checkpoint", unit="tensor",
                          disable=None if progress is None else not progress, leave=False):
        name, out = target(native, t)
        writers[by_name[name]].write(name, out.to(cast) if cast is not None else out)
    for w in writers.values():
        w.close()

    out_dtype = cast or next((e.dtype for e in entries if e.dtype.is_floating_point), torch.float32)
    if to == "mistral":
        (dst / "params.json").write_text(json.dumps({**a.to_params_json(with_vision), **(config_extra or {})}, indent=2)
                                         + "\n")
    else:
        config = {**a.to_hf_config(str(out_dtype).removeprefix("torch."), with_vision), **(config_extra or {})}
        (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if len(files) > 1:
            index = {"metadata": {"total_size": sum(e.nbytes for e in entries)}, "weight_map": by_name}
            (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    if companions_from is not None:
        for p in companions_from.iterdir():
            if p.is_file() and (p.name in _COMPANIONS or p.name.startswith("tokenizer.model")):
                shutil.copy2(p, dst / p.name)
    return dst


def _plan_files(entries: list[_Entry], to: str, shard_bytes: int | None = None) -> dict[str, list[_Entry]]:
    """File name -> entries; HF shards of at most ``shard_bytes`` (default ``HF_SHARD_BYTES``)."""
    shard_bytes = shard_bytes or HF_SHARD_BYTES
    if to == "mistral":
        return {"consolidated.safetensors": entries}
    shards: list[list[_Entry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    if len(shards) == 1:
        return {"model.safetensors": shards[0]}
    n = len(shards)
    return {f"model-{i + 1:05d}-of-{n:05d}.safetensors": s for i, s in enumerate(shards)}
