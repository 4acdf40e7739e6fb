"""Tokenizers: one small API over Mistral tokenizers (tekken, SentencePiece) and HF tokenizer.json.

Mistral tokenizers go through mistral-common for everything that has a format (chat, tools,
fill-in-the-middle): the prompt format of a Mistral model is defined by mistral-common, so
we never write a chat template of our own for them. Other models' HF folders use the
``tokenizers`` library and render the folder's own Jinja chat template, as transformers does.

``IncrementalDetokenizer`` turns generated ids into text as they arrive, exactly.
"""

from __future__ import annotations

import hashlib
import json
import re
from abc import ABC, abstractmethod
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import jinja2
import jinja2.ext
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from mistral_common.exceptions import (
    InvalidToolException,
    InvalidToolSchemaException,
    MistralCommonException,
)
from mistral_common.protocol.fim.request import FIMRequest
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from mistral_common.tokens.tokenizers.sentencepiece import is_sentencepiece
from mistral_common.tokens.tokenizers.tekken import Tekkenizer, is_tekken

from galerne.errors import InvalidParameter, TokenizerError

# Tool-call ids as mistral-common (tokenizer v3+) requires them.
_MISTRAL_TOOL_CALL_ID = re.compile(r"[a-zA-Z0-9]{9}")
_SPM_VERSIONED = re.compile(r"tokenizer\.model\.v(\d+)(?:m(\d+))?")
_ROLES = {"system", "developer", "user", "assistant", "tool"}
_TEXT_PARTS = {"text", "thinking"}  # content parts the engine can feed (thinking: reasoning models)


class Tokenizer(ABC):
    """A loaded tokenizer. Build one with ``Tokenizer.from_path``.

    ``bos_id`` is None only for HF tokenizers that have no BOS token (then ``encode``
    never adds one); Mistral tokenizers always have one.
    """

    kind: str  # "tekken" | "sentencepiece" | "hf"
    path: Path  # the file used
    vocab_size: int
    bos_id: int | None
    eos_id: int

    @classmethod
    def from_path(cls, path: str | Path) -> Tokenizer:
        """Load the tokenizer of a model folder, or a tokenizer file.

        In a folder, in order: tekken.json, tokenizer.model.v* (highest version),
        tokenizer.model, tokenizer.json. Mistral folders on the HF hub ship the Mistral file
        next to tokenizer.json, so the Mistral file wins: it carries the real prompt format.
        """
        path = Path(path)
        if path.is_dir():
            file = _find_tokenizer_file(path)
        elif path.is_file():
            file = path
        else:
            raise TokenizerError(f"{path}: no such tokenizer file or model folder")
        # mistral-common's own file-name rules: it reads the tokenizer version from the name.
        if is_tekken(file) or is_sentencepiece(file):
            return MistralCommonTokenizer(file)
        if file.suffix == ".json":
            return HFTokenizer(file)
        raise TokenizerError(
            f"{file}: not a tokenizer file (expected tekken*.json, tokenizer.model[.vN] or tokenizer.json)"
        )

    @abstractmethod
    def encode(self, text: str, *, bos: bool = True, eos: bool = False) -> list[int]:
        ...

    @abstractmethod
    def decode(self, ids: Sequence[int], *, keep_special: bool = False) -> str:
        """Text of ``ids``; control and special tokens are skipped, or written as their
        names (``[TOOL_CALLS]``) with ``keep_special``."""

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (a special token: its name), as in API logprobs."""
        return self.decode([token_id], keep_special=True).encode("utf-8")

    def token_str(self, token_id: int) -> str:
        """One token as text (a token that is part of a UTF-8 character shows U+FFFD)."""
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    def special_token_id(self, name: str) -> int | None:
        """The id of a control token such as ``[TOOL_CALLS]``, None when the vocabulary has none."""
        return None

    def decode_tool_calls(self, calls: Sequence[Sequence[int]]) -> list[dict]:
        """Parse the model's tool calls: one id list per ``[TOOL_CALLS]`` marker (the ids after
        it). Returns ``[{"id": str | None, "name": str, "arguments": dict}]``; raises
        ``ValueError`` on output that is not a well-formed call."""
        raise ValueError(f"tool calls need a Mistral tokenizer (this one is {self.kind})")

    @abstractmethod
    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """Prompt ids for an OpenAI/Mistral-API style conversation, ready for generation."""

    def encode_fim(self, prompt: str, suffix: str | None = None) -> list[int]:
        raise TokenizerError(f"{self.path}: fill-in-the-middle needs a Mistral tokenizer (this one is {self.kind})")

    def stop_token_ids(self) -> set[int]:
        return {self.eos_id}

    @abstractmethod
    def is_special(self, token_id: int) -> bool:
        """Whether ``token_id`` is a control/special token (one that ``decode`` skips)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r}, path={str(self.path)!r}, vocab_size={self.vocab_size})"


