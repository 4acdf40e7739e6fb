"""The reference generation path: one sequence at a time over a dense KV cache.

The paged, batched engine is tested against it (tests/test_engine.py); no
production module uses it. It only talks to the model through the
``AttentionBackend`` protocol, as the engine does.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from galerne.engine.request import Limits, validate_request
from galerne.engine.stop import StopChecker, drain
from galerne.models.attention import allowed_mask, sdpa
from galerne.models.transformer import Transformer
from galerne.sampling.params import SamplingParams
from galerne.sampling.sampler import make_generator, sample
from galerne.tokenizer import IncrementalDetokenizer, Tokenizer


class DenseKVCache:
    """Keys and values of one sequence, all layers: (layers, K, capacity, hd).

    Heads before positions, so that the keys of one head are contiguous and a
    decode step reads them as one strided block. Capacity grows by doubling, so a
    long ``max_tokens`` does not reserve memory it may never use.
    """

    def __init__(self, model: Transformer, capacity: int, dtype: torch.dtype, device: torch.device):
        a = model.args
        self.args = a
        shape = (a.n_layers, a.n_kv_heads, capacity, a.head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.length = 0  # tokens whose keys/values are stored
        self._new = 0  # tokens being added by the forward in progress

    def reserve(self, n_new: int) -> None:
        """Make room for ``n_new`` more tokens; call before each forward."""
        need = self.length + n_new
        cap = self.k.shape[2]
        if need > cap:
            new_cap = max(need, 2 * cap)
            for name in ("k", "v"):
                old = getattr(self, name)
                grown = old.new_empty(old.shape[:2] + (new_cap,) + old.shape[3:])
                grown[:, :, : self.length] = old[:, :, : self.length]
                setattr(self, name, grown)
        self._new = n_new

    def commit(self) -> None:
        self.length += self._new
        self._new = 0

    def attend(self, layer: int, q, k, v, window: int | None) -> torch.Tensor:
        T, start = q.shape[0], self.length
        end = start + T
        self.k[layer, :, start:end] = k.transpose(0, 1)
        self.v[layer, :, start:end] = v.transpose(0, 1)
        # The first query (at ``start``) sees keys from start - window + 1 on;
        # older keys are never read again, so the slice starts there.
        lo = max(0, start + 1 - window) if window is not None else 0
        keys, values = self.k[layer, :, lo:end], self.v[layer, :, lo:end]  # (K, L, hd)
        qh = q.transpose(0, 1)  # (H, T, hd)
        if T == 1:
            out = sdpa(qh, keys, values)  # the slice is exactly what the token may see
        elif start == 0 and (window is None or window >= T):
            out = sdpa(qh, keys, values, causal=True)
        else:
            q_pos = torch.arange(start, end, device=q.device)
            k_pos = torch.arange(lo, end, device=q.device)
            out = sdpa(qh, keys, values, mask=allowed_mask(q_pos, k_pos, window))
        return out.transpose(0, 1)


@dataclass
class Delta:
    """What one step of a stream adds."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" on the last delta


class DenseGenerator:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, max_model_len: int):
        self.model = model
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype

    def stream(self, prompt_ids: Sequence[int], params: SamplingParams) -> Iterator[Delta]:
        """Generate for one prompt, yielding text as it becomes final."""
        budget = validate_request(prompt_ids, params, Limits(self.tokenizer.vocab_size, self.max_model_len)).max_tokens
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids |= self.tokenizer.stop_token_ids()
        generator = make_generator(params, self.device)
        detok = IncrementalDetokenizer(self.tokenizer, prompt_ids)
        stopper = StopChecker(params.stop, params.include_stop_str_in_output)
        cache = DenseKVCache(self.model, min(len(prompt_ids) + budget, len(prompt_ids) + 256), self.dtype, self.device)

        tokens = torch.tensor(list(prompt_ids), dtype=torch.long, device=self.device)
        positions = torch.arange(len(prompt_ids), device=self.device)
        with torch.inference_mode():
            for step in range(budget):
                cache.reserve(tokens.shape[0])
                hidden = self.model(tokens, positions, cache)
                cache.commit()
                logits = self.model.logits(hidden[-1]).float()  # (V,)
                token = sample(logits, params, generator)
                if token in stop_ids:
                    yield Delta(drain(detok, stopper)[0], [token], "stop")
                    return
                text, stopped = stopper.push(detok.push(token))
                if stopped:
                    yield Delta(text, [token], "stop")
                    return
                if step == budget - 1:
                    tail, stopped = drain(detok, stopper)
                    yield Delta(text + tail, [token], "stop" if stopped else "length")
                    return
                yield Delta(text, [token])
                tokens = torch.tensor([token], device=self.device)
                positions = torch.tensor([cache.length], device=self.device)

