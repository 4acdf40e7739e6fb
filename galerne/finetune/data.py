"""Training data: mistral-finetune's JSONL formats -> weighted token samples -> packed sequences.

Accepted lines (mistral-finetune's formats, unchanged):

* pretraining: ``{"text": "..."}`` -> BOS + text + EOS, every token trained but BOS;
* instruct: ``{"messages": [...]}`` with system/user/assistant messages (an assistant message
  may carry ``"weight": 0`` to be seen but not trained on);
* function calling: the same with ``"tools": [...]``, assistant ``tool_calls`` and ``tool``
  results.

Conversations are encoded by mistral-common, in its finetuning mode, message by message with
the same per-version encoders as ``encode_instruct`` (and checked to give exactly its tokens):
so the boundaries of each assistant turn are exact, and the assistant tokens, with the EOS that
closes each turn, are the only ones with a weight.

``Sample.weights[i]`` is the loss weight of *predicting* ``tokens[i]`` (from the logits at i-1).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from galerne.conversation import check_messages, check_tools, image_parts
from galerne.errors import GalerneError, InvalidParameter, TokenizerError


class DataError(GalerneError):
    """A training line that cannot be used; ``path`` and ``line`` say where, when known."""

    def __init__(self, reason: str, *, path: str | None = None, line: int | None = None):
        self.reason = reason
        self.path = path
        self.line = line
        where = f"{path}:{line}: " if path is not None and line is not None else f"{path}: " if path else ""
        super().__init__(f"{where}{reason}")


@dataclass
class Sample:
    tokens: list[int]
    weights: list[float]  # weights[i]: loss weight of predicting tokens[i]
    # The images of a vision model's line (galerne.images.ImageInput, spans in ``tokens``).
    images: list = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def trained_tokens(self) -> int:
        return sum(1 for w in self.weights if w > 0)


@dataclass
class PackedBatch:
    """One training sequence of exactly ``seq_len`` tokens.

    ``seqlens`` are the lengths of the documents in it, in order (the padding, if any, is the
    last, with weight 0): attention must not cross them (document masking), and position ids
    restart at each.
    """

    tokens: list[int]
    weights: list[float]
    seqlens: list[int] = field(default_factory=list)
    images: list = field(default_factory=list)  # ImageInput, spans in ``tokens``


# --------------------------------------------------------------------------- encoding


def encode_sample(tokenizer, obj: Any) -> Sample:
    """Encode one parsed JSONL line. Raises ``DataError`` (reason only; no path/line)."""
    if not isinstance(obj, dict):
        raise DataError("not a JSON object")
    if "messages" in obj:
        return _encode_chat(tokenizer, obj)
    if "text" in obj:
        text = obj["text"]
        if not isinstance(text, str):
            raise DataError("text must be a string")
        if not text.strip():
            raise DataError("empty text")
        tokens = tokenizer.encode(text, bos=True, eos=True)
        return Sample(tokens, [0.0] + [1.0] * (len(tokens) - 1))
    raise DataError('neither "text" (pretraining) nor "messages" (instruct)')


def _check_conversation(obj: dict) -> tuple[list[dict], list[dict] | None]:
    """mistral-finetune's rules, through the one conversation check (training mode)."""
    try:
        messages, _ = check_messages(obj["messages"], training=True)
        return messages, check_tools(obj.get("tools"))
    except InvalidParameter as e:
        raise DataError(str(e)) from None


@lru_cache(maxsize=4)
def _finetuning_tokenizer(path: str):
    # mistral-common's finetuning mode: the conversation must end with the assistant, and
    # assistant weights are checked; the engine's own instance serves (serving mode).
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    return MistralTokenizer.from_file(path, mode=ValidationMode.finetuning)


def _user_content(content, images: Iterator):
    """A user message's content for mistral-common: its text, or its chunks with the
    images read (``images``: the LoadedImage of each image part, in order)."""
    from mistral_common.protocol.instruct.chunk import ImageChunk, TextChunk

    if isinstance(content, str):
        return content
    return [TextChunk(text=p["text"]) if p["type"] == "text" else ImageChunk(image=next(images).image) for p in content]


def _read_images(messages: list[dict]) -> list:
    """The LoadedImage of every image part of a training line, read as a request's are
    (data URIs only: a training file names no URLs to fetch)."""
    from galerne.images import ImagePolicy, load_image

    policy = ImagePolicy()
    try:
        return [load_image(url, policy, field) for field, url in image_parts(messages)]
    except InvalidParameter as e:
        raise DataError(str(e)) from None


