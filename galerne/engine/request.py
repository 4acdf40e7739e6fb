"""A request, checked once before it reaches the engine.

``validate_request`` is the one place where a prompt and its SamplingParams are
checked against the model's ``Limits``: ``LLM`` (generate, stream, chat, score)
and every server route call it, the server in the worker thread that encodes, so
a refusal is an HTTP 400 and nothing reaches the engine. The sampling values
themselves were checked when the SamplingParams was made; the engine keeps only
what it alone knows (a request its KV cache can never hold, a grammar that does
not compile).
"""

from __future__ import annotations

import operator
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import InvalidParameter, PromptTooLong
from ..images import ImageInput
from ..sampling.params import SamplingParams

# Priorities (lower is served first; see engine/scheduler.py): a client waiting on an
# answer, and the lines of a batch job, which take what interactive traffic leaves.
INTERACTIVE = 0
BATCH = 1


@dataclass(frozen=True)
class Limits:
    """What a request is checked against: the tokenizer's vocabulary, the context length."""

    vocab_size: int
    max_model_len: int


@dataclass(frozen=True)
class EngineRequest:
    """A request that passed ``validate_request``: what ``Engine.add_request`` takes."""

    prompt: tuple[int, ...]
    params: SamplingParams | None  # None: a prompt to score (LLM.score), not to run
    max_tokens: int  # the generation budget: params.max_tokens, or the room the prompt leaves
    request_id: str
    adapter: str | None = None
    priority: int = INTERACTIVE  # lower first: INTERACTIVE, then BATCH
    images: tuple[ImageInput, ...] = ()  # the prompt's images, in order (galerne.images)


def validate_request(
    prompt_ids: Sequence[int],
    params: SamplingParams | None,
    limits: Limits,
    *,
    field: str = "prompt",
    request_id: str | None = None,
    adapter: str | None = None,
    images: Sequence[ImageInput] = (),
) -> EngineRequest:
    """Check a prompt (token ids) and its params; errors name the field (``field`` for
    the prompt). ``params`` None: the prompt is only scored (``LLM.score``), so it may
    fill the context and its budget is 0. ``images``: the prompt's images
    (``Tokenizer.encode_chat_with_images``), each span inside the prompt."""
    try:
        prompt = tuple(operator.index(t) for t in prompt_ids)
    except TypeError:
        raise InvalidParameter(field, "must be a list of token ids (integers)") from None
    n, context = len(prompt), limits.max_model_len
    if n == 0:
        raise InvalidParameter(field, "is empty")
    if n > context:
        raise PromptTooLong(n, context, field, (params.max_tokens or 0) if params is not None else 0)
    if n == context and params is not None and params.max_tokens != 0:
        raise PromptTooLong(n, context, field, 1)  # generating needs one token more
    _check_ids(prompt, limits.vocab_size, field)
    images = tuple(images)
    if any(not 0 <= a.offset < a.end <= n for a in images) or any(
            a.end > b.offset for a, b in zip(images, images[1:])):
        raise InvalidParameter(field, "image spans must lie inside the prompt, in order, without overlapping")
    if params is None:
        return EngineRequest(prompt, None, 0, request_id or uuid.uuid4().hex, adapter, images=images)
    room = context - n
    budget = room if params.max_tokens is None else params.max_tokens
    if budget > room:
        raise PromptTooLong(n, context, field, budget, field="max_tokens")
    if params.min_tokens > budget:
        raise InvalidParameter(
            "min_tokens", f"({params.min_tokens}) is more than the {budget} tokens the prompt ({n} tokens) leaves "
                          f"in the model's context of {context} tokens",
        )
    if params.logit_bias:
        _check_ids([t for t, _ in params.logit_bias], limits.vocab_size, "logit_bias")
    return EngineRequest(prompt, params, budget, request_id or uuid.uuid4().hex, adapter, images=images)


def _check_ids(ids: Sequence[int], vocab_size: int, field: str) -> None:
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidParameter(field, f"token id {bad} is outside the vocabulary (0..{vocab_size - 1})")
