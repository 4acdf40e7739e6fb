"""Perplexity of each precision and quantization scheme, galerne beside llama.cpp on the same weights.

Two fixed texts, each scored in windows of --ctx tokens (BOS, then ctx - 1 tokens of
the text; every token after the first of a window is scored, the same way for both
engines):

- ``mini``: galerne-mini (the built-in model, trained) on its held-out slice
  (recipes/galerne_mini/heldout.jsonl). Its width is 240, which no 32-weight block
  divides: the schemes quantize what fits (the output of attention, w2), the rest
  stays in float, in galerne as in llama.cpp (which falls back to F16 there).
- ``random``: cpu-125m with random weights (seed 0) on text it wrote itself (sampled
  at temperature 0.7 by galerne in float32, seed 0): every matrix is quantized.

Rows: float32, bfloat16, q8_0, q4_k, q4_0. galerne quantizes at load
(``quantization=``); llama.cpp's GGUF files come from its own converter and
``llama_model_quantize`` (q4_k is its Q4_K_S; its q4_0 and q4_k keep the output at
Q6_K, galerne keeps it at q8_0). The goal: each scheme within llama.cpp's
same-scheme perplexity + 1%.

galerne scores a window in one prefill, whose 4-bit matmuls take float32 inputs.
Decoding, the CPU kernel multiplies block weights by inputs rounded to int8
(``--quantized-activations int8``, the default): the rows ``q8_0/int8``,
``q4_k/int8`` and ``q4_0/int8`` score every window token by token through the
decode kernel, as generation computes them (``q4_0/float``: the same with float32
inputs).

    python benchmarks/quality.py                      # both texts, every row, llama.cpp beside
    python benchmarks/quality.py --texts random --windows 2 --no-llamacpp
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import random_checkpoint, report, v3_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ROWS = ("float32", "bfloat16", "q8_0", "q4_k", "q4_0", "q8_0/int8", "q4_k/int8", "q4_0/int8")
LLAMACPP = {"float32": "f32", "bfloat16": "bf16", "q8_0": "q8_0", "q4_k": "q4_k", "q4_0": "q4_0"}


def nll(logits: torch.Tensor, ids: list[int]) -> tuple[float, int]:
    """Summed negative log-likelihood of ids[1:] given logits (len, vocab) of each prefix."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    target = torch.tensor(ids[1:])
    return -logp[:-1].gather(1, target[:, None]).sum().item(), len(ids) - 1


def windows_of(tokens: list[int], ctx: int, count: int, bos: int) -> list[list[int]]:
    body = ctx - 1
    out = [[bos] + tokens[i : i + body] for i in range(0, len(tokens) - body + 1, body)][:count]
    if len(out) < count:
        raise SystemExit(f"the text has {len(tokens)} tokens: too short for {count} windows of {ctx}")
    return out


def mini_text(tokenizer, ctx: int, count: int) -> list[list[int]]:
    tokens: list[int] = []
    for line in (ROOT / "recipes" / "galerne_mini" / "heldout.jsonl").read_text().splitlines():
        tokens += tokenizer.encode(json.loads(line)["text"], bos=False)
        if len(tokens) >= ctx * count:
            break
    return windows_of(tokens, ctx, count, tokenizer.bos_id)


def self_generated(folder: Path, ctx: int, count: int, bos: int) -> list[list[int]]:
    """Text the float32 model writes itself (cached: it is the fixed text of the benchmark)."""
    cache = folder / f"selfgen-{ctx}x{count}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    from galerne import LLM, SamplingParams

    llm = LLM(folder, device="cpu", dtype="float32")
    params = SamplingParams(max_tokens=ctx - 2, temperature=0.7, seed=0, ignore_eos=True)
    outs = llm.generate([[bos, 3 + i] for i in range(count)], params)
    text = [[bos, 3 + i] + o.token_ids for i, o in enumerate(outs)]
    cache.write_text(json.dumps(text))
    return text


