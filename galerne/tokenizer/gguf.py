"""The tokenizer of a GGUF file.

A GGUF carries its tokenizer as metadata (llama.cpp's ``tokenizer.ggml.*`` keys):
the tokens, their scores and types, BPE merges, the special token ids, and a chat
template. For a Mistral model, mistral-common's own file is better: it carries the
real prompt format (tools, system prompts, FIM) that a Jinja template only
approximates. So :func:`gguf_tokenizer` takes, in order:

1. mistral-common's file next to the GGUF (tekken.json, tokenizer.model.v*), as a
   model folder's would be found;
2. the embedded tokenizer, rebuilt by transformers' GGUF tokenizer conversion into a
   ``tokenizers.Tokenizer``, with two corrections so that it encodes as
   mistral-common does (checked in tests/test_gguf.py):

   - a SentencePiece vocabulary (``tokenizer.ggml.model`` "llama") encodes text with
     the normalizer of Mistral's own tokenizer.json files: always a "▁" in front, every
     space a "▁" (transformers' Metaspace leaves out the "▁" before text that starts
     with a space);
   - control tokens written in the text (``[INST]``) are plain text in ``encode``,
     as mistral-common treats them; only a chat template's own output is read with
     them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import tokenizers
from tokenizers import normalizers

from galerne.conversation import check_text
from galerne.errors import TokenizerError

from .base import _SPM_VERSIONED, Tokenizer, _spm_version_key
from .hf import HFTokenizer

if TYPE_CHECKING:
    from galerne.conversation import Conversation

log = logging.getLogger(__name__)


def gguf_tokenizer(path: Path) -> Tokenizer:
    """mistral-common's file beside the GGUF ``path`` if there is one, else the embedded tokenizer."""
    folder = path.parent
    beside = folder / "tekken.json"
    if not beside.is_file():
        versioned = [p for p in folder.iterdir() if _SPM_VERSIONED.fullmatch(p.name) and p.is_file()]
        beside = max(versioned, key=_spm_version_key) if versioned else None
    if beside is not None:
        from .mistral import MistralCommonTokenizer

        log.info("%s: using the mistral-common tokenizer beside it, %s", path.name, beside.name)
        return MistralCommonTokenizer(beside)
    return GGUFTokenizer(path)


class GGUFTokenizer(HFTokenizer):
    """The tokenizer embedded in a GGUF file, as an ``HFTokenizer``."""

    kind = "gguf"

    def __init__(self, path: Path):  # (not HFTokenizer.__init__: that one reads a folder's files)
        from transformers.integrations.gguf import (
            convert_gguf_tokenizer,
            get_gguf_tokenizer,
        )

        self.path = path
        try:
            arch, info, config = get_gguf_tokenizer(str(path))
            tok, _ = convert_gguf_tokenizer(arch, info)
        except Exception as e:  # transformers raises ValueError, KeyError, ... for what it can't read
            raise TokenizerError(f"{path}: cannot build the embedded tokenizer: {type(e).__name__}: {e}") from e
        # Chat templates write control tokens as text: HFTokenizer reads their output with
        # self._tok, which makes them, and puts a "▁" before the first piece only (as
        # transformers' Metaspace does: "[INST] Hi" is [INST] "▁Hi"). Plain text (encode)
        # never makes a control token: self._plain, which for SentencePiece is spelled as
        # Mistral's tokenizer.json files are (add_dummy_prefix: a "▁" before the text
        # whatever it starts with, where Metaspace leaves it out before a space).
        self._tok = tok
        self._plain = tokenizers.Tokenizer.from_str(tok.to_str())
        self._plain.encode_special_tokens = True
        if info.get("tokenizer_type") == "llama":
            spaces = [normalizers.Replace(" ", "▁")]
            if info.get("add_prefix_space", True):  # (tokenizer.ggml.add_space_prefix; absent: llama.cpp's default)
                spaces.insert(0, normalizers.Prepend("▁"))
            self._plain.normalizer = normalizers.Sequence(spaces)
            self._plain.pre_tokenizer = None
        template = config.get("chat_template")
        self._chat_template = template
        self._builtin_template = template if isinstance(template, str) and "{" not in template else None
        if self._builtin_template:
            self._chat_template = None
        self._bos_token = config.get("bos_token")
        self._eos_token = config.get("eos_token")
        self.bos_id = info.get("bos_token_id") if config.get("add_bos_token", True) else None
        eos = info.get("eos_token_id")
        if eos is None:
            raise TokenizerError(f"{path}: the embedded tokenizer has no eos token (tokenizer.ggml.eos_token_id)")
        self.eos_id = int(eos)
        self._config_eos = set()
        # The file's tokens (transformers' byte-level class adds an <|endoftext|> of its own
        # past them, which no text encodes to: control tokens in text stay text).
        self.vocab_size = len(info["tokens"])
        self._special_ids = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}

    def encode(self, text: str, *, bos: bool = True, eos: bool = False) -> list[int]:
        check_text(text, "prompt")
        ids = self._plain.encode(text, add_special_tokens=False).ids
        if bos and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids

    def special_token_id(self, name: str) -> int | None:
        i = self._tok.token_to_id(name)
        return i if i is not None and i in self._special_ids else None

    def _encode_conversation(self, chat: Conversation) -> list[int]:
        if self._builtin_template:
            raise TokenizerError(
                f"{self.path}: the file names llama.cpp's built-in chat template {self._builtin_template!r}, "
                "which galerne does not render; put the model's mistral-common tokenizer file (tekken.json or "
                "tokenizer.model.v*) next to the GGUF file")
        return super()._encode_conversation(chat)
