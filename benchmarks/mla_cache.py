"""KV-cache bytes per token of Mistral Small 4 with the latent cache against the
same model with uncompressed keys and values (figures for docs/models.md).

The shape is transformers' ``Mistral4Config`` defaults (its docstring checkpoint is
mistralai/Mistral-Small-4-119B-2603); nothing is downloaded, no weights are built.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch
from transformers import Mistral4Config

from galerne.engine.paged import PagedKVCache
from galerne.models.args import ModelArgs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cache-gb", type=float, default=8.0, help="cache size for the token counts (1 GB = 1e9 bytes)")
    ap.add_argument("--dtype", default="bfloat16")
    a = ap.parse_args()
    dtype = getattr(torch, a.dtype)
    config = Mistral4Config().to_dict()
    config["architectures"] = ["Mistral4ForCausalLM"]
    args = ModelArgs.from_hf_config(config)
    m = args.mla
    latent = PagedKVCache.bytes_per_token(args, dtype)
    # The same attention without the latent: every head's key (nope + rope) and value cached.
    elem = torch.empty((), dtype=dtype).element_size()
    full = args.n_layers * args.n_heads * (m.qk_head_dim + m.v_head_dim) * elem
    budget = a.cache_gb * 1e9
    rows = [("latent (MLA, galerne)", latent), ("uncompressed K/V", full)]
    print(f"Mistral Small 4 shape: dim {args.dim}, {args.n_layers} layers, {args.n_heads} heads, "
          f"kv_lora_rank {m.kv_lora_rank}, qk_rope {m.qk_rope_head_dim}, qk_nope {m.qk_nope_head_dim}, "
          f"v {m.v_head_dim}, q_lora_rank {m.q_lora_rank}, {args.moe.num_experts} experts, "
          f"{args.moe.num_experts_per_tok} per token, {args.moe.num_shared_experts} shared; {a.dtype}")
    for name, b in rows:
        print(f"{name:24s} {b:8d} bytes/token ({b // args.n_layers} per layer)  {int(budget // b):>10,d} tokens in {a.cache_gb:g} GB")
    print(f"ratio {full / latent:.1f}x")
    print(json.dumps({"dtype": a.dtype, "cache_gb": a.cache_gb, "latent_bytes_per_token": latent,
                      "full_bytes_per_token": full, "latent_tokens": int(budget // latent),
                      "full_tokens": int(budget // full), "mla": dataclasses.asdict(m)}))


if __name__ == "__main__":
    main()