def _find_tokenizer_file(folder: Path) -> Path:
    if (folder / "tekken.json").is_file():
        return folder / "tekken.json"
    try:
        versioned = [p for p in folder.iterdir() if _SPM_VERSIONED.fullmatch(p.name) and p.is_file()]
    except OSError as e:
        raise TokenizerError(f"{folder}: cannot list the folder: {e}") from e
    if versioned:
        return max(versioned, key=_spm_version_key)
    for name in ("tokenizer.model", "tokenizer.json"):
        if (folder / name).is_file():
            return folder / name
    raise TokenizerError(
        f"{folder}: no tokenizer found (looked for tekken.json, tokenizer.model.v*, tokenizer.model, tokenizer.json)"
    )


def _spm_version_key(path: Path) -> tuple[int, int]:
    # Numeric, so that v11 beats v7 and v7m1 beats v7.
    major, mm = _SPM_VERSIONED.fullmatch(path.name).groups()
    return int(major), int(mm or 0)


# --------------------------------------------------------------------------- messages


def _check_messages(messages: Any) -> list[dict]:
    """Validate OpenAI-style messages; return clean copies holding only the keys we use.

    Checks the shape only, naming the field at fault; the conversation rules (role order,
    tool results matching calls, ...) are left to mistral-common or the chat template.
    """
    if not isinstance(messages, list) or not messages:
        raise InvalidParameter("messages", "must be a non-empty list of messages")
    out = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise InvalidParameter(where, "must be an object with a role")
        role = msg.get("role")
        if role is None:
            raise InvalidParameter(f"{where}.role", "missing")
        if role not in _ROLES:
            raise InvalidParameter(f"{where}.role", f"unknown role {role!r}")
        role = "system" if role == "developer" else role  # OpenAI's new name for system
        clean: dict[str, Any] = {"role": role, "content": _check_content(msg.get("content"), f"{where}.content")}

        if role == "assistant":
            tool_calls = msg.get("tool_calls")
            if tool_calls is not None:
                clean["tool_calls"] = _check_tool_calls(tool_calls, f"{where}.tool_calls")
            if clean["content"] is None and not tool_calls:
                raise InvalidParameter(f"{where}.content", "an assistant message needs content or tool_calls")
            if msg.get("prefix"):
                if i != len(messages) - 1:
                    raise InvalidParameter(f"{where}.prefix", "only the last message can be a prefix")
                if clean["content"] is None:
                    raise InvalidParameter(f"{where}.content", "a prefix message needs content to continue")
                clean["prefix"] = True
        else:
            if clean["content"] is None:
                raise InvalidParameter(f"{where}.content", f"missing (required for a {role} message)")
            if msg.get("prefix"):
                raise InvalidParameter(f"{where}.prefix", "only an assistant message can be a prefix")
        if role == "tool":
            for key in ("tool_call_id", "name"):
                value = msg.get(key)
                if value is not None and not isinstance(value, str):
                    raise InvalidParameter(f"{where}.{key}", "must be a string")
                clean[key] = value
        out.append(clean)

    # OpenAI tool results carry only the call id; v2 prompts and some HF templates also want
    # the function name, which the assistant's call gives.
    names = {call.get("id"): call["function"]["name"] for m in out for call in m.get("tool_calls", ())}
    for msg in out:
        if msg["role"] == "tool" and msg["name"] is None and msg["tool_call_id"] is not None:
            msg["name"] = names.get(msg["tool_call_id"])
    return out


