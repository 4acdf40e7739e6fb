"""The CPU decode kernel's step with batched LoRA rows against the same step without.

cpu-125m shape (random weights), every sequence at position ``--context``; for each
batch size M, one kernel step with no adapters, then with k distinct adapters of
rank ``--rank`` on all 7 linears (wq wk wv wo w1 w3 w2) spread over the rows
(row m uses slot m % k). The times are medians of interleaved runs (plain, then each
k, repeated), so that drift on a shared machine hits them alike, and their
minima (the runs least disturbed by other processes); the ratios are with / without.

    python benchmarks/lora_kernel_step.py                      # float32, M = 1, 8, 32
    python benchmarks/lora_kernel_step.py --dtype bfloat16 --batch 1 8
"""

from __future__ import annotations

import argparse
import time

import torch

from common import SHAPES, hf_config, median, report

TARGETS = ("wq", "wk", "wv", "wo", "w1", "w3", "w2")


def build(name: str, dtype: torch.dtype):
    from galerne.models.args import ModelArgs
    from galerne.models.transformer import Transformer

    args = ModelArgs.from_hf_config({**hf_config(name).to_dict(), "architectures": ["MistralForCausalLM"]})
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = Transformer(args)
    return model.to(dtype).eval()


def stacks(model, slots: int, rank: int, dtype: torch.dtype):
    """Per layer {target: (A (S, R, in), B (S, out, R))}, random, as MultiLoRALinear holds them."""
    g = torch.Generator().manual_seed(1)
    out = []
    for layer in model.layers:
        a, f = layer.attention, layer.feed_forward
        per = {}
        for t, m in zip(TARGETS, (a.wq, a.wk, a.wv, a.wo, f.w1, f.w3, f.w2)):
            o, n = m.weight.shape
            per[t] = ((0.01 * torch.randn(slots, rank, n, generator=g)).to(dtype).contiguous(),
                      (0.01 * torch.randn(slots, o, rank, generator=g)).to(dtype).contiguous())
        out.append(per)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="cpu-125m", choices=sorted(SHAPES))
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--adapters", type=int, nargs="+", default=[1, 4, 8], help="k values (those <= M are run)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=None, help="OpenMP threads of the step (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from galerne.engine.paged import PagedKVCache
    from galerne.kernels import cpu as cpu_kernels

    ext = cpu_kernels.load()
    assert ext is not None, "the CPU kernel did not build"
    dtype = getattr(torch, args.dtype)
    model = build(args.model, dtype)
    block = 16
    per_seq = -(-(args.context + 1) // block)
    figures = {"model": args.model, "dtype": args.dtype, "rank": args.rank, "context": args.context,
               "threads": torch.get_num_threads(), "steps": []}
    for M in args.batch:
        cache = PagedKVCache(model.args, M * per_seq, block, dtype, torch.device("cpu"))
        tokens = [(7 * m + 3) % model.args.vocab_size for m in range(M)]
        entries = [(list(range(m * per_seq, (m + 1) * per_seq)), args.context, 1) for m in range(M)]
        ks = [k for k in args.adapters if k <= M]
        runs = {0: (cpu_kernels.CpuDecoder(ext, model, cache.k, cache.v), None)}
        for k in ks:
            dec = cpu_kernels.CpuDecoder(ext, model, cache.k, cache.v, lora=stacks(model, k, args.rank, dtype))
            runs[k] = (dec, [m % k for m in range(M)])
        times = {k: [] for k in runs}
        for k, (dec, slots) in runs.items():  # warm up: pages, caches
            for _ in range(3):
                dec(tokens, entries, slots)
        for _ in range(args.repeats):
            for k, (dec, slots) in runs.items():
                t = time.perf_counter()
                dec(tokens, entries, slots)
                times[k].append(time.perf_counter() - t)
        base, base_min = median(times[0]), min(times[0])
        print(f"M={M:3d}  no adapters: median {base * 1e3:8.2f} ms, min {base_min * 1e3:8.2f} ms", flush=True)
        row = {"batch": M, "plain_ms": round(base * 1e3, 3), "plain_min_ms": round(base_min * 1e3, 3), "lora": []}
        for k in ks:
            t, t_min = median(times[k]), min(times[k])
            print(f"       {k:2d} adapter(s), rank {args.rank} x 7: median {t * 1e3:8.2f} ms, min {t_min * 1e3:8.2f} ms"
                  f"  ratio {t / base:.3f} (median), {t_min / base_min:.3f} (min)", flush=True)
            row["lora"].append({"adapters": k, "ms": round(t * 1e3, 3), "min_ms": round(t_min * 1e3, 3),
                                "ratio": round(t / base, 3), "ratio_min": round(t_min / base_min, 3)})
        figures["steps"].append(row)
    report("lora_kernel_step", figures)


if __name__ == "__main__":
    main()
