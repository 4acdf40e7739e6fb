"""Peak memory of `galerne serve` on a quantized 7B-shaped model: goal under 5 GB at q4.

The model: Mistral 7B's shape (32 layers, dim 4096, 14336 hidden, 32 / 8 heads,
vocab 32768) with random blocks (``common.random_quantized_checkpoint``), laid out
as `galerne quantize` writes it.

The run: `galerne serve FOLDER --kv-cache-gb G` in a subprocess, one chat request
with a prompt of --prompt-tokens words and --max-tokens new tokens, then the
server's peak resident memory (VmHWM in /proc: weights mapped from the page cache
count too), its time to load and the request's time.

    python benchmarks/peak_rss.py                       # mistral-7b, q4_0, 0.5 GB of KV cache
    python benchmarks/peak_rss.py --scheme q8_0 --kv-cache-gb 1
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHAPES, random_quantized_checkpoint, report  # noqa: E402


def vm_hwm_kb(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mistral-7b", choices=sorted(SHAPES))
    ap.add_argument("--scheme", default="q4_0", choices=("q8_0", "q4_0", "q4_k"))
    ap.add_argument("--kv-cache-gb", type=float, default=0.5)
    ap.add_argument("--kv-cache-dtype", default=None, help="passed to galerne serve when given")
    ap.add_argument("--prompt-tokens", type=int, default=64, help="words in the prompt (about as many tokens)")
    ap.add_argument("--max-tokens", type=int, default=16)
    args = ap.parse_args()

    t0 = time.perf_counter()
    folder = random_quantized_checkpoint(args.model, args.scheme)
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    print(f"{folder.name}: {size / 1e9:.2f} GB of weights (built/found in {time.perf_counter() - t0:.1f} s)")

    cmd = [sys.executable, "-m", "galerne.cli", "serve", str(folder), "--port", "0", "--kv-cache-gb",
           str(args.kv_cache_gb), "--no-prefix-caching"]
    if args.kv_cache_dtype:
        cmd += ["--kv-cache-dtype", args.kv_cache_dtype]
    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": f"{repo}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("GALERNE_API_KEY", None)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    try:
        base = None
        seen = []
        for line in proc.stderr:
            seen.append(line)
            if m := re.search(r"serving (\S+) on (http://\S+/v1)", line):
                base, name = m.group(2), m.group(1)
                break
        if base is None:
            raise SystemExit("the server did not start:\n" + "".join(seen[-20:]))
        loaded_s = time.perf_counter() - start
        loaded_kb = vm_hwm_kb(proc.pid)
        import httpx

        words = " ".join(["river stone light market"] * (args.prompt_tokens // 4))
        t = time.perf_counter()
        r = httpx.post(f"{base}/chat/completions", timeout=3600, json={
            "model": name, "messages": [{"role": "user", "content": words}], "max_tokens": args.max_tokens,
            "temperature": 0, "ignore_eos": True})
        r.raise_for_status()
        request_s = time.perf_counter() - t
        usage = r.json()["usage"]
        peak_kb = vm_hwm_kb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    print(f"  loaded in {loaded_s:.1f} s, peak RSS after load {loaded_kb / 1e6:.2f} GB")
    print(f"  one request ({usage['prompt_tokens']} prompt + {usage['completion_tokens']} new tokens) in "
          f"{request_s:.1f} s; peak RSS {peak_kb / 1e6:.2f} GB (goal: under 5 GB)")
    report("peak_rss", {"model": args.model, "scheme": args.scheme, "weights_gb": round(size / 1e9, 3),
                        "kv_cache_gb": args.kv_cache_gb, "kv_cache_dtype": args.kv_cache_dtype,
                        "peak_rss_gb": round(peak_kb / 1e6, 3), "rss_after_load_gb": round(loaded_kb / 1e6, 3),
                        "load_s": round(loaded_s, 1), "request_s": round(request_s, 1), "usage": usage})


if __name__ == "__main__":
    main()
