"""A batch job beside interactive traffic: what the batch costs an interactive client,
and what the batch gets done meanwhile.

``galerne serve`` (the built-in galerne-mini by default) in a subprocess. One interactive
client (the official ``openai`` AsyncOpenAI, streaming chat completions of
``--interactive-tokens`` tokens, EOS ignored) sends requests one after the other:

1. baseline: ``--baseline-requests`` requests with nothing else running;
2. during: the same client while a batch job (Mistral's ``/v1/batch/jobs``, its
   ``--requests`` chat requests inline, ``--batch-tokens`` tokens each, EOS ignored)
   runs, until the job ends;
3. batch alone (``--batch-alone``, on by default): the same job with no client, for the
   batch's own throughput.

Reports the client's total time and time to first token (p50, p95) in 1 and 2 and
their ratios, the batch's wall time, requests/s and output tokens/s in 2 (and 3),
checks that the job's output file holds one answer per request, then a JSON line.

    python benchmarks/batch_latency.py                       # galerne-mini, 200 requests
    python benchmarks/batch_latency.py --requests 50 --baseline-requests 10   # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import WORDS, percentile, report

CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")


def cpu_flags() -> str:
    """The CPU's flags that matter to its matmuls (BENCHMARKS.md: a CPU figure names them)."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((x for x in f if x.startswith("flags")), "")
    except OSError:
        line = ""
    have = set(line.partition(":")[2].split())
    return " ".join(f for f in CPU_FLAGS if f in have) or ("none of " + ",".join(CPU_FLAGS) if line else "unknown")


def start_server(args, data_dir: str) -> tuple[subprocess.Popen, str, str]:
    cmd = [sys.executable, "-m", "galerne.cli", "serve", "--port", "0", "--data-dir", data_dir,
           "--kv-cache-gb", str(args.kv_cache_gb)]
    if args.model:
        cmd.insert(3, args.model)
    if args.batch_concurrency:
        cmd += ["--batch-concurrency", str(args.batch_concurrency)]
    if args.max_background_seqs is not None:
        cmd += ["--max-background-seqs", str(args.max_background_seqs)]
    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": f"{repo}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("GALERNE_API_KEY", None)
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    seen = []
    for line in proc.stderr:  # the notice of the built-in model, then the serving line
        seen.append(line)
        match = re.search(r"serving (\S+) on (http://\S+/v1)", line)
        if match:
            return proc, match.group(2), match.group(1)
    proc.kill()
    raise SystemExit("the server did not start:\n" + "".join(seen))


def prompts(n: int, words: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(n)]


