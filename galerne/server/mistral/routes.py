"""Mistral-only routes: Codestral-style fill-in-the-middle."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends
from starlette.requests import Request
from starlette.responses import Response

from ...engine.request import INTERACTIVE, validate_request
from ..auth import require_api_key
from ..chat import ChatResponder, new_id
from ..dialect import Dialect
from ..protocol import sampling_params
from ..serving import Generation, read_request, respond
from ..state import ServerState
from .protocol import MistralFIMCompletionRequest

router = APIRouter(dependencies=[Depends(require_api_key)], tags=["mistral"])


def body_schema(name: str) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{name}"}}}}}


@router.post("/v1/fim/completions", openapi_extra=body_schema("MistralFIMCompletionRequest"),
             summary="Fill-in-the-middle completion (Mistral)")
async def fim_completions(request: Request) -> Response:
    """The code between ``prompt`` and ``suffix``, through mistral-common's FIM encoding.
    The answer has the shape of a chat completion, as La Plateforme's."""
    req = await read_request(request, MistralFIMCompletionRequest)
    gen, responder = await start_fim(request.app.state.server, req)
    return await respond(request, gen, responder, Dialect.MISTRAL)


async def start_fim(server: ServerState, wire: MistralFIMCompletionRequest, *,
                    priority: int = INTERACTIVE) -> tuple[Generation, ChatResponder]:
    """A validated FIM body as the generation to run (at ``priority``) and the responder
    that answers it: what the route and a batch job's line share."""
    req = wire.normalize()
    model, adapter = server.check_model(req.model)
    params = sampling_params(req.sampling)

    def prepare():  # encoding and checking take CPU time: not on the event loop
        return validate_request(server.tokenizer.encode_fim(req.prompts[0], req.suffix), params, server.limits,
                                adapter=adapter)

    gen = Generation(server, [await asyncio.to_thread(prepare)], request_id=new_id(Dialect.MISTRAL), priority=priority)
    responder = ChatResponder(server, Dialect.MISTRAL, gen, model=model, stream=req.stream, thinking=False)
    return gen, responder