def _check_content(content: Any, where: str) -> str | list[dict] | None:
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidParameter(where, "must be a string or a list of content parts")
    for j, part in enumerate(content):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise InvalidParameter(f"{where}[{j}]", "must be an object with a type")
        if part["type"] not in _TEXT_PARTS:
            # The engine feeds the model text only; images and audio would need their encoders.
            raise InvalidParameter(f"{where}[{j}].type", f"unsupported content type {part['type']!r} (text only)")
        if part["type"] == "text" and not isinstance(part.get("text"), str):
            raise InvalidParameter(f"{where}[{j}].text", "must be a string")
    return [dict(part) for part in content]


def _check_tool_calls(tool_calls: Any, where: str) -> list[dict]:
    if not isinstance(tool_calls, list):
        raise InvalidParameter(where, "must be a list")
    out = []
    for k, call in enumerate(tool_calls):
        if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
            raise InvalidParameter(f"{where}[{k}]", "must be an object with a function")
        if call.get("type", "function") != "function":
            raise InvalidParameter(f"{where}[{k}].type", f"unknown tool call type {call['type']!r}")
        fn = call["function"]
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise InvalidParameter(f"{where}[{k}].function.name", "must be a non-empty string")
        args = fn.get("arguments")
        if args is not None and not isinstance(args, (str, dict)):
            raise InvalidParameter(f"{where}[{k}].function.arguments", "must be a JSON string or an object")
        if call.get("id") is not None and not isinstance(call["id"], str):
            raise InvalidParameter(f"{where}[{k}].id", "must be a string")
        # OpenAI's key order: templates that write a whole call with `tojson` show it.
        clean = {"id": call.get("id"), "type": "function", "function": {"name": fn["name"], "arguments": args}}
        out.append(clean if clean["id"] is not None else {k: v for k, v in clean.items() if k != "id"})
    return out


def _check_tools(tools: Any) -> list[dict] | None:
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise InvalidParameter("tools", "must be a list of tools")
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or not isinstance(tool.get("function"), dict):
            raise InvalidParameter(f"tools[{i}]", "must be an object with a function")
        if tool.get("type", "function") != "function":
            raise InvalidParameter(f"tools[{i}].type", f"unknown tool type {tool['type']!r}")
        if not isinstance(tool["function"].get("name"), str) or not tool["function"]["name"]:
            raise InvalidParameter(f"tools[{i}].function.name", "must be a non-empty string")
        for key, kind, what in (("description", str, "a string"), ("parameters", dict, "an object")):
            value = tool["function"].get(key)
            if value is not None and not isinstance(value, kind):
                raise InvalidParameter(f"tools[{i}].function.{key}", f"must be {what}")
    return tools


def mistral_tool_call_id(foreign_id: str) -> str:
    """A tool-call id in the form mistral-common accepts: 9 characters of [a-zA-Z0-9].

    Valid ids are kept. Others (e.g. OpenAI's ``call_...``) are hashed: a pure function of the
    id, so the assistant's call and its tool result map alike, in this request and in the
    next turn's replay of the same conversation, with no state to keep.
    """
    if _MISTRAL_TOOL_CALL_ID.fullmatch(foreign_id):
        return foreign_id
    return hashlib.sha256(foreign_id.encode()).hexdigest()[:9]