def decode_logits(model, ids: list[int], int8_dot: bool) -> torch.Tensor:
    """The logits (len, vocab) of each prefix of ids, one decode step of the CPU kernel
    per token (teacher forcing), as generation computes them."""
    from galerne.engine.paged import PagedKVCache
    from galerne.kernels.cpu import CpuDecoder

    block = 16
    cache = PagedKVCache(model.args, -(-len(ids) // block), block, torch.float32, torch.device("cpu"))
    decoder = CpuDecoder.create(model, cache.k, cache.v, int8_dot=int8_dot)
    if decoder is None:
        raise SystemExit("the CPU decode kernel does not serve this model (see the log)")
    table = list(range(cache.k.shape[1]))
    return torch.stack([decoder([t], [(table, i, 1)])[0].clone() for i, t in enumerate(ids)])


def galerne_ppl(folder: Path, row: str, windows: list[list[int]]) -> float:
    from galerne import LLM

    scheme, _, mode = row.partition("/")
    dtype = scheme if scheme in ("float32", "bfloat16") else "float32"
    llm = LLM(folder, device="cpu", dtype=dtype, quantization=None if scheme in ("float32", "bfloat16") else scheme)
    total, n = 0.0, 0
    for ids in windows:
        logits = decode_logits(llm.model, ids, mode == "int8") if mode else llm.score(ids)
        s, k = nll(logits, ids)
        total, n = total + s, n + k
    return math.exp(total / n)


def llamacpp_ppl(folder: Path, row: str, windows: list[list[int]], ctx: int) -> float:
    import numpy as np
    from llamacpp_baseline import _load, convert_hf_to_gguf

    gguf = folder / f"model-{LLAMACPP[row]}.gguf"
    if not gguf.exists():
        convert_hf_to_gguf(folder, gguf, LLAMACPP[row])
    llm = _load(gguf, threads=torch.get_num_threads(), logits_all=True, n_ctx=ctx)
    total, n = 0.0, 0
    for ids in windows:
        llm.reset()
        llm.eval(ids)
        logits = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
        s, k = nll(logits, ids)
        total, n = total + s, n + k
    llm.close()
    return math.exp(total / n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--texts", default="mini,random", help="comma list: mini, random")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma list of {', '.join(ROWS)} (and q4_0/float)")
    ap.add_argument("--ctx", type=int, default=512, help="tokens per window")
    ap.add_argument("--windows", type=int, default=4, help="windows per text")
    ap.add_argument("--no-llamacpp", action="store_true")
    args = ap.parse_args()

    from galerne.builtin import builtin_model_path
    from galerne.tokenizer import Tokenizer

    use_llamacpp = not args.no_llamacpp
    if use_llamacpp:
        try:
            import llama_cpp  # noqa: F401
        except ImportError as e:
            print(f"llama.cpp skipped: {e}")
            use_llamacpp = False
    tokenizer = Tokenizer.from_path(v3_tokenizer())
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    figures: dict[str, dict] = {}
    for text in [t.strip() for t in args.texts.split(",") if t.strip()]:
        if text == "mini":
            folder = builtin_model_path()
            windows = mini_text(Tokenizer.from_path(folder), args.ctx, args.windows)
        else:
            folder = random_checkpoint("cpu-125m", torch.float32)
            windows = self_generated(folder, args.ctx, args.windows, tokenizer.bos_id)
        if use_llamacpp and text == "mini":
            # llama.cpp's converter writes into the folder's neighbourhood: work on a copy of the built-in model.
            from common import CACHE

            copy = CACHE / "galerne-mini-hf"
            if not copy.exists():
                import shutil

                shutil.copytree(folder, copy)
            folder = copy
        print(f"{text}: {folder.name}, {len(windows)} windows of {args.ctx} tokens")
        print(f"  {'row':<10} {'galerne':>10} {'llama.cpp':>10} {'ratio':>7}")
        figures[text] = {}
        for row in rows:
            ours = galerne_ppl(folder, row, windows)
            theirs = llamacpp_ppl(folder, row.partition("/")[0], windows, args.ctx) if use_llamacpp else None
            ratio = f"{ours / theirs:7.4f}" if theirs else "      -"
            print(f"  {row:<10} {ours:10.4f} {theirs if theirs else float('nan'):10.4f} {ratio}")
            figures[text][row] = {"galerne": round(ours, 4), "llamacpp": round(theirs, 4) if theirs else None}
    report("quality", {"ctx": args.ctx, "windows": args.windows, "perplexity": figures})


if __name__ == "__main__":
    main()
