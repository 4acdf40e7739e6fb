"""Protocol 1 on one GGUF file, galerne and llama.cpp reading the very same bytes.

Batch 1, a random prompt of --prompt-tokens, --new-tokens greedy tokens with EOS
ignored; decode-phase tokens/s (the first token excluded), medians of --repeats
rounds, the engines interleaved round by round. Both engines map the same file
(its blocks are galerne's as they are: q8_0, q4_0, q4_k read by the CPU kernel).

Without --gguf, the file is a 7B-shaped model (Mistral 7B's shape, vocab 32768)
with random blocks of --scheme (``common.random_quantized_checkpoint``, written to
GGUF by `galerne convert --to gguf` with its blocks unchanged): real weights of
that size would take 29 GB of float32 to quantize.

    python benchmarks/decode_gguf.py                              # mistral-7b q4_0
    python benchmarks/decode_gguf.py --scheme q8_0 --new-tokens 32
    python benchmarks/decode_gguf.py --gguf ./mistral-7b-instruct-v0.3.Q4_K_M.gguf
    PYTHONPATH=.bench/llamacpp-avx2 python benchmarks/decode_gguf.py --kernel-march x86-64-v3   # both AVX2-only
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHAPES, median, random_quantized_checkpoint, report  # noqa: E402
from decode_latency import galerne_decode  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", default=None, help="a GGUF file (default: a random 7B-shaped one of --scheme)")
    ap.add_argument("--model", default="mistral-7b", choices=sorted(SHAPES))
    ap.add_argument("--scheme", default="q4_0", choices=("q8_0", "q4_0", "q4_k"))
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--huge-pages", default="off",
                    help="galerne's weights in 2 MB pages (--huge-pages): off (the default's), on, or 'off,on' (each a "
                         "contender)")
    ap.add_argument("--kernel-march", default=None, help="galerne's CPU kernel built for this -march (x86-64-v3: AVX2)")
    args = ap.parse_args()
    if args.kernel_march:
        os.environ["GALERNE_CPU_MARCH"] = args.kernel_march

    if args.gguf:
        gguf = Path(args.gguf)
    else:
        folder = random_quantized_checkpoint(args.model, args.scheme)
        gguf = folder.with_suffix(".gguf")
        if not gguf.exists():
            subprocess.run([sys.executable, "-m", "galerne.cli", "convert", str(folder), str(gguf), "--to", "gguf"],
                           check=True)

    from galerne import LLM
    import llama_cpp
    from llamacpp_baseline import decoder

    modes = [m.strip() for m in args.huge_pages.split(",") if m.strip()]
    if not modes or set(modes) - {"on", "off"}:
        raise SystemExit(f"--huge-pages: off, on or off,on, got {args.huge_pages!r}")
    llms = {m: LLM(gguf, device="cpu", kv_cache_gb=0.5, max_model_len=args.prompt_tokens + args.new_tokens + 16,
                   huge_pages=m == "on") for m in modes}
    llm = llms[modes[0]]
    kernel = llm.engine.runner.cpu_decoder is not None
    system = llama_cpp.llama_print_system_info().decode()
    print(f"{gguf.name}: {gguf.stat().st_size / 1e9:.2f} GB; galerne's kernel "
          f"{'on, -march=' + os.environ.get('GALERNE_CPU_MARCH', 'native') if kernel else 'off (torch ops)'}; "
          f"llama.cpp {'with' if 'AVX512 = 1' in system else 'without'} AVX512")
    g = torch.Generator().manual_seed(0)
    vocab = llm.model.args.vocab_size
    prompt = torch.randint(3, vocab, (args.prompt_tokens,), generator=g).tolist()
    run_llamacpp, close = decoder(gguf, prompt, args.new_tokens, threads=torch.get_num_threads())
    contenders = {"galerne": lambda: galerne_decode(llm, prompt, args.new_tokens, torch.device("cpu"))}
    for m in modes[1:]:
        contenders[f"galerne, huge pages {m}"] = lambda e=llms[m]: galerne_decode(e, prompt, args.new_tokens,
                                                                                   torch.device("cpu"))
    contenders["llama.cpp"] = run_llamacpp
    for fn in contenders.values():
        fn()  # warm-up: the file's pages into the page cache, allocators
    runs: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.repeats):
        for name, fn in contenders.items():
            runs[name].append(fn())
    close()
    figures = {name: round(median(r), 2) for name, r in runs.items()}
    for name, tps in figures.items():
        print(f"  {name:<26} {tps:8.2f} tokens/s   (runs: {min(runs[name]):.2f}-{max(runs[name]):.2f})")
    wins = sum(a > b for a, b in zip(runs["galerne"], runs["llama.cpp"]))
    print(f"  galerne / llama.cpp: {figures['galerne'] / figures['llama.cpp']:.2f}x (ahead in {wins} of {args.repeats} rounds)")
    report("decode_gguf", {"gguf": gguf.name, "bytes": gguf.stat().st_size, "prompt_tokens": args.prompt_tokens,
                           "new_tokens": args.new_tokens, "kernel": kernel, "huge_pages": modes,
                           "kernel_march": os.environ.get("GALERNE_CPU_MARCH", "native"),
                           "llamacpp_avx512": "AVX512 = 1" in system, "tokens_per_s": figures,
                           "runs": {k: [round(x, 2) for x in v] for k, v in runs.items()}})


if __name__ == "__main__":
    main()
