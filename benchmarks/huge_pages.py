"""One CPU decode step with the weights in 4 KB pages against the same weights in 2 MB pages.

With ``--huge-pages`` the engine moves a CPU model's weights into transparent huge
pages at start (``galerne/hugepages.py``). This times the decode kernel's step on
one sequence (a 150-token context) over the same values in both places: the 4 KB
side is a plain torch copy of every tensor (anonymous memory, as
a float checkpoint quantized or cast at load is), the 2 MB side the engine's. Rounds alternate between the two; each round is the median of --steps
steps, and the figure the median of the rounds.

    python benchmarks/huge_pages.py                          # cpu-125m float32
    python benchmarks/huge_pages.py --dtype bfloat16
    python benchmarks/huge_pages.py --quantization q4_0
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from common import SHAPES, models, report, v3_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="cpu-125m", choices=sorted(SHAPES))
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--quantization", default=None, choices=("q8_0", "q4_0", "q4_k"))
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()

    from galerne import LLM, hugepages
    from galerne.kernels.cpu import CpuDecoder
    from galerne.tokenizer import Tokenizer

    if not hugepages.available():
        raise SystemExit(f"transparent huge pages are {hugepages.thp_mode()} here: nothing to compare")
    _, ours = models(args.model, torch.device("cpu"), getattr(torch, args.dtype), keep_hf=False)
    if args.quantization:
        from galerne.quant.plan import quantize_model_

        quantize_model_(ours, args.quantization)
    runner = LLM.from_model(ours, Tokenizer.from_path(v3_tokenizer()), huge_pages=True).engine.runner  # moves the weights
    def place(values) -> None:
        for (owner, name, is_param, t), v in zip(list(hugepages.tensors(runner.model)), values):
            hugepages.replace(owner, name, is_param, t, v)

    huge = [t.data for *_, t in hugepages.tensors(runner.model)]
    small = [t.clone() for t in huge]
    table = list(range(64))

    def step_ms() -> float:
        decoder = CpuDecoder.create(runner.model, runner.cache.k, runner.cache.v, int8_dot=runner.int8_dot)
        times = []
        for i in range(args.steps):
            t0 = time.perf_counter()
            decoder([5], [(table, 100 + i % 50, 1)])
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3

    label = f"{args.model} {args.dtype}{' ' + args.quantization if args.quantization else ''}"
    rounds: dict[str, list[float]] = {"4 KB pages": [], "2 MB pages": []}
    for _ in range(args.rounds):
        for name, values in (("4 KB pages", small), ("2 MB pages", huge)):
            place(values)
            rounds[name].append(step_ms())
    med = {k: statistics.median(v) for k, v in rounds.items()}
    for k, v in rounds.items():
        print(f"  {label}, weights in {k}: {med[k]:.2f} ms a step (rounds: {', '.join(f'{x:.2f}' for x in v)})")
    print(f"  2 MB / 4 KB: {med['4 KB pages'] / med['2 MB pages']:.3f}x the speed")
    report("huge_pages", {"model": args.model, "dtype": args.dtype, "quantization": args.quantization,
            "steps": args.steps, "step_ms": med, "rounds_ms": rounds})


if __name__ == "__main__":
    main()
