"""The ``galerne`` command: generate, chat, convert."""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .config import ModelSettings, SamplingSettings, add_arguments, from_args
from .errors import GalerneError
from .log import setup_logging


def _sampling(ns: argparse.Namespace):
    from .sampling.params import SamplingParams

    s = from_args(SamplingSettings, ns)
    return SamplingParams(
        max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
        seed=s.seed, stop=tuple(s.stop or ()), ignore_eos=s.ignore_eos,
    )


def _load(ns: argparse.Namespace):
    from .llm import LLM

    return LLM(ns.model, **from_args(ModelSettings, ns).llm_kwargs())


def cmd_generate(ns: argparse.Namespace) -> int:
    params = _sampling(ns)
    prompt = ns.prompt if ns.prompt is not None else sys.stdin.read()
    llm = _load(ns)
    finish = None
    for delta in llm.stream(prompt, params):
        sys.stdout.write(delta.text)
        sys.stdout.flush()
        finish = delta.finish_reason
    sys.stdout.write("\n")
    if ns.verbose:
        print(f"[finish_reason: {finish}]", file=sys.stderr)
    return 0


def cmd_chat(ns: argparse.Namespace) -> int:
    params = _sampling(ns)
    llm = _load(ns)
    history: list[dict] = [{"role": "system", "content": ns.system}] if ns.system else []
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"galerne chat on {ns.model}: /reset clears the conversation, /exit or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history = history[:1] if ns.system else []
            continue
        history.append({"role": "user", "content": line})
        try:
            ids = llm.tokenizer.encode_chat(history)
            answer = []
            for delta in llm.stream(ids, params):
                sys.stdout.write(delta.text)
                sys.stdout.flush()
                answer.append(delta.text)
        except GalerneError as e:  # e.g. the conversation outgrew the context: say so, keep the REPL
            history.pop()
            print(f"\nerror: {e}", file=sys.stderr)
            continue
        except KeyboardInterrupt:  # stop this answer, keep the conversation
            print("\n[interrupted]", file=sys.stderr)
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(answer)})
    return 0


def cmd_convert(ns: argparse.Namespace) -> int:
    from .weights.export import convert

    out = convert(ns.src, ns.dst, ns.to, dtype=ns.dtype)
    print(f"wrote {ns.to} checkpoint to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="galerne", description="Run, serve and fine-tune Mistral-family models.")
    p.add_argument("--version", action="version", version=f"galerne {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=0, help="more logs (-v info, -vv debug)")
    common.add_argument("--log-json", action="store_true", help="logs as JSON lines on stderr")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", parents=[common], help="complete a prompt, streaming to stdout")
    g.add_argument("model", help="model folder (Hugging Face or Mistral-native layout) or Hub id")
    g.add_argument("--prompt", help="the prompt (default: read stdin)")
    add_arguments(g, ModelSettings)
    add_arguments(g, SamplingSettings)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", parents=[common], help="interactive chat with the model's chat template")
    c.add_argument("model", help="model folder or Hub id")
    c.add_argument("--system", help="system prompt")
    add_arguments(c, ModelSettings)
    add_arguments(c, SamplingSettings)
    c.set_defaults(func=cmd_chat)

    v = sub.add_parser("convert", parents=[common], help="write a checkpoint in the other layout")
    v.add_argument("src", help="source model folder")
    v.add_argument("dst", help="destination folder (created; must be empty)")
    v.add_argument("--to", required=True, choices=("mistral", "hf"), help="target layout")
    v.add_argument("--dtype", default=None, help="cast the weights (default: keep their dtype)")
    v.set_defaults(func=cmd_convert)
    return p


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    setup_logging(ns.verbose, ns.log_json)
    try:
        return ns.func(ns)
    except GalerneError as e:
        print(f"galerne: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
