"""Turn logits into next tokens under SamplingParams, for a whole batch at once.

``sample_batch`` takes the (B, V) logits of one step and one ``SamplingRow`` per
row, and applies, in this order:

1. penalties: repetition (over prompt + output), presence and frequency (over
   the output only);
2. ``logit_bias`` (added);
3. ``masked_ids`` set to -inf (EOS / stop ids while below ``min_tokens``), and
   every id outside ``allowed`` (the grammar's mask of a guided row) too;
4. logprobs, when a row asks: ``log_softmax`` of these *processed* logits,
   before temperature and the top-k/top-p/min-p cuts (what vLLM calls
   processed logprobs; they do not depend on the sampling knobs, so greedy and
   sampled requests report the same numbers for the same logits);
5. greedy rows (temperature 0) take the first maximum of the processed logits (argmax);
6. the other rows: temperature, top-k, top-p, min-p, then a draw.

The penalties, bias and masks touch only the (row, id) pairs they concern
(O(tokens), not O(B * V)); the temperature and the cuts use per-row columns.
A row with a feature off is left exactly as it was by that feature.

The draw is the exponential race ``argmax(p / q)``, ``q ~ Exp(1)`` (what
``torch.multinomial(p, 1)`` does inside). A seeded row draws its ``q`` from its
own generator, so its token depends only on its own logits and generator: the
same whether it runs alone or in a batch, with whatever other rows (greedy rows
draw nothing). Unseeded rows draw from the global generator. A row with the whole
vocabulary as support draws V numbers (torch.multinomial's token); on CPU a row
cut to a small support draws only for its support (``_draw``).

The top-p cut looks for each row's cut among its most likely tokens first
(``TOP_P_CANDIDATES``), and sorts the whole row only when they do not hold top_p of
the mass: a full sort of (256, 32768) costs 0.3 s on 2 CPU cores.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import InvalidParameter
from .params import SamplingParams


_TINY = torch.finfo(torch.float32).tiny
_MAX = torch.finfo(torch.float32).max


@dataclass
class SamplingRow:
    params: SamplingParams
    prompt_token_ids: Sequence[int] = ()  # for repetition_penalty
    output_token_ids: Sequence[int] = ()  # for the penalties
    generator: torch.Generator | None = None  # a seeded request's own (make_generator)
    masked_ids: frozenset[int] = frozenset()  # ids forbidden this step (see min_tokens_masked_ids)
    # Guided rows: (V,) bool, the only ids allowed this step (a shorter mask allows
    # none of the ids past its end). None: every id.
    allowed: torch.Tensor | None = None


@dataclass
class SamplerOutput:
    token_ids: list[int]
    # The chosen token's logprob for every row; None when no row asked for logprobs.
    logprobs: list[float] | None
    # Per row: the top-k (id, logprob), most likely first, when that row asked
    # (an empty list for logprobs=0), else None. None when no row asked.
    top_logprobs: list[list[tuple[int, float]] | None] | None


def make_generator(params: SamplingParams, device: torch.device | str, index: int = 0) -> torch.Generator | None:
    """A private generator for a seeded request (None: the global one).

    ``index`` is the completion's index within a request with n > 1: completion
    i is seeded with ``seed + i``, so that the n completions differ.
    """
    if params.seed is None:
        return None
    seed = params.seed + index
    if seed >= 2**64:
        seed -= 2**64
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def min_tokens_masked_ids(
    params: SamplingParams, num_output_tokens: int, eos_token_ids: Sequence[int] | frozenset[int] = ()
) -> frozenset[int]:
    """The ids to forbid this step: EOS (unless ignore_eos) and stop_token_ids
    while fewer than ``min_tokens`` tokens were generated."""
    if num_output_tokens >= params.min_tokens:
        return frozenset()
    ids = set(params.stop_token_ids)
    if not params.ignore_eos:
        ids.update(eos_token_ids)
    return frozenset(ids)


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    *,
    prompt_token_ids: Sequence[int] = (),
    output_token_ids: Sequence[int] = (),
    masked_ids: frozenset[int] = frozenset(),
    allowed: torch.Tensor | None = None,
) -> int:
    """logits: (V,) -> token id. Greedy when temperature is 0.

    One row of ``sample_batch``; without the token context, the penalties have
    nothing to act on.
    """
    row = SamplingRow(params, prompt_token_ids, output_token_ids, generator, masked_ids, allowed)
    return sample_batch(logits.reshape(1, -1), [row]).token_ids[0]


def process_logits(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Steps 1-3: penalties, logit_bias, masked ids. Returns float32 logits: a new
    tensor when a row has something to change, else ``logits`` as they are (cast
    to float32 if they were not), unmodified either way."""
    V = logits.shape[1]
    device = logits.device
    changes = any(
        r.params.repetition_penalty != 1.0 or r.params.logit_bias or r.masked_ids or r.allowed is not None
        or ((r.params.presence_penalty != 0.0 or r.params.frequency_penalty != 0.0) and len(r.output_token_ids))
        for r in rows
    )
    out = logits.to(torch.float32, copy=True) if changes else logits.float()

    # The penalties touch only the (row, id) pairs that occur: O(tokens), not O(B * V).
    rep = [i for i, r in enumerate(rows) if r.params.repetition_penalty != 1.0]
    if rep:
        # Every id seen in the prompt or the output; an id seen twice is written twice
        # with the same value (computed from the logits before this step).
        lists = [_ids(getattr(rows[i], f)) for i in rep for f in ("prompt_token_ids", "output_token_ids")]
        r_idx, t_idx = _flatten(lists, [i for i in rep for _ in range(2)], V)
        # A penalty that is 0 in float32 (1e-300) acts as the smallest one: never x / 0.
        penalty = np.array([max(float(r.params.repetition_penalty), _TINY) for r in rows], dtype=np.float32)[r_idx]
        where = (_dev(r_idx, device), _dev(t_idx, device))
        x = out[where]
        penalty = _dev(penalty, device)
        # An overflow is the largest float, not inf (inf - inf is NaN in the softmax).
        out[where] = torch.where(x > 0, x / penalty, x * penalty).clamp(max=_MAX)

    pen = [i for i, r in enumerate(rows)
           if (r.params.presence_penalty != 0.0 or r.params.frequency_penalty != 0.0) and len(r.output_token_ids)]
    if pen:
        r_idx, t_idx = _flatten([_ids(rows[i].output_token_ids) for i in pen], pen, V)
        keys, counts = np.unique(r_idx * V + t_idx, return_counts=True)
        r_idx, t_idx = keys // V, keys % V
        presence = np.array([float(r.params.presence_penalty) for r in rows], dtype=np.float32)[r_idx]
        frequency = np.array([float(r.params.frequency_penalty) for r in rows], dtype=np.float32)[r_idx]
        where = (_dev(r_idx, device), _dev(t_idx, device))
        # logit -= presence * (count > 0) + frequency * count, over the distinct generated ids.
        out[where] -= _dev(presence, device) + _dev(frequency, device) * _dev(counts.astype(np.float32), device)

    bias_rows, bias_tok, bias_vals = [], [], []
    mask_rows, mask_tok = [], []
    for i, r in enumerate(rows):
        if r.params.logit_bias:
            for t, b in r.params.logit_bias:
                if t >= V:
                    raise InvalidParameter("logit_bias", f"token id {t} is outside the vocabulary (0..{V - 1})")
                bias_rows.append(i)
                bias_tok.append(t)
                bias_vals.append(b)
        if r.masked_ids:
            ids = [t for t in r.masked_ids if 0 <= t < V]  # an id outside the vocabulary cannot be drawn anyway
            mask_rows.extend([i] * len(ids))
            mask_tok.extend(ids)
    if bias_rows:
        where = (torch.tensor(bias_rows, device=device), torch.tensor(bias_tok, device=device))
        out.index_put_(where, torch.tensor(bias_vals, dtype=torch.float32, device=device), accumulate=True)
    if mask_rows:
        out[torch.tensor(mask_rows, device=device), torch.tensor(mask_tok, device=device)] = float("-inf")

    guided = [i for i, r in enumerate(rows) if r.allowed is not None]
    if guided:
        masks = [rows[i].allowed.reshape(-1).to(torch.bool) for i in guided]
        if all(m.numel() == V for m in masks):
            allowed = torch.stack(masks)
        else:
            allowed = torch.zeros(len(guided), V, dtype=torch.bool)
            for j, m in enumerate(masks):
                allowed[j, : min(m.numel(), V)] = m[:V]
        forbidden = ~allowed.to(device, non_blocking=True)
        if len(guided) == len(rows):
            out.masked_fill_(forbidden, float("-inf"))
        else:
            g_idx = torch.tensor(guided, dtype=torch.long, device=device)
            out[g_idx] = out[g_idx].masked_fill(forbidden, float("-inf"))
    return out


