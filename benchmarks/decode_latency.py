"""Protocol 1 of shared/BENCHMARKS.md: decode latency at batch 1.

128-token prompt, 256 new tokens, greedy, EOS ignored; tokens/s of the decode
phase (first generated token to last) and MBU = tokens/s x weight bytes / peak
bandwidth, the bandwidth measured in the same run. Baselines on the same weights
and prompt in the same run: transformers ``generate`` and, where
``llama-cpp-python`` is installed, llama.cpp at the same precision.

    python benchmarks/decode_latency.py                       # cpu-125m, fp32, CPU
    python benchmarks/decode_latency.py --model mistral-7b --device cuda --dtype bfloat16
    python benchmarks/decode_latency.py --arch ministral3   # Ministral 3's YaRN + query scaling
    python benchmarks/decode_latency.py --quantization q4_0 # galerne's q4_0 vs llama.cpp's Q4_0
    python benchmarks/decode_latency.py --kernel-march x86-64-v3  # galerne's kernel built for AVX2

``--quantization`` quantizes the same random weights (galerne: ``quantize_model_``,
as a load with ``quantization=`` does; llama.cpp: ``llama-quantize`` of the f32 GGUF).
The schemes differ on the output projection: galerne keeps it at q8_0 with 4-bit
schemes, llama.cpp at Q6_K; q4_k is llama.cpp's Q4_K_S (a few tensors at Q5_K).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from common import ARCHS, SHAPES, median, models, peak_bandwidth, random_checkpoint, report, sync, v3_tokenizer, weight_bytes


def galerne_decode(llm, prompt: list[int], new_tokens: int, device) -> float:
    from galerne import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    stamps = []
    for delta in llm.stream(prompt, params):
        sync(device)
        stamps.append(time.perf_counter())
    assert len(stamps) == new_tokens
    return (new_tokens - 1) / (stamps[-1] - stamps[0])


def hf_decode(model, prompt: list[int], new_tokens: int, device) -> float:
    from transformers.generation.streamers import BaseStreamer

    class Stamps(BaseStreamer):
        def __init__(self):
            self.t: list[float] = []
            self.first = True

        def put(self, value):
            if self.first:  # the prompt
                self.first = False
                return
            sync(device)
            self.t.append(time.perf_counter())

        def end(self):
            pass

    s = Stamps()
    ids = torch.tensor([prompt], device=device)
    with torch.inference_mode():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, streamer=s, pad_token_id=0)
    assert len(s.t) == new_tokens
    return (new_tokens - 1) / (s.t[-1] - s.t[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="cpu-125m", choices=sorted(SHAPES))
    ap.add_argument("--arch", default="mistral", choices=sorted(ARCHS), help="the architecture at that shape")
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU default)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5, help="interleaved rounds; figures are medians")
    ap.add_argument("--baseline-new-tokens", type=int, default=None,
                    help="fewer new tokens for the slow baselines (tokens/s hardly depends on it at this length)")
    ap.add_argument("--baselines", default="transformers,llamacpp", help="comma list: transformers, llamacpp, none")
    ap.add_argument("--quantization", default=None, choices=["q8_0", "q4_0", "q4_k"],
                    help="quantize the weights (float32 activations); llama.cpp at the same precision")
    ap.add_argument("--activations", default="int8",
                    help="with --quantization on CPU: comma list of --quantized-activations to time "
                         "(int8, float; both: 'int8,float'), each a galerne contender")
    ap.add_argument("--wait-idle", type=float, default=120.0,
                    help="CPU: before each run, wait up to this many seconds for other processes to go idle (0: don't)")
    ap.add_argument("--huge-pages", action="store_true", help="galerne's weights and KV cache in 2 MB pages (CPU)")
    ap.add_argument("--kernel-march", default=None,
                    help="build galerne's CPU kernel for this -march (x86-64-v3: the AVX2 code) instead of native")
    args = ap.parse_args()
    if args.kernel_march:
        os.environ["GALERNE_CPU_MARCH"] = args.kernel_march  # read by galerne.kernels.cpu.load

    from galerne import LLM
    from galerne.tokenizer import Tokenizer

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    baselines = {b.strip() for b in args.baselines.split(",")} - {"none", ""}

    # One set of random weights for everyone (common.models). On CPU they live in a
    # cached HF folder, which llama.cpp converts from.
    folder = random_checkpoint(args.model, dtype, args.arch) if device.type == "cpu" else None
    hf, ours = models(args.model, device, dtype, args.arch, keep_hf="transformers" in baselines)
    if args.quantization:
        from galerne.quant.plan import quantize_model_

        quantize_model_(ours, args.quantization)
    modes = [m.strip() for m in args.activations.split(",") if m.strip()]
    if not (args.quantization and device.type == "cpu"):
        modes = modes[:1]  # only block weights on the CPU tell the two apart
    # One engine per mode over the same weights (the last made sets QuantLinear's mode,
    # which only the prefill's last rows read: the decode kernel holds its own).
    llms = {m: LLM.from_model(ours, Tokenizer.from_path(v3_tokenizer()), quantized_activations=m,
                              huge_pages=args.huge_pages) for m in modes}
    llm = llms[modes[0]]
    if device.type == "cpu":
        decoder = llm.engine.runner.cpu_decoder
        print(f"  galerne's CPU decode kernel: {'on' if decoder is not None else 'off (torch ops)'}"
              f"{', -march=' + os.environ.get('GALERNE_CPU_MARCH', 'native') if decoder is not None else ''}")

    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, SHAPES[args.model]["vocab_size"], (args.prompt_tokens,), generator=g).tolist()
    wbytes = weight_bytes(ours, active=True)  # of a mixture of experts, the k experts a token reads
    wbytes += sum(b.numel() for name, b in ours.named_buffers() if name.endswith("qweight"))  # blocks, uint8
    bw = peak_bandwidth(device, gib=2.0 if device.type == "cuda" else 1.0)
    print(f"{args.model} ({args.arch}) {dtype}{' ' + args.quantization if args.quantization else ''} on {device}: {wbytes / 1e9:.3f} GB of weights read per token, peak copy bandwidth {bw / 1e9:.1f} GB/s")

    # Every contender runs once per round, rounds interleaved (galerne, transformers,
    # llama.cpp, galerne, ...): the shared host's bandwidth drifts by several percent
    # within minutes, and interleaving spreads that drift over everyone alike.
    contenders: dict[str, object] = {"galerne": lambda: galerne_decode(llm, prompt, args.new_tokens, device)}
    for m in modes[1:]:
        contenders[f"galerne {m}"] = lambda e=llms[m]: galerne_decode(e, prompt, args.new_tokens, device)
    slow_tokens = args.baseline_new_tokens or args.new_tokens
    if "transformers" in baselines:
        contenders["transformers"] = lambda: hf_decode(hf, prompt, slow_tokens, device)
    closers = []
    if "llamacpp" in baselines and device.type == "cpu" and args.arch == "mistral":
        try:
            import llama_cpp  # noqa: F401  (llama-cpp-python, built as in benchmarks/README.md)
            from llamacpp_baseline import convert_hf_to_gguf, decoder
        except ImportError as e:
            print(f"  llama.cpp skipped: {e}")
        else:
            precision = args.quantization or {torch.float32: "f32", torch.bfloat16: "bf16"}.get(dtype)
            if precision:
                gguf = folder / f"model-{precision}.gguf"
                if not gguf.exists():
                    convert_hf_to_gguf(folder, gguf, precision)
                run_llamacpp, close = decoder(gguf, prompt, args.new_tokens, threads=torch.get_num_threads())
                contenders[f"llama.cpp {precision}"] = run_llamacpp
                closers.append(close)

    def quiet() -> None:  # the CPU box is shared: a run next to another job's is worth nothing
        if device.type == "cpu" and args.wait_idle > 0:
            from llamacpp_baseline import wait_for_idle

            other = wait_for_idle(0.08, 1.0, args.wait_idle)
            if other >= 0.08:
                print(f"  (other processes used {other:.0%} of the CPUs before this run)")

    for fn in contenders.values():
        fn()  # warm-up (allocator, kernels, caches)
    runs: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.repeats):
        for name, fn in contenders.items():
            quiet()
            runs[name].append(fn())
    for close in closers:
        close()
    figures = {name: round(median(r), 2) for name, r in runs.items()}
    for name, tps in figures.items():
        spread = f"{min(runs[name]):.1f}-{max(runs[name]):.1f}"
        print(f"  {name:<22} {tps:8.1f} tokens/s   MBU {tps * wbytes / bw:6.1%}   (runs: {spread})")
    for name in figures:
        if name.startswith("llama.cpp"):
            for ours_name in (n for n in figures if n.startswith("galerne")):
                wins = sum(g > b for g, b in zip(runs[ours_name], runs[name]))
                print(f"  {ours_name} / {name}: {figures[ours_name] / figures[name]:.2f}x "
                      f"(ahead in {wins} of {args.repeats} rounds)")

    base = figures.get("transformers")
    if base:
        print(f"  galerne / transformers: {figures['galerne'] / base:.2f}x")
    report("decode_latency", {
        "model": args.model, "arch": args.arch, "dtype": str(dtype), "device": str(device), "prompt_tokens": args.prompt_tokens,
        "quantization": args.quantization, "activations": modes, "huge_pages": args.huge_pages, "kernel_march": os.environ.get("GALERNE_CPU_MARCH", "native"),
        "new_tokens": args.new_tokens, "weight_bytes": wbytes, "peak_bandwidth_Bps": round(bw),
        "tokens_per_s": figures, "runs": {k: [round(x, 2) for x in v] for k, v in runs.items()},
        "mbu": {k: round(v * wbytes / bw, 4) for k, v in figures.items()},
    })


if __name__ == "__main__":
    main()