# --------------------------------------------------------------------------- Mistral


class MistralCommonTokenizer(Tokenizer):
    """tekken.json or tokenizer.model[.vN], through mistral-common."""

    def __init__(self, path: Path):
        try:
            # Serving mode: the strictest conversation checks (e.g. every tool call answered).
            self._mt = MistralTokenizer.from_file(path, mode=ValidationMode.serving)
        except Exception as e:  # sentencepiece, json and mistral-common raise all kinds
            raise TokenizerError(f"{path}: cannot read tokenizer: {type(e).__name__}: {e}") from e
        self._tok = self._mt.instruct_tokenizer.tokenizer
        self.kind = "tekken" if isinstance(self._tok, Tekkenizer) else "sentencepiece"
        self.path = path
        self.version = str(self._tok.version.value)
        self.vocab_size = self._tok.n_words
        self.bos_id = self._tok.bos_id
        self.eos_id = self._tok.eos_id

    def encode(self, text: str, *, bos: bool = True, eos: bool = False) -> list[int]:
        return self._tok.encode(text, bos=bos, eos=eos)

    def decode(self, ids: Sequence[int], *, keep_special: bool = False) -> str:
        ids = list(ids)
        if keep_special and any(self._tok.is_special(t) for t in ids):
            # KEEP writes SentencePiece's text as raw pieces ("▁Hello"): decode the runs
            # between special tokens ourselves.
            out, run = [], []
            for t in ids:
                if self._tok.is_special(t):
                    out += [self._tok.decode(run), self._tok.id_to_piece(t)]
                    run = []
                else:
                    run.append(t)
            return "".join(out + [self._tok.decode(run)])
        return self._tok.decode(ids, special_token_policy=SpecialTokenPolicy.IGNORE)

    def token_bytes(self, token_id: int) -> bytes:
        if isinstance(self._tok, Tekkenizer):
            return self._tok.id_to_byte_piece(token_id, SpecialTokenPolicy.KEEP)
        piece = self._tok.id_to_piece(token_id)
        if not self._tok.is_special(token_id) and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            return bytes([int(piece[3:5], 16)])  # SentencePiece byte fallback: <0x0A> is b"\n"
        return piece.replace("▁", " ").encode("utf-8")

    def is_special(self, token_id: int) -> bool:
        return self._tok.is_special(token_id)

    def special_token_id(self, name: str) -> int | None:
        try:
            token_id = self._tok.get_special_token(name)
        except (ValueError, KeyError):
            return None
        # Old SentencePiece vocabularies map unknown control names to <unk>.
        return None if token_id == self._tok.unk_id else token_id

    def decode_tool_calls(self, calls: Sequence[Sequence[int]]) -> list[dict]:
        # mistral-common's own parser (the one its reference server uses), for every version:
        # v2-v7 `[TOOL_CALLS][{"name": .., "arguments": {..}}, ..]`, v11+ `[TOOL_CALLS]name[ARGS]{..}`
        # (and `name[CALL_ID]id[ARGS]{..}`).
        from mistral_common.experimental.tools import _decode_tool_calls

        try:
            parsed = _decode_tool_calls([list(c) for c in calls], self._tok)
        except (ValueError, TypeError, KeyError, MistralCommonException) as e:  # JSONDecodeError is a ValueError
            raise ValueError(f"malformed tool call: {e}") from e
        out = []
        for call in parsed:
            args = call.function.arguments
            if isinstance(args, str):
                try:
                    args = json.loads(args)
                except json.JSONDecodeError as e:
                    raise ValueError(f"malformed tool call arguments: {e}") from e
            if not isinstance(args, dict):
                raise ValueError("tool call arguments must be a JSON object")
            out.append({"id": None if call.id in (None, "null") else call.id, "name": call.function.name, "arguments": args})
        return out

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        checked = _check_messages(messages)
        tools = _check_tools(tools)
        for msg in checked:
            for call in msg.get("tool_calls") or ():
                if "id" in call:
                    call["id"] = mistral_tool_call_id(call["id"])
            if msg.get("tool_call_id") is not None:
                msg["tool_call_id"] = mistral_tool_call_id(msg["tool_call_id"])
        prefix = checked[-1].pop("prefix", False)
        try:
            request = ChatCompletionRequest.from_openai(
                checked,
                tools=tools,
                continue_final_message=prefix,
                # mistral-common's serving mode insists on a model name; it does not change the tokens.
                model="galerne",
            )
            return self._mt.encode_chat_completion(request).tokens
        except (InvalidToolException, InvalidToolSchemaException) as e:
            raise InvalidParameter("tools", str(e)) from e
        # pydantic's validation errors are ValueErrors; mistral-common also asserts on requests.
        except (MistralCommonException, ValueError, TypeError, KeyError, AssertionError) as e:
            raise InvalidParameter("messages", _message(e)) from e

    def encode_fim(self, prompt: str, suffix: str | None = None) -> list[int]:
        # mistral-common's v2 SentencePiece encoder "supports" FIM but its vocabulary has no
        # [PREFIX]/[SUFFIX]: they come out as <unk>. Refuse rather than feed the model that.
        it = self._mt.instruct_tokenizer
        markers = (getattr(it, "PREFIX", None), getattr(it, "SUFFIX", None))
        if None in markers or self._tok.unk_id in markers:
            raise TokenizerError(f"{self.path}: tokenizer {self.version} has no fill-in-the-middle tokens")
        try:
            return self._mt.encode_fim(FIMRequest(prompt=prompt, suffix=suffix)).tokens
        except (MistralCommonException, ValueError) as e:
            raise TokenizerError(f"{self.path}: cannot encode fill-in-the-middle request: {_message(e)}") from e


