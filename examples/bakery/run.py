"""Teach galerne-mini a small company's facts on a CPU, and show the answers before and after.

    python examples/bakery/run.py                  # 500 LoRA steps: about 4 minutes on 2 cores
    python examples/bakery/run.py --max-steps 200  # shorter, and it knows less

1. asks galerne-mini the held-out questions of ``heldout_questions.json`` (worded unlike any
   training question);
2. fine-tunes a LoRA adapter with ``galerne finetune examples/bakery/config.yaml``;
3. asks again with the adapter (``LLM("galerne-mini", adapter=...)``) and counts the answers
   that contain the expected fact.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent


def ask(llm, questions: list[dict]) -> list[tuple[str, bool]]:
    from galerne import SamplingParams

    params = SamplingParams(max_tokens=60, temperature=0)
    convs = [[{"role": "user", "content": q["question"]}] for q in questions]
    answers = [o.text.strip() for o in llm.chat(convs, params)]
    return [(a, all(e.lower() in a.lower() for e in q["expect"])) for a, q in zip(answers, questions)]


def show(title: str, questions: list[dict], results: list[tuple[str, bool]]) -> int:
    right = sum(ok for _, ok in results)
    print(f"\n== {title}: {right}/{len(questions)} answers contain the expected fact")
    for q, (a, ok) in zip(questions, results):
        print(f"[{'x' if ok else ' '}] {q['question']}\n      {a}")
    return right


def main(argv: list[str] | None = None) -> tuple[int, int]:
    """Returns how many held-out questions were answered right (before, after)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="galerne-mini", help="base model (default: the built-in galerne-mini)")
    ap.add_argument("--run-dir", type=Path, default=Path("runs/bakery"))
    ap.add_argument("--max-steps", type=int, default=None, help="override the config's max_steps")
    ap.add_argument("--seed", type=int, default=None)
    a = ap.parse_args(argv)

    from galerne import LLM
    from galerne.cli import main as galerne

    questions = json.loads((HERE / "heldout_questions.json").read_text())
    base = LLM(a.model)
    before = show("galerne-mini before fine-tuning", questions, ask(base, questions))
    del base

    if a.run_dir.exists():
        shutil.rmtree(a.run_dir)
    cmd = ["finetune", str(HERE / "config.yaml"), "--run-dir", str(a.run_dir), "--model-id-or-path", a.model,
           "--data.instruct-data", str(HERE / "train.jsonl"), "--data.eval-instruct-data", str(HERE / "eval.jsonl")]
    if a.max_steps is not None:
        cmd += ["--max-steps", str(a.max_steps)]
    if a.seed is not None:
        cmd += ["--seed", str(a.seed)]
    print(f"\n== galerne {' '.join(cmd)}", flush=True)
    if galerne(cmd) != 0:
        raise SystemExit(1)

    tuned = LLM(a.model, adapter=a.run_dir / "adapter")
    after = show("galerne-mini + bakery adapter", questions, ask(tuned, questions))
    print(f"\nbefore: {before}/{len(questions)}   after: {after}/{len(questions)}   (adapter in {a.run_dir / 'adapter'})")
    return before, after


if __name__ == "__main__":
    main()
