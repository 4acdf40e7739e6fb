"""Log-probabilities as the APIs write them: one place for both responders.

* ``api_logprob``: a number that JSON can carry. A logprob can be -inf (a token the
  model gives no chance); JSON has no infinity (Starlette refuses it: a 500; a
  stream would send ``-Infinity``, which no client parses), so it is written as
  -9999.0, as vLLM does.
* ``prompt_logprobs``: vLLM's ``prompt_logprobs`` field (chat: top level; text
  completions: per choice): one entry per prompt token, None for the first, else
  ``{token_id: {"logprob", "rank", "decoded_token"}}`` with the prompt's own token
  and the top alternatives asked for.
* ``legacy``: OpenAI's legacy completions ``logprobs`` object (``tokens``,
  ``token_logprobs``, ``top_logprobs``, ``text_offset``) for some tokens and their
  logprobs; ``echo`` puts the prompt's first, with a null first logprob, which is what
  lm-evaluation-harness reads to score a text.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..engine.engine import PromptLogprob
from ..tokenizer import Tokenizer

FLOOR = -9999.0


def api_logprob(value: float) -> float:
    return value if value >= FLOOR else FLOOR  # -inf (and a NaN, which never compares) -> FLOOR


def prompt_logprobs(tok: Tokenizer, prompt: Sequence[int], entries: Sequence[PromptLogprob | None]) -> list[dict | None]:
    out: list[dict | None] = []
    for token, e in zip(prompt, entries):
        if e is None:
            out.append(None)
            continue
        ranked = {str(token): {"logprob": api_logprob(e.logprob), "rank": e.rank, "decoded_token": tok.token_str(token)}}
        for rank, (alt, lp) in enumerate(e.top, 1):
            ranked.setdefault(str(alt), {"logprob": api_logprob(lp), "rank": rank, "decoded_token": tok.token_str(alt)})
        out.append(ranked)
    return out


def legacy(tok: Tokenizer, tokens: Sequence[int], logprobs: Sequence[float | None],
           tops: Sequence[Sequence[tuple[int, float]] | None], k: int, offset: int) -> dict:
    """The legacy ``logprobs`` object of ``tokens``; text offsets count from ``offset``.
    A None logprob (the prompt's first token) has a None top_logprobs entry."""
    piece: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for t, lp, top in zip(tokens, logprobs, tops):
        s = tok.token_str(t)
        piece["tokens"].append(s)
        piece["token_logprobs"].append(None if lp is None else api_logprob(lp))
        piece["top_logprobs"].append(None if lp is None else
                                     {tok.token_str(a): api_logprob(v) for a, v in list(top or ())[:k]})
        piece["text_offset"].append(offset)
        offset += len(s)
    return piece
