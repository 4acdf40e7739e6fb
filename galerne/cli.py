"""The ``galerne`` command: generate, chat, serve, convert, quantize, merge, finetune, data validate."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from . import __version__
from .config import (
    ArgumentParser,
    EngineSettings,
    ModelSettings,
    SamplingSettings,
    ServerSettings,
    add_arguments,
    from_args,
)
from .errors import GalerneError
from .sampling.params import SamplingParams
from .log import setup_logging


def _load(ns: argparse.Namespace):
    from .llm import LLM

    model, engine = from_args(ModelSettings, ns), from_args(EngineSettings, ns)  # a bad value: no notice below
    if ns.model is None:
        from .builtin import BUILTIN_NAME, builtin_model_path

        ns.model = str(builtin_model_path())
        print(f"galerne: no model given: using the built-in {BUILTIN_NAME}, a 12M-parameter demo model trained by "
              f"galerne (short English answers; give a model folder for real work)", file=sys.stderr, flush=True)
    return LLM(ns.model, **model.llm_kwargs(), **vars(engine))


def cmd_generate(ns: argparse.Namespace) -> int:
    params = from_args(SamplingSettings, ns).params()
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
    params = from_args(SamplingSettings, ns).params()
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
            for delta in llm.stream(ids, _fit(params, llm.max_model_len - len(ids))):
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


def _fit(params: SamplingParams, room: int) -> SamplingParams:
    """``params`` for an answer that has ``room`` tokens left in the context: a REPL
    near the end of its context answers shorter (and says so) rather than refusing;
    with no room at all, the request's own error says the conversation is too long."""
    if params.max_tokens is None or not 0 < room < params.max_tokens or params.min_tokens > room:
        return params
    print(f"[the context has room for {room} more tokens: the answer stops there; /reset starts over]",
          file=sys.stderr)
    return dataclasses.replace(params, max_tokens=room)


def cmd_serve(ns: argparse.Namespace) -> int:
    import asyncio
    import ipaddress
    from pathlib import Path

    settings = from_args(ServerSettings, ns)
    if not settings.api_key and not _is_loopback(settings.host, ipaddress):
        if not settings.allow_no_auth:
            print(f"galerne: error: refusing to listen on {settings.host} without an API key: anyone who can reach "
                  "it could use the model. Give --api-key KEY (or GALERNE_API_KEY), or --allow-no-auth if a "
                  "proxy in front authenticates.", file=sys.stderr)
            return 2
        print(f"galerne: WARNING: listening on {settings.host} with NO authentication (--allow-no-auth)", file=sys.stderr)
        if not settings.allowed_host:
            print("galerne: without an API key, only requests for Host localhost, 127.0.0.1, [::1] or "
                  f"{settings.host} are answered: give the names clients use with --allowed-host NAME "
                  "(or --allowed-host '*')", file=sys.stderr)

    from .platform import Platform
    from .server import create_app
    from .server.transport import Server, uvicorn_config

    Platform.check(settings)  # a data folder or database it cannot use: said before the model loads
    llm = _load(ns)
    name = Path(ns.model).expanduser().resolve().name if Path(ns.model).expanduser().exists() else ns.model
    app = create_app(llm, settings, model_name=name)
    server = Server(uvicorn_config(app, settings))

    async def run() -> None:
        # The startup line comes once the socket is bound, so a port of 0 shows the real one.
        task = asyncio.create_task(server.serve())
        while not server.started and not task.done():
            await asyncio.sleep(0.05)
        if server.started:
            port = server.servers[0].sockets[0].getsockname()[1]
            auth = f"API key required ({len(settings.api_key)} key(s))" if settings.api_key else "no authentication"
            console = f"; the console at http://{_url_host(settings.host)}:{port}/" if settings.console else ""
            print(f"galerne: serving {app.state.server.model_id} on http://{_url_host(settings.host)}:{port}/v1 "
                  f"({auth}; docs at /docs{console})", file=sys.stderr, flush=True)
            platform = app.state.server.platform
            print(f"galerne: files, jobs and fine-tuned models in {platform.data.root} ({platform.store.kind} store)",
                  file=sys.stderr, flush=True)
        await task

    asyncio.run(run())
    return 0 if server.started else 1


def _is_loopback(host: str, ipaddress) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def cmd_convert(ns: argparse.Namespace) -> int:
    from .weights.export import convert

    out = convert(ns.src, ns.dst, ns.to, dtype=ns.dtype, scheme=ns.scheme)
    print(f"wrote {ns.to} checkpoint to {out}")
    return 0


