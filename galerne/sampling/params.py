"""SamplingParams: what a request asks of generation, validated once when made.

Every field is checked here, so that an engine or a route never sees an
out-of-range value; the error names the field (``InvalidParameter.field``, and
the message starts with it).

Semantics (the sampler applies them in this order, see ``sampler.sample_batch``):

* ``repetition_penalty`` (HF/vLLM): every token id seen in the prompt *or* the
  output so far has its logit divided by the penalty when positive, multiplied
  when negative. 1.0 is off.
* ``presence_penalty`` / ``frequency_penalty`` (OpenAI): over the *generated*
  tokens only, ``logit[t] -= presence * (count[t] > 0) + frequency * count[t]``.
  0.0 is off.
* ``logit_bias``: ``logit[t] += bias`` for each (token id, bias) pair. Ids are
  checked against the vocabulary by ``engine.request.validate_request`` (and the
  sampler), not here.
* ``min_tokens``: EOS and ``stop_token_ids`` cannot be drawn until this many
  tokens were generated (stop *strings* are not affected).
* ``temperature`` (0 = greedy), then ``top_k``, ``top_p``, ``min_p`` (keep the
  tokens whose probability is at least ``min_p`` times the most likely one's).
* ``guided`` (a ``guided.Guidance``): every token the grammar does not allow
  next is masked (-inf), for greedy and sampled rows alike; when the grammar is
  complete the completion ends with finish reason "stop". Compiled when the
  request is added (an invalid grammar is an InvalidParameter there).
* ``logprobs``: None returns none; k in 0..20 returns the chosen token's
  logprob and up to k most likely alternatives (tokens the row cannot draw, such
  as those a grammar forbids, are left out). They are the log-softmax of the
  logits after penalties, bias and masking (grammar included), before
  temperature and the top-k/top-p/min-p cuts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import InvalidParameter
from .guided import Guidance

MAX_N = 128
MAX_LOGPROBS = 20
# Stop strings: at most 16, of at most 1024 characters each (OpenAI allows 4). Every
# generated token is checked against each of them (engine/stop.py, linear in the new
# text), and the text held back for a possible match is up to the longest one.
MAX_STOP = 16
MAX_STOP_CHARS = 1024
MAX_LOGIT_BIAS = 100.0
# torch.Generator.manual_seed accepts this inclusive range.
_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1
# The temperature Mistral recommends for its models, which La Plateforme (the Mistral
# API) applies to a request that gives none. galerne's Mistral dialect, its model card's
# default_model_temperature and `galerne generate`/`chat` use it; SamplingParams' own
# default (as vLLM's, and the OpenAI API's) is the neutral 1.0.
MISTRAL_DEFAULT_TEMPERATURE = 0.7


@dataclass(frozen=True)
class SamplingParams:
    # 0 means greedy (argmax); other values divide the logits.
    temperature: float = 1.0
    top_p: float = 1.0
    # 0 or -1: no top-k cut.
    top_k: int = 0
    # None: until EOS, a stop string, or the model's context is full. 0: nothing is
    # generated, the prompt is only computed (for prompt_logprobs: scoring a text).
    max_tokens: int | None = None
    # A request with a seed draws from its own generator, so its tokens do not
    # depend on anything else running. With n > 1, completion i uses seed + i.
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    # Keep the stop string in the returned text.
    include_stop_str_in_output: bool = False
    # How many completions to return for the prompt (1..128).
    n: int = 1
    # Keep tokens with probability >= min_p * (the highest probability); 0 is off.
    min_p: float = 0.0
    # OpenAI penalties over the generated tokens, in [-2, 2]; 0 is off.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # HF/vLLM penalty over prompt and generated tokens, > 0; 1 is off.
    repetition_penalty: float = 1.0
    # Given as a mapping {token id: bias} (ids may be decimal strings, as in
    # OpenAI JSON) or pairs; stored as a tuple of (id, bias) pairs sorted by id,
    # None when empty. Each bias is in [-100, 100].
    logit_bias: tuple[tuple[int, float], ...] | None = None
    # EOS and stop_token_ids are masked until this many tokens were generated.
    min_tokens: int = 0
    # None: no logprobs. 0..20: the chosen token's logprob plus that many top alternatives.
    logprobs: int | None = None
    # Grammar-constrained decoding (JSON schema, JSON object, Lark, regex); None is off.
    guided: Guidance | None = None
    # None: none. 0..20: each prompt token's logprob (the first has none), its rank, and
    # that many top alternatives, of the model's raw logits (nothing above applies).
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        # Accept a single string / lists from callers, store tuples (hashable, immutable).
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif self.stop is None:
            object.__setattr__(self, "stop", ())
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        object.__setattr__(self, "logit_bias", _logit_bias(self.logit_bias))
        self._validate()

    def _validate(self) -> None:
        _number("temperature", self.temperature, lo=0.0)
        _number("top_p", self.top_p, lo=0.0, lo_open=True, hi=1.0)
        if not _is_int(self.top_k) or self.top_k < -1:
            raise InvalidParameter("top_k", f"must be an integer >= -1 (0 or -1 disable it), got {self.top_k!r}")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 0):
            raise InvalidParameter("max_tokens", f"must be an integer >= 0 or None, got {self.max_tokens!r}")
        if self.seed is not None:
            if not _is_int(self.seed):
                raise InvalidParameter("seed", f"must be an integer, got {self.seed!r}")
            if not _SEED_MIN <= self.seed <= _SEED_MAX:
                raise InvalidParameter("seed", f"must be in [-2**63, 2**64 - 1], got {self.seed}")
        if len(self.stop) > MAX_STOP:
            raise InvalidParameter("stop", f"at most {MAX_STOP} stop strings, got {len(self.stop)}")
        for i, s in enumerate(self.stop):
            if not isinstance(s, str) or not s:
                raise InvalidParameter(f"stop[{i}]", f"must be a non-empty string, got {_short_repr(s)}")
            if len(s) > MAX_STOP_CHARS:
                raise InvalidParameter(f"stop[{i}]", f"a stop string has at most {MAX_STOP_CHARS} characters, got {len(s)}")
        for i, t in enumerate(self.stop_token_ids):
            if not _is_int(t) or t < 0:
                raise InvalidParameter(f"stop_token_ids[{i}]", f"must be a token id (int >= 0), got {t!r}")
        if not _is_int(self.n) or not 1 <= self.n <= MAX_N:
            raise InvalidParameter("n", f"must be an integer in 1..{MAX_N}, got {self.n!r}")
        _number("min_p", self.min_p, lo=0.0, hi=1.0)
        _number("presence_penalty", self.presence_penalty, lo=-2.0, hi=2.0)
        _number("frequency_penalty", self.frequency_penalty, lo=-2.0, hi=2.0)
        _number("repetition_penalty", self.repetition_penalty, lo=0.0, lo_open=True)
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise InvalidParameter("min_tokens", f"must be an integer >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidParameter(
                "min_tokens", f"({self.min_tokens}) must not be more than max_tokens ({self.max_tokens})"
            )
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise InvalidParameter("logprobs", f"must be None or an integer in 0..{MAX_LOGPROBS}, got {self.logprobs!r}")
        if self.prompt_logprobs is not None and (
                not _is_int(self.prompt_logprobs) or not 0 <= self.prompt_logprobs <= MAX_LOGPROBS):
            raise InvalidParameter("prompt_logprobs",
                                   f"must be None or an integer in 0..{MAX_LOGPROBS}, got {self.prompt_logprobs!r}")
        if self.guided is not None and not isinstance(self.guided, Guidance):
            raise InvalidParameter("guided", f"must be a Guidance or None, got {type(self.guided).__name__}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def logit_bias_dict(self) -> dict[int, float]:
        return dict(self.logit_bias or ())


def _short_repr(value) -> str:
    text = repr(value)
    return text if len(text) <= 100 else text[:100] + "..."


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(name: str, value, *, lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidParameter(name, f"must be a finite number, got {value!r}")
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise InvalidParameter(name, f"must be {'>' if lo_open else '>='} {lo}, got {value}")
    if hi is not None and value > hi:
        raise InvalidParameter(name, f"must be <= {hi}, got {value}")


def _logit_bias(value) -> tuple[tuple[int, float], ...] | None:
    """Normalise logit_bias to sorted (id, bias) pairs, or None; validate it."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(value, (str, bytes)):
        raise InvalidParameter("logit_bias", f"must be a mapping of token id to bias, got {value!r}")
    else:
        try:
            items = [tuple(p) for p in value]
        except TypeError:
            raise InvalidParameter("logit_bias", f"must be a mapping of token id to bias, got {value!r}") from None
        if any(len(p) != 2 for p in items):
            raise InvalidParameter("logit_bias", "must be a mapping of token id to bias, or (id, bias) pairs")
    out: dict[int, float] = {}
    for key, bias in items:
        tid = key
        if isinstance(key, str) and key.strip().lstrip("+-").isdigit():
            tid = int(key)
        if not _is_int(tid) or tid < 0:
            raise InvalidParameter("logit_bias", f"keys must be token ids (int >= 0), got {key!r}")
        if tid in out:
            raise InvalidParameter("logit_bias", f"token id {tid} is given twice")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not math.isfinite(bias):
            raise InvalidParameter("logit_bias", f"bias for token {tid} must be a finite number, got {bias!r}")
        if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
            raise InvalidParameter("logit_bias", f"bias for token {tid} must be in [-100, 100], got {bias}")
        out[tid] = float(bias)
    return tuple(sorted(out.items())) or None
