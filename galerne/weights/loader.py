"""Find a checkpoint, read its config, and load its weights into a model built on
the ``meta`` device, one memory-mapped tensor at a time.

Two folder layouts are understood:

- Mistral-native: ``params.json`` + ``consolidated.safetensors`` (or
  ``consolidated-0000x-of-0000y.safetensors``);
- Hugging Face: ``config.json`` + ``model.safetensors`` or shards listed in
  ``model.safetensors.index.json``.

Pickle checkpoints (``.bin``, ``.pth``, ``.pt``) are read only through
``torch.load(weights_only=True)``, which cannot run code; anything else is refused.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from ..errors import ConfigError, ModelLoadError
from ..models.args import ModelArgs
from ..models.quant import Fp8Linear, fp8_matmul_supported
from ..models.transformer import Transformer
from ..models.vision import VisionModel
from ..quant import SCHEMES, QTensor, Scheme, quantize
from ..quant import scheme as find_scheme
from ..quant.plan import (
    quantized_module,
    replace_module,
    stored_schemes,
    tensor_scheme,
    tie_output,
)
from .fp8 import FP8_DTYPES, Fp8Format, Fp8Weight, dequantize, is_scale
from .names import (
    IGNORED_HF,
    PACKED_HF,
    from_native_file,
    hf_to_native,
    is_vision_tensor,
    permute_for,
    permute_rows,
    split_packed,
    strip_text_prefix,
    vision_hf_to_native,
)

log = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_PICKLE_SUFFIXES = (".bin", ".pth", ".pt")

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """"auto": bfloat16 on a GPU, float32 on a CPU (where bf16 matmuls are slow on
    most processors and fp32 is the reference precision)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(DTYPES)}") from None


