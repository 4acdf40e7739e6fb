"""GGUF (llama.cpp's single-file format) for Mistral-family models: read one as a
checkpoint, and write one (``galerne convert SRC out.gguf --to gguf``).

The container is read and written by the ``gguf`` package (llama.cpp's own
gguf-py): a memory map of the file, metadata key/values, then tensors. What this
module adds is the model: which metadata are which ``ModelArgs``, which tensor
names are which native names, which tensor types galerne keeps as they are.

Architectures: llama.cpp's converter writes Mistral 7B / Nemo / Small (dense,
``MistralForCausalLM`` or Mistral-native folders) and Mixtral (each layer's experts
stacked in three (experts, out, in) tensors) as arch ``llama``, and Ministral 3 /
Mistral Small 3.x text models (YaRN + llama-4 query scaling: ``Ministral3ForCausalLM``,
``Mistral3ForConditionalGeneration``, params.json with ``llama_4_scaling``) as arch
``mistral3``, with the same tensors and two more metadata: the YaRN log multiplier
(transformers' ``mscale_all_dim``) and ``attention.temperature_scale`` (the llama-4
query-scaling beta, over ``rope.scaling.original_context_length`` positions).

Rotary layout: llama.cpp's ``LlamaModel.permute`` undoes Hugging Face's q/k row
permutation when it converts (``undo_permute``; Mistral-native files are taken as
they are), so a GGUF's attn_q / attn_k rows are in Mistral's interleaved-pairs
order, galerne's native one: nothing to permute either way.

Tensor types: F32 / F16 / BF16 are floats (cast to the model's dtype at load);
Q8_0, Q4_0 and Q4_K are galerne's own block schemes (``galerne.quant``), kept as they
are, read from the memory map without a copy; Q5_K and Q6_K (which llama.cpp's
Q4_K_M / Q5_K_M files put in some tensors) have no kernel yet: they are dequantized
and stored in q8_0 at load, so that memory stays near the file's size. Anything else
is refused, naming the tensor and its type, before any weight is read.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, ModelLoadError
from ..models.args import (
    DEFAULT_NATIVE_CONTEXT,
    ModelArgs,
    MoeArgs,
    QueryScaling,
    YarnArgs,
    yarn_mscale,
)
from ..quant import SCHEMES, QTensor, by_ggml_type, dequantize, quantize

log = logging.getLogger(__name__)

SUPPORTED_ARCHS = ("llama", "mistral3")
SUFFIX = ".gguf"

# GGUF tensor name -> galerne's native name ({i}: the layer).
_GLOBAL = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
}
_LAYER = {
    "attn_norm": "attention_norm",
    "attn_q": "attention.wq",
    "attn_k": "attention.wk",
    "attn_v": "attention.wv",
    "attn_output": "attention.wo",
    "ffn_norm": "ffn_norm",
    "ffn_gate": "feed_forward.w1",
    "ffn_down": "feed_forward.w2",
    "ffn_up": "feed_forward.w3",
    "ffn_gate_inp": "feed_forward.gate",  # Mixtral's router
}
_NATIVE_TO_GGUF = {v: k for k, v in _GLOBAL.items()}
# Old llama.cpp files carry a per-layer rotary cache: not a weight.
_IGNORED_SUFFIX = ".attn_rot_embd"
# Mixtral's experts: llama.cpp stacks each layer's into one (experts, out, in) tensor per
# projection (older files: one tensor per expert, ``blk.N.ffn_gate.E.weight``).
_STACKED = {"ffn_gate_exps": "w1", "ffn_down_exps": "w2", "ffn_up_exps": "w3"}
_STACKED_NAME = re.compile(r"^blk\.(\d+)\.(ffn_gate_exps|ffn_down_exps|ffn_up_exps)\.weight$")
_ONE_EXPERT = re.compile(r"^blk\.(\d+)\.ffn_(gate|down|up)\.(\d+)\.weight$")
_NATIVE_EXPERT = re.compile(r"^layers\.(\d+)\.feed_forward\.experts\.(\d+)\.(w[123])\.weight$")
_W = {"gate": "w1", "down": "w2", "up": "w3"}


def gguf_to_native(name: str) -> str | None:
    """``blk.3.attn_q.weight`` -> ``layers.3.attention.wq.weight``; None when unknown."""
    if name in _GLOBAL:
        return _GLOBAL[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[3] == "weight" and parts[2] in _LAYER:
        return f"layers.{parts[1]}.{_LAYER[parts[2]]}.weight"
    if m := _ONE_EXPERT.match(name):
        return f"layers.{m[1]}.feed_forward.experts.{m[3]}.{_W[m[2]]}.weight"
    return None


def _expert_names(name: str, n_experts: int) -> list[str] | None:
    """A stacked expert tensor's native names, one per expert; None for any other tensor."""
    m = _STACKED_NAME.match(name)
    if m is None:
        return None
    return [f"layers.{m[1]}.feed_forward.experts.{e}.{_STACKED[m[2]]}.weight" for e in range(n_experts)]