async def interactive(api, model: str, args, texts: list[str], until=None) -> list[dict]:
    """Requests one after the other: all of ``texts``, or (``until``) until it is set."""
    out = []
    for text in texts:
        if until is not None and until.is_set():
            break
        t0 = time.perf_counter()
        first = None
        stream = await api.chat.completions.create(
            model=model, messages=[{"role": "user", "content": text}], max_tokens=args.interactive_tokens,
            temperature=1.0, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        tokens = 0
        async for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter()
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        if tokens != args.interactive_tokens:
            raise RuntimeError(f"expected {args.interactive_tokens} tokens, got {tokens}")
        out.append({"total": time.perf_counter() - t0, "ttft": (first or time.perf_counter()) - t0})
    return out


async def run_batch(http, base: str, model: str, args, seed: int, done: asyncio.Event) -> dict:
    """Create the job, wait for its end; its wall time and figures."""
    requests = [{"custom_id": f"q{i}", "body": {"messages": [{"role": "user", "content": t}],
                                               "max_tokens": args.batch_tokens, "temperature": args.batch_temperature,
                                               "ignore_eos": True, "random_seed": i}}
                for i, t in enumerate(prompts(args.requests, args.prompt_words, seed))]
    try:
        t0 = time.perf_counter()
        r = await http.post(f"{base}/batch/jobs", json={"endpoint": "/v1/chat/completions", "model": model,
                                                        "requests": requests})
        if r.status_code != 200:
            raise SystemExit(f"the batch was refused: {r.status_code} {r.text[:1000]}")
        job = r.json()
        while job["status"] not in ("SUCCESS", "FAILED", "TIMEOUT_EXCEEDED", "CANCELLED"):
            await asyncio.sleep(0.1)
            job = (await http.get(f"{base}/batch/jobs/{job['id']}")).json()
        return {"job": job, "wall": time.perf_counter() - t0}
    finally:
        done.set()  # also when it failed: the interactive client stops


def check_output(data_dir: str, job: dict, n: int) -> int:
    """The job's output file holds one answer per request: its output tokens."""
    if job["status"] != "SUCCESS" or job["failed_requests"] or not job["output_file"]:
        raise SystemExit(f"the batch did not succeed: {json.dumps(job)[:2000]}")
    lines = [json.loads(x) for x in (Path(data_dir) / "files" / job["output_file"]).read_text().splitlines()]
    ids = sorted(x["custom_id"] for x in lines)
    if ids != sorted(f"q{i}" for i in range(n)) or any(x["response"]["status_code"] != 200 for x in lines):
        raise SystemExit(f"the output file holds {len(lines)} lines for {n} requests, or a failed one")
    return sum(x["response"]["body"]["usage"]["completion_tokens"] for x in lines)


def latency(rows: list[dict], prefix: str) -> dict:
    return {f"{prefix}_requests": len(rows),
            f"{prefix}_total_p50_ms": round(percentile([r["total"] for r in rows], 50) * 1e3, 1),
            f"{prefix}_total_p95_ms": round(percentile([r["total"] for r in rows], 95) * 1e3, 1),
            f"{prefix}_ttft_p50_ms": round(percentile([r["ttft"] for r in rows], 50) * 1e3, 1),
            f"{prefix}_ttft_p95_ms": round(percentile([r["ttft"] for r in rows], 95) * 1e3, 1)}


async def run(args, base: str, model: str, data_dir: str) -> dict:
    import httpx
    from openai import AsyncOpenAI

    api = AsyncOpenAI(base_url=base, api_key="none", max_retries=0, timeout=600)
    http = httpx.AsyncClient(timeout=600)
    # Warm-up: the first forwards pay one-off costs.
    await interactive(api, model, args, prompts(2, args.prompt_words, 99))
    figures: dict = {}

    baseline = await interactive(api, model, args, prompts(args.baseline_requests, args.prompt_words, 1))
    figures.update(latency(baseline, "baseline"))

    done = asyncio.Event()
    batch_task = asyncio.create_task(run_batch(http, base, model, args, 2, done))
    await asyncio.sleep(0.5)  # the job is taken and its first requests run
    during = await interactive(api, model, args, prompts(100_000, args.prompt_words, 3), until=done)
    batch = await batch_task
    tokens = check_output(data_dir, batch["job"], args.requests)
    figures.update(latency(during, "during"))
    figures.update({
        "total_p50_ratio": round(figures["during_total_p50_ms"] / figures["baseline_total_p50_ms"], 3),
        "ttft_p50_ratio": round(figures["during_ttft_p50_ms"] / figures["baseline_ttft_p50_ms"], 3),
        "batch_requests": args.requests, "batch_wall_s": round(batch["wall"], 2),
        "batch_requests_per_s": round(args.requests / batch["wall"], 3),
        "batch_output_tokens_per_s": round(tokens / batch["wall"], 1),
    })

    if args.batch_alone:
        alone = await run_batch(http, base, model, args, 2, asyncio.Event())
        tokens = check_output(data_dir, alone["job"], args.requests)
        figures.update({"alone_batch_wall_s": round(alone["wall"], 2),
                        "alone_batch_output_tokens_per_s": round(tokens / alone["wall"], 1),
                        "batch_with_client_vs_alone": round(alone["wall"] / batch["wall"], 3)})
    await http.aclose()
    await api.close()
    return figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder to serve (default: the built-in galerne-mini)")
    ap.add_argument("--requests", type=int, default=200, help="requests in the batch job")
    ap.add_argument("--batch-tokens", type=int, default=64, help="tokens each batch request generates")
    ap.add_argument("--interactive-tokens", type=int, default=32, help="tokens each interactive request generates")
    ap.add_argument("--baseline-requests", type=int, default=30, help="interactive requests with no batch running")
    ap.add_argument("--batch-temperature", type=float, default=1.0,
                    help="the batch requests' (0: greedy, whose sampling costs the host far less per row)")
    ap.add_argument("--prompt-words", type=int, default=40)
    ap.add_argument("--batch-concurrency", type=int, default=None, help="the server's (default: its own default)")
    ap.add_argument("--max-background-seqs", type=int, default=None,
                    help="the server's cap on batch rows in a step beside interactive work (default: its own default)")
    ap.add_argument("--kv-cache-gb", type=float, default=1.0)
    ap.add_argument("--batch-alone", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the same batch with no interactive client")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="galerne-batch-bench-") as data_dir:
        proc, base, model = start_server(args, data_dir)
        try:
            figures = asyncio.run(run(args, base, model, data_dir))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    figures = {"model": model, "batch_tokens": args.batch_tokens, "interactive_tokens": args.interactive_tokens,
               "batch_temperature": args.batch_temperature,
               "batch_concurrency": args.batch_concurrency or "default",
               "cpu_flags": cpu_flags(), **figures}
    for k, v in figures.items():
        print(f"{k:>32}: {v}")
    report("batch_latency", figures)


if __name__ == "__main__":
    main()
