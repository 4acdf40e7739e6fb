"""A chat request's conversation, normalised and checked once.

Messages, tools, ``tool_choice``, ``response_format`` and tool-call ids come in
the shapes of OpenAI's and Mistral's APIs (and of mistral-finetune's JSONL
lines). ``Conversation.parse`` checks them, naming the field at fault
(``messages[2].tool_calls[0].function.name``), and returns one normalised form
that the server, the tokenizers (``Tokenizer.encode_chat``), the grammar
compiler (``guided.guidance_for_chat``) and the fine-tuning data reader all
read. Nothing downstream re-checks or re-parses these options.

Pure Python (no torch, no tokenizer): the tokenizer package sits above it.

What is checked here is the *shape*: roles, content kinds, tool calls, tool
definitions and their JSON schemas, the tool choice against the tools. The
conversation *rules* of a prompt format (role order, every call answered) stay
with mistral-common or the model's chat template, which name the field too.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import string
from dataclasses import dataclass, field
from typing import Any

from .cache import byte_cached
from .errors import InvalidParameter

# ------------------------------------------------------------------ tool-call ids

# Mistral's tool-call ids: 9 characters of [a-zA-Z0-9] (mistral-common's validator,
# mistral-finetune's data rule, La Plateforme's answers).
TOOL_CALL_ID = re.compile(r"[a-zA-Z0-9]{9}")
_ID_ALPHABET = string.ascii_letters + string.digits


def is_tool_call_id(value: Any) -> bool:
    return isinstance(value, str) and TOOL_CALL_ID.fullmatch(value) is not None


def new_tool_call_id() -> str:
    """A fresh tool-call id, as Mistral's API makes them."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(9))


def mistral_tool_call_id(foreign_id: str) -> str:
    """A tool-call id in the form mistral-common accepts.

    Valid ids are kept. Others (e.g. OpenAI's ``call_...``) are hashed: a pure
    function of the id, so an assistant's call and its tool result map alike, in
    this request and in the next turn's replay of the same conversation, with no
    state to keep.
    """
    if is_tool_call_id(foreign_id):
        return foreign_id
    return hashlib.sha256(foreign_id.encode()).hexdigest()[:9]


# ------------------------------------------------------------------ text


def find_lone_surrogate(value: Any) -> tuple[tuple, str] | None:
    """Where the first lone UTF-16 surrogate in a JSON value's strings (dict keys
    included) is, and the surrogate; None if there is none.

    JSON may escape half of a surrogate pair (``"\\ud800"``); Python decodes it to a
    ``str`` that is not valid Unicode, which every encoder (the tokenizers, llguidance)
    fails on. ``where`` is a path of keys and indexes (a key's own surrogate: the
    path to that key, the key written with escapes as ``ascii`` writes it). Linear in
    the value's size, without recursion."""
    todo: list[tuple[Any, Any, Any]] = [(None, None, value)]  # (parent entry, key, node)
    while todo:
        entry = todo.pop()
        node = entry[2]
        if isinstance(node, str):
            bad = _surrogate(node)
            if bad is not None:
                return _path(entry), bad
        elif isinstance(node, dict):
            items = list(node.items())
            for k, _ in items:
                bad = _surrogate(k) if isinstance(k, str) else None
                if bad is not None:  # the key is written escaped: the path goes into error bodies
                    return _path((entry, ascii(k)[1:-1], None)), bad
            todo += [(entry, k, v) for k, v in reversed(items)]
        elif isinstance(node, (list, tuple)):
            todo += [(entry, i, v) for i, v in reversed(list(enumerate(node)))]
    return None


def _surrogate(text: str) -> str | None:
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return text[e.start]
    return None


def _path(entry) -> tuple:
    out = []
    while entry is not None and entry[0] is not None:
        out.append(entry[1])
        entry = entry[0]
    return tuple(reversed(out))


def field_name(where: tuple, base: str = "") -> str:
    """``("messages", 0, "content")`` as galerne names fields: ``messages[0].content``."""
    out = base
    for part in where:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out


def surrogate_message(char: str) -> str:
    return f"contains a lone UTF-16 surrogate ({ascii(char)[1:-1]}), which is not valid Unicode text"


