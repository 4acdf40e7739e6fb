"""Tool calls in a model's output: ``[TOOL_CALLS]`` and what follows it, parsed from
the token ids as they come, once.

The format depends on the tokenizer (``Tokenizer.tool_call_format``):

* "list" (v2-v7): ``[TOOL_CALLS][{"name": "f", "arguments": {...}}, ...]``, one JSON list
  (an object may carry an ``"id"``);
* "args" (v11+): ``[TOOL_CALLS]f[ARGS]{...}``, one marker per call
  (``f[CALL_ID]id[ARGS]{...}`` too).

``ToolCallParser`` follows a completion's ids after its first ``[TOOL_CALLS]`` and
says when a call begins (its id and name are known), when its arguments grow and
when it ends, so that each API dialect can stream what its clients expect. A whole
answer is the same parse, read to its end: streamed and not, the calls are the same.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from galerne.conversation import is_tool_call_id, new_tool_call_id

from .base import Tokenizer
from .detokenizer import IncrementalDetokenizer


@dataclass
class ToolEvent:
    """``begin``: a call's id and name are known; ``args``: more of its arguments' text;
    ``end``: the call is over (``arguments`` whole, as far as the output went)."""

    kind: str  # "begin" | "args" | "end"
    index: int
    id: str = ""
    name: str = ""
    arguments: str = ""


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str = ""  # JSON text, as the model wrote it

    @property
    def complete(self) -> bool:
        """Its arguments are a whole JSON object (False for a call the output cut short)."""
        try:
            return isinstance(json.loads(self.arguments), dict)
        except json.JSONDecodeError:
            return False

    def as_api(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ToolCallParser:
    """The calls of one completion, from the ids after its first ``[TOOL_CALLS]``."""

    tokenizer: Tokenizer
    calls: list[ToolCall] = field(default_factory=list)
    _ids: list[int] = field(default_factory=list)  # after the first marker, markers included
    # "args": the current call's name (and call-id) ids, then its argument detokenizer
    _head: list[int] | None = None
    _args: IncrementalDetokenizer | None = None
    # "list": the JSON text so far and a small scanner over it
    _text: str = ""
    _detok: IncrementalDetokenizer | None = None
    _scan: int = 0
    _depth: int = 0
    _in_string: bool = False
    _escape: bool = False
    _obj_start: int = -1

    def __post_init__(self) -> None:
        tok = self.tokenizer
        self.format = tok.tool_call_format
        if self.format is None:
            raise ValueError(f"{tok!r} has no tool-call format")
        self.marker = tok.special_token_id("[TOOL_CALLS]")
        self._args_id = tok.special_token_id("[ARGS]")
        self._call_id_id = tok.special_token_id("[CALL_ID]")
        if self.format == "list":
            self._detok = IncrementalDetokenizer(tok)

    def push(self, token_id: int) -> list[ToolEvent]:
        self._ids.append(token_id)
        if self.format == "args":
            return self._push_args(token_id)
        if token_id == self.marker:
            return []
        self._text += self._detok.push(token_id)
        return self._scan_json()

    def finish(self) -> list[ToolEvent]:
        """The events still due when the completion ends (the last call of the "args"
        format ends here)."""
        if self.format == "list":
            self._text += self._detok.flush()
            return self._scan_json()
        return self._end_current()

    def raw_text(self) -> str:
        """What followed the first marker, special tokens written out."""
        return self.tokenizer.decode(self._ids, keep_special=True)

    # "args": [TOOL_CALLS]name[ARGS]{...}, arguments streamed as they come
    def _push_args(self, token_id: int) -> list[ToolEvent]:
        if token_id == self.marker:
            events = self._end_current()  # a new marker closes the call before it
            self._head = []
            return events
        if self._args is not None:
            piece = self._args.push(token_id)
            self.calls[-1].arguments += piece
            return [ToolEvent("args", len(self.calls) - 1, arguments=piece)] if piece else []
        if self._head is None:  # after a call's arguments were closed by nothing: not ours
            return []
        if token_id != self._args_id:
            self._head.append(token_id)
            return []
        head, cid = self._head, None
        if self._call_id_id is not None and self._call_id_id in head:
            k = head.index(self._call_id_id)
            head, cid = head[:k], self.tokenizer.decode(head[k + 1:]).strip()
        call = ToolCall(cid if is_tool_call_id(cid) else new_tool_call_id(), self.tokenizer.decode(head).strip())
        self.calls.append(call)
        self._head = None
        self._args = IncrementalDetokenizer(self.tokenizer)
        return [ToolEvent("begin", len(self.calls) - 1, call.id, call.name)]

    def _end_current(self) -> list[ToolEvent]:
        if self._args is None:
            return []
        call, i = self.calls[-1], len(self.calls) - 1
        tail = self._args.flush()
        self._args = None
        call.arguments += tail
        return ([ToolEvent("args", i, arguments=tail)] if tail else []) + [
            ToolEvent("end", i, call.id, call.name, call.arguments)]

    # "list": one JSON list; each object is a call when it closes
    def _scan_json(self) -> list[ToolEvent]:
        events = []
        text = self._text
        while self._scan < len(text):
            c = text[self._scan]
            if self._in_string:
                if self._escape:
                    self._escape = False
                elif c == "\\":
                    self._escape = True
                elif c == '"':
                    self._in_string = False
            elif c == '"':
                self._in_string = True
            elif c in "[{":
                if c == "{" and self._depth == 1:
                    self._obj_start = self._scan
                self._depth += 1
            elif c in "]}":
                self._depth -= 1
                if c == "}" and self._depth == 1 and self._obj_start >= 0:
                    events += self._object(text[self._obj_start : self._scan + 1])
                    self._obj_start = -1
            self._scan += 1
        return events

    def _object(self, text: str) -> list[ToolEvent]:
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            return []
        if not (isinstance(obj, dict) and isinstance(obj.get("name"), str) and isinstance(obj.get("arguments"), dict)):
            return []
        cid = obj.get("id")
        call = ToolCall(cid if is_tool_call_id(cid) else new_tool_call_id(), obj["name"],
                        json.dumps(obj["arguments"], ensure_ascii=False))
        self.calls.append(call)
        i = len(self.calls) - 1
        return [ToolEvent("begin", i, call.id, call.name), ToolEvent("args", i, arguments=call.arguments),
                ToolEvent("end", i, call.id, call.name, call.arguments)]
