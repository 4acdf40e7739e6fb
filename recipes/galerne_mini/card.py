"""Write galerne-mini's MODEL_CARD.md from what the recipe recorded (``recipe.json``).

    python recipes/galerne_mini/card.py --out galerne/assets/galerne-mini [--train-log LOG]

``train.py`` calls :func:`write_card` at its end; this command rewrites the card alone.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _sources_table(sources: list[dict]) -> str:
    rows = ["| source | package (version) | licence | used | documents | tokens |", "|---|---|---|---|---:|---:|"]
    for s in sources:
        rows.append(f"| {s['source']} | `{s['package']}` ({s['version']}) | {s['licence']} | {s['used']} | "
                    f"{s.get('documents', 0):,} | {s.get('tokens', 0):,} |")
    return "\n".join(rows)


def summary_from_log(lines) -> dict:
    """The last metrics line of each stage of train.py's JSON log lines."""
    last: dict[str, dict] = {}
    for line in lines:
        if line.startswith("{") and '"stage"' in line:
            row = json.loads(line)
            last[row["stage"]] = row
    out = {}
    for stage, row in last.items():
        out[f"{stage} final loss"] = f"{row['loss']:.3f} (step {row['step']})"
        out[f"{stage} wall time"] = f"{row['elapsed_s'] / 60:.0f} min"
    return out


def write_card(out: Path, train_summary: dict | None = None) -> Path:
    recipe = json.loads((out / "recipe.json").read_text())
    cfg, corpus = recipe["config"], recipe["sources"]
    sources = corpus["sources"] if isinstance(corpus, dict) else corpus
    m, p, c = cfg["model"], cfg["pretrain"], cfg["chat"]
    params = json.loads((out / "config.json").read_text())
    from safetensors import safe_open

    n_params = 0
    for f in out.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                n = 1
                for d in st.get_slice(k).get_shape():
                    n *= d
                n_params += n
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    summary = train_summary or recipe.get("training", {})
    pre_tokens = p["max_steps"] * p["num_microbatches"] * p["seq_len"]
    card = f"""# galerne-mini

A small Mistral-architecture language model trained from scratch by galerne's own training
code (full-weight mode, `galerne.finetune.train`) on a 2-core CPU, shipped inside the galerne
package so that `galerne serve` and `galerne chat` work on a fresh machine with no network.
It is a demonstration and test model: it writes English-looking sentences and short chat
answers, follows the `[INST]` turn format, and knows very little. Do not rely on anything it
says. For real work, give galerne a real model folder (Mistral 7B, Nemo, ...).

## Model

| | |
|---|---|
| architecture | `MistralForCausalLM` (Hugging Face layout), tied embeddings |
| parameters | {n_params / 1e6:.2f}M |
| shape | dim {m['dim']}, {m['n_layers']} layers, {m['n_heads']} heads ({m['n_kv_heads']} KV heads), head_dim {m['head_dim']}, hidden {m['hidden_dim']} |
| context | {params.get('max_position_embeddings')} tokens (trained on {p['seq_len']}-token packed sequences) |
| tokenizer | mistral-common's v3 SentencePiece tokenizer (`{cfg['tokenizer']}`, 32768 tokens), as `tokenizer.model.v3` |
| weights | bf16 safetensors, {size / 2**20:.1f} MiB in {len(list(out.glob('*.safetensors')))} files, each under 16 MiB |

## Training (recipe: `recipes/galerne_mini/`)

One command from a clone, seed {cfg['seed']}, config `recipes/galerne_mini/config.yaml`:

```bash
bash recipes/galerne_mini/run.sh     # corpus.py, then train.py; about an hour on 2 CPU cores
```

1. **Corpus** (`corpus.py`): the sources below, fetched from Debian and PyPI, turned into
   mistral-finetune pretraining JSONL (`{{"text": ...}}`, documents of at most 500 tokens) and
   instruct JSONL for the chat stage; a deterministic 0.5% of the documents (by a hash of the
   text) is held out.
2. **Pretraining**: {p['max_steps']} AdamW steps of {p['num_microbatches']} x {p['seq_len']} tokens
   (about {pre_tokens / 1e6:.1f}M token positions), lr {p['lr']} with {p['warmup_steps']} warm-up steps then cosine
   decay, weight decay {p['weight_decay']}, clipping {p['grad_clip']}, bf16 autocast with fp32 weights.
3. **Chat stage**: {c['max_steps']} steps on the `[INST]` conversations (loss on the assistant turns only)
   mixed with pretraining text ({c['pretrain_per_chat']} documents per conversation), lr {c['lr']}.
{"" if not summary else chr(10) + "Measured during the run that made these weights: " + ", ".join(f"{k} {v}" for k, v in summary.items()) + "." + chr(10)}
## Evaluation

Held-out perplexity: **{recipe['heldout_perplexity']:.2f}** (per token, BOS excluded, EOS
included) on `recipes/galerne_mini/heldout.jsonl` ({recipe['heldout_tokens']:.0f} tokens, the first
{cfg['heldout_docs']} held-out documents, shipped with the recipe). `tests/test_builtin.py`
re-measures it and must find it within 5%.

## Sources and licences

Every source is public domain or under a permissive licence; each licence was read in the
package's own copyright file by `corpus.py` and is recorded in `recipe.json`.

{_sources_table(sources)}

The fortune files are quotations collected by many people; the BSD licence covers the
collection as distributed by Debian. The weights are released under the Apache-2.0 licence, as galerne.

## Limits

A {n_params / 1e6:.0f}M-parameter model trained on about five million tokens: its facts are
unreliable, its answers short and often off-topic, and its knowledge is that of a Bible, a
book of psalm commentaries, Python's manual, fortune cookies and small talk. Its use is to
show galerne working end to end (serving, chat, fine-tuning: see `examples/bakery/`).
"""
    path = out / "MODEL_CARD.md"
    path.write_text(card)
    return path


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--train-log", type=Path, default=None, help="train.py's output, for the losses and times")
    a = ap.parse_args()
    summary = summary_from_log(a.train_log.read_text().splitlines()) if a.train_log else None
    print(write_card(a.out, summary))