def check_text(value: Any, field: str) -> None:
    """Raise InvalidParameter naming ``field`` (and the place inside it) if a string in
    ``value`` holds a lone surrogate (see ``find_lone_surrogate``)."""
    found = find_lone_surrogate(value)
    if found is not None:
        where, char = found
        raise InvalidParameter(field_name(where, field), surrogate_message(char))


# ------------------------------------------------------------------ the normalised form

ROLES = ("system", "user", "assistant", "tool")
TEXT_PARTS = ("text", "thinking")  # content parts the engine can feed (thinking: reasoning models)
# Where a thinking part may be: an assistant's earlier reasoning, and a system prompt that
# shows the model how to think (Magistral's). mistral-common refuses it anywhere else.
THINKING_ROLES = ("assistant", "system")
# OpenAI's (and mistral-common's) reasoning_effort values; which ones a model takes, if
# any, its tokenizer says (tokenizer v15's model settings).
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")
# What a bare "json_object" response format asks for: any JSON object (OpenAI's JSON mode).
JSON_OBJECT_SCHEMA: dict[str, Any] = {"type": "object"}
# The most nested objects and lists a JSON schema may have (32 levels of "properties"):
# real schemas stay far below, and the checkers (jsonschema, the prompt encoder) recurse
# on each level, so a deeper one is refused before it reaches them.
MAX_SCHEMA_DEPTH = 64
# What the checks of JSON schemas keep, keyed by the schemas' text (see galerne.cache).
SCHEMA_CHECK_CACHE_BYTES = 16 << 20


@dataclass(frozen=True)
class ToolChoice:
    """``mode``: "auto" (the model may call a tool), "none" (it may not) or "required"
    (it must; ``function``, when set, is the one it must call). Mistral's "any" is
    "required"."""

    mode: str = "auto"
    function: str | None = None


@dataclass
class Conversation:
    """A checked chat request's conversation and options.

    ``messages``: copies holding only the keys galerne uses: ``role`` (OpenAI's
    "developer" read as "system"), ``content`` (a string, a list of text/thinking
    parts and, in user messages, ``{"type": "image_url", "url": str}`` parts, or None for an assistant turn with tool calls only; a thinking part is
    ``{"type": "thinking", "thinking": str, "closed": bool}`` whichever API shape it
    came in, and an assistant's OpenAI-style ``reasoning_content`` is one, first), and per role
    ``tool_calls`` (assistant; each ``{"id"?, "type", "function": {"name",
    "arguments"}}``, arguments as given: a JSON string or an object),
    ``tool_call_id`` / ``name`` (tool; the name filled in from the call it
    answers), ``weight`` (assistant, training data only). ``continue_final``: the
    last message is an assistant prefix the answer continues (Mistral's
    ``prefix: true``). ``response_schema``: the JSON schema the answer must match
    (None: free text); ``response_format``: the request's, checked, as mistral-common
    takes it (tokenizer v15 writes its schema into the prompt). ``reasoning_effort``:
    one of REASONING_EFFORTS or None (see ``Tokenizer.takes_reasoning_effort``).
    """

    messages: list[dict]
    tools: list[dict] | None = None
    tool_choice: ToolChoice = field(default_factory=ToolChoice)
    parallel_tool_calls: bool = True
    response_schema: dict | None = None
    continue_final: bool = False
    response_format: dict | None = None
    reasoning_effort: str | None = None

    @classmethod
    def parse(cls, messages: Any, *, tools: Any = None, tool_choice: Any = None, response_format: Any = None,
              parallel_tool_calls: Any = True, reasoning_effort: Any = None) -> Conversation:
        """Check a chat request's conversation and options (API shapes); raises
        ``InvalidParameter`` naming the field."""
        for name, value in (("messages", messages), ("tools", tools), ("tool_choice", tool_choice),
                            ("response_format", response_format)):
            check_text(value, name)
        checked, prefix = check_messages(messages)
        tools = check_tools(tools)
        if not isinstance(parallel_tool_calls, bool):
            raise InvalidParameter("parallel_tool_calls", f"must be a boolean, got {parallel_tool_calls!r}")
        if reasoning_effort is not None and reasoning_effort not in REASONING_EFFORTS:
            raise InvalidParameter("reasoning_effort",
                                   f"must be one of {', '.join(REASONING_EFFORTS)}, got {reasoning_effort!r}")
        schema = response_schema(response_format)
        fmt = None if schema is None else (
            {"type": "json_object"} if response_format.get("type") == "json_object" else
            {"type": "json_schema", "json_schema": {**response_format["json_schema"], "schema": schema}})
        return cls(checked, tools, parse_tool_choice(tool_choice, tools), parallel_tool_calls,
                   schema, prefix, fmt, reasoning_effort)

    @property
    def images(self) -> list[tuple[str, str]]:
        """(field, URL) of every image part, in order (``messages[0].content[1].image_url``)."""
        return image_parts(self.messages)

    @property
    def open_thinking(self) -> bool:
        """The answer continues a prefix that ends inside its thinking (a last thinking
        part with ``closed: false``): the model's first tokens are thinking."""
        last = self.messages[-1]["content"] if self.continue_final else None
        return isinstance(last, list) and bool(last) and last[-1]["type"] == "thinking" and not last[-1]["closed"]

    @property
    def calls_allowed(self) -> bool:
        """Whether the model may answer with tool calls."""
        return bool(self.tools) and self.tool_choice.mode != "none"

    @property
    def forced_tools(self) -> list[dict] | None:
        """The tools one of which the answer must call (None: calls are not forced)."""
        if self.tool_choice.mode != "required":
            return None
        name = self.tool_choice.function
        return [t for t in self.tools or () if name is None or t["function"]["name"] == name]


