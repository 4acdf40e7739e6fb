"""Protocol 3 of shared/BENCHMARKS.md: serving under concurrent streaming clients.

N clients (the official ``openai`` AsyncOpenAI, streaming chat completions) on
loopback, each sending requests one after the other until the request count or
the time bound is reached. Every request generates exactly ``--max-tokens``
tokens (EOS ignored) after a prompt of about ``--prompt-words`` random words.
Reports requests/s, output tokens/s, time to first token and inter-token latency
(p50/p99, as the clients see them) and errors (must be 0), then a JSON line.
Baseline in the same run: the same requests through ``LLM.generate`` in-process
(no HTTP, no streaming, ``max_num_seqs`` = the number of clients), so that
``server_vs_offline`` is the share of the engine's throughput the server keeps
(on a small CPU machine the clients' own SSE parsing takes cores from it).

By default the script starts ``galerne serve`` on the benchmark model in a
subprocess (so the clients do not share its GIL); ``--base-url`` drives a server
already running instead.

    python benchmarks/serve_load.py                                   # cpu-125m, 64 clients, on CPU
    python benchmarks/serve_load.py --clients 8 --requests 16 --max-tokens 16   # a quick look
    python benchmarks/serve_load.py --base-url http://127.0.0.1:8000/v1 --model my-model --api-key KEY
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import SHAPES, WORDS, percentile, random_checkpoint, report


def start_server(args) -> tuple[subprocess.Popen, str]:
    folder = random_checkpoint(args.model_shape)
    cmd = [sys.executable, "-m", "galerne.cli", "serve", str(folder), "--port", "0", "--served-model-name", args.model,
           "--kv-cache-gb", str(args.kv_cache_gb), "--max-queued-requests", str(max(256, args.clients * 2))]
    if args.device:
        cmd += ["--device", args.device]
    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": f"{repo}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("GALERNE_API_KEY", None)
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    line = proc.stderr.readline()
    match = re.search(r"(http://\S+/v1)", line)
    if not match:
        proc.kill()
        raise SystemExit(f"the server did not start: {line}{proc.stderr.read()}")
    return proc, match.group(1)


def make_prompts(n: int, words: int) -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(n)]


async def client(api, args, prompts: list[str], deadline: float, results: list[dict]) -> None:
    while prompts and time.perf_counter() < deadline:
        prompt = prompts.pop()
        t0 = time.perf_counter()
        stamps: list[float] = []
        try:
            stream = await api.chat.completions.create(
                model=args.model, messages=[{"role": "user", "content": prompt}], max_tokens=args.max_tokens,
                temperature=1.0, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
            usage = None
            async for chunk in stream:
                if chunk.usage is not None:
                    usage = chunk.usage
                if chunk.choices and (chunk.choices[0].delta.content or chunk.choices[0].finish_reason):
                    stamps.append(time.perf_counter())
            if usage is None or usage.completion_tokens != args.max_tokens:
                raise RuntimeError(f"expected {args.max_tokens} tokens, got usage {usage}")
            results.append({"ok": True, "start": t0, "end": time.perf_counter(), "ttft": stamps[0] - t0,
                            "itl": [b - a for a, b in zip(stamps, stamps[1:])], "tokens": usage.completion_tokens})
        except Exception as e:  # counted, and the first few shown
            results.append({"ok": False, "error": f"{type(e).__name__}: {e}"})


async def run(args, base_url: str) -> dict:
    from openai import AsyncOpenAI

    api = AsyncOpenAI(base_url=base_url, api_key=args.api_key, max_retries=0, timeout=args.duration)
    # One warm-up request: the first forward pays one-off costs.
    await api.chat.completions.create(model=args.model, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    results: list[dict] = []
    todo = make_prompts(args.requests, args.prompt_words)[::-1]  # popped from the end: in order
    t0 = time.perf_counter()
    deadline = t0 + args.duration
    await asyncio.gather(*[client(api, args, todo, deadline, results) for _ in range(args.clients)])
    wall = time.perf_counter() - t0
    await api.close()
    ok = [r for r in results if r["ok"]]
    errors = [r["error"] for r in results if not r["ok"]]
    for e in errors[:5]:
        print("error:", e, file=sys.stderr)
    ttft = [r["ttft"] for r in ok]
    itl = [x for r in ok for x in r["itl"]]
    return {
        "clients": args.clients, "requests": len(results), "completed": len(ok), "errors": len(errors),
        "max_tokens": args.max_tokens, "prompt_words": args.prompt_words, "wall_s": round(wall, 2),
        "requests_per_s": round(len(ok) / wall, 3),
        "output_tokens_per_s": round(sum(r["tokens"] for r in ok) / wall, 1),
        "ttft_p50_ms": round(percentile(ttft, 50) * 1e3, 1), "ttft_p99_ms": round(percentile(ttft, 99) * 1e3, 1),
        "itl_p50_ms": round(percentile(itl, 50) * 1e3, 1), "itl_p99_ms": round(percentile(itl, 99) * 1e3, 1),
        "ttft_mean_ms": round(statistics.fmean(ttft) * 1e3, 1) if ttft else None,
    }


def offline(args, n: int) -> dict:
    """Baseline in the same run: the same requests through ``LLM.generate`` in one
    process, no HTTP, at most ``--clients`` at once (what the engine alone does with them)."""
    from galerne import LLM, SamplingParams

    kw = {"device": args.device} if args.device else {}
    llm = LLM(random_checkpoint(args.model_shape), kv_cache_gb=args.kv_cache_gb, max_num_seqs=args.clients, **kw)
    prompts = [llm.tokenizer.encode_chat([{"role": "user", "content": p}]) for p in make_prompts(n, args.prompt_words)]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=1.0, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(max_tokens=2))  # warm-up, as the server's
    t = time.perf_counter()
    outs = llm.generate(prompts, params)
    wall = time.perf_counter() - t
    return {"offline_wall_s": round(wall, 2),
            "offline_output_tokens_per_s": round(sum(len(o.token_ids) for o in outs) / wall, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", help="drive this server (…/v1) instead of starting one")
    ap.add_argument("--model", default="bench", help="model id to request")
    ap.add_argument("--api-key", default="none")
    ap.add_argument("--model-shape", default="cpu-125m", choices=sorted(SHAPES), help="benchmark model to serve")
    ap.add_argument("--device", default=None)
    ap.add_argument("--kv-cache-gb", type=float, default=2.0)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--requests", type=int, default=192, help="requests in all (the count bound)")
    ap.add_argument("--duration", type=float, default=600.0, help="seconds (the time bound)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-words", type=int, default=100)
    ap.add_argument("--baseline", choices=("offline", "none"), default=None,
                    help="offline: the same requests through LLM.generate after the load (default when the "
                         "script starts the server)")
    args = ap.parse_args()
    baseline = args.baseline or ("offline" if args.base_url is None else "none")

    proc = None
    base_url = args.base_url
    if base_url is None:
        proc, base_url = start_server(args)
    try:
        figures = asyncio.run(run(args, base_url))
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    if baseline == "offline" and figures["completed"]:
        figures.update(offline(args, figures["completed"]))
        figures["server_vs_offline"] = round(figures["output_tokens_per_s"] / figures["offline_output_tokens_per_s"], 3)
    for k, v in figures.items():
        print(f"{k:>22}: {v}")
    report("serve_load", {"model": args.model_shape if args.base_url is None else args.model, **figures})
    if figures["errors"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