def _to_request(messages: list[dict], tools: list[dict] | None, images: list = ()):
    from mistral_common.protocol.instruct.messages import (
        FinetuningAssistantMessage,
        SystemMessage,
        ToolMessage,
        UserMessage,
    )
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.tool_calls import (
        Function,
        FunctionCall,
        Tool,
        ToolCall,
    )

    out = []
    left = iter(images)
    for m in messages:
        role = m["role"]
        if role == "system":
            out.append(SystemMessage(content=m["content"]))
        elif role == "user":
            out.append(UserMessage(content=_user_content(m["content"], left)))
        elif role == "assistant":
            calls = None
            if m.get("tool_calls"):
                calls = []
                for c in m["tool_calls"]:
                    fn = c["function"]
                    args = fn.get("arguments")
                    calls.append(ToolCall(id=c["id"], function=FunctionCall(name=fn["name"], arguments=args if args is not None else {})))
            out.append(FinetuningAssistantMessage(content=m.get("content") or None, tool_calls=calls, weight=m["weight"]))
        else:  # a tool result: check_messages named it after the call it answers
            out.append(ToolMessage(content=m["content"], tool_call_id=m["tool_call_id"], name=m["name"]))
    tool_objs = None
    if tools:
        tool_objs = []
        for t in tools:
            fn = t["function"]
            tool_objs.append(Tool(function=Function(name=fn.get("name"), description=fn.get("description", ""), parameters=fn.get("parameters") or {})))
    return ChatCompletionRequest(messages=out, tools=tool_objs)


def _assistant_run_weights(messages: list[dict], separators: set[str]) -> list[float]:
    """The weight of each run of consecutive assistant messages (mistral-common merges runs)."""
    runs: list[list[float]] = []
    prev = None
    for m in messages:
        role = m["role"]
        if role == "assistant":
            w = float(m.get("weight", 1))
            if prev == "assistant":
                runs[-1].append(w)
            else:
                runs.append([w])
            prev = role
        elif role in separators:
            prev = role
    for run in runs:
        if len(set(run)) > 1:
            raise DataError("consecutive assistant messages with different weights")
    return [run[0] for run in runs]


def _encode_chat(tokenizer, obj: dict) -> Sample:
    from mistral_common.exceptions import MistralCommonException
    from mistral_common.protocol.instruct.messages import (
        AssistantMessage,
        SystemMessage,
        ToolMessage,
        UserMessage,
    )

    from galerne.tokenizer import MistralCommonTokenizer

    messages, tools = _check_conversation(obj)
    if not isinstance(tokenizer, MistralCommonTokenizer):
        raise TokenizerError(f"{tokenizer.path}: instruct data needs a Mistral tokenizer (this one is {tokenizer.kind})")
    images = _read_images(messages)
    if images and not tokenizer.takes_images:
        raise DataError(f"the line holds images but the model's tokenizer ({tokenizer.path.name}) has no image format "
                        "(a vision model's tekken.json)")
    mt = _finetuning_tokenizer(str(tokenizer.path))
    it = mt.instruct_tokenizer
    pixels = []
    try:
        request = _to_request(messages, tools, images)
        validated = mt._chat_completion_request_validator.validate_request(request)
        instruct = mt._instruct_request_normalizer.from_chat_completion_request(validated)
        # encode_instruct's loop, keeping each message's tokens apart.
        it.validate_messages(instruct.messages)
        first_user, last_user = it.find_first_last_user(instruct)
        tokens = it.start()
        weights = [0.0] * len(tokens)
        n_assistant = sum(isinstance(m, AssistantMessage) for m in instruct.messages)
        run_weights = _assistant_run_weights(messages, {"user", "tool", "system"})
        if len(run_weights) != n_assistant:  # system messages folded into the system prompt
            run_weights = _assistant_run_weights(messages, {"user", "tool"})
        if len(run_weights) != n_assistant:
            raise DataError("cannot match the assistant messages to their encoding")
        k = 0
        for idx, msg in enumerate(instruct.messages):
            w = 0.0
            if isinstance(msg, UserMessage):
                new, found, _ = it.encode_user_message(
                    msg, instruct.available_tools, idx == last_user, idx == first_user,
                    system_prompt=instruct.system_prompt, force_img_first=True, settings=instruct.settings,
                )
                pixels += found or []
            elif isinstance(msg, ToolMessage):
                new, _, _ = it.encode_tool_message(msg, idx < last_user)
            elif isinstance(msg, AssistantMessage):
                new = it.encode_assistant_message(message=msg, is_before_last_user_message=idx < last_user)
                w = run_weights[k]
                k += 1
            elif isinstance(msg, SystemMessage):
                new, _ = it.encode_system_message(msg)
            else:
                raise DataError(f"unknown message type {type(msg).__name__}")
            new = new or []
            tokens += new
            weights += [w] * len(new)
        full = it.encode_instruct(instruct).tokens
    except DataError:
        raise
    except (MistralCommonException, ValueError, TypeError, KeyError, AssertionError) as e:
        raise DataError(f"rejected by mistral-common: {type(e).__name__}: {e}") from e
    if tokens != full:
        raise DataError("per-message encoding differs from mistral-common's (unsupported conversation)")
    if not images:
        return Sample(tokens, weights)
    from galerne.images import image_inputs

    ids = tokenizer.image_encoder.special_ids
    try:
        return Sample(tokens, weights, image_inputs(tokens, pixels, [im.digest for im in images], ids.img, ids.img_end))
    except ValueError as e:
        raise DataError(f"cannot place the line's images: {e}") from None