# ------------------------------------------------------------------ messages


def check_messages(messages: Any, *, training: bool = False) -> tuple[list[dict], bool]:
    """Checked copies of API-shaped ``messages`` and whether the last one is a prefix
    to continue. ``training``: mistral-finetune's rules for a JSONL line instead of a
    request's (string contents, 0/1 ``weight`` on assistant messages, tool-call ids
    already in Mistral's form, every tool result after its call, the assistant last)."""
    if not isinstance(messages, list) or not messages:
        raise InvalidParameter("messages", "must be a non-empty list of messages")
    out: list[dict] = []
    prefix = False
    call_ids: set[str] = set()
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise InvalidParameter(where, "must be an object with a role")
        role = msg.get("role")
        if role is None:
            raise InvalidParameter(f"{where}.role", "missing")
        if role == "developer" and not training:
            role = "system"  # OpenAI's newer name for it
        if role not in ROLES:
            raise InvalidParameter(f"{where}.role", f"unknown role {role!r}")
        content = _check_content(msg.get("content"), f"{where}.content", training, role)
        if role == "assistant" and not training:
            content = _with_reasoning(msg, content, where)
        clean: dict[str, Any] = {"role": role, "content": content}
        if role == "assistant":
            calls = msg.get("tool_calls")
            if calls is not None:
                clean["tool_calls"] = _check_tool_calls(calls, f"{where}.tool_calls", training)
                call_ids.update(c["id"] for c in clean["tool_calls"] if "id" in c)
            if (not content if training else content is None) and not calls:
                raise InvalidParameter(f"{where}.content", "an assistant message needs content or tool_calls: it has neither content nor tool_calls")
            if training:
                weight = msg.get("weight", 1)
                if isinstance(weight, bool) or weight not in (0, 1):
                    raise InvalidParameter(f"{where}.weight", f"must be 0 or 1, got {weight!r}")
                clean["weight"] = int(weight)
            elif msg.get("prefix"):
                if i != len(messages) - 1:
                    raise InvalidParameter(f"{where}.prefix", "only the last message can be a prefix")
                if content is None:
                    raise InvalidParameter(f"{where}.content", "a prefix message needs content to continue")
                prefix = True
        else:
            if content is None:
                raise InvalidParameter(f"{where}.content", f"missing (required for a {role} message)")
            if msg.get("prefix"):
                raise InvalidParameter(f"{where}.prefix", "only an assistant message can be a prefix")
        if role == "tool":
            for key in ("tool_call_id", "name"):
                value = msg.get(key)
                if value is not None and not isinstance(value, str):
                    raise InvalidParameter(f"{where}.{key}", "must be a string")
                clean[key] = value
            if training and clean["tool_call_id"] not in call_ids:
                raise InvalidParameter(f"{where}.tool_call_id",
                                       f"{clean['tool_call_id']!r} answers no call made before it")
        out.append(clean)
    if training and out[-1]["role"] != "assistant":
        raise InvalidParameter(f"messages[{len(out) - 1}].role",
                               f"the last message is from the {out[-1]['role']}, not the assistant (nothing to train on)")

    # OpenAI tool results carry only the call id; v2 prompts and some HF templates also want
    # the function name, which the assistant's call gives.
    names = {call.get("id"): call["function"]["name"] for m in out for call in m.get("tool_calls", ())}
    for msg in out:
        if msg["role"] == "tool" and msg["name"] is None and msg["tool_call_id"] is not None:
            msg["name"] = names.get(msg["tool_call_id"])
    return out, prefix


