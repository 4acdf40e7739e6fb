"""A chat answer's parts, from the ids the model writes: its thinking, its content and
its tool calls, parsed once, as they come.

A reasoning model (tokenizer v13 and later with ``[THINK]`` and ``[/THINK]``: see
``Tokenizer.thinks``) thinks out loud before it answers::

    [THINK]the user greets me[/THINK]Hello![TOOL_CALLS]get_weather[ARGS]{"city": "Brest"}

The ids between ``[THINK]`` and ``[/THINK]`` are thinking, the others content, up to the
first ``[TOOL_CALLS]`` outside a thought, after which a ``ToolCallParser`` reads the
calls (see ``toolcalls``). ``AnswerParser.push`` takes each engine output (its ids and
the text the engine made of them) and returns what it adds to each part, so that the
API dialects stream them as they are generated; a whole answer is the same parse, read
to its end.

The text is the engine's (its stop strings applied, its held-back bytes released in
order): a part's text is the engine's text from where the part began, the part's start
being the length of the exact decode of the parts before it (control tokens write no
text). ``[THINK]`` and ``[/THINK]`` count as thinking tokens (``reasoning_tokens``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .base import Tokenizer
from .toolcalls import ToolCallParser, ToolEvent


@dataclass
class AnswerDelta:
    """What one output added: thinking text, content text, tool-call events."""

    thinking: str = ""
    content: str = ""
    tool_events: list[ToolEvent] = field(default_factory=list)


class AnswerParser:
    """One completion's thinking, content and tool calls.

    ``tools``: whether a ``[TOOL_CALLS]`` starts tool calls (the request allows them and
    the tokenizer knows their format). ``thinking``: whether ``[THINK]``/``[/THINK]`` split
    the answer (the tokenizer thinks; off for fill-in-the-middle). ``in_thought``: the
    answer starts inside a thought (it continues a prefix whose thinking is open).
    """

    def __init__(self, tokenizer: Tokenizer, *, tools: bool, thinking: bool = True, in_thought: bool = False):
        self.tokenizer = tokenizer
        self.marker = tokenizer.special_token_id("[TOOL_CALLS]") if tools and tokenizer.tool_call_format else None
        think = thinking and tokenizer.thinks
        self.begin = tokenizer.special_token_id("[THINK]") if think else None
        self.end = tokenizer.special_token_id("[/THINK]") if think else None
        self.calls: ToolCallParser | None = None  # after the first [TOOL_CALLS]
        self.thinking = ""  # the thinking text so far
        self.content = ""  # the content text so far
        self.thought = in_thought and self.begin is not None  # whether the answer has thought at all
        self.reasoning_tokens = 0
        self._in_thought = self.thought
        self._text = ""  # the engine's text of the answer so far
        self._ids: list[int] = []  # the open part's ids
        self._closed = ""  # the closed parts' text, of either kind: where the open part starts
        self._closed_thinking = ""
        self._closed_content = ""

    def push(self, ids: list[int], text: str) -> AnswerDelta:
        """An engine output: its answer ids (the stop token left out) and its text."""
        self._text += text
        events: list[ToolEvent] = []
        for t in ids:
            if self.calls is not None:
                events += self.calls.push(t)
            elif self._in_thought:
                self.reasoning_tokens += 1
                if t == self.end:
                    self._close()
                    self._in_thought = False
                else:
                    self._ids.append(t)
            elif t == self.begin:
                self.reasoning_tokens += 1
                self._close()
                self._in_thought = self.thought = True
            elif t == self.marker:
                self._close()
                self.calls = ToolCallParser(self.tokenizer)
                events += self.calls.push(t)
            else:
                self._ids.append(t)
        return self._delta(events)

    def finish(self, engine_reason: str) -> AnswerDelta:
        """The end of the answer (the engine's finish reason): the last call's end, or, when
        what followed ``[TOOL_CALLS]`` was no call and the answer was not cut short, that
        text (special tokens written out) as content, so that nothing the model said is lost."""
        delta = AnswerDelta()
        if self.calls is not None:
            delta.tool_events = self.calls.finish()
            if not self.calls.calls and engine_reason != "length":
                delta.content = self.calls.raw_text()
                self.content += delta.content
        return delta

    def _close(self) -> None:
        """The open part ends here: its exact text, from its ids."""
        piece = self.tokenizer.decode(self._ids)
        self._ids = []
        if self._in_thought:
            self._closed_thinking += piece
        else:
            self._closed_content += piece
        self._closed += piece

    def _delta(self, events: list[ToolEvent]) -> AnswerDelta:
        # The open part: the engine's text past the closed parts (none once calls began;
        # none yet while the engine still holds back the end of the closed ones).
        known = self.calls is None and self._text.startswith(self._closed)
        open_text = self._text[len(self._closed):] if known else ""
        thinking = self._closed_thinking + (open_text if self._in_thought else "")
        content = self._closed_content + ("" if self._in_thought else open_text)
        delta = AnswerDelta(_grown(self.thinking, thinking), _grown(self.content, content), events)
        self.thinking, self.content = thinking, content
        return delta


def _grown(before: str, now: str) -> str:
    """What ``now`` adds to ``before``; nothing when it does not extend it (SentencePiece
    drops the leading space of a decode that the engine's text keeps: the exact text
    replaces the streamed one, whose pieces were already sent)."""
    return now[len(before):] if now.startswith(before) else ""
