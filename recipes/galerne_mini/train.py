"""Train galerne-mini from scratch with galerne's own training code, then write it out.

    python recipes/galerne_mini/train.py --corpus DIR --out galerne/assets/galerne-mini

DIR is what ``corpus.py`` wrote (pretrain.jsonl, chat.jsonl, heldout.jsonl). Two stages,
both full-weight with :func:`galerne.finetune.train.train_steps` (bf16 autocast, fp32
master weights): pretraining on ``pretrain.jsonl``, then a short chat stage on the
``[INST]`` conversations of ``chat.jsonl`` mixed with pretraining text. The result is
written in the Hugging Face layout, bf16, sharded so every file stays under 16 MiB, with
mistral-common's v3 tokenizer beside it, and MODEL_CARD.md gets the held-out perplexity
measured on the slice this script also copies to ``recipes/galerne_mini/heldout.jsonl``.
Everything is seeded by ``config.yaml``: the same corpus gives the same weights (on the
same torch build and CPU).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

import torch
import yaml

from galerne.finetune.data import encode_sample, pack, pack_first_fit
from galerne.finetune.evaluate import evaluate
from galerne.finetune.train import train_steps
from galerne.models.args import ModelArgs
from galerne.models.transformer import Transformer
from galerne.tokenizer import Tokenizer
from galerne.weights.export import save_model

HERE = Path(__file__).resolve().parent
SHARD_BYTES = 15 * 1024**2 + 512 * 1024  # each weight file < 16 MiB


def tokenizer_file(name: str) -> Path:
    import mistral_common

    return Path(mistral_common.__file__).parent / "data" / name


def read_jsonl(path: Path):
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def packed_stream(objs, tokenizer, seq_len: int, group: int = 4000):
    """Encode and pack (first-fit: little padding) in groups of ``group`` samples (memory stays small)."""
    it = iter(objs)
    while True:
        chunk = list(itertools.islice(it, group))
        if not chunk:
            return
        # a sample longer than seq_len is an error (DataError), never dropped silently
        yield from pack_first_fit([encode_sample(tokenizer, o) for o in chunk], seq_len)


def repeat(make):
    """Epochs over a re-creatable iterable."""
    while True:
        yield from make()


def init_model(args: ModelArgs, std: float, seed: int) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(args)
    for name, p in model.named_parameters():
        if p.ndim == 1:
            torch.nn.init.ones_(p)  # RMSNorm gains
        else:
            # GPT-2 style: residual projections scaled down by the depth
            scale = 1 / math.sqrt(2 * args.n_layers) if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")) else 1.0
            torch.nn.init.normal_(p, std=std * scale)
    return model


LOG: list[str] = []  # every metrics line printed, for the model card


def logger(stage: str, total: int, every: int = 10):
    start = time.perf_counter()

    def log(m: dict) -> None:
        if m["step"] % every and m["step"] != total:
            return
        dt = time.perf_counter() - start
        eta = dt / m["step"] * (total - m["step"])
        line = json.dumps({"stage": stage, **{k: (round(v, 5) if isinstance(v, float) else v) for k, v in m.items()},
                           "elapsed_s": round(dt), "eta_s": round(eta)})
        LOG.append(line)
        print(line, flush=True)

    return log


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--config", type=Path, default=HERE / "config.yaml")
    ap.add_argument("--work", type=Path, default=None, help="where the pretrained stage is kept (default: OUT.work)")
    a = ap.parse_args(argv)
    cfg = yaml.safe_load(a.config.read_text())
    torch.set_num_threads(max(1, torch.get_num_threads()))
    tok_path = tokenizer_file(cfg["tokenizer"])
    tokenizer = Tokenizer.from_path(tok_path)
    m = cfg["model"]
    args = ModelArgs(dim=m["dim"], n_layers=m["n_layers"], n_heads=m["n_heads"], n_kv_heads=m["n_kv_heads"],
                     head_dim=m["head_dim"], hidden_dim=m["hidden_dim"], vocab_size=tokenizer.vocab_size,
                     norm_eps=m["norm_eps"], rope_theta=m["rope_theta"], max_seq_len=m["max_seq_len"],
                     tied_embeddings=True, bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
    work = a.work or a.out.with_name(a.out.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    pretrained = work / "pretrained.pt"
    pretrain = a.corpus / "pretrain.jsonl"

    model = init_model(args, m["init_std"], cfg["seed"])
    print(f"galerne-mini: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters", flush=True)
    if pretrained.exists():
        model.load_state_dict(torch.load(pretrained, weights_only=True))
        print(f"pretraining: reusing {pretrained}", flush=True)
    else:
        p = cfg["pretrain"]
        stream = repeat(lambda: packed_stream(read_jsonl(pretrain), tokenizer, p["seq_len"]))
        train_steps(model, stream, lr=p["lr"], weight_decay=p["weight_decay"], warmup_steps=p["warmup_steps"],
                    max_steps=p["max_steps"], grad_clip=p["grad_clip"], num_microbatches=p["num_microbatches"],
                    seed=cfg["seed"], amp_dtype=torch.bfloat16, log=logger("pretrain", p["max_steps"]))
        torch.save(model.state_dict(), pretrained)

    c = cfg["chat"]
    rng = random.Random(cfg["seed"])
    chat = list(read_jsonl(a.corpus / "chat.jsonl"))

    def chat_mix():
        convs = chat[:]
        rng.shuffle(convs)
        docs = read_jsonl(pretrain)
        mixed, debt = [], 0.0
        for conv in convs:
            mixed.append(conv)
            debt += c["pretrain_per_chat"]
            while debt >= 1:
                mixed.append(next(docs))
                debt -= 1
        return packed_stream(mixed, tokenizer, c["seq_len"])

    train_steps(model, repeat(chat_mix), lr=c["lr"], weight_decay=c["weight_decay"], warmup_steps=c["warmup_steps"],
                max_steps=c["max_steps"], grad_clip=c["grad_clip"], num_microbatches=c["num_microbatches"],
                seed=cfg["seed"] + 1, amp_dtype=torch.bfloat16, log=logger("chat", c["max_steps"]))

    # Held-out slice, shipped with the recipe so a test can re-measure the card's figure.
    heldout = list(itertools.islice(read_jsonl(a.corpus / "heldout.jsonl"), cfg["heldout_docs"]))
    with (HERE / "heldout.jsonl").open("w", encoding="utf-8") as f:
        for o in heldout:
            f.write(json.dumps(o, ensure_ascii=False) + "\n")

    if a.out.exists():
        shutil.rmtree(a.out)
    companions = work / "companions"
    companions.mkdir(exist_ok=True)
    shutil.copy2(tok_path, companions / "tokenizer.model.v3")
    save_model(model, a.out, "hf", companions_from=companions, dtype="bfloat16", shard_bytes=SHARD_BYTES)
    from galerne.weights.loader import load_model

    shipped, _ = load_model(a.out, dtype="float32", device="cpu")
    result = evaluate(shipped, pack([encode_sample(tokenizer, o) for o in heldout], 2048))
    print(json.dumps({"heldout_loss": result.loss, "heldout_perplexity": result.perplexity, "tokens": result.tokens}), flush=True)
    write_card(a.out, cfg, args, result, a.corpus)


def write_card(out: Path, cfg: dict, args: ModelArgs, result, corpus: Path) -> None:
    from card import summary_from_log, write_card as card

    sources = json.loads((corpus / "sources.json").read_text()) if (corpus / "sources.json").exists() else []
    (out / "recipe.json").write_text(json.dumps({"config": cfg, "heldout_perplexity": result.perplexity,
                                                 "heldout_tokens": result.tokens, "sources": sources}, indent=2) + "\n")
    print(f"wrote {card(out, summary_from_log(LOG))}", file=sys.stderr)


if __name__ == "__main__":
    main()
