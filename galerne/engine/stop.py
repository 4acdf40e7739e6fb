"""Stop strings over streamed text.

Text that might be the start of a stop string is held back, so that a client
never receives part of a stop string that is later cut off.
"""

from __future__ import annotations


class StopChecker:
    def __init__(self, stops: tuple[str, ...], include_stop: bool = False):
        self.stops = stops
        self.include_stop = include_stop
        self.pending = ""
        self.matched: str | None = None  # the stop string that ended the text

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
            self.matched = s
            return buf[: i + len(s) if self.include_stop else i], True
        hold = max((k for s in self.stops for k in range(1, min(len(s), len(buf) + 1)) if buf.endswith(s[:k])), default=0)
        self.pending = buf[len(buf) - hold :]
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        """The held-back text, once the stream ends without a stop string."""
        out, self.pending = self.pending, ""
        return out


def drain(detok, stopper: StopChecker) -> tuple[str, bool]:
    """Everything still held back (by the detokenizer, then the stop checker) when
    a stream ends; True if a stop string turned up in it."""
    text, stopped = stopper.push(detok.flush())
    return (text if stopped else text + stopper.flush()), stopped
