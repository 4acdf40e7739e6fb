"""galerne's native CPU decode kernel: build on first use, and the decoder that calls it.

At batch 1 on a CPU, a decode step reads every weight once, and that read sets the
floor on its time. Run from Python op by op, the rest of the step (norms, rotary,
cache writes, attention, activations) adds a few microseconds of dispatch per op:
about a quarter of the step for a 125M model. ``cpu_decode.cpp`` runs the whole
step, every layer and the logits, in one call and one OpenMP region. Its GEMVs
read the weights where they are: ``nn.Linear``'s (out, in) layout, with no packing
and no copy. Unmerged adapters (``MultiLoRALinear``'s slot stacks) run in it too:
each sequence of a step names its slot.

The extension is compiled once (``torch.utils.cpp_extension`` with ninja and the
system's C++ compiler, ``-march=native``; about 30 s) and cached under
``$XDG_CACHE_HOME/galerne/kernels/KEY``, where KEY hashes everything the binary depends
on (:func:`signature`: the source, the CPU's features, the compiler, the torch build
and install, the Python ABI, the flags): two environments have two folders and never
rebuild each other's. A build holds a lock on its folder (``build.lock``, an OS lock
that dies with its process): another process waits for it (saying so, up to
``BUILD_WAIT_S``, Ctrl-C stops it), and a build killed halfway leaves nothing that
stops the next one. Where it cannot be built (no compiler, no OpenMP, a wait that ran
out) galerne says why once and decodes with torch ops, which give the same tokens more
slowly. ``GALERNE_CPU_KERNELS=0`` turns it off; ``GALERNE_CPU_MARCH`` builds it for another
``-march`` than native (``x86-64-v3``: the AVX2 code, for benchmarks).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import threading
from pathlib import Path

import torch
from torch import nn

from ..models.layers import rotary_inv_freq
from ..models.quant import QuantEmbedding, QuantLinear
from ..models.transformer import Transformer

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_decode.cpp")
# Past this many sequences per step, torch's matmul wins: in bfloat16 it has
# AMX tiles (where the CPU does) and the kernel's AVX512-BF16 dot products stop
# keeping up past 8; in float32 both are bound by the FMA units and the kernel
# still saves the rest of the step at 64 (measured on cpu-125m, 2 cores, at
# batch 1..64).
MAX_BATCH = {torch.float32: 64, torch.bfloat16: 8}
# Quantized weights: the torch path dequantizes every matrix at every step, so the
# kernel stays ahead up to 64 (kernel / torch step time on cpu-125m, 2 cores, batch
# 1 -> 64: q4_0 0.06 -> 0.54, q8_0 -> 0.58, q4_k 0.16 -> 0.84).
MAX_BATCH_QUANTIZED = 64
CFLAGS = ("-O3", "-fopenmp")  # and -march=<march>
LDFLAGS = ("-fopenmp",)
BUILD_WAIT_S = 600.0  # the longest wait for another process's build of the same kernel

_lock = threading.Lock()
_built: dict[str, object] = {}


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "galerne" / "kernels"


def _cpu_signature() -> str:
    """What the compiled code depends on: the CPU's features (-march=native)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load():
    """The compiled extension, or None where it can't be had (the reason is logged once)."""
    if os.environ.get("GALERNE_CPU_KERNELS", "1") == "0":
        return None
    with _lock:
        if "ext" in _built:
            return _built["ext"]
        ext = None
        try:
            # GALERNE_CPU_MARCH: another -march than native (benchmarks time the AVX2 code,
            # x86-64-v3, on AVX512 machines).
            march = os.environ.get("GALERNE_CPU_MARCH")
            ext = _build(march=march) if march else _build()
        except Exception as e:  # no compiler, no ninja, no OpenMP: decode with torch ops instead
            reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            log.warning("CPU decode kernel unavailable (%s); decoding with torch ops, which is slower", reason)
        _built["ext"] = ext
        return ext


@functools.cache
def _compiler() -> tuple[str, str]:
    """(path, version line) of the C++ compiler torch's build uses ($CXX, or c++)."""
    name = os.environ.get("CXX", "c++")
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"no C++ compiler: {name} is not on PATH")
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30, check=False).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"the C++ compiler {path} does not run: {e}") from None
    return os.path.realpath(path), (out.strip().splitlines() or ["?"])[0]