@dataclass
class Checkpoint:
    """A model folder as found on disk: its layout, config and weight files."""

    folder: Path
    layout: str  # "mistral" | "hf"
    config_path: Path
    args: ModelArgs
    weight_files: list[Path]

    @classmethod
    def open(cls, folder: str | Path, layout: str | None = None) -> Checkpoint:
        folder = Path(folder)
        if not folder.is_dir():
            raise ModelLoadError("not a folder", path=str(folder))
        params, config = folder / "params.json", folder / "config.json"
        native_files = sorted(folder.glob("consolidated*.safetensors"))
        if layout is None:
            # Mistral's own Hub repos ship both layouts: prefer the native one.
            if params.exists() and (native_files or not config.exists()):
                layout = "mistral"
            elif config.exists():
                layout = "hf"
            else:
                raise ModelLoadError(
                    "no params.json (Mistral-native) or config.json (Hugging Face) in this folder",
                    path=str(folder),
                )
        if layout == "mistral":
            args = ModelArgs.from_params_json(_read_json(params), str(params))
            files = native_files or _pickle_files(folder, "consolidated")
            config_path = params
        elif layout == "hf":
            args = ModelArgs.from_hf_config(_read_json(config), str(config))
            files = _hf_weight_files(folder)
            config_path = config
        else:
            raise ModelLoadError(f"unknown layout {layout!r} (use 'mistral' or 'hf')")
        if not files:
            raise ModelLoadError(
                f"no weights found: expected {'consolidated.safetensors' if layout == 'mistral' else 'model.safetensors or model-*-of-*.safetensors'}",
                path=str(folder),
            )
        return cls(folder, layout, config_path, args, files)

    def raw_tensors(self, meta: bool = False, scales: bool | None = None,
                    vision: bool = False) -> Iterator[tuple[Path, str, torch.Tensor]]:
        """Yield (file, checkpoint name, tensor) for every tensor of the files, lazily.
        With ``meta``, the tensors are shape/dtype-only, read from the file headers.
        ``scales``: True, only FP8 scale tensors; False, all but them; None, all (the
        others are not read). A vision-language checkpoint's vision tensors are read
        apart: only them with ``vision`` (``load_vision``), else all but them."""
        multimodal = self.args.vision is not None

        def wanted(name: str) -> bool:
            if multimodal and is_vision_tensor(name):
                return vision
            return not vision and (scales is None or is_scale(name) == scales)

        for path in self.weight_files:
            if path.suffix == ".safetensors":
                try:
                    with safe_open(str(path), framework="pt") as f:
                        mapped = None
                        for name in f.keys():
                            if not wanted(name):
                                continue
                            if meta:
                                yield path, name, _meta_of(f.get_slice(name))
                            elif f.get_slice(name).get_dtype() == "U8":  # quantized blocks: mapped, not copied
                                mapped = mapped or _map_safetensors(path)
                                yield path, name, mapped(name)
                            else:
                                yield path, name, f.get_tensor(name)
                except (SafetensorError, OSError) as e:
                    raise ModelLoadError(f"cannot read safetensors file: {e}", path=str(path)) from None
            else:
                for name, t in _load_pickle(path).items():
                    if wanted(name):
                        yield path, name, t.to("meta") if meta else t

    def tensors(self, meta: bool = False, keep_fp8: bool = False) -> Iterator[tuple[Path, str, torch.Tensor]]:
        """:meth:`raw_tensors`, FP8 weights dequantized with their scales (float32),
        or with ``keep_fp8`` as they are stored (``Fp8Weight``: weight and scales),
        and the scales themselves left out (see ``weights/fp8.py``)."""
        blocks = stored_schemes(self.args)
        if blocks is not None:
            yield from self._block_tensors(blocks, meta)
            return
        fmt = Fp8Format.from_args(self.args)
        if fmt is None:
            yield from self.raw_tensors(meta)
            return
        # The scales first, one pass that reads only them (a small fraction of the bytes).
        scales = {name: t for _, name, t in self.raw_tensors(meta, scales=True)}
        for path, name, t in self.raw_tensors(meta, scales=False):
            if t.dtype in FP8_DTYPES:
                names = fmt.scale_names(name)
                scale_name = next((n for n in names if n in scales), None)
                if scale_name is None:
                    raise ModelLoadError(f"FP8 weight without its scale ({' or '.join(names)})", path=str(path), tensor=name)
                if meta:
                    t = torch.empty(t.shape, dtype=torch.float32, device="meta")
                elif keep_fp8:
                    t = Fp8Weight(t, scales[scale_name].to(torch.float32), fmt.block)
                else:
                    try:
                        t = dequantize(t, scales[scale_name], fmt.block)
                    except ValueError as e:
                        raise ModelLoadError(str(e), path=str(path), tensor=name) from None
            yield path, name, t

    def _block_tensors(self, cfg: dict, meta: bool) -> Iterator[tuple[Path, str, torch.Tensor]]:
        """A quantized checkpoint's tensors: uint8 ones as ``QTensor`` (its scheme from the
        config's ``tensors``), the others as they are."""
        named = cfg.get("tensors") or {}
        for path, name, t in self.raw_tensors(meta):
            if t.dtype != torch.uint8:
                yield path, name, t
                continue
            s = SCHEMES.get(str(named.get(name, cfg.get("scheme"))))
            if s is None or t.dim() != 2 or t.shape[1] % s.block_bytes:
                raise ModelLoadError(f"uint8 tensor of shape {tuple(t.shape)} is not stored in a known block scheme "
                                     f"({named.get(name, cfg.get('scheme'))!r})", path=str(path), tensor=name)
            shape = (t.shape[0], t.shape[1] // s.block_bytes * s.block)
            yield path, name, QTensor(t, s, shape) if not meta else torch.empty(shape, device="meta")

    def native_tensors(self, meta: bool = False, keep_fp8: bool = False) -> Iterator[tuple[Path, str, str, torch.Tensor]]:
        """Yield (file, checkpoint name, native name, tensor in native layout)."""
        if self.layout == "mistral":
            return ((path, name, from_native_file(name), t) for path, name, t in self.tensors(meta, keep_fp8))
        return hf_to_native_items(self.args, self.tensors(meta, keep_fp8))

    @property
    def fp8(self) -> bool:
        """Whether the checkpoint stores FP8 weights."""
        return Fp8Format.from_args(self.args) is not None


def hf_to_native_items(
    args: ModelArgs, items: Iterable[tuple[Path, str, torch.Tensor]]
) -> Iterator[tuple[Path, str, str, torch.Tensor]]:
    """Map Hugging Face (file, name, tensor) items to native names and rotary layout."""
    for path, name, t in items:
        if IGNORED_HF.match(name) or (args.vision is not None and is_vision_tensor(name)):
            continue
        packed = PACKED_HF.match(strip_text_prefix(name))
        if packed:
            if t.dim() != 3:
                raise ModelLoadError(f"packed experts must be 3-D, got shape {tuple(t.shape)}", path=str(path), tensor=name)
            for native, part in split_packed(packed["kind"], packed["i"], t):
                yield path, name, native, part
            continue
        mapped = hf_to_native(name)
        if mapped is None:
            raise ModelLoadError("unexpected tensor: not part of a Mistral-family model", path=str(path), tensor=name)
        native, rotary = mapped
        if isinstance(t, QTensor):  # rows of blocks permute as the float rows do
            yield path, name, native, QTensor(permute_for(args, t.data, rotary, to="native"), t.scheme, t.shape)
            continue
        if isinstance(t, Fp8Weight):
            if rotary is not None and args.mla is None:
                t = t.permuted_rows(lambda w: permute_for(args, w, rotary, to="native"), args.head_dim)
            elif rotary is not None and not args.mla.rope_interleave:
                t = permute_for(args, t.dense(), rotary, to="native")
            yield path, name, native, t
            continue
        yield path, name, native, permute_for(args, t, rotary, to="native")


_ST_TO_TORCH = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def _map_safetensors(path: Path):
    """name -> a tensor viewing the file's bytes in place, without a copy: a private
    (copy-on-write) memory map, so that a quantized model takes its file's pages
    from the page cache as llama.cpp's mmap does, and loading it does not hold the
    file and a copy at once. safetensors' API copies every tensor it returns; the
    layout read here is its documented one: 8 bytes of header length, the JSON
    header (dtype, shape, data offsets), then the data."""
    import mmap

    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    start = 8 + size

    def view(name: str) -> torch.Tensor:
        entry = header[name]
        begin, end = entry["data_offsets"]
        dtype = _ST_TO_TORCH[entry["dtype"]]
        t = torch.frombuffer(mm, dtype=torch.uint8, count=end - begin, offset=start + begin)
        return t.view(dtype).reshape(entry["shape"])

    return view


def _meta_of(sl) -> torch.Tensor:
    code = sl.get_dtype()
    if code not in _ST_TO_TORCH:
        raise ModelLoadError(f"unsupported safetensors dtype {code}")
    return torch.empty(sl.get_shape(), dtype=_ST_TO_TORCH[code], device="meta")


def resolve_model_path(model: str | Path, revision: str | None = None) -> Path:
    """A local folder, or a Hugging Face Hub id downloaded (or found in the local
    cache) through ``huggingface_hub``."""
    path = Path(model).expanduser()
    if path.exists():
        return path
    from galerne.builtin import BUILTIN_NAME, builtin_model_path

    if str(model) == BUILTIN_NAME:
        return builtin_model_path()
    if not _HUB_ID.match(str(model)):
        raise ModelLoadError("no such folder", path=str(model))
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = ["*.json", "*.safetensors", "tokenizer.model*", "tekken.json"]
    try:
        return Path(snapshot_download(str(model), revision=revision, allow_patterns=patterns, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    try:
        log.info("downloading %s from the Hugging Face Hub", model)
        return Path(snapshot_download(str(model), revision=revision, allow_patterns=patterns))
    except LocalEntryNotFoundError:
        raise ModelLoadError(
            f"{model!r} is not a local folder and the Hugging Face Hub cannot be reached "
            "(offline, or HF_HUB_OFFLINE=1). Download it where there is network "
            "(`huggingface-cli download ...`) and pass its folder.",
        ) from None
    except HfHubHTTPError as e:
        raise ModelLoadError(f"the Hugging Face Hub refused {model!r}: {e}") from None
    except OSError as e:  # connection errors surface as OSError subclasses
        raise ModelLoadError(f"cannot download {model!r} from the Hugging Face Hub: {e}") from None


def open_checkpoint(path: str | Path, layout: str | None = None):
    """A model folder's ``Checkpoint``, or a GGUF file's ``weights.gguf.GGUFCheckpoint``."""
    from .gguf import GGUFCheckpoint, is_gguf

    if layout == "gguf" or (layout is None and is_gguf(path)):
        return GGUFCheckpoint.open(path)
    return Checkpoint.open(path, layout)


def load_model(
    folder: str | Path,
    *,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device | None = "auto",
    layout: str | None = None,
    progress: bool | None = None,
    keep_fp8: bool | None = None,
    quantization: str | None = None,
) -> tuple[Transformer, Checkpoint]:
    """Build the model on ``meta`` and fill it from the checkpoint in ``folder``.

    ``quantization``: a block scheme (``galerne.quant``: q8_0, q4_0, q4_k) the weights
    are quantized to as they are read, one tensor at a time (peak memory: the
    quantized model and one float tensor). A checkpoint already quantized
    (``galerne quantize``) is loaded as stored, and ``quantization`` must be None or
    its own scheme.

    An FP8 checkpoint's linear weights stay in FP8 (``models.quant.Fp8Linear``) with
    ``keep_fp8``; None: where the device multiplies FP8 (``fp8_matmul_supported``),
    else they are dequantized to ``dtype`` at load."""
    ckpt = open_checkpoint(folder, layout)
    if ckpt.fp8 and keep_fp8 is None:
        dev = resolve_device(device)
        keep_fp8 = fp8_matmul_supported(dev)
        if not keep_fp8:
            log.info("%s: FP8 weights dequantized at load on %s (kept in FP8 only on GPUs that multiply it, "
                     "compute capability 8.9+)", ckpt.folder.name, dev)
    stored = stored_schemes(ckpt.args)
    if quantization is not None and stored is not None and find_scheme(quantization).name != stored.get("scheme"):
        raise ModelLoadError(f"this checkpoint is already quantized ({stored.get('scheme')}); it can't be loaded as "
                             f"{quantization} (quantize the float checkpoint instead)", path=str(ckpt.folder))
    model = build_model(ckpt.args, ckpt.native_tensors(keep_fp8=bool(keep_fp8)), dtype=dtype, device=device,
                        config_name=ckpt.config_path.name, where=str(ckpt.folder),
                        desc=f"loading {ckpt.folder.name}", progress=progress,
                        quantization=None if stored is not None else quantization)
    return model, ckpt


def load_vision(ckpt, *, dtype: torch.dtype, device: torch.device) -> VisionModel | None:
    """The vision encoder and projector of a vision-language checkpoint (None for a text
    model, or a GGUF file: llama.cpp keeps its encoder in a separate mmproj file), in
    ``dtype`` on ``device``. Every tensor must be there, in its expected shape."""
    a = ckpt.args.vision
    if a is None or not isinstance(ckpt, Checkpoint):
        return None
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in VisionModel(a).state_dict().items()}
    state: dict[str, torch.Tensor] = {}
    for path, name, native, t in vision_native_items(ckpt):
        if native not in shapes:
            raise ModelLoadError(f"unexpected vision tensor (as {native}): this config's encoder has no such weight",
                                 path=str(path), tensor=name)
        if t.shape != shapes[native]:
            raise ModelLoadError(f"shape {tuple(t.shape)} does not match the config's {tuple(shapes[native])}",
                                 path=str(path), tensor=name)
        if t.dtype in FP8_DTYPES or t.dtype == torch.uint8:
            raise ModelLoadError("quantized vision weights are not supported (the encoder loads from float weights)",
                                 path=str(path), tensor=name)
        state[native] = t.to(device=device, dtype=dtype)
    missing = sorted(set(shapes) - set(state))
    if missing:
        raise ModelLoadError(f"the vision encoder lacks {len(missing)} tensor(s): {', '.join(missing[:5])}"
                             f"{', ...' if len(missing) > 5 else ''}", path=str(ckpt.folder))
    with torch.device("meta"):
        model = VisionModel(a)
    model.load_state_dict(state, assign=True)
    return model.eval().requires_grad_(False)


def vision_native_items(ckpt: Checkpoint, meta: bool = False) -> Iterator[tuple[Path, str, str, torch.Tensor]]:
    """(file, checkpoint name, native name, tensor in native layout) of the vision
    encoder's and projector's tensors (none for a text model)."""
    a = ckpt.args.vision
    if a is None:
        return
    for path, name, t in ckpt.raw_tensors(meta, vision=True):
        if ckpt.layout != "hf":
            yield path, name, name, t
            continue
        mapped = vision_hf_to_native(name)
        if mapped is None:
            raise ModelLoadError("unexpected vision tensor: not part of a Pixtral encoder or its projector",
                                 path=str(path), tensor=name)
        native, rotary = mapped
        yield path, name, native, permute_rows(t, rotary, a.n_heads, a.n_heads, to="native")


def model_from_hf_state_dict(
    args: ModelArgs, state_dict: dict[str, torch.Tensor], *, dtype=None, device=None
) -> Transformer:
    """A model from an in-memory Hugging Face state dict (benchmarks and tests use it
    to share one set of random weights with a transformers model)."""
    items = hf_to_native_items(args, ((Path("<state_dict>"), n, t) for n, t in state_dict.items()))
    return build_model(args, items, dtype=dtype or next(iter(state_dict.values())).dtype, device=device or "auto",
                       config_name="config", where="<state_dict>", desc="building", progress=False)


def build_model(
    args: ModelArgs,
    tensors: Iterator[tuple[Path, str, str, torch.Tensor]],
    *,
    dtype: str | torch.dtype | None,
    device: str | torch.device | None,
    config_name: str,
    where: str,
    desc: str,
    progress: bool | None,
    quantization: str | Scheme | None = None,
) -> Transformer:
    """Fill a model built on ``meta`` from (file, checkpoint name, native name,
    tensor) items.

    Each tensor is checked (known name, expected shape), cast and moved on its own,
    so that peak memory stays near the size of the model, not twice it. A
    ``QTensor`` item (quantized blocks) makes its layer a ``QuantLinear`` or
    ``QuantEmbedding``; with ``quantization``, float weights the scheme applies to
    (``quant.plan.tensor_scheme``) are quantized as they arrive.
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    target = find_scheme(quantization) if isinstance(quantization, str) else quantization
    with torch.device("meta"):
        model = Transformer(args)
    expected = dict(model.named_parameters())  # tied output is listed once, as the embedding
    seen: set[str] = set()
    # progress=None: tqdm decides (a bar on a terminal, nothing in logs or tests).
    bar = tqdm(total=len(expected), desc=desc, unit="tensor", disable=None if progress is None else not progress, leave=False)
    for path, name, native, t in tensors:
        if native == "output.weight" and args.tied_embeddings:
            continue  # some tied checkpoints still store lm_head: the embedding wins
        param = expected.get(native)
        if param is None:
            raise ModelLoadError("unexpected tensor: the config has no such weight", path=str(path), tensor=name)
        if native in seen:
            raise ModelLoadError("tensor appears twice in the checkpoint", path=str(path), tensor=name)
        if tuple(t.shape) != tuple(param.shape):
            raise ModelLoadError(
                f"shape {tuple(t.shape)} disagrees with the config ({config_name}), which implies {tuple(param.shape)}",
                path=str(path), tensor=name,
            )
        if isinstance(t, Fp8Weight) and target is not None:
            t = t.dense()
        chosen = tensor_scheme(native, tuple(t.shape), target, args.n_layers) if target is not None and not isinstance(t, QTensor) else None
        if chosen is not None:
            t = QTensor(quantize(t.to(dev), chosen), chosen, tuple(t.shape))
        if isinstance(t, QTensor):
            _set_quant(model, native, t, dev, dt)
        elif isinstance(t, Fp8Weight):
            _set_fp8(model, native, t, dev, dt)
        else:
            _set_param(model, native, t.to(device=dev, dtype=dt))
        seen.add(native)
        bar.update(1)
    bar.close()
    missing = [n for n in expected if n not in seen]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ModelLoadError(f"missing tensor(s) in the checkpoint: {shown}", path=where)
    if args.tied_embeddings:
        tie_output(model)
    model.eval()
    return model


def _set_quant(model: torch.nn.Module, name: str, t: QTensor, device: torch.device, dtype: torch.dtype) -> None:
    """Put a quantized weight in place: its linear layer becomes a ``QuantLinear``, the
    embedding a ``QuantEmbedding``; any other tensor (no quantized path) is dequantized."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    kind_ok = (type(module) is torch.nn.Linear and module.bias is None) or type(module) is torch.nn.Embedding
    if attr != "weight" or not kind_ok:
        log.info("%s: no quantized path for this tensor (%s); dequantized to %s", name, t.scheme.name, dtype)
        _set_param(model, name, t.dense(torch.float32).to(device=device, dtype=dtype))
        return
    replace_module(model, module_name, quantized_module(name, t.data.to(device), t.scheme, t.shape, dtype))


def _set_fp8(model: torch.nn.Module, name: str, w: Fp8Weight, device: torch.device, dtype: torch.dtype) -> None:
    """Put a kept FP8 weight in place: its linear layer becomes an ``Fp8Linear`` (any
    other FP8 tensor is dequantized)."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr != "weight" or type(module) is not torch.nn.Linear or module.bias is not None:
        _set_param(model, name, w.dense().to(device=device, dtype=dtype))
        return
    replace_module(model, module_name, Fp8Linear(w.data.to(device), w.scale.to(device), w.block))


def _set_param(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    setattr(module, attr, torch.nn.Parameter(value, requires_grad=False))


def _read_json(path: Path) -> dict:
    if not path.exists():
        raise ConfigError("file not found", path=str(path))
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"not valid JSON: {e}", path=str(path)) from None
    if not isinstance(data, dict):
        raise ConfigError("expected a JSON object", path=str(path))
    return data


def _hf_weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelLoadError("has no weight_map", path=str(index))
        files = [folder / f for f in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.exists()]
        if absent:
            raise ModelLoadError(f"lists shard(s) that are not in the folder: {', '.join(absent)}", path=str(index))
        return files
    single = folder / "model.safetensors"
    if single.exists():
        return [single]
    shards = sorted(folder.glob("model-*-of-*.safetensors"))
    return shards or _pickle_files(folder, "pytorch_model")


def _pickle_files(folder: Path, stem: str) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.name.startswith(stem) and p.suffix in _PICKLE_SUFFIXES)
    if stem == "consolidated" and len(files) > 1:
        raise ModelLoadError(
            f"{len(files)} consolidated.*.pth files are tensor-parallel shards, which galerne does not merge; "
            "use the consolidated.safetensors release of this model",
            path=str(folder),
        )
    return files


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    """Only ``weights_only=True``: a pickle that needs arbitrary code is refused."""
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, ... : all mean "refused"
        raise ModelLoadError(
            "refusing this pickle checkpoint: it does not load with torch.load(weights_only=True) "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Convert it to safetensors with "
            "a tool you trust, or get the .safetensors release.",
            path=str(path),
        ) from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ModelLoadError("pickle checkpoint is not a flat dict of tensors", path=str(path))
    return sd