def _ids(tokens):
    """Token ids as something that iterates Python ints (lists, tuples, tensors, arrays)."""
    return tokens.tolist() if isinstance(tokens, (torch.Tensor, np.ndarray)) else tokens


def _flatten(lists: list, owners: list[int], vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Lists of ids -> (owner row, id) int64 arrays; ``owners[k]`` is the row of ``lists[k]``.

    numpy.fromiter is several times faster than torch.tensor on long Python lists.
    Ids are checked here, on the host: a bad index on a GPU is a device assert."""
    lens = np.fromiter((len(x) for x in lists), dtype=np.int64, count=len(lists))
    flat = np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int64, count=int(lens.sum()))
    if flat.size and (flat.min() < 0 or flat.max() >= vocab_size):
        bad = int(flat[(flat < 0) | (flat >= vocab_size)][0])
        raise ValueError(f"token id {bad} is outside the vocabulary (0..{vocab_size - 1})")
    return np.repeat(np.asarray(owners, dtype=np.int64), lens), flat


def _dev(a: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).to(device)


def sampling_probs(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Step 6 without the draw, for rows with temperature > 0: (S, V) processed
    logits -> (S, V) unnormalised probabilities, zero outside each row's support."""
    V = logits.shape[1]
    device = logits.device
    cols = torch.tensor(
        [[p.temperature, p.top_p, p.top_k if 0 < p.top_k < V else 0, p.min_p] for p in params],
        dtype=torch.float64,
    )
    # Values that are 0 or inf in float32 (temperature 1e-45 or 1e308) act as their
    # limits, greedy or uniform: clamped, and the row's maximum subtracted first, so
    # that the division gives 0 for the best token and -inf (never NaN) for a forbidden one.
    temp = cols[:, 0].clamp(_TINY, _MAX).to(device=device, dtype=torch.float32)
    best = logits.max(dim=-1, keepdim=True).values
    x = (logits - best.nan_to_num(0.0, 0.0, 0.0)) / temp[:, None]

    top_k = cols[:, 2].long()
    if bool((top_k > 0).any()):
        k_max = int(top_k.max())
        kth_sorted = torch.topk(x, k_max, dim=-1).values  # (S, k_max), descending
        k_idx = (top_k.clamp(min=1) - 1).to(device)
        kth = kth_sorted.gather(1, k_idx[:, None])
        # Rows with no top-k cut compare against -inf: nothing is masked.
        kth = kth.masked_fill((top_k <= 0).to(device)[:, None], float("-inf"))
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)

    top_p = cols[:, 1]
    if bool((top_p < 1.0).any()):
        _cut_top_p_(probs, top_p)

    min_p = cols[:, 3]
    if bool((min_p > 0).any()):
        # Ratios to the most likely token do not change when renormalising, so
        # the cut can use the unnormalised probabilities left after top-p.
        thresh = min_p.to(device=device, dtype=torch.float32)[:, None] * probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(probs < thresh, 0.0)
    return probs


