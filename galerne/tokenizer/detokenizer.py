"""Generated ids to text, as they arrive."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from .base import Tokenizer


class IncrementalDetokenizer:
    """Streaming decode of generated ids: push one id at a time, get back the newly completed text.

    ``"".join(pushes) + flush()`` is exactly ``tokenizer.decode(generated_ids)`` after a chat
    prompt (or none), and exactly the text the ids add to the prompt's after a prompt that ends
    mid-sentence: there the first word keeps its leading space, which SentencePiece drops from
    the first word of a decode.

    Each push decodes a short window (a few ids whose text was already emitted + the new ones)
    and diffs it against the window's already-emitted text. Text ending in U+FFFD is held
    back: it is a UTF-8 character whose remaining bytes are still to come.

    Every step is bounded, whatever the ids (this runs on the engine's thread, once per
    sequence: ``n`` of them per request): the set-up decodes at most ``_LOOKBACK`` prompt
    ids, a few times; text is held back for at most ``_MAX_HELD`` ids (a character is at
    most 4 bytes, so 4 ids): past that the ids are bytes that make no text (or ids that
    decode to nothing), and what they decode to (U+FFFD) is emitted, so that a window never
    grows with the answer. Only the ids a window can still need are kept.
    """

    _CONTEXT = 5  # prompt ids decoded with the first generated ones
    _LOOKBACK = _CONTEXT + 8  # the most prompt ids the first window looks back over
    _MAX_HELD = 16  # the most ids whose text is held back
    _TRIM = 1024  # ids before the window are dropped when this many have piled up

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = ()):
        self._tokenizer = tokenizer
        self._ids = list(prompt_ids[-self._LOOKBACK :])
        self._read_offset = len(self._ids)  # the text of the ids before this was emitted
        self._prefix_offset = self._first_window_start()
        self._prefix_text = self._decode(self._prefix_offset, self._read_offset)

    def _first_window_start(self) -> int:
        # A few prompt ids back, for the leading space; further back (a few ids: a
        # character is at most 4 bytes) while the window would open mid-character (HF byte
        # fallback decodes a byte run with a stray byte as all U+FFFD); never past a special
        # token: after [/INST] the answer starts a new text, whose first word has no leading
        # space in tokenizer.decode(generated) either. Bytes that are no text at all (the
        # window still opens on U+FFFD _LOOKBACK ids back) are not looked past: that would
        # not mend them, and would cost the square of their number.
        end = start = len(self._ids)
        while start > 0 and not self._tokenizer.is_special(self._ids[start - 1]):
            if end - start >= self._CONTEXT and not self._decode(start, end).startswith("\ufffd"):
                break
            start -= 1
        return start

    def _decode(self, start: int, end: int) -> str:
        return self._tokenizer.decode(self._ids[start:end])

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        text = self._decode(self._prefix_offset, len(self._ids))
        if len(text) > len(self._prefix_text) and not text.endswith("\ufffd"):
            return self._emit(text)
        if len(self._ids) - self._read_offset < self._MAX_HELD:
            return ""  # nothing yet, or a character still incomplete
        # Held back for _MAX_HELD ids: bytes that make no text, or ids that decode to
        # nothing. Emit up to the last id boundary whose text is settled: a prefix of the
        # window's text, with 3 ids (a character's other bytes, at most) after it.
        for end in range(len(self._ids) - 3, self._read_offset, -1):
            head = self._decode(self._prefix_offset, end)
            if text.startswith(head):
                return self._emit(head, end)
        return self._emit(text)

    def flush(self) -> str:
        """The text still held back (an incomplete character comes out as U+FFFD)."""
        text = self._decode(self._prefix_offset, len(self._ids))
        return self._emit(text) if len(text) > len(self._prefix_text) else ""

    def _emit(self, text: str, end: int | None = None) -> str:
        """Emit the window's ``text`` (that of the ids up to ``end``, default all)."""
        new = text[len(self._prefix_text) :]
        # The next window opens where this text started: a character boundary, and at least
        # one id before the new ones, whose text is the reference to diff against.
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids) if end is None else end
        self._prefix_text = self._decode(self._prefix_offset, self._read_offset)
        if self._prefix_offset >= self._TRIM:  # the ids before the window: never read again
            del self._ids[: self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0
        return new