def cmd_quantize(ns: argparse.Namespace) -> int:
    from .quant import SCHEMES
    from .weights.export import quantize_checkpoint

    out = quantize_checkpoint(ns.src, ns.dst, ns.scheme, to=ns.to)
    s = SCHEMES[ns.scheme]
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    print(f"wrote {out} ({s.name}, {s.bits:.1f} bits a weight; {size / 1e9:.2f} GB of weights)")
    return 0


def cmd_data_validate(ns: argparse.Namespace) -> int:
    from .finetune.validate import check_limits, check_speed, validate_files
    from .tokenizer import Tokenizer

    check_limits(ns.seq_len, ns.max_line_bytes)  # bad flags: said before the tokenizer loads
    if ns.tokens_per_s is not None:
        check_speed(ns.tokens_per_s)
    report = validate_files(ns.files, Tokenizer.from_path(ns.tokenizer), ns.seq_len, clean=ns.clean,
                            max_line_bytes=ns.max_line_bytes)
    for problem in report.problems:
        print(problem)
    print(report.summary(ns.tokens_per_s))
    if ns.clean is not None:
        print(f"wrote {report.samples} valid lines to {ns.clean}")
    return 1 if report.problems else 0


def cmd_merge(ns: argparse.Namespace) -> int:
    """Fold a LoRA adapter into the base weights and write a full checkpoint."""
    from .weights.adapters import merge_adapter
    from .weights.export import save_model
    from .weights.loader import Checkpoint, load_model, resolve_model_path

    base = resolve_model_path(ns.base)
    # Merge in float32 whatever the storage dtype; write back in the base's dtype
    # unless --dtype says otherwise.
    stored = next(t for _, _, t in Checkpoint.open(base).tensors(meta=True)).dtype
    model, _ = load_model(base, dtype="float32", device="cpu")
    layout, rank, targets = merge_adapter(model, ns.adapter)
    out = save_model(model, ns.out, ns.to, companions_from=base, dtype=ns.dtype or str(stored).removeprefix("torch."))
    print(f"merged {layout} adapter (rank {rank}, {', '.join(targets)}) into {out} ({ns.to} layout)")
    return 0


