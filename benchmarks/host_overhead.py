"""Host time per decode step: the Python around the model (issue #13's CPU-measurable part).

On a GPU a decode step's model call takes a few ms; what the host does around it
(schedule, batch building, sampling, detokenizing, stop checks) adds to it unless it
is small or overlapped. Here the model is stubbed (its forward returns ready hidden
states and its output layer ready logits, no arithmetic) so the step's time is the
host's alone,
measured on galerne-mini's real tokenizer and vocabulary (32,768) with ``B``
sequences decoding at once, greedy and sampled (temperature 1, top_p 0.9, seeded).

Each phase is timed by wrapping it: ``schedule`` (scheduler), ``batch`` (the runner:
token list, block tables, metadata, positions, the rows that sample; the stubbed
model),
``sample`` (``sample_batch``: penalties, masks, the draw, on the B x V logits),
``append`` (per sequence: the token, detokenizing, stop checks, outputs) and the rest
of ``Engine.step``.

``--baseline REF`` runs the same measurement on a git ref in a temporary worktree, in
the same run, and prints both:

    python benchmarks/host_overhead.py                       # batch 1 and 256
    python benchmarks/host_overhead.py --baseline HEAD~3     # and the same on HEAD~3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PHASES = ("schedule", "batch", "sample", "append", "advance")


def measure(batch: int, steps: int, sampled: bool) -> dict:
    import torch

    import galerne.engine.engine as engine_mod
    from galerne import LLM, SamplingParams

    torch.manual_seed(0)
    llm = LLM("galerne-mini", device="cpu", max_num_seqs=max(batch, 1), kv_cache_gb=0.5, enforce_eager=True)
    engine = llm.engine
    args = llm.model.args
    logits = torch.randn(batch, args.vocab_size) * 4  # flat-ish: top_p 0.9 keeps hundreds of tokens

    # The model itself is stubbed (its forward returns ready hidden states, its logits
    # ready rows): the runner's batch building, metadata and row selection still run.
    def forward(ids, positions, attention, embeds=None):
        return torch.zeros(ids.shape[0], args.dim)

    def head(hidden):
        n = hidden.shape[0]
        return logits[:n] if n <= batch else torch.randn(n, args.vocab_size)

    llm.model.forward = forward
    llm.model.logits = head
    timings = {p: 0.0 for p in PHASES}

    def timed(name, fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                timings[name] += time.perf_counter() - t0
        return wrapper

    engine.scheduler.schedule = timed("schedule", engine.scheduler.schedule)
    engine.runner.run = timed("batch", engine.runner.run)
    engine.scheduler.advance = timed("advance", engine.scheduler.advance)
    engine._append = timed("append", engine._append)
    original_sample = engine_mod.sample_batch
    engine_mod.sample_batch = timed("sample", original_sample)
    try:
        kw = dict(temperature=1.0, top_p=0.9, seed=1) if sampled else dict(temperature=0.0)
        params = SamplingParams(max_tokens=steps + 8, ignore_eos=True, **kw)
        prompt = llm.tokenizer.encode("Once upon a time, in a small harbour town,", bos=True)
        for _ in range(batch):
            engine.add_request(llm.validate(prompt, params))
        while engine.scheduler.waiting or any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running):
            engine.step()  # prefill: not counted
        for _ in range(3):
            engine.step()  # warm up
        for p in timings:
            timings[p] = 0.0
        per_step = []
        for _ in range(steps):
            t0 = time.perf_counter()
            outs = engine.step()
            per_step.append(time.perf_counter() - t0)
            assert len(outs) == batch
    finally:
        engine_mod.sample_batch = original_sample
    total = sum(per_step)
    figures = {f"{p}_us": round(1e6 * timings[p] / steps, 1) for p in PHASES}
    figures["other_us"] = round(1e6 * (total - sum(timings.values())) / steps, 1)
    figures["step_us_mean"] = round(1e6 * total / steps, 1)
    figures["step_us_median"] = round(1e6 * statistics.median(per_step), 1)
    return figures


def run_here(args) -> dict:
    out = {}
    for batch in args.batch:
        for sampled in (False, True):
            key = f"b{batch}_{'sampled' if sampled else 'greedy'}"
            out[key] = measure(batch, args.steps, sampled)
    return out


def run_baseline(ref: str, args) -> dict:
    repo = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(repo), "worktree", "add", "--detach", "-q", str(tree), ref], check=True)
        try:
            env = {**os.environ, "PYTHONPATH": str(tree), "GALERNE_CPU_KERNELS": "0"}
            cmd = [sys.executable, __file__, "--json-only", "--steps", str(args.steps),
                   "--batch", *map(str, args.batch)]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, cwd=tmp)
            return json.loads(done.stdout.strip().splitlines()[-1])
        finally:
            subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(tree)], check=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 256])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--baseline", help="a git ref to measure the same way, in the same run")
    ap.add_argument("--json-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ["GALERNE_CPU_KERNELS"] = "0"  # the model is stubbed: no kernel to build
    with contextlib.redirect_stderr(open(os.devnull, "w")) if args.json_only else contextlib.nullcontext():
        here = run_here(args)
    if args.json_only:
        print(json.dumps(here))
        return
    base = run_baseline(args.baseline, args) if args.baseline else None
    cols = ["schedule_us", "batch_us", "sample_us", "append_us", "advance_us", "other_us", "step_us_mean",
            "step_us_median"]
    print(f"{'case':<16} {'tree':<10} " + " ".join(f"{c.removesuffix('_us'):>12}" for c in cols))
    for key, figs in here.items():
        rows = [("this", figs)] + ([(args.baseline, base[key])] if base else [])
        for name, f in rows:
            print(f"{key:<16} {name[:10]:<10} " + " ".join(f"{f[c]:>12.1f}" for c in cols))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import report

    report("host_overhead", {"steps": args.steps, "this": here, **({"baseline": base, "baseline_ref": args.baseline}
                                                                 if base else {})})


if __name__ == "__main__":
    main()
