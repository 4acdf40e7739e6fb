"""From an API request to engine outputs, and back to HTTP.

``Generation`` runs the engine requests of one API request (one per prompt,
each already checked by ``validate_request`` in the route) and merges their
outputs. It is *opened* before any byte of the response goes out: admission
(queue bound, draining), the engine's own refusal (a request the KV cache can
never hold) and the wait for the first token all happen then, so every refusal
is a proper HTTP error in the dialect's envelope, never a broken stream.

A client that goes away cancels its engine requests: while the response is being
prepared (watching the ASGI ``http.disconnect``), and mid-stream (Starlette
cancels the body iterator, whose ``finally`` closes the generation). The
AsyncEngine queues the abort without waiting for the engine; the engine thread
applies it before its next step, freeing the request's blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import replace
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from ..conversation import json_depth
from ..engine.engine import StepOutput
from ..engine.request import INTERACTIVE, EngineRequest
from ..errors import EngineDeadError
from .errors import (
    ClientGone,
    FieldError,
    Overloaded,
    RequestInvalid,
    ShuttingDown,
    TextTooLong,
    error_body,
)
from .state import ServerState

log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")


# ------------------------------------------------------------------ request bodies

# Characters per token, an upper bound for real text (which averages about 4; the margin
# covers code indentation and long words): text past ``max_model_len`` times this would
# not fit the context, and is refused before anything tokenizes it. Only contrived text
# (a long run of one character, which a tokenizer may pack into long tokens) could.
CHARS_PER_TOKEN = 16
# Bodies past this size are parsed in a worker thread, with the text count (a Python
# walk, which then leaves the loop its turns); a thread hop costs more than parsing a
# small body. json.loads itself holds the GIL whatever the thread: what bounds its
# time is the body limit (guards.BodyGuard).
THREAD_MIN_BYTES = 64 * 1024
# The deepest nesting of objects and lists a body may have, anywhere in it: a tool's
# parameters schema (itself at most conversation.MAX_SCHEMA_DEPTH = 64) lies 4 deep.
# A fixed figure, not the decoder's recursion limit, which depends on the stack.
MAX_JSON_DEPTH = 128
_TOO_DEEP = f"objects and lists nested too deeply (more than {MAX_JSON_DEPTH} levels)"


async def read_json(request: Request, *, one_prompt: bool = True) -> Any:
    """The JSON body. A malformed one is a RequestInvalid that says where it breaks;
    more text than the context can hold is a TextTooLong (unless ``one_prompt`` is
    false: a body of many requests, a batch job's, whose each one is checked when it
    runs); a client gone while sending it is a ClientGone. Its size and the time it
    takes to come are bounded before (guards.BodyGuard: 413, 408)."""
    try:
        raw = await request.body()
    except ClientDisconnect:  # a 499 in the metrics, not a 500 in the logs
        raise ClientGone() from None
    context = request.app.state.server.max_model_len if one_prompt else None
    request.state.body_bytes = len(raw)
    if len(raw) < THREAD_MIN_BYTES:
        return parse_json(raw, context)
    return await asyncio.to_thread(parse_json, raw, context)


async def read_request(request: Request, model: type[M], body: Any = None) -> M:
    """The body (``read_json``'s, or ``body`` already read) validated as ``model``, in a
    worker thread when it is big (THREAD_MIN_BYTES), as its parsing was: pydantic walks
    every item of a 2 MiB body of tiny values for a few hundred ms, which other clients
    would otherwise wait for."""
    if body is None:
        body = await read_json(request)
    if getattr(request.state, "body_bytes", 0) < THREAD_MIN_BYTES:
        return validate(model, body)
    return await asyncio.to_thread(validate, model, body)


def parse_json(raw: bytes, context: int | None) -> Any:
    """A JSON body (``raw``) for a model of ``context`` tokens (None: no bound on its
    text), checked as ``read_json`` says; also each line of a batch job's input."""
    try:
        body = json.loads(raw)
    except RecursionError:  # the decoder recurses on each nested object or list
        raise RequestInvalid([FieldError(("body",), _TOO_DEEP, "json_invalid")]) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f" at line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
        raise RequestInvalid([FieldError(("body",), f"malformed JSON{where}: {e.msg if hasattr(e, 'msg') else e}",
                                         "json_invalid")]) from None
    if json_depth(body, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise RequestInvalid([FieldError(("body",), _TOO_DEEP, "json_invalid")])
    if context is not None and len(raw) > context * CHARS_PER_TOKEN:  # else: fewer characters than bytes
        check_text_length(text_chars(body), context)
    return body


def check_text_length(chars: int, context: int) -> None:
    """TextTooLong when ``chars`` characters cannot fit a context of ``context`` tokens."""
    limit = context * CHARS_PER_TOKEN
    if chars > limit:
        raise TextTooLong(f"the request holds {chars:,} characters of text, more than the model's context of "
                          f"{context:,} tokens can hold (at most {limit:,} characters, {CHARS_PER_TOKEN} per token); "
                          "shorten the prompt or messages")


def text_chars(body: Any) -> int:
    """The characters of the strings in a parsed JSON body (keys too). Each item of a
    top-level ``prompt`` list is a prompt of its own (legacy completions): the list
    counts as its longest item. An image part's URL is not text (a base64 image becomes
    image tokens, bounded by --max-image-mb, not characters' tokens): it is not counted."""
    if isinstance(body, dict) and isinstance(body.get("prompt"), list) and body["prompt"]:
        rest = _chars([v for k, v in body.items() if k != "prompt"]) + sum(len(k) for k in body)
        return rest + max(_chars(p) for p in body["prompt"])
    return _chars(body)


def _chars(value: Any) -> int:
    total, stack = 0, [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            total += len(v)
        elif isinstance(v, dict):
            total += sum(len(k) for k in v)
            image = v.get("type") == "image_url"
            stack.extend(item for k, item in v.items() if not (image and k == "image_url"))
        elif isinstance(v, list):
            stack.extend(v)
    return total


def validate(model: type[M], body: Any) -> M:
    if not isinstance(body, dict):
        raise RequestInvalid([FieldError(("body",), "must be a JSON object", "model_type")])
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise RequestInvalid.from_pydantic(e) from None


# ------------------------------------------------------------------ disconnects


async def until_disconnect(request: Request, aw: Awaitable[T]) -> T:
    """Await ``aw`` unless the client goes away first: then cancel it, raise ClientGone."""
    task = asyncio.ensure_future(aw)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watch.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    raise ClientGone()


async def _disconnected(request: Request) -> None:
    # The body was read: the next ASGI message can only be the disconnect.
    while True:
        try:
            message = await request.receive()
        except ClientDisconnect:
            return
        if message["type"] == "http.disconnect":
            return


# ------------------------------------------------------------------ generation


class Generation:
    """The engine requests of one API request: prompt k's completion i is choice k * n + i.
    They share one SamplingParams; engine request k is named ``<id>-k``.

    ``priority``: the engine's (``engine.request``). An interactive generation counts
    against ``max_queued_requests`` and in the latency histograms; a batch job's line
    does neither (its runner bounds how many it runs, and its waits are not a client's)."""

    def __init__(self, server: ServerState, requests: Sequence[EngineRequest], request_id: str | None = None,
                 priority: int = INTERACTIVE):
        self.server = server
        self.id = request_id or uuid.uuid4().hex
        self.interactive = priority == INTERACTIVE
        self.requests = [replace(r, request_id=f"{self.id}-{k}", priority=priority) for k, r in enumerate(requests)]
        self.prompts = [r.prompt for r in self.requests]
        self.params = self.requests[0].params
        self.start = time.monotonic()
        self.num_prompt_tokens = sum(len(p) for p in self.prompts)
        self.num_cached_tokens = 0
        self.num_generated = 0
        self._queue: asyncio.Queue = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self._buffer: list[tuple[int, StepOutput]] = []
        self._waiting_first: set[int] = set()
        self._live = 0  # producers not finished
        self._last: dict[tuple[int, int], float] = {}

    def usage(self) -> dict:
        """The API's usage object (both dialects), as far as the generation went."""
        return {"prompt_tokens": self.num_prompt_tokens, "completion_tokens": self.num_generated,
                "total_tokens": self.num_prompt_tokens + self.num_generated,
                "prompt_tokens_details": {"cached_tokens": self.num_cached_tokens}}

    # --- opening

    async def open(self, request: Request | None = None) -> None:
        """Admit, start and wait for every prompt's first output (or first error).
        ``request``: the HTTP request whose client, going away, cancels it (None: a batch
        job's line, which has no client)."""
        s = self.server
        if s.draining:
            raise ShuttingDown("the server is shutting down; it takes no new requests")
        if s.engine is None:
            raise EngineDeadError("the engine is not running")
        if self.interactive:
            if s.queued + len(self.prompts) > s.settings.max_queued_requests:
                raise Overloaded(f"too many requests waiting ({s.queued}, at most {s.settings.max_queued_requests}); "
                                 "retry later", retry_after=1)
            s.queued += len(self.prompts)
            s.metrics.queued.inc(len(self.prompts))
            self._waiting_first = set(range(len(self.prompts)))
        self._live = len(self.prompts)
        for k, req in enumerate(self.requests):
            self._tasks.append(asyncio.create_task(self._produce(k, req)))
        try:
            await (self._prime() if request is None else until_disconnect(request, self._prime()))
        except BaseException:
            await self.aclose()
            raise

    async def _prime(self) -> None:
        seen: set[int] = set()
        while len(seen) < len(self.prompts):
            k, item = await self._queue.get()
            if isinstance(item, BaseException):
                raise item
            self._buffer.append((k, item))
            seen.add(k)

    async def _produce(self, k: int, request: EngineRequest) -> None:
        put = self._queue.put_nowait
        try:
            async for out in self.server.engine.generate(request):
                self._first(k)
                put((k, out))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the engine's refusal (KV capacity), or EngineDeadError
            put((k, e))
        finally:
            self._first(k)
            put((k, None))

    def _first(self, k: int) -> None:
        if k in self._waiting_first:
            self._waiting_first.discard(k)
            self.server.queued -= 1
            self.server.metrics.queued.dec()

    # --- reading

    async def outputs(self) -> AsyncIterator[tuple[int, StepOutput]]:
        """(choice index, output) until every completion finished. The caller closes the
        generation (``aclose``) in its own ``finally``: a consumer cancelled mid-stream
        does not close this iterator."""
        n = self.params.n
        try:
            pending = list(self._buffer)
            self._buffer.clear()
            while True:
                for k, item in pending:
                    if item is None:
                        self._live -= 1
                        continue
                    if isinstance(item, BaseException):
                        raise item
                    self._record(k, item)
                    yield k * n + item.index, item
                if self._live == 0:
                    return
                pending = [await self._queue.get()]
        finally:
            await self.aclose()

    def _record(self, k: int, out: StepOutput) -> None:
        m, now = self.server.metrics, time.monotonic()
        key = (k, out.index)
        if key not in self._last:
            if self.interactive:
                m.ttft.observe(now - self.start)
            if out.index == 0:
                self.num_cached_tokens += out.num_cached_tokens
        elif self.interactive:
            m.itl.observe(now - self._last[key])
        self._last[key] = now
        self.num_generated += len(out.token_ids)
        if out.finish_reason is not None:
            m.finished(out.finish_reason)

    async def aclose(self) -> None:
        """Cancel what still runs (the AsyncEngine queues their aborts); idempotent."""
        tasks, self._tasks = self._tasks, []
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t
        for k in list(self._waiting_first):
            self._first(k)
        if tasks:
            m = self.server.metrics
            m.prompt_tokens.inc(self.num_prompt_tokens)
            m.generation_tokens.inc(self.num_generated)
            if self.interactive:
                m.e2e.observe(time.monotonic() - self.start)


# ------------------------------------------------------------------ SSE


def sse(data: Any) -> bytes:
    """One Server-Sent Event: ``data: {...}``."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


SSE_DONE = sse("[DONE]")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# ------------------------------------------------------------------ responses


class Responder(ABC):
    """Turns outputs into an API response: chunks as they come (``add``), closing chunks
    (``end``), or one body at the end (``body``). One per endpoint shape."""

    stream: bool

    @abstractmethod
    def add(self, choice: int, out: StepOutput) -> list[dict]:
        ...

    @abstractmethod
    def end(self) -> list[dict]:
        ...

    @abstractmethod
    def body(self) -> dict:
        ...


async def collect(gen: Generation, responder: Responder) -> dict:
    """Every output of an opened generation through ``responder``; its whole body."""
    async for i, out in gen.outputs():
        responder.add(i, out)
    return responder.body()


async def respond(request: Request, gen: Generation, responder: Responder, dialect) -> Response:
    """Open the generation (errors still become HTTP errors), then answer: one JSON body,
    or Server-Sent Events ``data: {...}`` ending with ``data: [DONE]``."""
    await gen.open(request)
    if not responder.stream:
        try:
            return JSONResponse(await until_disconnect(request, collect(gen, responder)))
        finally:
            await gen.aclose()

    async def events():
        try:
            async for i, out in gen.outputs():
                for chunk in responder.add(i, out):
                    yield sse(chunk)
            for chunk in responder.end():
                yield sse(chunk)
        except Exception as e:  # the response started: the error goes in the stream (clients raise it)
            log.warning("stream %s failed: %r", gen.id, e)
            yield sse(error_body(e, dialect)[1])
        finally:
            await gen.aclose()  # also when the client went away and Starlette cancelled us
        yield SSE_DONE

    return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)
