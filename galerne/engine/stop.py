"""Stop strings over streamed text.

Text that might be the start of a stop string is held back, so that a client
never receives part of a stop string that is later cut off.

Each push costs time linear in the new text, whatever the stop strings' length:
per stop string, the longest prefix of it that the text so far ends with is kept
up to date by the Knuth-Morris-Pratt automaton (a stop string's table is made
once per string). SamplingParams bounds how many stop strings a request has and
how long they are (``MAX_STOP``, ``MAX_STOP_CHARS``).
"""

from __future__ import annotations

from array import array
from functools import lru_cache


class StopChecker:
    def __init__(self, stops: tuple[str, ...], include_stop: bool = False):
        self.stops = stops
        self.include_stop = include_stop
        self.pending = ""
        self.matched: str | None = None  # the stop string that ended the text
        self._tables = [_borders(s) for s in stops]
        self._partial = [0] * len(stops)  # per stop string: how much of it the text so far ends with

    def push(self, text: str) -> tuple[str, bool]:
        """Add newly decoded text; returns (text safe to emit, whether a stop string ended it)."""
        if not self.stops:
            return text, False
        buf = self.pending + text
        # An occurrence must end inside ``text`` and can only start inside
        # ``pending`` (the longest partial match kept last time), so searching
        # ``buf`` finds every new one. The earliest wins.
        hits = [(i, s) for s in self.stops if (i := buf.find(s)) >= 0]
        if hits:
            i, s = min(hits)
            self.pending = ""
            self._partial = [0] * len(self.stops)
            self.matched = s
            return buf[: i + len(s) if self.include_stop else i], True
        hold = 0
        for j, s in enumerate(self.stops):
            self._partial[j] = k = _advance(s, self._tables[j], self._partial[j], text)
            hold = max(hold, k)
        self.pending = buf[len(buf) - hold :]
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        """The held-back text, once the stream ends without a stop string."""
        out, self.pending = self.pending, ""
        self._partial = [0] * len(self.stops)
        return out


@lru_cache(maxsize=256)  # bounded in bytes too: stop strings are at most MAX_STOP_CHARS long
def _borders(s: str) -> array:
    """KMP's failure table: ``t[k]`` is the length of the longest proper border of ``s[:k + 1]``."""
    t = array("i", [0]) * len(s)
    k = 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = t[k - 1]
        if s[i] == s[k]:
            k += 1
        t[i] = k
    return t


def _advance(s: str, borders: array, k: int, text: str) -> int:
    """How much of ``s`` the text ends with after ``text``, given it ended with ``s[:k]``."""
    i, n = 0, len(text)
    while i < n:
        if k == 0:  # skip to the next place ``s`` could start (str.find: C speed)
            i = text.find(s[0], i)
            if i < 0:
                return 0
        ch = text[i]
        while k and s[k] != ch:
            k = borders[k - 1]
        if s[k] == ch:
            k += 1
            if k == len(s):  # a whole occurrence (push has found none): go on from its border
                k = borders[k - 1]
        i += 1
    return k


def drain(detok, stopper: StopChecker) -> tuple[str, bool]:
    """Everything still held back (by the detokenizer, then the stop checker) when
    a stream ends; True if a stop string turned up in it."""
    text, stopped = stopper.push(detok.flush())
    return (text if stopped else text + stopper.flush()), stopped
