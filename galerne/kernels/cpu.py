"""galerne's native CPU decode kernel: build on first use, and the decoder that calls it.

At batch 1 on a CPU, a decode step reads every weight once, and that read sets the
floor on its time. Run from Python op by op, the rest of the step (norms, rotary,
cache writes, attention, activations) adds a few microseconds of dispatch per op:
about a quarter of the step for a 125M model. ``cpu_decode.cpp`` runs the whole
step, every layer and the logits, in one call and one OpenMP region. Its GEMVs
read the weights where they are: ``nn.Linear``'s (out, in) layout, with no packing
and no copy.

The extension is compiled once per machine and source (``torch.utils.cpp_extension``
with ninja and the system's C++ compiler, ``-march=native``; about 30 s) and cached
under ``$XDG_CACHE_HOME/galerne/kernels``. Where it cannot be built (no compiler,
no OpenMP) galerne says why once and decodes with torch ops, which give the same
tokens more slowly. ``GALERNE_CPU_KERNELS=0`` turns it off.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
from pathlib import Path

import torch
from torch import nn

from ..models.transformer import Transformer

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_decode.cpp")
# Past this many sequences per step, torch's matmul wins: in bfloat16 it has
# AMX tiles (where the CPU does) and the kernel's AVX512-BF16 dot products stop
# keeping up past 8; in float32 both are bound by the FMA units and the kernel
# still saves the rest of the step at 64 (measured on cpu-125m, 2 cores, at
# batch 1..64).
MAX_BATCH = {torch.float32: 64, torch.bfloat16: 8}

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
            ext = _build()
        except Exception as e:  # no compiler, no ninja, no OpenMP: decode with torch ops instead
            reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            log.warning("CPU decode kernel unavailable (%s); decoding with torch ops, which is slower", reason)
        _built["ext"] = ext
        return ext


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

    text = SOURCE.read_bytes()
    key = hashlib.sha256(
        text + _cpu_signature().encode() + march.encode() + torch.__version__.encode()
        + platform.python_version().encode()
    ).hexdigest()[:16]
    folder = cache_dir() / key
    folder.mkdir(parents=True, exist_ok=True)
    # Compile a copy of the source kept in the folder: the build command names the
    # source's path, and ninja rebuilds when the command changes, so building from
    # where this checkout happens to be would recompile for every other checkout
    # (another venv, a git worktree) of the same source.
    source = folder / SOURCE.name
    if not source.is_file() or source.read_bytes() != text:
        tmp = folder / f".{SOURCE.name}.{os.getpid()}"
        tmp.write_bytes(text)
        os.replace(tmp, source)
    name = f"galerne_cpu_{key}"
    if not any(folder.glob(f"{name}*.so")):
        log.warning("compiling galerne's CPU decode kernel for this CPU (once, about 30 s) into %s", folder)
    return build(name=name, sources=[str(source)], build_directory=str(folder),
                 extra_cflags=["-O3", f"-march={march}", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)


def unsupported(model: Transformer, cache_dtype: torch.dtype) -> str | None:
    """Why the kernel can't run this model, or None when it can. The kernel knows
    what ``galerne.models`` builds today (plain RoPE, RMSNorm, SwiGLU, grouped
    heads, sliding windows); a feature added there must be added here or listed."""
    args = model.args
    if args.moe is not None:
        return "mixture-of-experts layers"
    dtype = model.output.weight.dtype
    if dtype not in (torch.float32, torch.bfloat16):
        return f"{dtype} weights (float32 and bfloat16 only)"
    if cache_dtype != dtype:
        return "a KV cache dtype other than the weights'"
    linears = [m for layer in model.layers for m in (
        layer.attention.wq, layer.attention.wk, layer.attention.wv, layer.attention.wo,
        layer.feed_forward.w1, layer.feed_forward.w3, layer.feed_forward.w2)]
    if any(type(m) is not nn.Linear or m.bias is not None for m in linears):
        return "adapters or biases on the linear layers"
    if any(t.dtype != dtype or not t.is_contiguous() or t.device.type != "cpu" for t in model.parameters()):
        return "weights of mixed dtypes, non-contiguous or off the CPU"
    return None


class CpuDecoder:
    """Runs decode-only steps of up to MAX_BATCH sequences through the kernel.

    The weight list is taken once, here: in-place changes to the weights (a merged
    adapter) are seen, but replaced modules are not; build a new decoder then.
    """

    def __init__(self, ext, model: Transformer, k_cache: torch.Tensor, v_cache: torch.Tensor):
        args = model.args
        self.max_batch = MAX_BATCH[model.output.weight.dtype]
        weights = []
        for layer in model.layers:
            a, f = layer.attention, layer.feed_forward
            weights += [layer.attention_norm.weight, a.wq.weight, a.wk.weight, a.wv.weight, a.wo.weight,
                        layer.ffn_norm.weight, f.w1.weight, f.w3.weight, f.w2.weight]
        windows = [args.window(i) or 0 for i in range(args.n_layers)]
        # The C++ decoder holds references to these tensors (no copies).
        self._decoder = ext.Decoder([w.detach() for w in weights], model.norm.weight.detach(),
                                    model.output.weight.detach(), model.tok_embeddings.weight.detach(),
                                    k_cache, v_cache, windows, args.n_heads, args.n_kv_heads, args.head_dim,
                                    float(args.norm_eps), float(args.rope_theta))

    @classmethod
    def create(cls, model: Transformer, k_cache: torch.Tensor, v_cache: torch.Tensor):
        """A decoder, or None (with the reason logged at info) when the kernel can't serve this model."""
        reason = unsupported(model, k_cache.dtype)
        if reason is not None:
            log.info("CPU decode kernel not used: %s", reason)
            return None
        ext = load()
        return None if ext is None else cls(ext, model, k_cache, v_cache)

    def __call__(self, tokens: list[int], entries: list[tuple[list[int], int, int]]) -> torch.Tensor:
        """tokens: one new token per sequence; entries: (block_table, num_computed_tokens, 1).
        Returns float32 logits (len(tokens), vocab) in a buffer the next call reuses."""
        return self._decoder.step(tokens, [start for _, start, _ in entries], [t for t, _, _ in entries],
                                  torch.get_num_threads())