def _leave_process_group() -> None:
    """Under torchrun: leave the process group the trainer joined, every process together
    (gloo's threads still alive at interpreter exit can abort a process that succeeded)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def cmd_finetune(ns: argparse.Namespace) -> int:
    """Train a LoRA adapter (or every weight) from a mistral-finetune YAML config."""
    import os

    from .finetune.config import load_config, overrides_from_args
    from .finetune.trainer import train

    cfg = load_config(ns.config, overrides_from_args(ns))
    try:
        result = train(cfg, resume=ns.resume)
    except OSError as e:  # a file that cannot be written or read (a full disk, a file where a folder goes)
        raise GalerneError(f"{e.filename}: {e.strerror}" if e.filename and e.strerror else str(e)) from None
    _leave_process_group()
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, process 0 reports
        return 130 if result.interrupted else 0
    if result.skipped_lines:
        print(f"skipped {result.skipped_lines} invalid line(s)", file=sys.stderr)
    if result.interrupted:
        print(f"interrupted after step {result.step}; resume with --resume (checkpoint: {result.checkpoint})", file=sys.stderr)
        return 130
    last = f", loss {result.losses[-1]:.4f}" if result.losses else ""
    evals = f", eval loss {result.eval['eval_loss']:.4f} (perplexity {result.eval['eval_perplexity']:.2f})" if result.eval else ""
    print(f"trained {result.step} steps{last}{evals}; outputs in {result.output or result.run_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="galerne", description="Run, serve and fine-tune Mistral-family models.")
    p.add_argument("--version", action="version", version=f"galerne {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=0, help="more logs (-v info, -vv debug)")
    common.add_argument("--log-json", action="store_true", help="logs as JSON lines on stderr")
    sub = p.add_subparsers(dest="command", required=True)

    def model_command(name: str, help: str, func, *settings: type) -> argparse.ArgumentParser:
        """A command that loads a model: [MODEL], then the model and engine flags."""
        cmd = sub.add_parser(name, parents=[common], help=help)
        cmd.add_argument("model", nargs="?", default=None,
                         help="model folder (Hugging Face or Mistral-native layout), a .gguf file, Hub id, or galerne-mini "
                              "(the built-in model, also the default)")
        for cls in (ModelSettings, EngineSettings, *settings):
            add_arguments(cmd, cls)
        cmd.set_defaults(func=func)
        return cmd

    g = model_command("generate", "complete a prompt, streaming to stdout", cmd_generate, SamplingSettings)
    g.add_argument("--prompt", help="the prompt (default: read stdin)")
    c = model_command("chat", "interactive chat with the model's chat template", cmd_chat, SamplingSettings)
    c.add_argument("--system", help="system prompt")
    model_command("serve", "serve the model over HTTP (OpenAI and Mistral APIs)", cmd_serve, ServerSettings)

    m = sub.add_parser("merge", parents=[common], help="fold a LoRA adapter into its base model's weights")
    m.add_argument("base", help="base model folder or Hub id")
    m.add_argument("adapter", help="adapter folder (PEFT's adapter_config.json + adapter_model.safetensors, or lora.safetensors)")
    m.add_argument("out", help="destination folder (created; must be empty)")
    m.add_argument("--to", default="mistral", choices=("mistral", "hf"), help="layout of the merged checkpoint")
    m.add_argument("--dtype", default=None, help="dtype of the merged weights (default: the base's)")
    m.set_defaults(func=cmd_merge)

    from .weights.gguf import write_schemes

    v = sub.add_parser("convert", parents=[common], help="write a checkpoint in another layout, or as a GGUF file",
                       description="mistral / hf: a checkpoint folder in Mistral's or Hugging Face's layout. gguf: "
                                   "one GGUF file (llama.cpp's format, its tokenizer embedded), in the source's "
                                   "types or --scheme. The source: a model folder, or a GGUF file.")
    v.add_argument("src", help="source model folder or .gguf file")
    v.add_argument("dst", help="destination folder (created; must be empty), or the .gguf file (must not exist)")
    v.add_argument("--to", required=True, choices=("mistral", "hf", "gguf"), help="target layout")
    v.add_argument("--dtype", default=None, help="mistral / hf: cast the weights (default: keep their dtype)")
    v.add_argument("--scheme", default=None, choices=write_schemes(),
                   help="gguf: the matrices' type: f32, f16, bf16, or a block scheme (norms stay F32; under a "
                        "4-bit scheme output.weight is q8_0). Default: the source's types; a quantized source is "
                        "written as it is")
    v.set_defaults(func=cmd_convert)

    from .quant import WRITABLE

    q = sub.add_parser("quantize", parents=[common], help="write a checkpoint with its weights quantized (q8_0, q4_0, q4_k)",
                       description="Quantizes the attention and feed-forward matrices, the embedding and the output "
                                   "(at 8 bits with a 4-bit scheme) in llama.cpp's block layouts; norms stay in float. "
                                   "The folder loads with `galerne serve DST` as it is stored. See docs/quantization.md.")
    q.add_argument("src", help="source model folder (float weights)")
    q.add_argument("dst", help="destination folder (created; must be empty)")
    q.add_argument("--scheme", required=True, choices=WRITABLE,
                   help="q8_0: 8.5 bits a weight, near-lossless; q4_k: 4.5 bits, llama.cpp's K-quant; "
                        "q4_0: 4.5 bits, the fastest 4-bit to decode")
    q.add_argument("--to", default=None, choices=("mistral", "hf"), help="layout of the output (default: the source's)")
    q.set_defaults(func=cmd_quantize)

    f = sub.add_parser("finetune", parents=[common], help="LoRA or full fine-tuning from a mistral-finetune YAML config",
                       description="Every config key is also a flag (--max-steps 10, --lora.rank 8 or --lora-rank 8); "
                                   "flags override the YAML. See docs/finetune.md.")
    f.add_argument("config", help="YAML config (mistral-finetune's keys)")
    f.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                   help="continue the run: from RUN_DIR's newest checkpoint, or from the checkpoint folder given")
    from .finetune.config import add_config_arguments

    add_config_arguments(f)
    f.set_defaults(func=cmd_finetune)

    from .finetune.validate import MAX_LINE_BYTES

    d = sub.add_parser("data", help="fine-tuning data tools").add_subparsers(dest="data_command", required=True)
    dv = d.add_parser("validate", parents=[common], help="check JSONL training files (mistral-finetune formats)")
    dv.add_argument("files", nargs="+", help="JSONL files")
    dv.add_argument("--tokenizer", required=True, help="tokenizer file or model folder")
    dv.add_argument("--seq-len", type=int, default=2048, help="training sequence length (default 2048)")
    dv.add_argument("--clean", default=None, help="write the valid lines, unchanged, to this file (not one of "
                                                  "the inputs; replaced only once every input is read)")
    dv.add_argument("--tokens-per-s", type=float, default=None, help="training speed, for an ETA")
    dv.add_argument("--max-line-bytes", type=int, default=MAX_LINE_BYTES,
                    help=f"longest line read; a longer one is reported, not read (default {MAX_LINE_BYTES})")
    dv.set_defaults(func=cmd_data_validate)
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