def native_to_gguf(native: str) -> str | None:
    if native in _NATIVE_TO_GGUF:
        return _NATIVE_TO_GGUF[native]
    parts = native.split(".")
    if parts[0] == "layers" and len(parts) >= 4 and parts[-1] == "weight":
        module = ".".join(parts[2:-1])
        for key, value in _LAYER.items():
            if value == module:
                return f"blk.{parts[1]}.{key}.weight"
    return None


def is_gguf(path: str | Path) -> bool:
    """A file named ``*.gguf`` (the loader's test: a folder is never one)."""
    p = Path(path)
    return p.suffix.lower() == SUFFIX and p.is_file()


# ------------------------------------------------------------------ reading


def _reader(path: Path):
    """``gguf.GGUFReader`` of ``path``, with every tensor's extent checked against the
    file's size first: a truncated file names the tensor that runs past its end (the
    reader itself fails on a reshape, naming nothing)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType

    class Reader(GGUFReader):
        def _get_field_parts(self, orig_offs, raw_type):
            """Arrays in one piece: the stock reader makes numpy views of every element,
            seconds for a 131k-token vocabulary (tokens, scores, types, merges). A numeric
            array is one view here, a string array one walk over its length prefixes,
            with the parts laid out as the reader's own (``ReaderField.contents`` reads them)."""
            if raw_type != GGUFValueType.ARRAY or self.byte_order != "I":  # (big-endian: refused after)
                return super()._get_field_parts(orig_offs, raw_type)
            itype, alen = self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)
            sub, n, offs = GGUFValueType(int(itype[0])), int(alen[0]), orig_offs + 12
            scalar = self.gguf_scalar_to_np.get(sub)
            if scalar is not None:
                arr = self._get(offs, scalar, n)
                if len(arr) != n:
                    raise ValueError("an array runs past the end of the file")
                return 12 + int(arr.nbytes), [itype, alen, arr], [2], [GGUFValueType.ARRAY, sub]
            if sub != GGUFValueType.STRING:
                return super()._get_field_parts(orig_offs, raw_type)
            buf, size = self.data.view(np.ndarray), len(self.data)  # (a memmap slices slower)
            raw = memoryview(buf)
            parts, idxs = [itype, alen], []
            for _ in range(n):
                length = int.from_bytes(raw[offs:offs + 8], "little")
                if offs + 8 + length > size:
                    raise ValueError("a string runs past the end of the file")
                parts += [buf[offs:offs + 8].view(np.uint64), buf[offs + 8:offs + 8 + length]]
                idxs.append(len(parts) - 1)
                offs += 8 + length
            return offs - orig_offs, parts, idxs, [GGUFValueType.ARRAY, GGUFValueType.STRING]

        def _build_tensors(self, start_offs, fields):  # before the reader maps the tensors
            size = len(self.data)
            for f in fields:
                _, name_data, _, dims, raw_dtype, offset = f.parts
                name = bytes(name_data).decode("utf-8", errors="replace")
                try:
                    t = GGMLQuantizationType(int(raw_dtype[0]))
                except ValueError:
                    raise ModelLoadError(f"unknown GGML tensor type {int(raw_dtype[0])}", path=str(path),
                                         tensor=name) from None
                block, type_size = GGML_QUANT_SIZES[t]
                end = start_offs + int(offset[0]) + int(np.prod(dims, dtype=np.int64)) * type_size // block
                if end > size:
                    raise ModelLoadError(f"truncated file: the tensor's data ends at byte {end} but the file has "
                                         f"{size} bytes", path=str(path), tensor=name)
            super()._build_tensors(start_offs, fields)

    try:
        # "c": copy-on-write pages, so torch gets writable arrays without copying them.
        return Reader(path, mode="c")
    except ModelLoadError:
        raise
    except (ValueError, IndexError, OSError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"not a readable GGUF file ({type(e).__name__}: {e})", path=str(path)) from None