def _check_content(content: Any, where: str, training: bool, role: str = "user") -> str | list[dict] | None:
    if content is None or isinstance(content, str):
        return content
    if training and role != "user":
        raise InvalidParameter(where, "must be a string")
    if training:  # a user message of a vision model's data: text and image parts
        if not isinstance(content, list) or not content:
            raise InvalidParameter(where, "must be a string, or a non-empty list of text and image_url parts")
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") not in ("text", "image_url"):
                raise InvalidParameter(f"{where}[{j}]", "a training line's user parts are text or image_url parts")
    if not isinstance(content, list):
        raise InvalidParameter(where, "must be a string or a list of content parts")
    out = []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise InvalidParameter(at, "must be an object with a type")
        if part["type"] == "image_url":
            if role != "user":
                raise InvalidParameter(f"{at}.type", f"a {role} message cannot hold images (only user messages can)")
            out.append({"type": "image_url", "url": _image_url(part, at)})
            continue
        if part["type"] not in TEXT_PARTS:
            # Audio would need its encoder.
            raise InvalidParameter(f"{at}.type", f"unsupported content type {part['type']!r} (text, thinking or "
                                                 "image_url)")
        if part["type"] == "text":
            if not isinstance(part.get("text"), str):
                raise InvalidParameter(f"{at}.text", "must be a string")
            out.append({"type": "text", "text": part["text"]})
        else:
            if role not in THINKING_ROLES:
                raise InvalidParameter(f"{at}.type", f"a {role} message cannot hold thinking (only "
                                                     f"{' and '.join(THINKING_ROLES)} messages can)")
            out.append(_thinking_part(part, at))
    return out


def image_parts(messages: list[dict]) -> list[tuple[str, str]]:
    """(field, URL) of every image part of checked ``messages`` (a request's, or a training
    line's), in order."""
    return [(f"messages[{i}].content[{j}].image_url", part["url"])
            for i, m in enumerate(messages) if isinstance(m["content"], list)
            for j, part in enumerate(m["content"]) if part["type"] == "image_url"]


def _image_url(part: dict, where: str) -> str:
    """An image part's URL, from OpenAI's ``{"image_url": {"url": ...}}`` or Mistral's
    ``{"image_url": "..."}`` (its object form too). Only the shape is checked here:
    ``images.load_image`` reads it."""
    value = part.get("image_url")
    if isinstance(value, dict):
        value = value.get("url")
        where = f"{where}.image_url.url"
    else:
        where = f"{where}.image_url"
    if not isinstance(value, str) or not value:
        raise InvalidParameter(where, "must be a non-empty string: a base64 data URI or an http(s) URL")
    return value


def _thinking_part(part: dict, where: str) -> dict:
    """A thinking part in galerne's one form, ``{"type": "thinking", "thinking": str,
    "closed": bool}``, from mistral-common's (``"thinking": "..."``) or Mistral's API's
    (``"thinking": [{"type": "text", "text": "..."}, ...]``, the texts joined as a
    stream of it would join them)."""
    thinking = part.get("thinking")
    if isinstance(thinking, list):
        texts = []
        for k, chunk in enumerate(thinking):
            if not isinstance(chunk, dict) or chunk.get("type") != "text" or not isinstance(chunk.get("text"), str):
                raise InvalidParameter(f"{where}.thinking[{k}]", "must be a text chunk ({\"type\": \"text\", \"text\": ...})")
            texts.append(chunk["text"])
        thinking = "".join(texts)
    if not isinstance(thinking, str):
        raise InvalidParameter(f"{where}.thinking", "must be a string or a list of text chunks")
    closed = part.get("closed", True)
    if not isinstance(closed, bool):
        raise InvalidParameter(f"{where}.closed", "must be a boolean")
    return {"type": "thinking", "thinking": thinking, "closed": closed}


