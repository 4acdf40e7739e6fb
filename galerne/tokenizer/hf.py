"""Tokenizers of other models' HF folders: tokenizer.json through the ``tokenizers``
library, prompts through the folder's own Jinja chat template, as transformers does."""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import jinja2
import jinja2.ext
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

from galerne.conversation import check_text
from galerne.errors import InvalidParameter, TokenizerError

from .base import Tokenizer

if TYPE_CHECKING:
    from galerne.conversation import Conversation


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
        check_text(text, "prompt")
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

    @property
    def hf_tokenizer(self) -> tokenizers.Tokenizer:
        return self._tok

    def _encode_conversation(self, chat: Conversation) -> list[int]:
        tools = chat.tools
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

        prefix = chat.continue_final
        messages = [_hf_message(m) for m in chat.messages]
        # As transformers' continue_final_message: mark the end of the final message, render
        # without a generation prompt, and cut at the mark, dropping what closes the turn.
        tag = "CONTINUE_FINAL_MESSAGE_TAG "
        if prefix:
            messages[-1]["content"] += tag
        try:
            text = template.render(
                messages=messages,
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


def _hf_message(msg: dict) -> dict:
    """A checked message as HF chat templates expect it: string content, dict arguments."""
    out = dict(msg)
    content = msg["content"]
    if isinstance(content, list):
        # Joined as mistral-common joins text chunks; many templates cannot read part lists.
        out["content"] = "\n\n".join(part["text"] for part in content if part["type"] == "text")
        thinking = [part["thinking"] for part in content if part["type"] == "thinking"]
        if thinking:  # vLLM's name for it, which reasoning models' templates read
            out["reasoning_content"] = "\n".join(thinking)
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
