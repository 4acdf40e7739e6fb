"""OpenAI-only routes: the legacy text completions (with ``suffix``: fill-in-the-middle)."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Depends
from starlette.requests import Request
from starlette.responses import Response

from ...engine.engine import StepOutput
from ...engine.request import INTERACTIVE, EngineRequest, validate_request
from ...errors import InvalidParameter
from ..auth import require_api_key
from ..chat import new_id
from ..dialect import Dialect
from ..logprobs import legacy, prompt_logprobs, text_offsets
from ..mistral.routes import body_schema
from ..protocol import sampling_params
from ..serving import Generation, Responder, read_request, respond
from ..state import ServerState
from .protocol import OpenAICompletionRequest

router = APIRouter(dependencies=[Depends(require_api_key)], tags=["openai"])


@router.post("/v1/completions", openapi_extra=body_schema("OpenAICompletionRequest"),
             summary="Text completion (OpenAI legacy)")
async def completions(request: Request) -> Response:
    """Complete each prompt (text or token ids); with ``suffix``, fill in the middle
    between the prompt and the suffix (mistral-common's FIM encoding)."""
    req = await read_request(request, OpenAICompletionRequest)
    gen, responder = await start_completion(request.app.state.server, req)
    return await respond(request, gen, responder, Dialect.OPENAI)


async def start_completion(server: ServerState, wire: OpenAICompletionRequest, *,
                           priority: int = INTERACTIVE) -> tuple[Generation, TextResponder]:
    """A validated completions body as the generation to run (at ``priority``) and the
    responder that answers it: what the route and a batch job's line share."""
    req = wire.normalize()
    model, adapter = server.check_model(req.model)
    req.check_size(server.settings.max_queued_requests)
    tok = server.tokenizer
    kwargs = dict(req.sampling)
    asked_prompt_logprobs = kwargs.get("prompt_logprobs") is not None
    if req.logprobs is not None:
        kwargs["logprobs"] = req.logprobs
        if req.echo:  # the echoed prompt comes with its tokens' logprobs
            kwargs["prompt_logprobs"] = max(req.logprobs, kwargs.get("prompt_logprobs") or 0)
    params = sampling_params(kwargs)

    def prepare() -> list[EngineRequest]:  # encoding and checking take CPU time: not on the event loop
        out = []
        for i, p in enumerate(req.prompts):
            where = "prompt" if len(req.prompts) == 1 else f"prompt[{i}]"
            if isinstance(p, str):
                p = tok.encode_fim(p, req.suffix) if req.fim else tok.encode(p, bos=True)
            elif req.fim:
                raise InvalidParameter(where, "suffix needs a text prompt")
            out.append(validate_request(p, params, server.limits, field=where, adapter=adapter))
        return out

    gen = Generation(server, await asyncio.to_thread(prepare), request_id=new_id(Dialect.OPENAI, "cmpl-"),
                     priority=priority)
    echo = [p if isinstance(p, str) else tok.decode(p) for p in req.prompts] if req.echo else None
    responder = TextResponder(server, gen, model=model, stream=req.stream, logprobs=req.logprobs,
                              include_usage=req.include_usage, echo=echo, prompt_logprobs=asked_prompt_logprobs)
    return gen, responder


class TextResponder(Responder):
    def __init__(self, server: ServerState, gen: Generation, *, model: str, stream: bool, logprobs: int | None,
                 include_usage: bool, echo: list[str] | None, prompt_logprobs: bool = False):
        self.server, self.gen, self.model, self.stream = server, gen, model, stream
        self.logprobs, self.include_usage, self.echo = logprobs, include_usage, echo
        self.want_prompt_logprobs = prompt_logprobs  # vLLM's field, per choice
        self.created = int(time.time())
        self.tokenizer = server.tokenizer
        n = gen.params.n * len(gen.prompts)
        self.text = [""] * n
        self.started = [False] * n
        self.finish: list[str | None] = [None] * n
        self._unfinished = n
        self.lp = [{"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []} for _ in range(n)]
        self.prompt_lp: list[list | None] = [None] * n

    def _logprobs(self, i: int, out: StepOutput, first: bool) -> dict | None:
        """This output's piece of the legacy logprobs object; the first one of an echo
        starts with the prompt's tokens (the first with a null logprob)."""
        if self.logprobs is None or out.logprobs is None and not (first and self.echo is not None):
            return None
        tok = self.tokenizer
        pieces = []
        if first and self.echo is not None:
            prompt = self.gen.prompts[i // self.gen.params.n]
            entries = out.prompt_logprobs or [None] * len(prompt)
            pieces.append(legacy(tok, prompt, [None if e is None else e.logprob for e in entries],
                                 [None if e is None else e.top for e in entries], self.logprobs,
                                 text_offsets(tok, prompt)))
        if out.logprobs is not None:
            # Every generated token, the stop token (EOS) too: completion_tokens entries.
            ids = out.token_ids
            start = len(self.text[i]) - len(out.text)  # where this output's text starts
            pieces.append(legacy(tok, ids, out.logprobs, out.top_logprobs or [[]] * len(ids), self.logprobs,
                                 [start] * len(ids)))
        piece = {key: [v for p in pieces for v in p[key]] for key in ("tokens", "token_logprobs", "top_logprobs",
                                                                       "text_offset")}
        for key, values in piece.items():
            self.lp[i][key] += values
        return piece

    def _chunk(self, choices: list[dict], usage: dict | None = None) -> dict:
        out = {"id": self.gen.id, "object": "text_completion", "created": self.created, "model": self.model,
               "choices": choices}
        if usage is not None or self.include_usage:
            out["usage"] = usage
        return out

    def add(self, i: int, out: StepOutput) -> list[dict]:
        text, first = out.text, not self.started[i]
        if self.echo is not None and first:
            text = self.echo[i // self.gen.params.n] + text
        self.started[i] = True
        self.text[i] += text
        logprobs = self._logprobs(i, out, first)
        extra = {}
        if first and self.want_prompt_logprobs and out.prompt_logprobs is not None:
            self.prompt_lp[i] = prompt_logprobs(self.tokenizer, self.gen.prompts[i // self.gen.params.n],
                                                out.prompt_logprobs)
            extra["prompt_logprobs"] = self.prompt_lp[i]
        if out.finish_reason is not None:
            self.finish[i] = "stop" if out.finish_reason == "abort" else out.finish_reason
            self._unfinished -= 1
        if not self.stream or not (text or logprobs or out.finish_reason):
            return []
        # Without include_usage (an extra chunk, in end()), the last chunk carries the usage.
        usage = self.gen.usage() if self._unfinished == 0 and not self.include_usage else None
        return [self._chunk([{"index": i, "text": text, "logprobs": logprobs, "finish_reason": self.finish[i],
                              **extra}], usage)]

    def end(self) -> list[dict]:
        return [self._chunk([], self.gen.usage())] if self.include_usage else []

    def body(self) -> dict:
        choices = [{"index": i, "text": t, "finish_reason": self.finish[i],
                    "logprobs": self.lp[i] if self.logprobs is not None else None} for i, t in enumerate(self.text)]
        if self.want_prompt_logprobs:
            for c in choices:
                c["prompt_logprobs"] = self.prompt_lp[c["index"]]
        return {"id": self.gen.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": self.gen.usage()}