# Candidate counts for the top-p cut, tried in turn: a row's cut is found among its k
# most likely tokens when they hold top_p of the mass (a real model's next-token
# distribution almost always does at 128); only the rows where they do not try the next.
# A full sort of (256, 32768) takes 0.3 s on 2 CPU cores, a top-128 about 15 ms.
TOP_P_CANDIDATES = (128, 1024)


def _cut_top_p_(probs: torch.Tensor, top_p: torch.Tensor) -> None:
    """Cut each row of ``probs``, in place, to the smallest prefix (most likely first)
    whose mass reaches its top_p: a token is dropped when the mass *before* it already
    reaches top_p; the first token always stays (even for a top_p that is 0 in
    float32). Rows with top_p 1 are left as they are. A row is written once its cut is
    found, and only rows still pending are read again."""
    device, V = probs.device, probs.shape[1]
    pending = torch.nonzero(top_p < 1.0).flatten()
    for k in (*[k for k in TOP_P_CANDIDATES if k < V], V):
        if pending.numel() == 0:
            break
        idx = pending.to(device)
        rows = probs.index_select(0, idx)
        p = top_p[pending].to(device=device, dtype=torch.float32)[:, None]
        if k < V:
            vals, order = torch.topk(rows, k, dim=-1)
        else:
            vals, order = torch.sort(rows, dim=-1, descending=True)
        before = torch.cumsum(vals, dim=-1) - vals
        keep_sorted = before < p
        keep_sorted[:, 0] = True
        # Within the k candidates when they hold top_p of the mass (every token past them
        # has at least that much before it: dropped); else this row tries more.
        done = (vals.sum(dim=-1, keepdim=True) >= p)[:, 0] if k < V else torch.ones_like(p[:, 0], dtype=torch.bool)
        keep = torch.zeros_like(rows, dtype=torch.bool).scatter_(-1, order, keep_sorted)
        finished = torch.nonzero(done).flatten()
        if finished.numel():
            probs.index_copy_(0, idx[finished], rows[finished].masked_fill(~keep[finished], 0.0))
        pending = pending[~done.cpu()]


