"""Mistral tokenizers (tekken.json, tokenizer.model[.vN]) through mistral-common.

Everything that has a format (chat, tools, fill-in-the-middle) goes through
mistral-common: the prompt format of a Mistral model is defined there, so galerne
never writes a chat template of its own for these.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from mistral_common.exceptions import (
    InvalidToolException,
    InvalidToolSchemaException,
    MistralCommonException,
)
from mistral_common.protocol.fim.request import FIMRequest
from mistral_common.protocol.instruct.chunk import ImageChunk, ImageURLChunk
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy, TokenizerVersion
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from mistral_common.tokens.tokenizers.tekken import Tekkenizer

from galerne.conversation import check_text, mistral_tool_call_id
from galerne.errors import InvalidParameter, TokenizerError
from galerne.images import ImageInput, LoadedImage, image_inputs

from .base import Tokenizer

if TYPE_CHECKING:
    from galerne.conversation import Conversation


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
        check_text(text, "prompt")
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

    @property
    def mistral_tokenizer(self) -> MistralTokenizer:
        return self._mt

    @property
    def mistral_version(self) -> TokenizerVersion:
        return self._tok.version

    @property
    def thinks(self) -> bool:
        # mistral-common's rule (InstructTokenizerV13): both tokens, from v13 on.
        return (self._tok.version >= TokenizerVersion.v13 and self.special_token_id("[THINK]") is not None
                and self.special_token_id("[/THINK]") is not None)

    @property
    def takes_reasoning_effort(self) -> bool:
        builder = getattr(self._tok, "model_settings_builder", None)
        return builder is not None and builder.reasoning_effort is not None

    @property
    def tool_call_format(self) -> str | None:
        if self._tok.version == TokenizerVersion.v1 or self.special_token_id("[TOOL_CALLS]") is None:
            return None
        return "list" if self._tok.version <= TokenizerVersion.v7 else "args"

    def _encode_conversation(self, chat: Conversation) -> list[int]:
        return self._encode(chat).tokens

    @property
    def image_encoder(self):
        """mistral-common's ``ImageEncoder`` (its ``image_config``: patch size, largest
        side, merge size; its ``special_ids``), or None for a text-only tokenizer."""
        return getattr(self._mt.instruct_tokenizer, "image_encoder", None)

    @property
    def takes_images(self) -> bool:
        return self.image_encoder is not None

    def _encode_with_images(self, chat: Conversation, images: list[LoadedImage]) -> tuple[list[int], list[ImageInput]]:
        tokenized = self._encode(chat, images)
        ids = self.image_encoder.special_ids
        try:
            found = image_inputs(tokenized.tokens, tokenized.images, [im.digest for im in images], ids.img, ids.img_end)
        except ValueError as e:
            raise TokenizerError(f"{self.path}: {e}") from None
        return tokenized.tokens, found

    def _encode(self, chat: Conversation, images: list[LoadedImage] = ()):
        messages = []
        for msg in chat.messages:
            # mistral-common takes only its own id form: foreign ids are mapped, consistently.
            msg = dict(msg)
            if msg.get("tool_calls"):
                msg["tool_calls"] = [dict(c, id=mistral_tool_call_id(c["id"])) if "id" in c else c
                                     for c in msg["tool_calls"]]
            if msg.get("tool_call_id") is not None:
                msg["tool_call_id"] = mistral_tool_call_id(msg["tool_call_id"])
            messages.append(msg)
        options = self._model_settings(chat)
        try:
            if isinstance(msg.get("content"), list):  # image parts in mistral-common's OpenAI shape
                msg["content"] = [{"type": "image_url", "image_url": {"url": p["url"]}} if p["type"] == "image_url"
                                  else p for p in msg["content"]]
            request = ChatCompletionRequest.from_openai(
                messages,
                tools=chat.tools,
                continue_final_message=chat.continue_final,
                # mistral-common's serving mode insists on a model name; it does not change the tokens.
                model="galerne",
                **options,
            )
            _put_images(request, images)
            return self._mt.encode_chat_completion(request)
        except (InvalidToolException, InvalidToolSchemaException) as e:
            raise InvalidParameter("tools", str(e)) from e
        # pydantic's validation errors are ValueErrors; mistral-common also asserts on requests.
        except (MistralCommonException, ValueError, TypeError, KeyError, AssertionError) as e:
            raise InvalidParameter("messages", _message(e)) from e

    def _model_settings(self, chat: Conversation) -> dict:
        """What tokenizer v15 writes into the prompt as model settings, as
        ``ChatCompletionRequest`` fields: the reasoning effort (only where the model takes
        it, see takes_reasoning_effort) and the answer's response format."""
        if not self._tok.version.supports_model_settings:
            return {}
        options: dict = {}
        if chat.reasoning_effort is not None and self.takes_reasoning_effort:
            allowed = [str(v) for v in self._tok.model_settings_builder.reasoning_effort.values]
            if chat.reasoning_effort not in allowed:
                raise InvalidParameter("reasoning_effort",
                                       f"this model takes {', '.join(allowed)}; got {chat.reasoning_effort!r}")
            options["reasoning_effort"] = chat.reasoning_effort
        if chat.response_format is not None:
            options["response_format"] = chat.response_format
        return options

    def encode_fim(self, prompt: str, suffix: str | None = None) -> list[int]:
        # mistral-common's v2 SentencePiece encoder "supports" FIM but its vocabulary has no
        # [PREFIX]/[SUFFIX]: they come out as <unk>. Refuse rather than feed the model that.
        it = self._mt.instruct_tokenizer
        markers = (getattr(it, "PREFIX", None), getattr(it, "SUFFIX", None))
        if None in markers or self._tok.unk_id in markers:
            raise TokenizerError(f"{self.path}: tokenizer {self.version} has no fill-in-the-middle tokens")
        check_text(prompt, "prompt")
        check_text(suffix, "suffix")
        try:
            return self._mt.encode_fim(FIMRequest(prompt=prompt, suffix=suffix)).tokens
        except (MistralCommonException, ValueError) as e:
            raise TokenizerError(f"{self.path}: cannot encode fill-in-the-middle request: {_message(e)}") from e


def _put_images(request: ChatCompletionRequest, images: list[LoadedImage]) -> None:
    """Replace the request's image URL chunks, in order, by the images galerne read (so
    that mistral-common never fetches or decodes anything itself)."""
    left = iter(images)
    for msg in request.messages:
        if isinstance(getattr(msg, "content", None), list):
            msg.content = [ImageChunk(image=next(left).image) if isinstance(c, ImageURLChunk) else c
                           for c in msg.content]
    if next(left, None) is not None:
        raise TokenizerError("the request holds fewer image chunks than the images read")


def _message(e: Exception) -> str:
    # KeyError's str() is just the quoted key; say what it is.
    return f"missing field {e}" if isinstance(e, KeyError) else str(e)
