"""Tool calls in the model's output: ``[TOOL_CALLS]`` and what follows it.

The format depends on the tokenizer version (mistral-common's parser reads them all):

* v2-v7: ``[TOOL_CALLS][{"name": "f", "arguments": {...}}, ...]``, one JSON list;
* v11+: ``[TOOL_CALLS]f[ARGS]{...}``, one marker per call (``f[CALL_ID]id[ARGS]{...}`` too).

``ToolCallStream`` follows a completion's ids after its first ``[TOOL_CALLS]``
and says when a call begins, when its arguments grow and when it is complete, so
that each dialect can stream what its clients expect (OpenAI: a first delta with
id and name, then argument pieces; Mistral: each call whole). A whole answer is
the same stream, read to its end: streamed and not, the calls are the same.

Output that is not a well-formed call (a model that went astray) is returned as
text content, special tokens written out, with finish_reason "stop": never
dropped, never a 500. Grammar-constrained decoding (``tool_choice`` any/required
or a named function) makes the output always parse.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass, field

from ..tokenizer import IncrementalDetokenizer, Tokenizer

_ID = re.compile(r"[a-zA-Z0-9]{9}")
_ALPHABET = string.ascii_letters + string.digits


def new_call_id() -> str:
    """A tool-call id as Mistral's API makes them: 9 characters of [a-zA-Z0-9]."""
    return "".join(secrets.choice(_ALPHABET) for _ in range(9))


def _call(call: dict) -> dict:
    """mistral-common's parsed call as an API tool call (arguments as a JSON string)."""
    cid = call.get("id")
    return {
        "id": cid if isinstance(cid, str) and _ID.fullmatch(cid) else new_call_id(),
        "type": "function",
        "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)},
    }


# ------------------------------------------------------------------ streaming


@dataclass
class ToolEvent:
    """``begin``: a call's id and name are known; ``args``: more of its arguments' text;
    ``end``: the call is complete (``arguments`` whole)."""

    kind: str  # "begin" | "args" | "end"
    index: int
    id: str = ""
    name: str = ""
    arguments: str = ""


@dataclass
class _Call:
    id: str
    name: str
    arguments: str = ""


@dataclass
class ToolCallStream:
    """Follows the ids after the first ``[TOOL_CALLS]`` of one completion."""

    tokenizer: Tokenizer
    marker: int
    calls: list[_Call] = field(default_factory=list)
    _ids: list[list[int]] = field(default_factory=list)  # one list per marker
    # v11+: the current call's name (and call-id) ids, then its argument detokenizer
    _head: list[int] = field(default_factory=list)
    _args: IncrementalDetokenizer | None = None
    # v2-v7: the JSON text so far and a small scanner over it
    _text: str = ""
    _detok: IncrementalDetokenizer | None = None
    _scan: int = 0
    _depth: int = 0
    _in_string: bool = False
    _escape: bool = False
    _obj_start: int = -1

    def __post_init__(self) -> None:
        self._args_id = self.tokenizer.special_token_id("[ARGS]")
        self._call_id_id = self.tokenizer.special_token_id("[CALL_ID]")

    def push(self, token_id: int) -> list[ToolEvent]:
        if token_id == self.marker:
            events = self._end_current()  # v11+: a new marker closes the call before it
            self._ids.append([])
            self._head = []
            if self._detok is None and self._args_id is None:
                self._detok = IncrementalDetokenizer(self.tokenizer)
            return events
        if not self._ids:
            return []
        self._ids[-1].append(token_id)
        if self._args_id is not None:
            return self._push_v11(token_id)
        self._text += self._detok.push(token_id)
        return self._scan_json()

    def finish(self) -> tuple[list[ToolEvent], bool]:
        """Events still due at the end, and whether the output turned out not to be a call
        at all (nothing well-formed, nothing streamed as one): then ``raw_text`` is the answer."""
        events = self._end_current()
        try:
            parsed = [_call(c) for c in self.tokenizer.decode_tool_calls(self._ids)] if self._ids else []
        except ValueError:
            parsed = []
        if not parsed and not self.calls:
            return events, True
        # Calls the scanner could not see (e.g. an odd layout) come out whole at the end.
        for call in parsed[len(self.calls):]:
            self.calls.append(_Call(call["id"], call["function"]["name"], call["function"]["arguments"]))
            i = len(self.calls) - 1
            events += [ToolEvent("begin", i, call["id"], call["function"]["name"]),
                       ToolEvent("args", i, arguments=call["function"]["arguments"]),
                       ToolEvent("end", i, call["id"], call["function"]["name"], call["function"]["arguments"])]
        return events, False

    def raw_text(self) -> str:
        """What followed the first marker, special tokens written out."""
        return self.tokenizer.decode([t for group in self._ids for t in [self.marker, *group]], keep_special=True)

    # v11+: [TOOL_CALLS]name[ARGS]{...}, arguments streamed as they come
    def _push_v11(self, token_id: int) -> list[ToolEvent]:
        if self._args is not None:
            piece = self._args.push(token_id)
            self.calls[-1].arguments += piece
            return [ToolEvent("args", len(self.calls) - 1, arguments=piece)] if piece else []
        if token_id != self._args_id:
            self._head.append(token_id)
            return []
        head = self._head
        cid = None
        if self._call_id_id is not None and self._call_id_id in head:
            k = head.index(self._call_id_id)
            head, cid = head[:k], self.tokenizer.decode(head[k + 1:]).strip()
        call = _Call(cid if cid and _ID.fullmatch(cid) else new_call_id(), self.tokenizer.decode(head).strip())
        self.calls.append(call)
        self._args = IncrementalDetokenizer(self.tokenizer)
        return [ToolEvent("begin", len(self.calls) - 1, call.id, call.name)]

    def _end_current(self) -> list[ToolEvent]:
        if self._args is None or not self.calls:
            return []
        call, i = self.calls[-1], len(self.calls) - 1
        tail = self._args.flush()
        self._args = None
        call.arguments += tail
        return ([ToolEvent("args", i, arguments=tail)] if tail else []) + [
            ToolEvent("end", i, call.id, call.name, call.arguments)]

    # v2-v7: one JSON list; each object is sent when it closes
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
        call = _call(obj)
        fn = call["function"]
        self.calls.append(_Call(call["id"], fn["name"], fn["arguments"]))
        i = len(self.calls) - 1
        return [ToolEvent("begin", i, call["id"], fn["name"]), ToolEvent("args", i, arguments=fn["arguments"]),
                ToolEvent("end", i, call["id"], fn["name"], fn["arguments"])]
