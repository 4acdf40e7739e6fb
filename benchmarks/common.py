"""Shared pieces of the benchmark scripts: the reference model shapes of
``shared/BENCHMARKS.md``, random checkpoints, bandwidth, and the report line."""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import time
from pathlib import Path

import torch

SHAPES = {
    # Mistral architecture, untied, vocab of the v3 tokenizer.
    "cpu-125m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                     head_dim=64, intermediate_size=2048, vocab_size=32768),
    "mistral-7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       head_dim=128, intermediate_size=14336, vocab_size=32768),
}
CACHE = Path(os.environ.get("GALERNE_BENCH_CACHE", Path(__file__).resolve().parent.parent / ".bench"))


def v3_tokenizer() -> Path:
    import mistral_common

    return Path(mistral_common.__file__).parent / "data" / "mistral_instruct_tokenizer_240323.model.v3"


# Architectures a benchmark can build at a SHAPES size: the transformers classes, and
# the config beyond the shape (Ministral 3's rope: YaRN and llama-4 query scaling, as
# the 3B-14B releases set them).
ARCHS = {
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(rope_theta=1e6)),
    "ministral3": ("Ministral3Config", "Ministral3ForCausalLM", dict(rope_parameters=dict(
        rope_type="yarn", rope_theta=1e6, factor=16.0, original_max_position_embeddings=16384, beta_fast=32.0,
        beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0, llama_4_scaling_beta=0.1))),
    # Mistral Small 4's design (latent attention, 128-expert-style MoE with a shared
    # expert) scaled to the SHAPES size: ranks and experts in Small 4's proportions.
    "mistral4": ("Mistral4Config", "Mistral4ForCausalLM", dict(
        q_lora_rank=256, kv_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=32,
        n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1, moe_intermediate_size=512,
        first_k_dense_replace=0, n_group=1, topk_group=1)),
}
# Fields a SHAPES entry has that an architecture derives otherwise.
_NOT_FOR = {"mistral4": ("head_dim", "num_key_value_heads", "intermediate_size")}


def hf_config(name: str, arch: str = "mistral"):
    import transformers

    config_cls, _, extra = ARCHS[arch]
    shape = {k: v for k, v in SHAPES[name].items() if k not in _NOT_FOR.get(arch, ())}
    if arch == "mistral4":
        shape["num_key_value_heads"] = shape["num_attention_heads"]
    else:
        extra = {**extra, "sliding_window": None}
    return getattr(transformers, config_cls)(**shape, max_position_embeddings=32768, tie_word_embeddings=False,
                                             bos_token_id=1, eos_token_id=2, **extra)


def hf_model_class(arch: str = "mistral"):
    import transformers

    return getattr(transformers, ARCHS[arch][1])


def random_checkpoint(name: str, dtype: torch.dtype = torch.float32, arch: str = "mistral") -> Path:
    """A Hugging Face folder with random weights (seed 0) for shape ``name``,
    built once and cached under .bench/."""
    suffix = "" if arch == "mistral" else f"-{arch}"
    folder = CACHE / f"{name}{suffix}-{str(dtype).removeprefix('torch.')}"
    if (folder / "model.safetensors").exists() or (folder / "model.safetensors.index.json").exists():
        return folder
    torch.manual_seed(0)
    model = hf_model_class(arch)(hf_config(name, arch)).to(dtype)
    tmp = folder.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    shutil.copy(v3_tokenizer(), tmp / "tokenizer.model.v3")
    tmp.rename(folder)
    return folder


def models(name: str, device: torch.device, dtype: torch.dtype, arch: str = "mistral", keep_hf: bool = True):
    """(transformers model or None, galerne model) with the same random weights (seed 0)
    of shape ``name``: on CPU from the cached folder (llama.cpp converts from it), on a
    GPU made on the device (a 7B random init on the CPU would take minutes).
    ``keep_hf=False``: only galerne's (the transformers copy is dropped)."""
    from galerne.models.args import ModelArgs
    from galerne.weights.loader import model_from_hf_state_dict

    if device.type == "cpu":
        hf = hf_model_class(arch).from_pretrained(random_checkpoint(name, dtype, arch), dtype=dtype).eval()
    else:
        torch.manual_seed(0)
        with torch.device(device):
            hf = hf_model_class(arch)(hf_config(name, arch)).to(dtype).eval()
    margs = ModelArgs.from_hf_config(hf.config.to_dict() | {"architectures": [ARCHS[arch][1]]})
    ours = model_from_hf_state_dict(margs, hf.state_dict(), dtype=dtype, device=device)
    return (hf if keep_hf else None), ours