def _with_reasoning(msg: dict, content: str | list[dict] | None, where: str) -> str | list[dict] | None:
    """An assistant message's content with its OpenAI-style reasoning (vLLM's
    ``reasoning_content``, or ``reasoning``) as a leading thinking part, as mistral-common
    reads such a message."""
    given = {key: msg[key] for key in ("reasoning_content", "reasoning") if msg.get(key) is not None}
    if not given:
        return content
    for key, value in given.items():
        if not isinstance(value, str):
            raise InvalidParameter(f"{where}.{key}", "must be a string")
    if len(set(given.values())) > 1:
        raise InvalidParameter(f"{where}.reasoning", "differs from reasoning_content: give one of them")
    key, text = next(iter(given.items()))
    if isinstance(content, list) and any(p["type"] == "thinking" for p in content):
        raise InvalidParameter(f"{where}.{key}", "the content already has thinking parts: give the reasoning once")
    part = {"type": "thinking", "thinking": text, "closed": True}
    if content is None:
        return [part]
    return [part, *(content if isinstance(content, list) else [{"type": "text", "text": content}])]


def _check_tool_calls(tool_calls: Any, where: str, training: bool) -> list[dict]:
    if not isinstance(tool_calls, list):
        raise InvalidParameter(where, "must be a list")
    out = []
    for k, call in enumerate(tool_calls):
        at = f"{where}[{k}]"
        if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
            raise InvalidParameter(at, "must be an object with a function")
        if call.get("type", "function") != "function":
            raise InvalidParameter(f"{at}.type", f"unknown tool call type {call['type']!r}")
        fn = call["function"]
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise InvalidParameter(f"{at}.function.name", "must be a non-empty string")
        args = fn.get("arguments")
        if args is not None and not isinstance(args, (str, dict)):
            raise InvalidParameter(f"{at}.function.arguments", "must be a JSON string or an object")
        cid = call.get("id")
        if cid is not None and not isinstance(cid, str):
            raise InvalidParameter(f"{at}.id", "must be a string")
        if training and not is_tool_call_id(cid):
            # Training data is written as the model will read it: no id mapping here.
            raise InvalidParameter(f"{at}.id", f"tool call id {cid!r} is not 9 alphanumeric characters")
        # OpenAI's key order: templates that write a whole call with `tojson` show it.
        clean = {"id": cid, "type": "function", "function": {"name": fn["name"], "arguments": args}}
        out.append(clean if cid is not None else {k: v for k, v in clean.items() if k != "id"})
    return out


# ------------------------------------------------------------------ tools and options


def check_tools(tools: Any) -> list[dict] | None:
    """Checked tool definitions (None or an empty list: no tools); each tool's
    ``parameters`` must be a valid JSON schema."""
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise InvalidParameter("tools", "must be a list of tools")
    names: set[str] = set()
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or not isinstance(tool.get("function"), dict):
            raise InvalidParameter(f"tools[{i}]", "must be an object with a function")
        if tool.get("type", "function") != "function":
            raise InvalidParameter(f"tools[{i}].type", f"unknown tool type {tool['type']!r}")
        fn = tool["function"]
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise InvalidParameter(f"tools[{i}].function.name", "must be a non-empty string")
        if fn["name"] in names:
            raise InvalidParameter(f"tools[{i}].function.name", f"{fn['name']!r} is defined twice")
        names.add(fn["name"])
        for key, kind, what in (("description", str, "a string"), ("parameters", dict, "an object")):
            value = fn.get(key)
            if value is not None and not isinstance(value, kind):
                raise InvalidParameter(f"tools[{i}].function.{key}", f"must be {what}")
        if fn.get("parameters"):
            check_json_schema(fn["parameters"], f"tools[{i}].function.parameters")
    return tools or None