def _draw(probs: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """One token per row of (unnormalised) ``probs``: the exponential race
    argmax(p / q), q ~ Exp(1), which is what torch.multinomial(p, 1) does.

    A row with a generator draws its q from it, the other rows from the global
    generator: a row's token depends only on its own probabilities and generator,
    whatever the batch. A row whose support is the whole vocabulary draws V numbers
    (the same token as torch.multinomial). On CPU, a row that a cut (top-k, top-p,
    min-p, a grammar) left with at most 1/8 of the vocabulary draws one number per
    token of its support only: the same distribution, at a fraction of the cost
    (filling (256, 32768) exponentials takes 0.18 s on 2 cores). On CUDA every row
    draws V numbers, in one launch.
    """
    B, V = probs.shape
    tokens = torch.empty(B, dtype=torch.long, device=probs.device)
    dense = list(range(B))
    if probs.device.type == "cpu" and V >= 64:
        support = (probs > 0).sum(dim=-1).tolist()
        dense = [j for j in range(B) if support[j] > V // 8]
        for j in (j for j in range(B) if support[j] <= V // 8):
            ids = torch.nonzero(probs[j]).flatten()
            q = torch.empty(ids.numel(), dtype=probs.dtype).exponential_(generator=generators[j])
            q.clamp_(min=torch.finfo(q.dtype).tiny)
            tokens[j] = ids[torch.argmax(probs[j, ids] / q)]
    if not dense:
        return tokens
    rows = probs if len(dense) == B else probs[torch.tensor(dense, device=probs.device)]
    q = torch.empty_like(rows)
    shared = []
    for i, j in enumerate(dense):
        if generators[j] is None:
            shared.append(i)
        else:
            q[i].exponential_(generator=generators[j])
    if len(shared) == len(dense):
        q.exponential_()
    elif shared:
        s_idx = torch.tensor(shared, dtype=torch.long, device=probs.device)
        q[s_idx] = torch.empty(len(shared), V, device=probs.device).exponential_()
    # A CPU exponential can be exactly 0 (log1p(-u) with u = 0): 0/0 would be NaN and
    # win the argmax for a forbidden token.
    q.clamp_(min=torch.finfo(q.dtype).tiny)
    drawn = first_max(rows / q).to(probs.device)
    if len(dense) == B:
        return drawn
    tokens[torch.tensor(dense, device=probs.device)] = drawn
    return tokens


def first_max(x: torch.Tensor) -> torch.Tensor:
    """Each row's index of its first maximum (a NaN counts as the maximum), as int64.
    On the CPU through numpy's argmax: torch's ``max(dim=-1)`` over rows of 32,768
    float32 took 40 us for one row and 11 ms for 256 on the 2-core Xeon, numpy's
    argmax 4 us and 1.2 ms."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2 and x.shape[1] > 0:
        return torch.from_numpy(x.detach().contiguous().numpy().argmax(axis=-1))
    return x.max(dim=-1).indices


def sample_batch(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> SamplerOutput:
    """logits: (B, V), any float dtype and device; one SamplingRow per row."""
    if logits.dim() != 2 or logits.shape[0] != len(rows):
        raise ValueError(f"logits of shape {tuple(logits.shape)} for {len(rows)} rows")
    B, V = logits.shape
    device = logits.device
    processed = process_logits(logits, rows)

    want_lp = [r.params.logprobs for r in rows]
    any_lp = any(k is not None for k in want_lp)
    logprobs = torch.log_softmax(processed, dim=-1) if any_lp else None

    tokens = torch.empty(B, dtype=torch.long, device=device)
    greedy = [i for i, r in enumerate(rows) if r.params.greedy]
    rand = [i for i, r in enumerate(rows) if not r.params.greedy]
    if len(greedy) == B:
        tokens = first_max(processed)
    elif greedy:
        g_idx = torch.tensor(greedy, dtype=torch.long, device=device)
        tokens[g_idx] = first_max(processed[g_idx]).to(device)
    if rand:
        r_idx = torch.tensor(rand, dtype=torch.long, device=device)
        probs = sampling_probs(processed[r_idx], [rows[i].params for i in rand])
        tokens[r_idx] = _draw(probs, [rows[i].generator for i in rand])

    token_ids = tokens.tolist()
    if not any_lp:
        return SamplerOutput(token_ids, None, None)
    chosen = logprobs.gather(1, tokens[:, None])[:, 0].tolist()
    top: list[list[tuple[int, float]] | None] = [None] * B
    asked = [i for i, k in enumerate(want_lp) if k is not None]
    k_max = min(max(want_lp[i] for i in asked), V)
    if k_max > 0:
        a_idx = torch.tensor(asked, dtype=torch.long, device=device)
        vals, ids = torch.topk(logprobs[a_idx], k_max, dim=-1)
        vals, ids = vals.tolist(), ids.tolist()
        for j, i in enumerate(asked):
            k = want_lp[i]
            # Tokens the row could not draw (a grammar's mask, min_tokens) are no alternatives.
            top[i] = [(t, lp) for t, lp in zip(ids[j][:k], vals[j][:k]) if lp != -math.inf]
    else:
        for i in asked:
            top[i] = []
    return SamplerOutput(token_ids, chosen, top)
