"""Peak memory of `galerne serve` on a quantized 7B-shaped model: goal under 5 GB at q4.

The model: Mistral 7B's shape (32 layers, dim 4096, 14336 hidden, 32 / 8 heads,
vocab 32768) written once as a folder `galerne quantize` would write, with random
blocks (random nibbles or bytes, scales of a trained model's size): its speed and
memory are those of real weights, and building it takes seconds instead of
quantizing 29 GB of float32. The embedding and every layer matrix are in the
scheme, the output in q8_0 (as `galerne quantize` stores them).

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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, SHAPES, hf_config, report, v3_tokenizer  # noqa: E402


def random_blocks(rows: int, cols: int, scheme, g: torch.Generator) -> torch.Tensor:
    """(rows, row_bytes) uint8 blocks: random payload, float16 scales near 0.002
    (q4_k: its d and dmin; q8_0, q4_0: d)."""
    n = cols // scheme.block
    out = torch.randint(0, 256, (rows, n, scheme.block_bytes), dtype=torch.uint8, generator=g)
    scales = 2 if scheme.name == "q4_k" else 1
    d = (torch.rand(rows, n, scales, generator=g) * 0.002 + 0.001).to(torch.float16)
    out[..., : 2 * scales] = d.view(torch.uint8).reshape(rows, n, 2 * scales)
    return out.reshape(rows, -1)


def build(model: str, scheme_name: str) -> Path:
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
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg = {"quant_method": "galerne", "scheme": target.name,
           "tensors": {n: s.name for n, s in plan.items() if s is not None}}
    write_checkpoint(tmp, "mistral", args, ((n, meta(n)) for n in shapes), tensors(), companions_from=None,
                     dtype=None, progress=True, config_extra={"quantization": cfg})
    shutil.copy(v3_tokenizer(), tmp / "tokenizer.model.v3")
    tmp.rename(folder)
    return folder


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
    folder = build(args.model, args.scheme)
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
