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
    """

    _CONTEXT = 5  # prompt ids decoded with the first generated ones

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = ()):
        self._tokenizer = tokenizer
        self._ids = list(prompt_ids)
        self._read_offset = len(self._ids)  # the text of the ids before this was emitted
        self._prefix_offset = self._first_window_start()
        self._prefix_text = self._decode(self._prefix_offset, self._read_offset)

    def _first_window_start(self) -> int:
        # A few prompt ids back, for the leading space; further back while the window would
        # open mid-character (HF byte fallback decodes a byte run with a stray byte as all
        # U+FFFD); never past a special token: after [/INST] the answer starts a new text,
        # whose first word has no leading space in tokenizer.decode(generated) either.
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
        if len(text) <= len(self._prefix_text) or text.endswith("\ufffd"):
            return ""  # nothing yet, or a character still incomplete
        return self._emit(text)

    def flush(self) -> str:
        """The text still held back (an incomplete character comes out as U+FFFD)."""
        text = self._decode(self._prefix_offset, len(self._ids))
        return self._emit(text) if len(text) > len(self._prefix_text) else ""

    def _emit(self, text: str) -> str:
        new = text[len(self._prefix_text) :]
        # The next window opens where this text started: a character boundary, and at least
        # one id before the new ones, whose text is the reference to diff against.
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self._prefix_text = self._decode(self._prefix_offset, self._read_offset)
        return new