def weight_bytes(model: torch.nn.Module, active: bool = False) -> int:
    """Bytes of the model's weights; ``active``: those one token reads, i.e. of a
    mixture of experts only k of the E routed experts (MBU's numerator)."""
    seen, total = set(), 0
    for name, p in model.named_parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    moe = getattr(getattr(model, "args", None), "moe", None)
    if active and moe is not None:
        routed = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." in n)
        total -= routed * (1 - moe.num_experts_per_tok / moe.num_experts)
    return int(total)


def peak_bandwidth(device: torch.device, gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes/s of a large copy (bytes read + written): on CPU a memcpy-style copy,
    on GPU a device-to-device copy (BENCHMARKS.md measures 2 GiB)."""
    n = int(gib * 2**30) // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n * 4 / best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median(xs):
    return statistics.median(xs)


def percentile(xs: list[float], p: float) -> float:
    """The ``p``-th percentile of ``xs``, interpolated between ranks (nan when empty)."""
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


# Words of the serving benchmarks' random prompts.
WORDS = ("river", "stone", "light", "market", "winter", "paper", "garden", "voice", "engine", "window", "story",
         "mountain", "silver", "table", "morning", "bridge", "forest", "letter", "number", "music", "ocean", "station",
         "circle", "coffee", "pocket", "ladder", "cloud")


def machine() -> dict:
    info = {
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    else:
        try:
            for line in open("/proc/cpuinfo"):
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    return info


def report(name: str, figures: dict) -> None:
    """The JSON line every benchmark ends with."""
    print(json.dumps({"benchmark": name, **figures, "env": machine()}))


def random_blocks(rows: int, cols: int, scheme, g: torch.Generator) -> torch.Tensor:
    """(rows, row_bytes) uint8 blocks: random payload, float16 scales near 0.002
    (q4_k: its d and dmin; q8_0, q4_0: d)."""
    n = cols // scheme.block
    out = torch.randint(0, 256, (rows, n, scheme.block_bytes), dtype=torch.uint8, generator=g)
    scales = 2 if scheme.name == "q4_k" else 1
    d = (torch.rand(rows, n, scales, generator=g) * 0.002 + 0.001).to(torch.float16)
    out[..., : 2 * scales] = d.view(torch.uint8).reshape(rows, n, 2 * scales)
    return out.reshape(rows, -1)


def random_quantized_checkpoint(model: str, scheme_name: str) -> Path:
    """A folder as `galerne quantize --scheme SCHEME` writes it for shape ``model``,
    with random blocks (random payload, scales of a trained model's size): its
    speed and memory are those of real weights, and building it takes seconds
    where quantizing a 7B's 29 GB of float32 would take minutes. Cached under .bench/."""
    from galerne.models.args import ModelArgs
    from galerne.models.transformer import Transformer
    from galerne.quant import SCHEMES
    from galerne.quant.plan import tensor_scheme
    from galerne.weights.export import write_checkpoint

    folder = CACHE / f"{model}-{scheme_name}-random"
    if (folder / "params.json").exists():
        return folder
    config = hf_config(model).to_dict() | {"architectures": ["MistralForCausalLM"]}
    args = ModelArgs.from_hf_config(config)
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in Transformer(args).named_parameters()}
    target = SCHEMES[scheme_name]
    plan = {n: tensor_scheme(n, s, target, args.n_layers) for n, s in shapes.items()}
    g = torch.Generator().manual_seed(0)

    def meta(n):
        s = plan[n]
        if s is None:
            return torch.empty(shapes[n], dtype=torch.float32, device="meta")
        return torch.empty(shapes[n][0], s.row_bytes(shapes[n][1]), dtype=torch.uint8, device="meta")

    def tensors():
        for n, shape in shapes.items():
            s = plan[n]
            yield n, torch.ones(shape) if s is None else random_blocks(shape[0], shape[1], s, g)

    tmp = folder.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg = {"quant_method": "galerne", "scheme": target.name,
           "tensors": {n: s.name for n, s in plan.items() if s is not None}}
    write_checkpoint(tmp, "mistral", args, ((n, meta(n)) for n in shapes), tensors(), companions_from=None,
                     dtype=None, progress=None, config_extra={"quantization": cfg})
    shutil.copy(v3_tokenizer(), tmp / "tokenizer.model.v3")
    tmp.rename(folder)
    return folder
