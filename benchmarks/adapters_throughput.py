"""Many adapters in one batch (issue #15): protocol 2's offline throughput with the
requests spread over 0, 1, 4, 16 and 64 distinct LoRA adapters, against the base
model alone, in the same run and the same engine.

Random adapters of rank 16 on every linear (wq wk wv wo w1 w3 w2), made in memory
(the engine's own ``AdapterWeights``), B scaled like trained ones (so that the
deltas are not zero). Requests: prompt and
output lengths drawn uniformly from [--min-len, --max-len] with seed 0, EOS ignored,
request i through adapter i mod N. Runs interleaved over ``--repeats`` rounds
(0, 1, 4, ... then again), figures are medians.

    python benchmarks/adapters_throughput.py                                 # cpu-125m, CPU-sized
    python benchmarks/adapters_throughput.py --model mistral-7b --device cuda --num-requests 256 --max-len 1024
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import SHAPES, median, models, report, sync, v3_tokenizer
from throughput import requests

TARGETS = {"attention.wq": ("dim", "q"), "attention.wk": ("dim", "kv"), "attention.wv": ("dim", "kv"),
           "attention.wo": ("q", "dim"), "feed_forward.w1": ("dim", "ffn"), "feed_forward.w3": ("dim", "ffn"),
           "feed_forward.w2": ("ffn", "dim")}


def make_adapters(args, n: int, rank: int, device) -> list:
    """``n`` random adapters, made in memory on the device (a 7B's would be 170 MB of
    files each): ``AdapterWeights`` as ``read_adapter`` returns them."""
    from galerne.weights.adapters import AdapterWeights

    dims = {"dim": args.dim, "q": args.n_heads * args.head_dim, "kv": args.n_kv_heads * args.head_dim,
            "ffn": args.hidden_dim}
    out = []
    for a in range(n):
        g = torch.Generator(device=device).manual_seed(1000 + a)
        tensors = {}
        for layer in range(args.n_layers):
            for target, (i, o) in TARGETS.items():
                A = torch.randn(rank, dims[i], generator=g, device=device) / dims[i] ** 0.5
                B = torch.randn(dims[o], rank, generator=g, device=device) * 0.02
                tensors[f"layers.{layer}.{target}"] = (A, B)
        out.append(AdapterWeights(Path(f"<random adapter {a}>"), "mistral", rank, 2.0, 2.0 * rank, tensors))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="cpu-125m", choices=sorted(SHAPES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--min-len", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--adapters", default="0,1,4,16,64", help="comma list of distinct adapter counts (0: the base alone)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None)
    args = ap.parse_args()

    from galerne import LLM, SamplingParams
    from galerne.tokenizer import Tokenizer

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    _, model = models(args.model, device, dtype, keep_hf=False)
    margs = model.args
    counts = [int(c) for c in args.adapters.split(",")]
    most = max(counts)
    adapters = make_adapters(margs, most, args.rank, device)
    engine = {"max_num_batched_tokens": args.max_num_batched_tokens} if args.max_num_batched_tokens else {}
    llm = LLM.from_model(model, Tokenizer.from_path(v3_tokenizer()), max_model_len=4096,
                         max_loras=max(most, 1), max_lora_rank=args.rank, **engine)
    names = [f"a{i}" for i in range(most)]
    t = time.perf_counter()
    for name, weights in zip(names, adapters):
        llm.engine.adapters.add(name, weights)
    load_s = time.perf_counter() - t

    prompts, output_lens = requests(args.num_requests, args.min_len, args.max_len, SHAPES[args.model]["vocab_size"])
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in output_lens]
    total_out = sum(output_lens)
    # Warm-up: every prompt once, base and adapters mixed (allocator, kernel buffers, slots).
    warm = [SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)] * len(prompts)
    llm.generate(prompts, warm, adapter=[names[i % most] if most and i % 2 else None for i in range(len(prompts))])
    runs: dict[int, list[float]] = {n: [] for n in counts}
    for _ in range(args.repeats):
        for n in counts:
            adapter = [names[i % n] if n else None for i in range(len(prompts))]
            sync(device)
            t = time.perf_counter()
            outs = llm.generate(prompts, params, adapter=adapter)
            sync(device)
            runs[n].append(total_out / (time.perf_counter() - t))
            assert sum(len(o.token_ids) for o in outs) == total_out
    figures = {n: round(median(r), 1) for n, r in runs.items()}
    base = figures.get(0)
    print(f"{args.num_requests} requests, {total_out} output tokens, {args.model} {dtype} on {device}, "
          f"rank {args.rank} on 7 targets; {most} adapters registered in {load_s:.2f} s")
    for n, tps in figures.items():
        rel = f"   {tps / base:6.1%} of the base" if base and n else ""
        print(f"  {n:>3} adapters  {tps:9.1f} output tokens/s  (runs: {', '.join(f'{x:.1f}' for x in runs[n])}){rel}")
    report("adapters_throughput", {
        "model": args.model, "dtype": str(dtype), "device": str(device), "num_requests": args.num_requests,
        "lengths": [args.min_len, args.max_len], "rank": args.rank, "output_tokens": total_out,
        "output_tokens_per_s": figures, "runs": {n: [round(x, 1) for x in r] for n, r in runs.items()},
        "vs_base": {n: round(v / base, 3) for n, v in figures.items() if base and n},
    })


if __name__ == "__main__":
    main()
