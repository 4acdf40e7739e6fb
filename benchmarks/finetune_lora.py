"""Protocol 4 of shared/BENCHMARKS.md: LoRA fine-tuning speed, galerne vs transformers + PEFT.

Rank 16 on every linear layer, batch 1, sequences of ``--seq-len`` tokens (512 on CPU,
4096 on GPU), AdamW, the same random weights and the same token sequences on both
sides; fp32 on CPU, bf16 on GPU. Each side runs in its own subprocess, so that its peak
memory is its own. Reported per side: trained tokens/s (median step after warm-up),
MFU and peak memory (GPU: ``max_memory_allocated``; CPU: peak RSS).

MFU counts the model FLOPs of a LoRA step as 4 x N x tokens, N the parameters of the
matmuls (the embedding lookup excluded) (forward 2N, backward
through the frozen weights 2N; the LoRA matrices and the weight gradients they skip are
negligible) plus attention (causal: 2 x 2 x layers x T^2 x heads x head_dim / 2 forward,
twice that backward). The peak is a large matmul in the run's dtype, measured in the
same run (CPU) or from ``--peak-tflops`` (GPU: e.g. 989 for an H100/H200's dense bf16).

galerne's loss (``--variants``, each in its own subprocess): ``chunked``, the fused chunked
cross-entropy (:mod:`galerne.finetune.loss`, 1024 rows at a time); ``full``, the same
``weighted_loss`` with ``chunk=None``: the whole (T, vocab) float32 logits in one autograd
piece, kept for the backward (the state before the chunked loss); ``checkpointed``,
``fused_loss=False``: 1024-row chunks each under activation checkpointing, the logits
computed again in the backward (the chunked loss before it was fused).

Activation checkpointing on galerne's side is ``checkpoint: auto``'s plan
(:mod:`galerne.finetune.memory`) under ``--max-memory-gb`` (GPU default 24, the issue's
bound; CPU default: the machine's free memory). transformers + PEFT runs without gradient
checkpointing (its fastest setting, memory permitting).

On a GPU both sides build the random model on the device from seed 0 (the same weights;
a 7B checkpoint on disk would take minutes to write and read), and peak memory counts
from the end of loading.

    python benchmarks/finetune_lora.py --seq-len 2048 --variants chunked,full   # cpu-125m, CPU
    python benchmarks/finetune_lora.py --model mistral-7b --device cuda --seq-len 4096 --peak-tflops 989
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from common import SHAPES, median, random_checkpoint, report, sync

RANK = 16
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def sequences(n: int, seq_len: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [[1] + torch.randint(3, vocab, (seq_len - 1,), generator=g).tolist() for _ in range(n)]


def model_flops(shape: dict, n_params: int, seq_len: int) -> float:
    attn = 2 * 2 * shape["num_hidden_layers"] * seq_len**2 * shape["num_attention_heads"] * shape["head_dim"] / 2
    return 4 * n_params * seq_len + 3 * attn


def loss_chunk(loss: str) -> int | None:
    return None if loss == "full" else 1024


VARIANTS = ("chunked", "full", "checkpointed")


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_galerne(model_name, folder, seqs, device, dtype, lr, loss="chunked", max_memory_gb=None) -> list[float]:
    from galerne.finetune.data import PackedBatch
    from galerne.finetune.memory import choose_checkpointing
    from galerne.finetune.train import checkpoint_blocks, train_steps
    from galerne.models.lora import apply_lora
    from galerne.weights.loader import load_model

    # fp32 master weights on CPU; on GPU bf16 weights (frozen) with bf16 autocast
    if device.type == "cuda":
        from common import models

        _, model = models(model_name, device, dtype, keep_hf=False)
        torch.cuda.empty_cache()
    else:
        model, _ = load_model(folder, dtype=dtype, device=device)
    model.requires_grad_(False)
    apply_lora(model, rank=RANK, alpha=2 * RANK)
    if device.type == "cuda":
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.data = p.data.float()
    plan = choose_checkpointing(model, device, len(seqs[0]), dtype, lora_rank=RANK,
                                limit_bytes=int(max_memory_gb * 1e9) if max_memory_gb else None)
    checkpoint_blocks(model, plan.blocks)
    print(f"galerne ({loss}): checkpointing {plan.blocks} of {len(model.layers)} blocks: {plan.reason}",
          file=sys.stderr, flush=True)
    stamps: list[float] = []

    def log(_m: dict) -> None:
        sync(device)
        stamps.append(time.perf_counter())

    batches = [PackedBatch(s, [0.0] + [1.0] * (len(s) - 1), [len(s)]) for s in seqs]
    reset_peak(device)
    sync(device)
    stamps.append(time.perf_counter())
    train_steps(model, batches, lr=lr, max_steps=len(seqs), grad_clip=1.0, log=log, chunk=loss_chunk(loss),
                fused_loss=loss != "checkpointed",
                amp_dtype=torch.bfloat16 if device.type == "cuda" else None)
    return [b - a for a, b in zip(stamps, stamps[1:])]


def reset_peak(device: torch.device) -> None:
    """GPU: peak memory counts from here (after loading); CPU: peak RSS cannot be reset."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def run_hf(model_name, folder, seqs, device, dtype, lr, loss=None, max_memory_gb=None) -> list[float]:
    from peft import LoraConfig, get_peft_model
    from transformers import MistralForCausalLM

    if device.type == "cuda":  # seed 0 on the device: the weights of common.models
        from common import hf_config

        torch.manual_seed(0)
        with torch.device(device):
            model = MistralForCausalLM(hf_config(model_name)).to(dtype)
    else:
        model = MistralForCausalLM.from_pretrained(folder, dtype=dtype).to(device)
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=HF_TARGETS, lora_dropout=0.0))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95))
    reset_peak(device)
    times = []
    for s in seqs:
        sync(device)
        t = time.perf_counter()
        ids = torch.tensor([s], device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - t)
    return times