# --------------------------------------------------------------------------- packing


def pack(samples: Iterable[Sample], seq_len: int, *, pad_id: int = 0) -> list[PackedBatch]:
    """Pack samples, in order, greedily into sequences of exactly ``seq_len`` tokens.

    A sample is never split: one that does not fit what is left of a sequence starts the next
    one, and the rest is padding (weight 0, its own trailing document in ``seqlens``). A sample
    longer than ``seq_len`` raises ``DataError`` (validation reports these with their line).
    """
    return list(pack_stream(samples, seq_len, pad_id=pad_id))


def pack_stream(samples: Iterable[Sample], seq_len: int, *, pad_id: int = 0) -> Iterator[PackedBatch]:
    """:func:`pack` as a generator: works on an endless stream of samples."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, not {seq_len}")
    cur = PackedBatch([], [], [])
    for i, s in enumerate(samples):
        n = len(s.tokens)
        if n > seq_len:
            raise DataError(f"sample {i}: {n} tokens > seq_len {seq_len}")
        if n == 0:
            continue
        if len(cur.tokens) + n > seq_len:
            yield _padded(cur, seq_len, pad_id)
            cur = PackedBatch([], [], [])
        _append(cur, s)
    if cur.tokens:
        yield _padded(cur, seq_len, pad_id)


def _append(batch: PackedBatch, s: Sample) -> None:
    if s.images:
        batch.images += shifted(s.images, len(batch.tokens))
    batch.tokens += s.tokens
    batch.weights += s.weights
    batch.seqlens.append(len(s.tokens))


def shifted(images: list, by: int) -> list:
    """``images`` (ImageInput) with their spans ``by`` tokens later (a sample packed after others)."""
    import dataclasses

    return [dataclasses.replace(im, offset=im.offset + by) for im in images]


def _padded(batch: PackedBatch, seq_len: int, pad_id: int) -> PackedBatch:
    """``batch`` filled up to ``seq_len`` with padding: weight 0, its own trailing document."""
    pad = seq_len - len(batch.tokens)
    if pad:
        batch.tokens += [pad_id] * pad
        batch.weights += [0.0] * pad
        batch.seqlens.append(pad)
    return batch


def pack_first_fit(samples: Iterable[Sample], seq_len: int, *, pad_id: int = 0) -> list[PackedBatch]:
    """Pack ``samples`` into as few sequences as first-fit-decreasing finds: far less
    padding than :func:`pack` when samples are long relative to ``seq_len``, at the cost
    of their order (sequences come out longest-first-filled; deterministic). Never splits
    a sample; one longer than ``seq_len`` raises ``DataError``."""
    items = [s for s in samples if len(s.tokens)]
    for i, s in enumerate(items):
        if len(s.tokens) > seq_len:
            raise DataError(f"sample {i}: {len(s.tokens)} tokens > seq_len {seq_len}")
    order = sorted(range(len(items)), key=lambda i: -len(items[i].tokens))  # stable: ties keep input order
    bins: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = len(items[i].tokens)
        for b, room in enumerate(free):
            if n <= room:
                bins[b].append(i)
                free[b] -= n
                break
        else:
            bins.append([i])
            free.append(seq_len - n)
    out = []
    for b in bins:
        batch = PackedBatch([], [], [])
        for i in b:
            _append(batch, items[i])
        out.append(_padded(batch, seq_len, pad_id))
    return out


def decode_weighted(tokenizer, sample: Sample, *, keep_special: bool = False) -> str:
    """The text of the trained tokens (weight > 0): a debugging aid for data files."""
    return tokenizer.decode([t for t, w in zip(sample.tokens, sample.weights) if w > 0], keep_special=keep_special)

