"""Protocol 2 of shared/BENCHMARKS.md: offline throughput (nano-vllm's protocol).

256 requests, prompt and output lengths drawn uniformly from [100, 1024] with
seed 0, EOS ignored; output tokens/s and total time. Baseline in the same run:
transformers batched ``generate`` on the same requests (left-padded batches of
``--hf-batch``; each batch runs to its longest output, only requested tokens count).

    python benchmarks/throughput.py --model mistral-7b            # GPU
    python benchmarks/throughput.py --num-requests 32 --max-len 256   # a CPU-sized run
"""

from __future__ import annotations

import argparse
import time

import torch

from common import SHAPES, models, report, sync, v3_tokenizer


def requests(n: int, lo: int, hi: int, vocab: int):
    g = torch.Generator().manual_seed(0)
    prompt_lens = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    output_lens = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    prompts = [torch.randint(3, vocab, (k,), generator=g).tolist() for k in prompt_lens]
    return prompts, output_lens


def run_hf(model, prompts, output_lens, batch: int, device) -> float:
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # similar lengths together
    t = time.perf_counter()
    for s in range(0, len(order), batch):
        idx = order[s : s + batch]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.zeros((len(idx), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, i in enumerate(idx):  # left padding
            ids[r, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[r, width - len(prompts[i]) :] = 1
        new = max(output_lens[i] for i in idx)
        with torch.inference_mode():
            model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, pad_token_id=0)
    sync(device)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="cpu-125m", choices=sorted(SHAPES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--min-len", type=int, default=100)
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--hf-batch", type=int, default=64)
    ap.add_argument("--baseline", choices=("transformers", "none"), default="transformers")
    ap.add_argument("--max-num-batched-tokens", type=int, default=None)
    args = ap.parse_args()

    from galerne import LLM, SamplingParams
    from galerne.tokenizer import Tokenizer

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    hf, ours = models(args.model, device, dtype, keep_hf=args.baseline == "transformers")
    engine = {"max_num_batched_tokens": args.max_num_batched_tokens} if args.max_num_batched_tokens else {}
    llm = LLM.from_model(ours, Tokenizer.from_path(v3_tokenizer()), max_model_len=4096, **engine)

    prompts, output_lens = requests(args.num_requests, args.min_len, args.max_len, SHAPES[args.model]["vocab_size"])
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in output_lens]
    total_out = sum(output_lens)
    llm.generate(prompts[:2], [SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)] * 2)  # warm-up
    sync(device)
    t = time.perf_counter()
    outs = llm.generate(prompts, params)
    sync(device)
    ours_s = time.perf_counter() - t
    assert sum(len(o.token_ids) for o in outs) == total_out
    figures = {"galerne": {"seconds": round(ours_s, 2), "output_tokens_per_s": round(total_out / ours_s, 1)}}
    print(f"{args.num_requests} requests, {total_out} output tokens, {args.model} {dtype} on {device}")
    print(f"  galerne        {ours_s:8.1f} s  {total_out / ours_s:9.1f} output tokens/s  "
          f"(preemptions {llm.engine.stats()['num_preemptions']})")
    if args.baseline == "transformers":
        hf_s = run_hf(hf, prompts, output_lens, args.hf_batch, device)
        figures["transformers"] = {"seconds": round(hf_s, 2), "output_tokens_per_s": round(total_out / hf_s, 1), "batch": args.hf_batch}
        print(f"  transformers   {hf_s:8.1f} s  {total_out / hf_s:9.1f} output tokens/s  (batch {args.hf_batch})")
        print(f"  galerne / transformers: {hf_s / ours_s:.2f}x")
    report("throughput", {"model": args.model, "dtype": str(dtype), "device": str(device),
                          "num_requests": args.num_requests, "lengths": [args.min_len, args.max_len],
                          "output_tokens": total_out, "results": figures})


if __name__ == "__main__":
    main()