def parse_tool_choice(tool_choice: Any, tools: list[dict] | None) -> ToolChoice:
    """``tool_choice`` in either API's spelling, checked against ``tools``."""
    if tool_choice is None:
        return ToolChoice()
    if isinstance(tool_choice, str):
        if tool_choice not in ("auto", "none", "any", "required"):
            raise InvalidParameter("tool_choice", f"must be auto, none, required, any or a named function, got {tool_choice!r}")
        mode = "required" if tool_choice == "any" else tool_choice
        if mode == "required" and not tools:
            raise InvalidParameter("tool_choice", f"{tool_choice!r} needs tools")
        return ToolChoice(mode)
    if not isinstance(tool_choice, dict):
        raise InvalidParameter("tool_choice", "must be a string or an object naming a function")
    if tool_choice.get("type", "function") != "function":
        raise InvalidParameter("tool_choice.type", f"unknown tool choice type {tool_choice.get('type')!r}")
    fn = tool_choice.get("function")
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str) or not name:
        raise InvalidParameter("tool_choice.function.name", "must be a non-empty string")
    if not tools:
        raise InvalidParameter("tool_choice", f"names function {name!r} but no tools are given")
    names = [t["function"]["name"] for t in tools]
    if name not in names:
        raise InvalidParameter("tool_choice.function.name", f"{name!r} is not one of the tools ({', '.join(names)})")
    return ToolChoice("required", name)


def response_schema(response_format: Any) -> dict | None:
    """The JSON schema a ``response_format`` asks for; None for text."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise InvalidParameter("response_format", "must be an object with a type")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return JSON_OBJECT_SCHEMA
    if kind != "json_schema":
        raise InvalidParameter("response_format.type", f"must be text, json_object or json_schema, got {kind!r}")
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict):
        raise InvalidParameter("response_format.json_schema", "must be an object with a schema")
    schema = spec.get("schema")
    where = "response_format.json_schema.schema"
    if schema is None:
        raise InvalidParameter(where, "missing")
    return parse_json_schema(schema, where)  # some clients send the schema as JSON text


def parse_json_schema(schema: dict | str, field: str) -> dict:
    """A JSON schema given as an object or as JSON text, checked (``check_json_schema``)."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise InvalidParameter(field, f"the JSON schema is not valid JSON: {e}") from None
    if not isinstance(schema, dict):
        raise InvalidParameter(field, f"the JSON schema must be an object, got {type(schema).__name__}")
    check_json_schema(schema, field)
    return schema


def check_json_schema(schema: dict, field: str) -> None:
    """Reject what is not a JSON Schema (e.g. ``{"type": "objectx"}``), or one nested
    deeper than MAX_SCHEMA_DEPTH, naming ``field``."""
    if json_depth(schema, MAX_SCHEMA_DEPTH) > MAX_SCHEMA_DEPTH:
        raise InvalidParameter(field, f"the JSON schema nests objects and lists more than {MAX_SCHEMA_DEPTH} deep")
    problem = _schema_problem(json.dumps(schema, ensure_ascii=False, sort_keys=True))
    if problem is not None:
        raise InvalidParameter(field, problem)


@byte_cached(SCHEMA_CHECK_CACHE_BYTES)
def _schema_problem(text: str) -> str | None:
    # Cached by text: a server sees the same schemas (tools) request after request; by
    # bytes, as a schema may be megabytes (one over a quarter of the cache is not kept).
    import jsonschema  # comes with mistral-common

    schema = json.loads(text)
    try:
        jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(schema)
    except jsonschema.exceptions.SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path)
        return f"invalid JSON schema{f' at {where}' if where else ''}: {e.message}"
    if not _has_finite_value(schema):
        return ("no finite JSON value can match the JSON schema: what it requires refers back to itself "
                'without end (e.g. {"$ref": "#"}, or a property required at every level) or is impossible')
    return None


