"""Run by .ci/run with the Python of a fresh virtualenv that holds torch and galerne's
wheel, and nothing of the checkout: the installed package is complete (the CPU kernel's
C++ source, the built-in model, the console's page) and a decode step goes through the
kernel, compiled from the installed source, giving the tokens of the torch path."""

from __future__ import annotations

import sys
from pathlib import Path

import galerne
from galerne import LLM, SamplingParams

root = Path(galerne.__file__).resolve().parent
if "site-packages" not in root.parts:
    sys.exit(f"wheel check: galerne was imported from {root}, not from the installed wheel")
for part in ("kernels/cpu_decode.cpp", "assets/galerne-mini/config.json", "server/console/static/index.html",
             "server/console/static/app.js"):
    if not (root / part).is_file():
        sys.exit(f"wheel check: the wheel lacks galerne/{part}")

fast = LLM("galerne-mini", device="cpu")
runner = fast.engine.runner
if runner.cpu_decoder is None:
    sys.exit("wheel check: the CPU decode kernel was not built from the installed source (see the warning above)")
kernel, steps = runner.cpu_decoder, []


class Counted:
    max_batch = kernel.max_batch

    def __call__(self, tokens, entries, slots=None):
        steps.append(len(tokens))
        return kernel(tokens, entries, slots)


runner.cpu_decoder = Counted()
params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
got = fast.generate(["The capital of France is"], params)[0].token_ids
want = LLM("galerne-mini", device="cpu", enforce_eager=True).generate(["The capital of France is"], params)[0].token_ids
if not steps:
    sys.exit("wheel check: no decode step went through the kernel")
if got != want:
    sys.exit(f"wheel check: the kernel decoded {got}, the torch path {want}")
print(f"wheel check: {root} is complete; {len(steps)} decode step(s) through the CPU kernel, tokens {got} "
      "as the torch path's")