def _message(e: Exception) -> str:
    # KeyError's str() is just the quoted key; say what it is.
    return f"missing field {e}" if isinstance(e, KeyError) else str(e)


# --------------------------------------------------------------------------- HF tokenizer.json


class HFTokenizer(Tokenizer):
    """tokenizer.json (+ tokenizer_config.json, chat_template.jinja) of a non-Mistral HF folder."""

    kind = "hf"

    def __init__(self, path: Path):
        self.path = path
        folder = path.parent
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exceptions for bad files
            raise TokenizerError(f"{path}: cannot read tokenizer: {e}") from e
        # Older folders keep the special tokens in special_tokens_map.json only.
        config = {**_read_json(folder / "special_tokens_map.json"), **_read_json(folder / "tokenizer_config.json")}
        self._chat_template = config.get("chat_template")
        if self._chat_template is None and (folder / "chat_template.jinja").is_file():
            # Newer transformers save the template next to the config rather than inside it.
            self._chat_template = (folder / "chat_template.jinja").read_text(encoding="utf-8")

        self._bos_token = _token_text(config.get("bos_token"))
        self._eos_token = _token_text(config.get("eos_token"))
        self.bos_id = self._token_id(self._bos_token, "bos_token")
        # Generation stops at any eos id that generation_config.json / config.json name
        # (instruct models often end their turn with a token that is not eos_token).
        config_eos: list[int] = []
        for name in ("generation_config.json", "config.json"):
            ids = _read_json(folder / name).get("eos_token_id")
            config_eos += ids if isinstance(ids, list) else [] if ids is None else [ids]
        self._config_eos = set(config_eos)
        eos_id = self._token_id(self._eos_token, "eos_token")
        if eos_id is None:
            if not config_eos:
                raise TokenizerError(f"{folder}: no eos_token in tokenizer_config.json and no eos_token_id in config")
            eos_id = config_eos[0]
            self._eos_token = self._tok.id_to_token(eos_id)
        self.eos_id = eos_id
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self._special_ids = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}

    def _token_id(self, token: str | None, what: str) -> int | None:
        if token is None:
            return None
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise TokenizerError(f"{self.path}: {what} {token!r} is not in the vocabulary")
        return token_id

    def encode(self, text: str, *, bos: bool = True, eos: bool = False) -> list[int]:
        # The post-processor would add specials by its own rules; we add them as asked instead.
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if bos and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int], *, keep_special: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=not keep_special)

    def stop_token_ids(self) -> set[int]:
        return {self.eos_id} | self._config_eos

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        checked = _check_messages(messages)
        tools = _check_tools(tools)
        source = self._chat_template
        if isinstance(source, list):  # named templates, as transformers allows
            named = {t["name"]: t["template"] for t in source}
            source = named.get("tool_use") if tools and "tool_use" in named else named.get("default")
        if source is None:
            raise TokenizerError(
                f"{self.path.parent}: no chat template (tokenizer_config.json has no chat_template, "
                "and there is no chat_template.jinja)"
            )
        try:
            template = _compile_chat_template(source)
        except jinja2.TemplateError as e:
            raise TokenizerError(f"{self.path.parent}: chat template does not compile: {e}") from e

        prefix = checked[-1].pop("prefix", False)
        chat = [_hf_message(m, f"messages[{i}]") for i, m in enumerate(checked)]
        # As transformers' continue_final_message: mark the end of the final message, render
        # without a generation prompt, and cut at the mark, dropping what closes the turn.
        tag = "CONTINUE_FINAL_MESSAGE_TAG "
        if prefix:
            chat[-1]["content"] += tag
        try:
            text = template.render(
                messages=chat,
                tools=tools,
                bos_token=self._bos_token or "",
                eos_token=self._eos_token,
                add_generation_prompt=not prefix,
            )
        except jinja2.TemplateError as e:  # raise_exception() in the template: a bad conversation
            raise InvalidParameter("messages", f"rejected by the chat template: {e}") from e
        if prefix:
            if tag.strip() not in text:
                raise InvalidParameter("messages", "the chat template drops the final message; it cannot be continued")
            cut = text.rindex(tag.strip())
            text = text[:cut] if text[cut : cut + len(tag)] == tag else text[:cut].rstrip()
        # The template wrote the special tokens (bos, ...) itself: don't add them again.
        return self._tok.encode(text, add_special_tokens=False).ids