def signature(march: str = "native") -> dict[str, str]:
    """Everything the compiled kernel depends on; its hash names the cache folder."""
    compiler, version = _compiler()
    return {
        "source": hashlib.sha256(SOURCE.read_bytes()).hexdigest(),
        "flags": " ".join([*CFLAGS, f"-march={march}", "|", *LDFLAGS]),
        "cpu": f"{platform.machine()} {_cpu_signature()}",
        "compiler": f"{compiler} ({version})",
        "torch": f"{torch.__version__} {getattr(torch.version, 'git_version', '')}",
        "torch_path": os.path.realpath(os.path.dirname(torch.__file__)),
        "python": f"{sys.implementation.cache_tag} {sysconfig.get_config_var('EXT_SUFFIX')}",
    }


def kernel_folder(march: str = "native") -> Path:
    """The cache folder of the kernel for ``march`` in this environment."""
    return _folder(signature(march))


def _folder(sig: dict[str, str]) -> Path:
    return cache_dir() / hashlib.sha256(json.dumps(sig, sort_keys=True).encode()).hexdigest()[:16]


def _hold_build_lock(folder: Path):
    """The build lock of ``folder``, held: at once when free; else after saying that another
    build runs, waiting up to BUILD_WAIT_S (interruptible). The lock is the OS's (flock),
    released when its holder exits, killed or not: a dead build never blocks."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(folder / "build.lock"))
    try:
        lock.acquire(timeout=0)
        return lock
    except Timeout:
        pass
    log.warning("waiting for another build of galerne's CPU decode kernel in %s (up to %.0f s; Ctrl-C stops)",
                folder, BUILD_WAIT_S)
    try:
        lock.acquire(timeout=BUILD_WAIT_S, poll_interval=0.2)
    except Timeout:
        raise RuntimeError(f"another process has been building it for more than {BUILD_WAIT_S:.0f} s "
                           f"(it holds {folder / 'build.lock'})") from None
    return lock


def _build(march: str = "native"):
    """Compile (or find in the cache) the extension for ``-march=<march>``: native
    for use; tests also build a baseline x86-64-v3 (AVX2) variant, so that the
    portable loops that AVX512 machines never run are checked too."""
    from torch.utils.cpp_extension import load as build

    try:  # the ninja that pip installed with galerne, when its venv's bin is not on PATH
        import ninja

        bin_dir = getattr(ninja, "BIN_DIR", None)
        path = os.environ.get("PATH", "")
        if bin_dir and bin_dir not in path.split(os.pathsep):
            os.environ["PATH"] = bin_dir + os.pathsep + path
    except ImportError:
        pass

    sig = signature(march)
    folder = _folder(sig)
    folder.mkdir(parents=True, exist_ok=True)
    lock = _hold_build_lock(folder)
    try:
        # torch's own lock file, which its build leaves behind when killed and then waits on
        # forever: holding build.lock, no build of ours is running here, so it is stale.
        (folder / "lock").unlink(missing_ok=True)
        # Compile a copy of the source kept in the folder: the build command names the
        # source's path, and ninja rebuilds when the command changes, so building from
        # where this checkout happens to be would recompile for every other checkout
        # (another venv, a git worktree) of the same source.
        text = SOURCE.read_bytes()
        source = folder / SOURCE.name
        if not source.is_file() or source.read_bytes() != text:
            tmp = folder / f".{SOURCE.name}.{os.getpid()}"
            tmp.write_bytes(text)
            os.replace(tmp, source)
        done = folder / "signature.json"  # written once a build succeeded
        if not done.is_file():
            log.warning("compiling galerne's CPU decode kernel for this CPU (once, about 30 s) into %s", folder)
        ext = build(name=f"galerne_cpu_{folder.name}", sources=[str(source)], build_directory=str(folder),
                    extra_cflags=[*CFLAGS, f"-march={march}"], extra_ldflags=list(LDFLAGS), verbose=False)
        if not done.is_file():
            tmp = folder / f".signature.json.{os.getpid()}"
            tmp.write_text(json.dumps(sig, indent=1) + "\n")
            os.replace(tmp, done)
        return ext
    finally:
        lock.release()


def _ext_reading(scheme):
    """The extension, where it is built and reads ``scheme`` (``galerne.quant.Scheme``); else None."""
    return load() if scheme.kernel else None


def dequantize(q: torch.Tensor, scheme, in_features: int) -> torch.Tensor | None:
    """(out, row_bytes) uint8 blocks of ``scheme`` -> (out, in_features) float32, on every
    thread; None where the kernel is not built (or does not read this scheme): the
    caller dequantizes with torch ops."""
    ext = _ext_reading(scheme)
    return None if ext is None else ext.dequantize(q.contiguous(), scheme.name, in_features, torch.get_num_threads())


def linear(x: torch.Tensor, q: torch.Tensor, scheme, in_features: int, int8_dot: bool = False) -> torch.Tensor | None:
    """x (rows, in_features) float32 @ W.T, W the (out, row_bytes) uint8 blocks of
    ``scheme``, by the decode kernel's GEMV (no dense copy of W): float32 (rows, out);
    None where the kernel is not built (or does not read this scheme). ``int8_dot``: W
    multiplies x rounded to int8 per block of 32 (:func:`int8_reference`)."""
    ext = _ext_reading(scheme)
    return None if ext is None else ext.linear(x.contiguous(), q.contiguous(), scheme.name, in_features,
                                                torch.get_num_threads(), int8_dot)


def round_activations(x: torch.Tensor, block: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """x (rows, n) float32 rounded as the kernel's int8_dot rounds a GEMV's input: per
    ``block`` inputs (32; 256 for q4_k's super-blocks, llama.cpp's q8_K), dx = max |x| /
    127 and q = round(x / dx) (ties to even). Returns q (rows, n / block, block) int64
    and dx (rows, n / block, 1) float32."""
    b = x.float().reshape(x.shape[0], -1, block)
    dx = b.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(dx > 0, 1 / dx, torch.zeros_like(dx))
    return torch.round(b * inv).clamp(-127, 127).long(), dx


def input_block(scheme) -> int:
    """How many inputs share a rounding scale under int8_dot: 256 for q4_k, else 32."""
    return 256 if getattr(scheme, "name", scheme) == "q4_k" else 32


def int8_reference(x: torch.Tensor, q: torch.Tensor, scheme, in_features: int) -> torch.Tensor:
    """What ``linear(..., int8_dot=True)`` computes, in float64 torch ops: x rounded by
    :func:`round_activations` times the dequantized weights (q8_0, q4_0, q4_k: a scale
    times an integer, minus an offset, per block of 32 weights)."""
    from ..quant.formats import dequantize

    qx, dx = round_activations(x, input_block(scheme))
    xr = (qx.double() * dx.double()).reshape(x.shape[0], in_features)
    w = dequantize(q, scheme, in_features).double()
    return xr @ w.T


TARGETS = ("wq", "wk", "wv", "wo", "w1", "w3", "w2")  # the kernel's order of the adapted linears


def _linears(layer) -> dict[str, nn.Module]:
    a, f = layer.attention, layer.feed_forward
    return {"wq": a.wq, "wk": a.wk, "wv": a.wv, "wo": a.wo, "w1": f.w1, "w3": f.w3, "w2": f.w2}


def _lora_stacks(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(A, B) of a batched-adapter wrapper (galerne.models.lora's MultiLoRALinear: the
    base nn.Linear or QuantLinear at ``.base``, every slot's stacks at ``.lora_A``
    (S, R, in) and ``.lora_B`` (S, out, R)), or None for any other module."""
    base, a, b = getattr(module, "base", None), getattr(module, "lora_A", None), getattr(module, "lora_B", None)
    if not (isinstance(base, (nn.Linear, QuantLinear)) and isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return None
    return a, b


def _base_linear(module: nn.Module) -> nn.Module:
    return module.base if _lora_stacks(module) is not None else module


def _lora_problem(module: nn.Module, dtype: torch.dtype) -> str | None:
    """Why the kernel can't take a wrapper's stacks, or None."""
    a, b = _lora_stacks(module)
    shape = (module.base.out_features, module.base.in_features)
    if a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[0] or a.shape[1] != b.shape[2] \
            or a.shape[2] != shape[1] or b.shape[1] != shape[0]:
        return f"adapter stacks of shapes {tuple(a.shape)} and {tuple(b.shape)} for a {shape} weight"
    if any(t.dtype != dtype or not t.is_contiguous() or t.device.type != "cpu" for t in (a, b)):
        return "adapter stacks of another dtype, non-contiguous or off the CPU"
    return None


# The kernel's code of each matrix format (cpu_decode.cpp's Decoder: schemes).
SCHEME_CODES = {"q8_0": 1, "q4_0": 2, "q4_k": 3}


def activation_dtype(model: Transformer) -> torch.dtype:
    """The dtype of the model's norms: its activations' and its KV cache's."""
    return model.norm.weight.dtype


def _matrix(module: nn.Module) -> tuple[torch.Tensor, int]:
    """A linear's (or an embedding's) weight as the kernel reads it, and its scheme code (0: dense)."""
    if isinstance(module, (QuantLinear, QuantEmbedding)):
        return module.qweight.detach(), SCHEME_CODES[module.scheme.name]
    return module.weight.detach(), 0


def _matrix_problem(module: nn.Module) -> str | None:
    if isinstance(module, (QuantLinear, QuantEmbedding)):
        if module.scheme.name not in SCHEME_CODES:
            return f"{module.scheme.name} weights (the kernel reads {', '.join(SCHEME_CODES)})"
        t = module.qweight
    elif isinstance(module, (nn.Linear, nn.Embedding)) and getattr(module, "bias", None) is None:
        t = module.weight
        if t.dtype not in (torch.float32, torch.bfloat16):
            return f"{t.dtype} weights (float32, bfloat16 and {', '.join(SCHEME_CODES)} only)"
    else:
        return "adapters or biases on the linear layers"
    if not t.is_contiguous() or t.device.type != "cpu":
        return "weights non-contiguous or off the CPU"
    return None


def unsupported(model: Transformer, cache_dtype: torch.dtype) -> str | None:
    """Why the kernel can't run this model, or None when it can. The kernel knows
    what ``galerne.models`` builds today (RoPE plain or YaRN, llama-4 query scaling,
    RMSNorm, SwiGLU, grouped heads, sliding windows; each matrix float32, bfloat16,
    q8_0, q4_0 or q4_k); a feature added there must be added here or listed."""
    args = model.args
    if args.mla is not None:
        return "multi-head latent attention"
    if args.moe is not None:
        return "mixture-of-experts layers"
    dtype = activation_dtype(model)
    if dtype not in (torch.float32, torch.bfloat16):
        return f"{dtype} weights (float32 and bfloat16 only)"
    if cache_dtype != dtype:
        return "a KV cache dtype other than the weights'"
    # Batched adapters (MultiLoRALinear: a base nn.Linear or QuantLinear and slot
    # stacks) run in the kernel; any other wrapper (LoRALinear's training modules) or
    # a bias does not.
    wrapped = [m for layer in model.layers for m in _linears(layer).values()]
    for m in [*(_base_linear(m) for m in wrapped), model.output, model.tok_embeddings]:
        if (problem := _matrix_problem(m)) is not None:
            return problem
    for m in wrapped:
        if _lora_stacks(m) is not None and (problem := _lora_problem(m, dtype)) is not None:
            return problem
    norms = [model.norm.weight] + [w for layer in model.layers for w in (layer.attention_norm.weight, layer.ffn_norm.weight)]
    if any(t.dtype != dtype or not t.is_contiguous() or t.device.type != "cpu" for t in norms):
        return "norms of mixed dtypes, non-contiguous or off the CPU"
    return None


_NONE = torch.empty(0)  # a matrix without adapters


class CpuDecoder:
    """Runs decode-only steps of up to MAX_BATCH sequences through the kernel.

    The weight list is taken once, here: in-place changes to the weights (a merged
    adapter) are seen, but replaced modules are not; build a new decoder then.
    """

    def __init__(self, ext, model: Transformer, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 lora: list[dict[str, tuple[torch.Tensor, torch.Tensor]] | None] | None = None, int8_dot: bool = False):
        """``lora``: per layer, {target: (A, B)} (targets among TARGETS; A (S, R, in) and
        B (S, out, R), every slot's adapter, R the largest rank with lower ones
        zero-padded, alpha / r folded into B), or None. Without it, the stacks of the
        model's MultiLoRALinear wrappers (``.lora_A``, ``.lora_B``; the weight at
        ``.base.weight``) are taken. The kernel reads the stacks in place: an adapter
        loaded into a slot's rows is seen by the next step. ``int8_dot``: q8_0, q4_0 and
        q4_k matrices multiply their inputs rounded to int8 per block of 32 (llama.cpp's
        way; :func:`int8_reference`); float32 inputs otherwise."""
        args = model.args
        quantized = any(isinstance(m, (QuantLinear, QuantEmbedding)) for m in model.modules())
        self.max_batch = MAX_BATCH_QUANTIZED if quantized else MAX_BATCH[activation_dtype(model)]
        weights, schemes, stacks = [], [], []
        for i, layer in enumerate(model.layers):
            m = _linears(layer)
            w = {t: _matrix(_base_linear(m[t])) for t in TARGETS}
            for x in [(layer.attention_norm.weight.detach(), 0), w["wq"], w["wk"], w["wv"], w["wo"],
                      (layer.ffn_norm.weight.detach(), 0), w["w1"], w["w3"], w["w2"]]:
                weights.append(x[0]), schemes.append(x[1])
            given = (lora[i] or {}) if lora is not None else {t: _lora_stacks(m[t]) for t in TARGETS}
            unknown = set(given) - set(TARGETS)
            if unknown:
                raise ValueError(f"CpuDecoder: no adapter target {sorted(unknown)} (targets: {TARGETS})")
            for t in TARGETS:
                pair = given.get(t)
                stacks += [x.detach() for x in pair] if pair is not None else [_NONE, _NONE]
        self.slots = 0
        if all(x is _NONE for x in stacks):
            stacks = []
        else:
            self.slots = next(x for x in stacks if x is not _NONE).shape[0]
        windows = [args.window(i) or 0 for i in range(args.n_layers)]
        inv_freq, rope_scale = rotary_inv_freq(args.head_dim, args.rope_theta, args.yarn)
        qs = args.query_scaling
        out, out_code = _matrix(model.output)
        emb, emb_code = _matrix(model.tok_embeddings)
        # The C++ decoder holds references to these tensors (no copies).
        self._decoder = ext.Decoder(weights, model.norm.weight.detach(), out, emb,
                                    k_cache, v_cache, windows, args.n_heads, args.n_kv_heads, args.head_dim,
                                    float(args.norm_eps), inv_freq.contiguous(), float(rope_scale),
                                    float(qs.beta) if qs else 0.0, int(qs.original_max_position_embeddings) if qs else 0,
                                    stacks, [*schemes, out_code, emb_code], int8_dot)

    @classmethod
    def create(cls, model: Transformer, k_cache: torch.Tensor, v_cache: torch.Tensor, int8_dot: bool = False):
        """A decoder, or None (with the reason logged at info) when the kernel can't serve this model."""
        reason = unsupported(model, k_cache.dtype)
        if reason is not None:
            log.info("CPU decode kernel not used: %s", reason)
            return None
        ext = load()
        return None if ext is None else cls(ext, model, k_cache, v_cache, int8_dot=int8_dot)

    def __call__(self, tokens: list[int], entries: list[tuple[list[int], int, int]],
                 slots: list[int] | None = None) -> torch.Tensor:
        """tokens: one new token per sequence; entries: (block_table, num_computed_tokens, 1);
        slots: each sequence's adapter slot, -1 for none (None: all -1).
        Returns float32 logits (len(tokens), vocab) in a buffer the next call reuses."""
        return self._decoder.step(tokens, [start for _, start, _ in entries], [t for t, _, _ in entries],
                                  torch.get_num_threads(), [] if slots is None else list(slots))