def _has_finite_value(schema: Any) -> bool:
    """Whether some finite JSON value can match ``schema``, as far as its references
    decide: False for ``{"$ref": "#"}``, for an object that requires a property whose
    schema is the object's own, for an array that needs at least one item of its own
    schema... (a grammar compiled from such a schema has no end: the constrained
    decoder would stall or fail mid-answer). Recursion with a way out (an optional
    property, an ``anyOf`` branch, ``minItems`` 0) is fine.

    Keywords that do not take part in references (string formats, numbers, ``not``,
    ``if``) count as satisfiable: this only rules out what references make impossible.
    The least fixpoint of "productive" over the schema's graph, in linear time."""
    # Formula nodes: ("and" | "or", [children]); a child is a node index, True or False.
    kinds: list[str] = []
    children: list[list] = []
    of_schema: dict[int, int] = {}  # id(schema dict) -> its node
    todo: list[tuple[int, dict]] = []
    keep: list[Any] = []  # the dicts whose id() is a key above stay alive

    def node(kind: str, kids: list) -> int:
        kinds.append(kind)
        children.append(kids)
        return len(kinds) - 1

    def ref(sub: Any) -> int | bool:
        if isinstance(sub, bool):
            return sub
        if not isinstance(sub, dict):
            return True  # not a schema: nothing to decide here
        i = of_schema.get(id(sub))
        if i is None:
            i = of_schema[id(sub)] = node("and", [])
            keep.append(sub)
            todo.append((i, sub))
        return i

    root = ref(schema)
    while todo:
        i, sub = todo.pop()
        parts = children[i]
        target = sub.get("$ref")
        if isinstance(target, str):
            parts.append(ref(_resolve(schema, target)))
        for key in ("allOf",):
            if isinstance(sub.get(key), list):
                parts += [ref(s) for s in sub[key]]
        for key in ("anyOf", "oneOf"):
            if isinstance(sub.get(key), list):
                parts.append(node("or", [ref(s) for s in sub[key]]))
        types = sub.get("type")
        if "const" in sub or "enum" in sub or types is None:
            continue  # a given value, or a value of any type (null matches object and array keywords)
        options = []
        for t in types if isinstance(types, list) else [types]:
            if t == "object":
                props = sub.get("properties") if isinstance(sub.get("properties"), dict) else {}
                extra = sub.get("additionalProperties", True)
                need = []
                for k in sub.get("required") or ():
                    if k in props:
                        need.append(ref(props[k]))
                    elif not sub.get("patternProperties"):
                        need.append(ref(extra))
                options.append(node("and", need))
            elif t == "array":
                items = sub.get("items", True)
                prefix, rest = (items, sub.get("additionalItems", True)) if isinstance(items, list) \
                    else (sub.get("prefixItems") if isinstance(sub.get("prefixItems"), list) else [], items)
                least = sub.get("minItems", 0) if isinstance(sub.get("minItems", 0), int) else 0
                need = [ref(s) for s in prefix[:least]]
                if least > len(prefix):
                    need.append(ref(rest))
                options.append(node("and", need))
            else:
                options.append(True)
        parts.append(node("or", options))

    if isinstance(root, bool):
        return root
    # Propagate "productive" up from the leaves: an "and" when all its children are,
    # an "or" when one is.
    parents: list[list[int]] = [[] for _ in kinds]
    missing = [0] * len(kinds)  # an "and": children not yet known productive; -1: a False child
    done = [False] * len(kinds)
    ready = []
    for i, (kind, kids) in enumerate(zip(kinds, children)):
        for c in kids:
            if c is True:
                done[i] = done[i] or kind == "or"
            elif c is False:
                missing[i] = -1 if kind == "and" else missing[i]
            else:
                parents[c].append(i)
                if kind == "and" and missing[i] >= 0:
                    missing[i] += 1
        if kind == "and" and missing[i] == 0:
            done[i] = True
        if done[i]:
            ready.append(i)
    while ready:
        for p in parents[ready.pop()]:
            if done[p] or missing[p] < 0:
                continue
            if kinds[p] == "and":
                missing[p] -= 1
                if missing[p] > 0:
                    continue
            done[p] = True
            ready.append(p)
    return done[root]


def _resolve(root: Any, ref: str) -> Any:
    """The target of a local ``$ref`` ("#", "#/$defs/x"); True (anything) for a reference
    this cannot follow (another document, an anchor): the grammar compiler judges those."""
    if ref == "#":
        return root
    if not ref.startswith("#/"):
        return True
    node = root
    for raw in ref[2:].split("/"):
        key = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and key in node:
            node = node[key]
        elif isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
        else:
            return True
    return node


def json_depth(value: Any, stop: int) -> int:
    """How deeply objects and lists nest in ``value`` (a scalar: 0), counted without
    recursion, whatever it is; once past ``stop`` it returns at once (a figure above
    ``stop``: nobody needs the exact one)."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        node, depth = todo.pop()
        if isinstance(node, (dict, list)):
            if depth > deepest:
                deepest = depth
                if deepest > stop:
                    return deepest
            todo.extend((v, depth + 1) for v in (node.values() if isinstance(node, dict) else node))
    return deepest