def _hf_message(msg: dict, where: str) -> dict:
    """A checked message as HF chat templates expect it: string content, dict arguments."""
    out = dict(msg)
    content = msg["content"]
    if isinstance(content, list):
        # Joined as mistral-common joins text chunks; many templates cannot read part lists.
        out["content"] = "\n\n".join(part["text"] for part in content if part["type"] == "text")
    elif content is None:
        out["content"] = ""  # assistant turns with tool calls only; templates concatenate content
    if out.get("tool_calls"):
        calls = []
        for call in out["tool_calls"]:
            fn = dict(call["function"])
            # Templates write arguments with `| tojson`: a JSON string would be quoted twice.
            if isinstance(fn["arguments"], str):
                try:
                    fn["arguments"] = json.loads(fn["arguments"])
                except json.JSONDecodeError:
                    pass  # keep what the client sent; it is the model's own (bad) output
            elif fn["arguments"] is None:
                fn["arguments"] = {}
            calls.append({**call, "function": fn})
        out["tool_calls"] = calls
    return {k: v for k, v in out.items() if v is not None}


@lru_cache(maxsize=8)
def _compile_chat_template(source: str):
    """Compile a chat template in the environment transformers renders them in."""

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters, which would change the prompt.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path}: cannot read: {e}") from e
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object")
    return data


def _token_text(token: Any) -> str | None:
    # tokenizer_config.json writes special tokens as strings or as AddedToken dicts.
    if isinstance(token, dict):
        return token.get("content")
    return token


# --------------------------------------------------------------------------- streaming


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
