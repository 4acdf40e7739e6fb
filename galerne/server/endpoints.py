"""The generation endpoints by dialect and path, and ``answer``: one request body answered
whole, as its route answers it, without HTTP. A batch job's line goes through here
(server/batch/runner.py), so that it meets the route's own checks (its wire type, the
model, the prompt's limits) and gets the route's body, or its error in the dialect's
envelope.

A route and ``answer`` share the endpoint's ``start`` (chat.py's ``start_chat``, and the
others'): a validated body in, the ``Generation`` to run and the ``Responder`` that
writes the answer out; the route then streams it or answers it over HTTP (``respond``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from ..engine.request import BATCH
from ..errors import EngineDeadError, GalerneError, InvalidParameter
from . import chat
from .dialect import Dialect
from .errors import ShuttingDown, error_body
from .mistral.protocol import MistralFIMCompletionRequest
from .mistral.routes import start_fim
from .openai.protocol import OpenAICompletionRequest
from .openai.routes import start_completion
from .protocol import RequestBody
from .serving import THREAD_MIN_BYTES, Generation, Responder, collect, validate
from .state import ServerState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Endpoint:
    wire: type[RequestBody]  # what validates its body
    # (server, validated body, priority=) -> the generation to run and its responder
    start: Callable[..., Awaitable[tuple[Generation, Responder]]]


ENDPOINTS: dict[Dialect, dict[str, Endpoint]] = {
    Dialect.OPENAI: {
        "/v1/chat/completions": Endpoint(chat.CHAT_WIRE[Dialect.OPENAI], partial(chat.start_chat, dialect=Dialect.OPENAI)),
        "/v1/completions": Endpoint(OpenAICompletionRequest, start_completion),
    },
    Dialect.MISTRAL: {
        "/v1/chat/completions": Endpoint(chat.CHAT_WIRE[Dialect.MISTRAL],
                                         partial(chat.start_chat, dialect=Dialect.MISTRAL)),
        "/v1/fim/completions": Endpoint(MistralFIMCompletionRequest, start_fim),
    },
}


async def answer(server: ServerState, dialect: Dialect, path: str, body: Any, *, priority: int = BATCH,
                 body_bytes: int | None = None) -> tuple[int, dict]:
    """(HTTP status, JSON body) of ``body`` sent to the endpoint ``path`` of ``dialect``,
    run at ``priority``: the route's answer, whole (``stream: true`` is refused: there is
    no stream to send it on). A refusal is its status and body in the dialect's envelope,
    as errors.py maps it, and so is a bug (a 500, logged). ShuttingDown and
    EngineDeadError are raised instead: the request did not run, nothing refused it.
    ``body_bytes``: the body's size, if known; a big one (or one of unknown size) is
    validated in a worker thread, as ``read_request`` does."""
    endpoint = ENDPOINTS[dialect][path]
    try:
        if body_bytes is not None and body_bytes < THREAD_MIN_BYTES:
            wire = validate(endpoint.wire, body)
        else:
            wire = await asyncio.to_thread(validate, endpoint.wire, body)
        if getattr(wire, "stream", False):
            raise InvalidParameter("stream", "must be false here: the answer comes whole, in the batch's output file")
        gen, responder = await endpoint.start(server, wire, priority=priority)
        try:
            await gen.open()
            return 200, await collect(gen, responder)
        finally:
            await gen.aclose()
    except (ShuttingDown, EngineDeadError):
        raise
    except Exception as e:
        if not isinstance(e, GalerneError):
            log.exception("%s %s: unexpected error", dialect.value, path)
        status, out, _ = error_body(e, dialect)
        return status, out
