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
  logprobs; ``echo`` puts the prompt's first, with a null first logprob, and every
  generated token has an entry, the one that stopped it (EOS) included, as OpenAI's
  and vLLM's: lm-evaluation-harness drops the last entry (``token_logprobs[ctxlen:-1]``)
  to score a text, and without the EOS entry it dropped the text's last token.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..engine.engine import PromptLogprob
from ..tokenizer import IncrementalDetokenizer, Tokenizer

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
           tops: Sequence[Sequence[tuple[int, float]] | None], k: int, offsets: Sequence[int]) -> dict:
    """The legacy ``logprobs`` object of ``tokens``, at ``offsets`` in the choice's text.
    A None logprob (the prompt's first token) has a None top_logprobs entry."""
    return {
        "tokens": [tok.token_str(t) for t in tokens],
        "token_logprobs": [None if lp is None else api_logprob(lp) for lp in logprobs],
        "top_logprobs": [None if lp is None else {tok.token_str(a): api_logprob(v) for a, v in list(top or ())[:k]}
                         for lp, top in zip(logprobs, tops)],
        "text_offset": list(offsets),
    }


def text_offsets(tok: Tokenizer, tokens: Sequence[int]) -> list[int]:
    """Where each token's text starts in ``tok.decode(tokens)`` (a special token, which
    decodes to nothing, where the next text starts), in one linear pass."""
    detok, offsets, length = IncrementalDetokenizer(tok), [], 0
    for t in tokens:
        offsets.append(length)
        length += len(detok.push(t))
    return offsets
