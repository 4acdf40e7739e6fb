"""The Tokenizer interface, and finding a model folder's tokenizer file."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from galerne.errors import InvalidParameter, TokenizerError
from galerne.images import ImageInput, ImagePolicy, LoadedImage, load_image

if TYPE_CHECKING:
    from galerne.conversation import Conversation

_SPM_VERSIONED = re.compile(r"tokenizer\.model\.v(\d+)(?:m(\d+))?")


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
        A GGUF file: mistral-common's file beside it, else its embedded tokenizer
        (``tokenizer.gguf``).
        """
        path = Path(path)
        from ..weights.gguf import is_gguf

        if is_gguf(path):
            from .gguf import gguf_tokenizer

            return gguf_tokenizer(path)
        if path.is_dir():
            file = _find_tokenizer_file(path)
        elif path.is_file():
            file = path
        else:
            raise TokenizerError(f"{path}: no such tokenizer file or model folder")
        from mistral_common.tokens.tokenizers.sentencepiece import is_sentencepiece
        from mistral_common.tokens.tokenizers.tekken import is_tekken

        # mistral-common's own file-name rules: it reads the tokenizer version from the name.
        if is_tekken(file) or is_sentencepiece(file):
            from .mistral import MistralCommonTokenizer

            return MistralCommonTokenizer(file)
        if file.suffix == ".json":
            from .hf import HFTokenizer

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

    @property
    def tool_call_format(self) -> str | None:
        """How the model writes tool calls after ``[TOOL_CALLS]``: "list" (tokenizers v2-v7:
        one JSON list ``[{"name": .., "arguments": {..}}, ..]``), "args" (v11+:
        ``name[ARGS]{..}`` per marker, ``name[CALL_ID]id[ARGS]{..}`` too), or None (no
        tool calls known for this tokenizer)."""
        return None

    @property
    def thinks(self) -> bool:
        """Whether the model may think out loud: its output may hold ``[THINK]...[/THINK]``
        (Mistral tokenizers v13 and later that have both tokens)."""
        return False

    @property
    def takes_reasoning_effort(self) -> bool:
        """Whether the prompt carries a ``reasoning_effort`` (tokenizer v15's model settings,
        when its file declares the values the model takes). Elsewhere a request's
        reasoning_effort is checked and then ignored, as vLLM ignores it for models whose
        prompt format has no place for it."""
        return False

    def reasoning_system_prompt(self) -> str | list[dict] | None:
        """The system prompt that turns the model's reasoning on (Mistral's
        ``prompt_mode: "reasoning"``): the ``SYSTEM_PROMPT.txt`` that reasoning models ship
        next to their tokenizer (Magistral's), or None. Its ``[THINK]...[/THINK]`` span,
        the template of a thought, becomes a thinking part, as the model cards load it."""
        file = self.path.parent / "SYSTEM_PROMPT.txt"
        try:
            text = file.read_text(encoding="utf-8")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
        except (OSError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{file}: cannot read the system prompt: {e}") from e
        if "[THINK]" not in text or not self.thinks:
            return text
        parts = []
        for i, piece in enumerate(re.split(r"\[THINK\]|\[/THINK\]", text)):
            if piece or i % 2:
                parts.append({"type": "thinking", "thinking": piece, "closed": True} if i % 2
                             else {"type": "text", "text": piece})
        return parts

    @property
    def mistral_version(self):
        """mistral-common's ``TokenizerVersion`` (v1, v2, ..., v13), or None (HF tokenizers)."""
        return None

    @property
    def mistral_tokenizer(self):
        """mistral-common's ``MistralTokenizer`` behind this one, or None (HF tokenizers)."""
        return None

    @property
    def hf_tokenizer(self):
        """The ``tokenizers.Tokenizer`` behind this one, or None (Mistral tokenizers)."""
        return None

    def encode_chat(self, chat: Conversation | list[dict], tools: list[dict] | None = None) -> list[int]:
        """Prompt ids for a conversation, ready for generation: a checked ``Conversation``
        (the server's), or API-shaped messages (and tools), which are checked here. A
        conversation with images needs ``encode_chat_with_images``."""
        chat = _conversation(chat, tools)
        if chat.images:
            raise InvalidParameter(chat.images[0][0], "a prompt with images is encoded by encode_chat_with_images "
                                                      "(its ids alone would lose the images)")
        return self._encode_conversation(chat)

    def encode_chat_with_images(self, chat: Conversation | list[dict], tools: list[dict] | None = None,
                                policy: ImagePolicy | None = None) -> tuple[list[int], list[ImageInput]]:
        """``encode_chat`` for conversations that may hold images: the prompt ids and one
        ``ImageInput`` per image, in prompt order. The images are read under ``policy``
        (default: ``ImagePolicy()``, data URIs only)."""
        chat = _conversation(chat, tools)
        found = chat.images
        if not found:
            return self._encode_conversation(chat), []
        policy = policy or ImagePolicy()
        if not self.takes_images:
            raise InvalidParameter(found[0][0], f"this model's tokenizer ({self.path.name}) has no image format: "
                                                "image input needs a Mistral tokenizer with an image config "
                                                "(tekken.json of a vision model)")
        if len(found) > policy.max_images:
            raise InvalidParameter("messages", f"{len(found)} images is over the limit of {policy.max_images} a request")
        return self._encode_with_images(chat, [load_image(url, policy, field) for field, url in found])

    @property
    def takes_images(self) -> bool:
        """Whether prompts may hold images (a Mistral tokenizer with an image config)."""
        return False

    def _encode_with_images(self, chat: Conversation, images: list[LoadedImage]) -> tuple[list[int], list[ImageInput]]:
        raise NotImplementedError

    @abstractmethod
    def _encode_conversation(self, chat: Conversation) -> list[int]:
        ...

    def encode_fim(self, prompt: str, suffix: str | None = None) -> list[int]:
        raise TokenizerError(f"{self.path}: fill-in-the-middle needs a Mistral tokenizer (this one is {self.kind})")

    def stop_token_ids(self) -> set[int]:
        return {self.eos_id}

    @abstractmethod
    def is_special(self, token_id: int) -> bool:
        """Whether ``token_id`` is a control/special token (one that ``decode`` skips)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r}, path={str(self.path)!r}, vocab_size={self.vocab_size})"


def _conversation(chat: Conversation | list[dict], tools: list[dict] | None) -> Conversation:
    from galerne.conversation import Conversation

    if not isinstance(chat, Conversation):
        return Conversation.parse(chat, tools=tools)
    if tools is not None:
        raise TypeError("encode_chat: give the tools inside the Conversation")
    return chat


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
