"""SamplingParams: what a request asks of generation, validated once when made.

Every field is checked here, so that an engine or a route never sees an
out-of-range value; the error names the field.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InvalidParameter


@dataclass(frozen=True)
class SamplingParams:
    # 0 means greedy (argmax); other values divide the logits.
    temperature: float = 1.0
    top_p: float = 1.0
    # 0 or -1: no top-k cut.
    top_k: int = 0
    # None: until EOS, a stop string, or the model's context is full.
    max_tokens: int | None = None
    # A request with a seed draws from its own generator, so its tokens do not
    # depend on anything else running.
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    # Keep the stop string in the returned text.
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        # Accept a single string / lists from callers, store tuples (hashable, immutable).
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif self.stop is None:
            object.__setattr__(self, "stop", ())
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        self._validate()

    def _validate(self) -> None:
        _number("temperature", self.temperature, lo=0.0)
        _number("top_p", self.top_p, lo=0.0, lo_open=True, hi=1.0)
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < -1:
            raise InvalidParameter("top_k", f"must be an integer >= -1 (0 or -1 disable it), got {self.top_k!r}")
        if self.max_tokens is not None and (
            isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1
        ):
            raise InvalidParameter("max_tokens", f"must be a positive integer or None, got {self.max_tokens!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise InvalidParameter("seed", f"must be an integer, got {self.seed!r}")
        for i, s in enumerate(self.stop):
            if not isinstance(s, str) or not s:
                raise InvalidParameter(f"stop[{i}]", f"must be a non-empty string, got {s!r}")
        for i, t in enumerate(self.stop_token_ids):
            if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                raise InvalidParameter(f"stop_token_ids[{i}]", f"must be a token id (int >= 0), got {t!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _number(name: str, value, *, lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise InvalidParameter(name, f"must be a number, got {value!r}")
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise InvalidParameter(name, f"must be {'>' if lo_open else '>='} {lo}, got {value}")
    if hi is not None and value > hi:
        raise InvalidParameter(name, f"must be <= {hi}, got {value}")