def matmul_peak(device: torch.device, dtype: torch.dtype, sizes=(1024, 2048, 4096), repeats: int = 5) -> float:
    """The best FLOP/s of square matmuls of a few sizes (the achievable peak)."""
    best_rate = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        for _ in range(repeats):
            sync(device)
            t = time.perf_counter()
            a @ b
            sync(device)
            best_rate = max(best_rate, 2 * n**3 / (time.perf_counter() - t))
    return best_rate


def child(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    folder = random_checkpoint(args.model, dtype) if device.type == "cpu" else None
    seqs = sequences(args.warmup + args.steps, args.seq_len, SHAPES[args.model]["vocab_size"])
    run = run_galerne if args.side == "galerne" else run_hf
    times = run(args.model, folder, seqs, device, dtype, args.lr, args.loss, args.max_memory_gb)[args.warmup:]
    print(json.dumps({"step_s": median(times), "peak_bytes": peak_memory(device)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="cpu-125m", choices=sorted(SHAPES))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seq-len", type=int, default=None, help="default: 512 on CPU, 4096 on GPU")
    ap.add_argument("--steps", type=int, default=6, help="measured steps per side")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--peak-tflops", type=float, default=None, help="GPU peak for MFU (default: measured matmul)")
    ap.add_argument("--variants", default="chunked",
                    help="galerne's loss variants to run, comma-separated: chunked (fused, 1024 rows at a time), "
                         "full (the whole logits in one piece), checkpointed (1024-row chunks recomputed in the backward)")
    ap.add_argument("--max-memory-gb", type=float, default=None,
                    help="memory galerne's checkpointing plan may use (default: 24 on GPU, free memory on CPU)")
    ap.add_argument("--baseline", choices=("peft", "none"), default="peft", help="run transformers + PEFT too")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every side this many times, interleaved (A B C A B C), and keep each side's fastest "
                         "round: a shared machine's load then disturbs every side alike or is left out")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads of every side (default: torch's); 1 leaves a shared 2-core machine's other "
                         "core to whoever else runs there")
    ap.add_argument("--side", choices=("galerne", "hf"), help=argparse.SUPPRESS)
    ap.add_argument("--loss", choices=VARIANTS, default="chunked", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.seq_len is None:
        args.seq_len = 512 if args.device == "cpu" else 4096
    if args.max_memory_gb is None and args.device != "cpu":
        args.max_memory_gb = 24.0
    if args.side:
        return child(args)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not variants or any(v not in VARIANTS for v in variants):
        ap.error(f"--variants: any of {', '.join(VARIANTS)}, got {args.variants!r}")

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cpu":
        random_checkpoint(args.model, dtype)  # built once, before the timed children
    from transformers import MistralForCausalLM

    with torch.device("meta"):
        hf = MistralForCausalLM(__import__("common").hf_config(args.model))
        # matmul parameters: the embedding is a lookup, not a matmul
        n_params = sum(p.numel() for n, p in hf.named_parameters() if "embed_tokens" not in n)
    if args.threads:
        torch.set_num_threads(args.threads)  # the matmul peak too: MFU against the threads used
    peak = args.peak_tflops * 1e12 if args.peak_tflops else matmul_peak(device, dtype)
    flops = model_flops(SHAPES[args.model], n_params, args.seq_len)
    runs = [("galerne", v, f"galerne-{v}") for v in variants] + ([("hf", "chunked", "hf")] if args.baseline == "peft" else [])
    out: dict[str, dict] = {}
    for side, loss, name in [r for _ in range(max(1, args.rounds)) for r in runs]:
        cmd = [sys.executable, __file__, "--side", side, "--loss", loss, "--model", args.model, "--device", args.device,
               "--seq-len", str(args.seq_len), "--steps", str(args.steps), "--warmup", str(args.warmup), "--lr", str(args.lr)]
        if args.max_memory_gb:
            cmd += ["--max-memory-gb", str(args.max_memory_gb)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        print(f"running {name} ({args.warmup} warm-up + {args.steps} steps of {args.seq_len} tokens)...", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        for line in proc.stderr.splitlines():
            if line.startswith("galerne ("):
                print("  " + line, file=sys.stderr, flush=True)
        if proc.returncode != 0:
            print(f"  {name} failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}", file=sys.stderr, flush=True)
            out.setdefault(name, {"error": f"exit {proc.returncode}"})
            continue
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        tps = args.seq_len / res["step_s"]
        print(f"  {name}: {tps:.1f} trained tok/s, peak {res['peak_bytes'] / 1e9:.2f} GB", file=sys.stderr, flush=True)
        if "step_s" in out.get(name, {}) and out[name]["step_s"] <= res["step_s"]:
            out[name]["rounds_s"].append(round(res["step_s"], 3))
            continue
        out[name] = {"trained_tok_s": round(tps, 1), "step_s": round(res["step_s"], 3),
                     "mfu": round(flops / res["step_s"] / peak, 4), "peak_gb": round(res["peak_bytes"] / 1e9, 2),
                     "rounds_s": out.get(name, {}).get("rounds_s", []) + [round(res["step_s"], 3)]}
    base = out.get("hf", {})
    for name, f in out.items():
        if name != "hf" and "trained_tok_s" in f and "trained_tok_s" in base:
            f["speed_vs_hf"] = round(f["trained_tok_s"] / base["trained_tok_s"], 3)
            f["memory_vs_hf"] = round(f["peak_gb"] / base["peak_gb"], 3)
    print(f"{args.model} on {args.device}, LoRA rank {RANK} on every linear, seq {args.seq_len}, batch 1 "
          f"(peak {peak / 1e12:.2f} TFLOP/s, {flops / 1e9:.0f} GFLOP per step)")
    for name, f in out.items():
        if "error" in f:
            print(f"  {name:16s} failed ({f['error']})")
            continue
        vs = f"   {f['speed_vs_hf']:.2f}x speed, {f['memory_vs_hf']:.2f}x memory of transformers+peft" if "speed_vs_hf" in f else ""
        print(f"  {name:16s} {f['trained_tok_s']:>9.1f} trained tok/s   MFU {f['mfu']:.1%}   peak {f['peak_gb']:.2f} GB{vs}")
    report("finetune_lora", {"model": args.model, "device": args.device, "seq_len": args.seq_len, "rank": RANK,
                             "threads": torch.get_num_threads(),
                             "peak_tflops": round(peak / 1e12, 3), "max_memory_gb": args.max_memory_gb, **out})


if __name__ == "__main__":
    main()