def _value(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    v = f.contents()
    if isinstance(v, float):
        # GGUF stores float32: 1e-5 reads back as 9.99999975e-06. The shortest decimal
        # that rounds to the same float32 is what the writer was given.
        v = float(str(np.float32(v)))
    return v


@dataclass
class GGUFCheckpoint:
    """A GGUF file opened as a checkpoint (what ``loader.Checkpoint`` is for folders).
    ``folder`` is the file itself: the model's path everywhere a folder's would go."""

    folder: Path
    args: ModelArgs
    arch: str
    reader: object = field(repr=False)
    layout: str = "gguf"

    @property
    def config_path(self) -> Path:
        return self.folder

    @property
    def weight_files(self) -> list[Path]:
        return [self.folder]

    @property
    def fp8(self) -> bool:
        return False

    @property
    def metadata(self) -> dict:
        """Every key/value of the file but the GGUF header's own (its tokenizer included)."""
        return {k: f.contents() for k, f in self.reader.fields.items() if not k.startswith("GGUF.")}

    @classmethod
    def open(cls, path: str | Path) -> GGUFCheckpoint:
        path = Path(path)
        if not path.is_file():
            raise ModelLoadError("no such GGUF file", path=str(path))
        reader = _reader(path)
        if reader.byte_order != "I":
            raise ModelLoadError("a big-endian GGUF file: galerne reads little-endian ones (llama.cpp's default)",
                                 path=str(path))
        arch = _value(reader, "general.architecture")
        if arch not in SUPPORTED_ARCHS:
            raise ConfigError(f"unsupported GGUF architecture {arch!r}; galerne reads Mistral-family models of "
                              f"architecture {', '.join(SUPPORTED_ARCHS)}", path=str(path))
        tensors = {t.name: t for t in reader.tensors}
        for t in reader.tensors:
            _check_tensor(path, t)
        args = _args(reader, arch, tensors, str(path))
        schemes = [s.name for t in reader.tensors if (s := by_ggml_type(t.tensor_type)) is not None]
        if schemes:
            # Said as a `galerne quantize` folder says it, so that the loader treats the file
            # alike: loaded as stored, and `quantization=` must be its scheme (or None).
            main = max(set(schemes), key=schemes.count)
            args = dataclasses.replace(args, extra={**args.extra, "quantization": {
                "quant_method": "galerne", "scheme": "q8_0" if main in ("q5_k", "q6_k") else main, "source": "gguf"}})
        return cls(path, args, arch, reader)

    def native_tensors(self, meta: bool = False, keep_fp8: bool = False, raw: bool = False
                       ) -> Iterator[tuple[Path, str, str, torch.Tensor]]:
        """Yield (file, GGUF tensor name, native name, tensor): floats as torch tensors
        on the memory map, Q8_0 / Q4_0 / Q4_K as ``QTensor`` (zero-copy), Q5_K / Q6_K
        converted to q8_0 (``raw``: left as they are, for writing them back)."""
        converted = 0
        n_experts = self.args.moe.num_experts if self.args.moe else 0
        for t in self.reader.tensors:
            if t.name.endswith(_IGNORED_SUFFIX):
                continue
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            natives = _expert_names(t.name, n_experts)
            if natives is None:
                natives, shape = [gguf_to_native(t.name)], (1, *shape)  # one "expert": the tensor itself
            elif shape[0] != n_experts:
                raise ModelLoadError(f"{shape[0]} experts stacked, the metadata says {n_experts}",
                                     path=str(self.folder), tensor=t.name)
            one = shape[1:]
            if meta:
                for native in natives:
                    yield self.folder, t.name, native, torch.empty(one, dtype=torch.float32, device="meta")
                continue
            s = by_ggml_type(t.tensor_type)
            if s is None:
                whole = _float_tensor(t, shape)
                for e, native in enumerate(natives):
                    yield self.folder, t.name, native, whole[e]
                continue
            if len(one) != 2:
                raise ModelLoadError(f"a quantized tensor must be 2-D, got shape {one}", path=str(self.folder),
                                     tensor=t.name)
            blocks = torch.from_numpy(t.data).reshape(shape[0], shape[1], -1)  # each expert's rows: a view
            for e, native in enumerate(natives):
                q, qs = blocks[e], s
                if not s.kernel and not raw:
                    # No kernel reads it: keep memory near the file's size with q8_0 (8.5 bits a
                    # weight against q5_k's 5.5 and q6_k's 6.56), one tensor at a time.
                    q, qs = quantize(dequantize(q, s, one[1]), SCHEMES["q8_0"]), SCHEMES["q8_0"]
                    converted += 1
                yield self.folder, t.name, native, QTensor(q, qs, one)
        if converted:
            log.info("%s: %d tensor(s) in Q5_K/Q6_K (no kernel reads them) dequantized and stored in q8_0",
                     self.folder.name, converted)


_FLOAT_TYPES = {0: torch.float32, 1: torch.float16, 30: torch.bfloat16}  # GGMLQuantizationType F32, F16, BF16


def _float_tensor(t, shape: tuple[int, ...]) -> torch.Tensor:
    dtype = _FLOAT_TYPES[int(t.tensor_type)]
    # numpy has no bfloat16: the reader gives BF16 as bytes, viewed here.
    return torch.from_numpy(t.data).reshape(-1).view(torch.uint8).view(dtype).reshape(shape)


def _check_tensor(path: Path, t) -> None:
    """Refuse, before any weight is read, a tensor galerne can't place or store."""
    from gguf import GGMLQuantizationType

    name = t.name
    if name.endswith(_IGNORED_SUFFIX):
        return
    if gguf_to_native(name) is None and _STACKED_NAME.match(name) is None:
        hint = " (llama 3's rope frequency factors: not a Mistral-family model)" if name.startswith("rope_freqs") else ""
        raise ModelLoadError(f"unexpected tensor: not part of a Mistral-family model{hint}", path=str(path),
                             tensor=name)
    if int(t.tensor_type) in _FLOAT_TYPES or by_ggml_type(t.tensor_type) is not None:
        return
    kind = GGMLQuantizationType(int(t.tensor_type)).name
    readable = ["F32", "F16", "BF16"] + [s.name.upper() for s in SCHEMES.values()]
    raise ModelLoadError(f"tensor type {kind} is not supported (galerne reads {', '.join(readable)}; "
                         f"requantize the file, e.g. to Q4_K_M or Q8_0)", path=str(path), tensor=name)


def _args(reader, arch: str, tensors: dict, where: str) -> ModelArgs:
    """``ModelArgs`` from the metadata, with llama.cpp's defaults for what a file leaves out."""

    def key(name: str, default=None, required: bool = False):
        v = _value(reader, f"{arch}.{name}")
        if v is None and required:
            raise ConfigError(f"missing metadata {arch}.{name}", path=where)
        return default if v is None else v

    moe = None
    if n_experts := int(key("expert_count", 0) or 0):
        # Mixtral's routing (llama.cpp's llama architecture: softmax, top k renormalised).
        if int(key("expert_shared_count", 0) or 0) or key("expert_gating_func", 1) != 1:
            raise ConfigError("only Mixtral's mixture of experts is read from a GGUF (softmax routing, no shared "
                              "experts)", path=where)
        moe = MoeArgs(n_experts, int(key("expert_used_count", required=True)))
    dim = int(key("embedding_length", required=True))
    n_heads = int(key("attention.head_count", required=True))
    head_dim = int(key("attention.key_length", dim // n_heads))
    if int(key("attention.value_length", head_dim)) != head_dim:
        raise ConfigError("attention.value_length differs from key_length: not a Mistral-family model", path=where)
    rope_dim = int(key("rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise ConfigError(f"rope.dimension_count {rope_dim} is not head_dim {head_dim} (partial rotary is not "
                          "supported)", path=where)
    emb = tensors.get("token_embd.weight")
    if emb is None:
        raise ModelLoadError("missing tensor token_embd.weight", path=where)
    vocab = int(emb.shape[1])  # ggml's dims are (in, out)
    if int(key("vocab_size", vocab)) != vocab:
        raise ConfigError(f"{arch}.vocab_size {key('vocab_size')} disagrees with token_embd's {vocab} rows", path=where)

    orig = key("rope.scaling.original_context_length")
    scaling = key("rope.scaling.type", "none")
    yarn = None
    if scaling == "yarn":
        factor = float(key("rope.scaling.factor", required=True))
        if orig is None:
            raise ConfigError("YaRN needs rope.scaling.original_context_length", path=where)
        # llama.cpp's magnitude: mscale(factor) / mscale(factor, log_mul) when the log
        # multiplier (transformers' mscale_all_dim) is set, else mscale(factor).
        log_mul = float(key("rope.scaling.yarn_log_multiplier", 0.0))
        # transformers' attention_factor, which llama.cpp's converter copies here when a
        # config has one: it wins, as in transformers (llama.cpp itself recomputes it).
        attn = key("rope.scaling.yarn_attn_factor")
        yarn = YarnArgs(
            factor=factor, original_max_position_embeddings=int(orig),
            beta_fast=float(key("rope.scaling.yarn_beta_fast", 32.0)),
            beta_slow=float(key("rope.scaling.yarn_beta_slow", 1.0)),
            mscale=1.0 if log_mul else None, mscale_all_dim=log_mul or None,
            attention_factor=None if attn is None else float(attn),
        )
    elif scaling not in ("none", None):
        raise ConfigError(f"rope.scaling.type {scaling!r} is not supported (none and yarn are)", path=where)
    query_scaling = None
    beta = key("attention.temperature_scale")
    if beta:
        if orig is None:
            raise ConfigError("attention.temperature_scale needs rope.scaling.original_context_length", path=where)
        query_scaling = QueryScaling(float(beta), int(orig))
    window = key("attention.sliding_window")
    return ModelArgs(
        dim=dim,
        n_layers=int(key("block_count", required=True)),
        n_heads=n_heads,
        n_kv_heads=int(key("attention.head_count_kv", n_heads)),
        head_dim=head_dim,
        hidden_dim=int(key("feed_forward_length", required=True)),
        vocab_size=vocab,
        norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        yarn=yarn,
        query_scaling=query_scaling,
        sliding_window=int(window) if window else None,
        tied_embeddings="output.weight" not in tensors,
        moe=moe,
        max_seq_len=int(key("context_length", DEFAULT_NATIVE_CONTEXT)),
        bos_token_id=_value(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_value(reader, "tokenizer.ggml.eos_token_id"),
    )


def _yarn_log_mul(y: YarnArgs) -> float:
    """The YaRN log multiplier that gives ``y``'s magnitude in llama.cpp (0: its default,
    mscale(factor))."""
    if y.factor <= 1 or math.isclose(y.magnitude, yarn_mscale(y.factor), rel_tol=1e-7):
        return 0.0
    # mscale(f) / mscale(f, L) = magnitude  =>  0.1 L ln f + 1 = mscale(f) / magnitude
    return (yarn_mscale(y.factor) / y.magnitude - 1.0) / (0.1 * math.log(y.factor))


# ------------------------------------------------------------------ writing

FLOAT_SCHEMES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
# llama.cpp's general.file_type of the matrices' most common type (galerne's q4_k mix is
# its Q4_K_S: quant.plan.tensor_scheme).
_FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7, "q4_k": 14, "q5_k": 17, "q6_k": 18, "bf16": 32}


def write_schemes() -> tuple[str, ...]:
    from ..quant import WRITABLE

    return (*FLOAT_SCHEMES, *WRITABLE)


@dataclass
class _Planned:
    native: str  # (a stack of experts: layers.N.feed_forward.experts.wK)
    name: str  # in the GGUF
    shape: tuple[int, ...]
    kind: str  # "f32" | "f16" | "bf16" | a block scheme's name


def write_gguf(src: str | Path, dst: str | Path, *, scheme: str | None = None, progress: bool | None = None) -> Path:
    """Write the model of ``src`` (a model folder or a GGUF file) as the GGUF file ``dst``.

    ``scheme``: f32, f16 or bf16 (matrices in that float type), or a block scheme (q8_0,
    q4_0, q4_k: matrices quantized as ``quant.plan.tensor_scheme`` decides, the output
    projection in q8_0 under a 4-bit scheme); None: the source's own types. Norms are
    always F32 (as llama.cpp writes them). A quantized source (``galerne quantize``'s
    folders, GGUF files) has its blocks written as they are.

    Everything is read and checked first (config, tokenizer, every tensor's name, shape
    and type); then the file is written, one tensor at a time, under a temporary name
    renamed to ``dst`` at the end. An existing ``dst`` is never overwritten.
    """
    from gguf import GGUFWriter

    from .loader import open_checkpoint

    dst = Path(dst)
    if dst.exists():
        raise ModelLoadError("the destination exists; refusing to overwrite it", path=str(dst))
    if scheme is not None and scheme.lower() not in write_schemes():
        raise ConfigError(f"unknown GGUF scheme {scheme!r}; use one of {', '.join(write_schemes())}")
    ckpt = open_checkpoint(src)
    a = ckpt.args
    _check_writable(a, str(src))
    if a.vision is not None:
        log.warning("%s: the vision encoder is not written: llama.cpp keeps it in a separate mmproj GGUF, which "
                    "galerne does not write yet; the GGUF holds the language model only", Path(src).name)
    plan = _plan(ckpt, scheme.lower() if scheme else None)
    # The writer holds the metadata and the tensor list in memory until the header is
    # written: everything it needs is gathered (and checked) before the file is opened.
    w = GGUFWriter(None, "mistral3" if a.yarn is not None or a.query_scaling is not None else "llama")
    _write_metadata(w, a, ckpt, plan)
    _write_vocab(w, ckpt, a)
    for p in plan:
        _add_info(w, p)

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.{os.urandom(4).hex()}.partial")
    try:
        w.write_header_to_file(path=tmp)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        _stream(w, ckpt, plan, progress)
        w.close()
        if dst.exists():  # appeared while we wrote
            raise ModelLoadError("the destination exists; refusing to overwrite it", path=str(dst))
        tmp.rename(dst)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    return dst


def _check_writable(a: ModelArgs, where: str) -> None:
    if a.mla is not None or (a.moe is not None and not a.moe.mixtral):
        raise ConfigError("only dense and Mixtral Mistral-family models are written as GGUF (not latent attention "
                          "or Mistral 4's mixture of experts)", path=where)
    if isinstance(a.sliding_window, tuple) and len(set(a.sliding_window)) > 1:
        raise ConfigError("per-layer sliding windows have no GGUF spelling for llama.cpp's llama architecture",
                          path=where)
    if a.yarn is not None and a.query_scaling is not None and \
            a.yarn.original_max_position_embeddings != a.query_scaling.original_max_position_embeddings:
        raise ConfigError("YaRN and llama-4 query scaling over different original contexts have no GGUF spelling "
                          "(llama.cpp reads one original_context_length)", path=where)


def _source_kinds(ckpt) -> Iterator[tuple[str, tuple[int, ...], torch.dtype | object]]:
    """(native name, shape, torch dtype or block Scheme) of every tensor (each expert on
    its own), from headers only."""
    if isinstance(ckpt, GGUFCheckpoint):
        n_experts = ckpt.args.moe.num_experts if ckpt.args.moe else 0
        for t in ckpt.reader.tensors:
            if t.name.endswith(_IGNORED_SUFFIX):
                continue
            kind = _FLOAT_TYPES.get(int(t.tensor_type)) or by_ggml_type(t.tensor_type)
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            natives = _expert_names(t.name, n_experts)
            for native in natives or [gguf_to_native(t.name)]:
                yield native, shape[1:] if natives else shape, kind
        return
    from ..quant.plan import stored_schemes

    cfg = stored_schemes(ckpt.args)
    raw = {name: t.dtype for _, name, t in ckpt.raw_tensors(meta=True)} if cfg else {}
    for _, name, native, meta in ckpt.native_tensors(meta=True):
        kind = meta.dtype
        if cfg and raw.get(name) == torch.uint8:
            kind = SCHEMES[str((cfg.get("tensors") or {}).get(name, cfg.get("scheme")))]
        yield native, tuple(meta.shape), kind


def _grouped(items, a: ModelArgs, where: str):
    """(native name, x) items -> (GGUF name, plan key, [(native name, x), ...]): one item
    per tensor, except Mixtral's experts, gathered per layer and given as llama.cpp's
    three stacked tensors (gate, down, up) once the layer's last expert has passed. The
    tied output projection is left out (llama.cpp reads token_embd then)."""
    n = a.moe.num_experts if a.moe else 0
    pending: dict[str, dict[tuple[str, int], tuple[str, object]]] = {}
    for native, x in items:
        if native == "output.weight" and a.tied_embeddings:
            continue
        m = _NATIVE_EXPERT.match(native)
        if m is None:
            name = native_to_gguf(native)
            if name is None:
                raise ModelLoadError("no GGUF name for this tensor", path=where, tensor=native)
            yield name, native, [(native, x)]
            continue
        layer = pending.setdefault(m[1], {})
        layer[(m[3], int(m[2]))] = (native, x)
        if len(layer) == 3 * n:
            del pending[m[1]]
            for stacked, w in _STACKED.items():
                yield f"blk.{m[1]}.{stacked}.weight", f"layers.{m[1]}.feed_forward.experts.{w}", \
                    [layer[(w, e)] for e in range(n)]
    if pending:
        raise ModelLoadError(f"incomplete experts in layer(s) {', '.join(sorted(pending))}", path=where)


def _plan(ckpt, scheme: str | None) -> list[_Planned]:
    where = str(ckpt.folder)
    target = None if scheme is None or scheme in FLOAT_SCHEMES else SCHEMES[scheme]
    plan = []
    items = ((native, (shape, kind)) for native, shape, kind in _source_kinds(ckpt))
    for name, key, parts in _grouped(items, ckpt.args, where):
        kinds = {_out_kind(native, shape, kind, scheme, target, ckpt.args.n_layers, where)
                 for native, (shape, kind) in parts}
        shapes = {shape for _, (shape, _) in parts}
        if len(kinds) != 1 or len(shapes) != 1:
            raise ModelLoadError(f"the experts of {name} differ in shape or type ({sorted(kinds)})", path=where)
        shape = shapes.pop()
        plan.append(_Planned(key, name, (len(parts), *shape) if _STACKED_NAME.match(name) else shape, kinds.pop()))
    return plan


def _out_kind(native: str, shape: tuple[int, ...], kind, scheme: str | None, target, n_layers: int,
              where: str) -> str:
    """What tensor ``native`` (``kind``: its source dtype or block Scheme) is written as."""
    from ..quant import Scheme
    from ..quant.plan import tensor_scheme

    if len(shape) == 1 or native.endswith("feed_forward.gate.weight"):
        return "f32"  # norms and Mixtral's router, as llama.cpp keeps them
    if isinstance(kind, Scheme):
        want = kind if scheme is None else tensor_scheme(native, shape, target, n_layers) if target else None
        if want is None or want.name != kind.name:
            raise ModelLoadError(f"stored in {kind.name}: a quantized source is written as it is; leave out "
                                 f"the scheme (asked: {scheme})", path=where, tensor=native)
        return kind.name
    source_float = next((n for n, dt in FLOAT_SCHEMES.items() if dt == kind), "f32")
    if target is not None:
        chosen = tensor_scheme(native, shape, target, n_layers)
        return chosen.name if chosen is not None else source_float
    return scheme or source_float


def _add_info(w, p: _Planned) -> None:
    from gguf import GGMLQuantizationType

    rows = int(np.prod(p.shape[:-1]))
    if p.kind in ("f32", "f16"):
        dt = np.dtype(np.float32 if p.kind == "f32" else np.float16)
        w.add_tensor_info(p.name, p.shape, dt, rows * p.shape[-1] * dt.itemsize)
    elif p.kind == "bf16":  # given as its bytes: numpy has no bfloat16
        w.add_tensor_info(p.name, (*p.shape[:-1], p.shape[-1] * 2), np.dtype(np.uint8), rows * p.shape[-1] * 2,
                          raw_dtype=GGMLQuantizationType.BF16)
    else:
        s = SCHEMES[p.kind]
        w.add_tensor_info(p.name, (*p.shape[:-1], s.row_bytes(p.shape[-1])), np.dtype(np.uint8),
                          rows * s.row_bytes(p.shape[-1]), raw_dtype=GGMLQuantizationType(s.ggml_type))


def _stream(w, ckpt, plan: list[_Planned], progress: bool | None) -> None:
    from tqdm import tqdm

    source = ckpt.native_tensors(raw=True) if isinstance(ckpt, GGUFCheckpoint) else ckpt.native_tensors()
    items = ((native, t) for _, _, native, t in source)
    done = 0
    with tqdm(total=len(plan), desc="writing gguf", unit="tensor", disable=None if progress is None else not progress,
              leave=False) as bar:
        for name, key, parts in _grouped(items, ckpt.args, str(ckpt.folder)):
            p = plan[done]
            if (p.name, p.native) != (name, key):
                raise RuntimeError(f"tensor {name} arrived out of plan (expected {p.name})")
            arrays = [_encode(t, p.kind) for _, t in parts]
            w.write_tensor_data(np.stack(arrays) if _STACKED_NAME.match(name) else arrays[0])
            done += 1
            bar.update(1)
    if done != len(plan):
        raise RuntimeError(f"{len(plan) - done} planned tensors were not written")


def _encode(t, kind: str) -> np.ndarray:
    """One tensor as the bytes the plan announced."""
    if isinstance(t, QTensor):
        if t.scheme.name == kind:
            return t.data.contiguous().cpu().numpy()
        t = t.dense()  # (not planned: a quantized source is written as it is)
    t = t.detach().cpu()
    if kind == "f32":
        return t.to(torch.float32).contiguous().numpy()
    if kind == "f16":
        return t.to(torch.float16).contiguous().numpy()
    if kind == "bf16":
        return t.to(torch.bfloat16).contiguous().view(torch.uint8).numpy()
    return quantize(t, SCHEMES[kind]).numpy()


def _write_metadata(w, a: ModelArgs, ckpt, plan: list[_Planned]) -> None:
    from gguf import GGML_QUANT_VERSION, RopeScalingType

    w.add_name(Path(ckpt.folder).stem if isinstance(ckpt, GGUFCheckpoint) else Path(ckpt.folder).name)
    w.add_vocab_size(a.vocab_size)
    w.add_context_length(a.max_seq_len)
    w.add_embedding_length(a.dim)
    w.add_block_count(a.n_layers)
    w.add_feed_forward_length(a.hidden_dim)
    w.add_head_count(a.n_heads)
    w.add_head_count_kv(a.n_kv_heads)
    w.add_key_length(a.head_dim)
    w.add_value_length(a.head_dim)
    w.add_rope_dimension_count(a.head_dim)
    w.add_rope_freq_base(a.rope_theta)
    w.add_layer_norm_rms_eps(a.norm_eps)
    window = a.sliding_window[0] if isinstance(a.sliding_window, tuple) else a.sliding_window
    if window is not None:  # (llama.cpp's llama architecture does not read it: it attends to everything)
        w.add_sliding_window(window)
    if a.yarn is not None:
        y = a.yarn
        w.add_rope_scaling_type(RopeScalingType.YARN)
        w.add_rope_scaling_factor(y.factor)
        w.add_rope_scaling_orig_ctx_len(y.original_max_position_embeddings)
        w.add_rope_scaling_yarn_beta_fast(y.beta_fast)
        w.add_rope_scaling_yarn_beta_slow(y.beta_slow)
        if log_mul := _yarn_log_mul(y):
            w.add_rope_scaling_yarn_log_mul(log_mul)
    if a.moe is not None:
        w.add_expert_count(a.moe.num_experts)
        w.add_expert_used_count(a.moe.num_experts_per_tok)
    if a.query_scaling is not None:
        if a.yarn is None:
            w.add_rope_scaling_orig_ctx_len(a.query_scaling.original_max_position_embeddings)
        w.add_attn_temperature_scale(a.query_scaling.beta)
    matrices = [p.kind for p in plan if len(p.shape) >= 2]
    main = max(set(matrices), key=matrices.count) if matrices else "f32"
    w.add_file_type(_FILE_TYPES.get(main, 0))
    if main not in FLOAT_SCHEMES:
        w.add_quantization_version(GGML_QUANT_VERSION)


def _write_vocab(w, ckpt, a: ModelArgs) -> None:
    """The tokenizer, as llama.cpp's converter writes a Mistral one (``_set_vocab_mistral``:
    mistral-common's tokens, scores and types; a tekken vocabulary as BPE with its
    merges and the "tekken" pre-tokenizer), or a GGUF source's as it is."""
    from gguf import GGUFValueType

    if isinstance(ckpt, GGUFCheckpoint):
        for key, f in ckpt.reader.fields.items():
            if key.startswith("tokenizer."):
                sub = f.types[1] if f.types[0] == GGUFValueType.ARRAY and len(f.types) > 1 else None
                w.add_key_value(key, f.contents(), f.types[0], sub)
        return
    from gguf import TokenType
    from gguf.vocab import MistralTokenizerType, MistralVocab
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
    from mistral_common.tokens.tokenizers.sentencepiece import is_sentencepiece
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer, is_tekken

    from ..errors import TokenizerError
    from ..tokenizer.base import _find_tokenizer_file

    folder = Path(ckpt.folder)
    try:
        file = _find_tokenizer_file(folder)
    except TokenizerError as e:
        raise ModelLoadError(f"a GGUF file embeds its tokenizer, and there is none: {e}", path=str(folder)) from None
    if not (is_tekken(file) or is_sentencepiece(file)):
        raise ModelLoadError(f"a GGUF file embeds its tokenizer; galerne writes mistral-common's (tekken.json, "
                             f"tokenizer.model.v*), and this folder has {file.name} only", path=str(folder))
    inner = MistralTokenizer.from_file(str(file)).instruct_tokenizer.tokenizer
    # gguf's MistralVocab does the conversion (llama.cpp's own code); it is built from
    # the tokenizer already loaded rather than by searching the folder again.
    vocab = MistralVocab.__new__(MistralVocab)
    vocab.tokenizer = inner
    vocab.tokenizer_type = MistralTokenizerType.tekken if isinstance(inner, Tekkenizer) else MistralTokenizerType.spm
    vocab.vocab_size = inner.n_words
    tokens, scores, types = (list(x) for x in zip(*vocab.all_tokens(), strict=True))
    if len(tokens) > a.vocab_size:
        raise ModelLoadError(f"the tokenizer {file.name} has {len(tokens)} tokens but the model's vocabulary "
                             f"{a.vocab_size}", path=str(folder))
    for i in range(len(tokens), a.vocab_size):  # rows past the tokenizer's (as llama.cpp pads a vocabulary)
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(TokenType.UNUSED)
    w.add_tokenizer_model(vocab.gguf_tokenizer_model)
    if vocab.tokenizer_type == MistralTokenizerType.tekken:
        w.add_tokenizer_pre("tekken")
        w.add_token_merges(vocab.extract_vocab_merges_from_model())
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(vocab.bos_id)
    w.add_eos_token_id(vocab.eos_id)
    w.add_unk_token_id(vocab.unk_id)
    w.add_pad_token_id(vocab.pad_id)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    template = _chat_template(folder, inner, vocab.tokenizer_type == MistralTokenizerType.tekken)
    if template is not None:
        w.add_chat_template(template)


def _chat_template(folder: Path, inner, tekken: bool) -> str | None:
    """The folder's own Jinja template, else the name of llama.cpp's built-in one for the
    tokenizer versions it has one for (what its converter writes); None otherwise."""
    own = folder / "chat_template.jinja"
    if own.is_file():
        return own.read_text(encoding="utf-8")
    version = str(inner.version.value if hasattr(inner.version, "value") else inner.version)
    names = {"v1": "mistral-v1", "v3": "mistral-v3-tekken" if tekken else "mistral-v3",
             "v7": "mistral-v7-tekken" if tekken else "mistral-v7"}
    return names.get(version)
