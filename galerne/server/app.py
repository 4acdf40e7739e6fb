"""The HTTP API server: ``create_app(llm, settings)`` builds the FastAPI app.

Routes are thin: they validate the body with the dialect's wire types, encode
with the tokenizer and check the request (``engine.request.validate_request``)
in a worker thread, and hand a ``Generation`` to the AsyncEngine (serving.py).
All state lives on ``app.state.server`` (state.py); the lifespan starts the
AsyncEngine over ``llm.engine`` and, at shutdown, waits for the requests in
flight (uvicorn's graceful shutdown already waits for open connections; this
covers other hosts too) before it stops the engine. ``/health`` and
``/metrics`` read what the AsyncEngine publishes (``errored``, a stats
snapshot), never the engine itself: they answer while a step runs. The
``--lora`` adapters are loaded here, before the engine thread starts; the others
come and go through adapters.py's routes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic.json_schema import models_json_schema
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .. import __version__
from ..config import ServerSettings
from ..engine.async_engine import AsyncEngine
from ..llm import LLM
from ..platform import Platform
from ..platform.supervisor import Supervisor
from . import adapters, chat, console, errors, files, finetuning
from . import dialect as dialects
from .auth import require_api_key
from .batch import routes as batch_routes
from .batch.protocol import MistralBatchCreate, OpenAIBatchCreate
from .batch.runner import BatchRunner
from .cards import adapter_card, ft_card, model_card
from .guards import BodyGuard, HeadAsGet, LocalGuard
from .metrics import Metrics
from .mistral import routes as mistral_routes
from .mistral.protocol import MistralChatCompletionRequest, MistralFIMCompletionRequest
from .openai import routes as openai_routes
from .openai.protocol import OpenAIChatCompletionRequest, OpenAICompletionRequest
from .protocol import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest
from .state import ServerState

log = logging.getLogger(__name__)

WIRE_MODELS = (OpenAIChatCompletionRequest, MistralChatCompletionRequest, OpenAICompletionRequest, MistralFIMCompletionRequest,
               LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest, *finetuning.WIRE_MODELS, OpenAIBatchCreate,
               MistralBatchCreate)
DESCRIPTION = """\
An API that the official `openai` and `mistralai` clients use unchanged: chat
completions (both dialects, tools, JSON output), FIM and text completions, models,
batch jobs (both dialects, run at low priority beside interactive traffic).
Errors come in the envelope of the request's dialect (see docs/server.md)."""


def create_app(llm: LLM, settings: ServerSettings | None = None, *, model_name: str | None = None) -> FastAPI:
    """The app serving ``llm``. Its model id is ``settings.served_model_name[0]``, else
    ``model_name``, else the model folder's name."""
    settings = settings or ServerSettings()
    ids = list(settings.served_model_name) or [model_name or default_model_name(llm)]
    server: ServerState
    metrics = Metrics(ids[0], lambda: server.engine_stats())
    server = ServerState(llm, settings, ids, metrics, lora_dirs=[Path(d).resolve() for d in settings.lora_dir])
    server.platform = Platform.open(settings, base_id=ids[0], base_path=base_model_path(llm))
    server.batches = BatchRunner(server)
    load_startup_adapters(server)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        server.idle = asyncio.Event()
        server.idle.set()
        server.draining = False  # an app can be started again after a shutdown (tests do)
        server.engine = AsyncEngine(llm.engine)
        server.jobs = start_supervisor(server)
        server.batches.start()
        try:
            yield
        finally:
            # The batch first: its requests in flight are aborted, not answered with a
            # refusal, and its job waits in the store for the next start.
            await server.batches.stop()
            server.draining = True
            jobs, server.jobs = server.jobs, None
            await jobs.stop()
            if server.in_flight:
                log.info("waiting for %d request(s) in flight", server.in_flight)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(server.idle.wait(), timeout=settings.drain_timeout)
            engine, server.engine = server.engine, None
            await asyncio.to_thread(engine.shutdown)

    app = FastAPI(title="galerne", version=__version__, description=DESCRIPTION, lifespan=lifespan)
    app.state.server = server
    app.state.api_keys = tuple(k.encode() for k in settings.api_key)
    errors.install(app)
    # Outermost last: HeadAsGet, _Tracking, LocalGuard (no API key only), CORS (allowed
    # origins only), BodyGuard, then FastAPI's exception handling and the routes.
    app.add_middleware(BodyGuard, max_bytes=settings.max_body_bytes, timeout=settings.body_timeout,
                       uploads={"/v1/files": settings.max_upload_bytes, "/v1/files/validate": settings.max_upload_bytes})
    if settings.allowed_origin:
        app.add_middleware(CORSMiddleware, allow_origins=settings.allowed_origin, allow_headers=["*"],
                           allow_methods=["GET", "HEAD", "POST", "OPTIONS"], expose_headers=["Retry-After"], max_age=600)
    if not settings.api_key:
        app.add_middleware(LocalGuard, settings=settings)
    app.add_middleware(_Tracking, server=server)
    app.add_middleware(HeadAsGet)
    app.include_router(chat.router)
    app.include_router(openai_routes.router)
    app.include_router(mistral_routes.router)
    app.include_router(adapters.router)
    app.include_router(files.router)
    app.include_router(finetuning.router)
    app.include_router(batch_routes.router)
    app.include_router(_models_router())
    app.include_router(_ops_router())
    if settings.console:
        app.include_router(console.router())  # the page at /, its files at /console/ (no key: they hold no data)
    app.openapi = lambda: _openapi(app)
    return app


def load_startup_adapters(server: ServerState) -> None:
    """The ``--lora NAME=PATH`` adapters, loaded before the engine thread starts (any
    path: the operator gave it). A bad one stops the server from starting."""
    for i, (name, path) in enumerate(server.settings.lora_adapters.items()):
        adapters.check_name(server, name, f"lora[{i}]")
        if name not in server.llm.engine.adapters:  # an app made again over the same LLM (tests)
            server.llm.load_adapter(name, Path(path).expanduser())


def start_supervisor(server: ServerState) -> Supervisor:
    """The fine-tuning jobs' supervisor (platform/supervisor.py): workers, and the fine-tuned
    models served as adapters under their ids."""

    async def load(name: str, path: str) -> None:
        weights = await asyncio.to_thread(server.llm.engine.adapters.read, Path(path))
        await server.engine.call(lambda engine: engine.adapters.add(name, weights))

    async def unload(name: str) -> None:
        await server.engine.call(lambda engine: engine.adapters.unload(name))

    settings = server.settings
    jobs = Supervisor(server.platform, max_running=settings.max_running_jobs, nproc=settings.job_nproc, load=load,
                      unload=unload, served=lambda: {a.name for a in server.adapters()},
                      fine_tunable=bool(server.platform.base_path))
    jobs.start()
    return jobs


def base_model_path(llm: LLM) -> str:
    """What a fine-tuning worker loads as the base: the model folder ('' when the model was
    built in memory, or has an adapter merged into it: nothing on disk to train from)."""
    if llm.checkpoint is None or llm.adapter is not None:
        return ""
    return str(Path(llm.checkpoint.folder).resolve())


def default_model_name(llm: LLM) -> str:
    folder = llm.checkpoint.folder if llm.checkpoint is not None else Path(llm.tokenizer.path).parent
    return Path(folder).name or "galerne"


# ------------------------------------------------------------------ models, health, metrics


def _models_router() -> APIRouter:
    router = APIRouter(dependencies=[Depends(require_api_key)], tags=["models"])

    @router.get("/v1/models", summary="The served models: the base, each adapter (its parent: the base), and the "
                                      "fine-tuned models of the base (archived ones too, not served)")
    async def list_models(request: Request) -> dict:
        server: ServerState = request.app.state.server
        tuned = {r["id"]: r for r in await asyncio.to_thread(fine_tuned_rows, server)}
        cards = [ft_card(server, tuned.pop(a.name)) if a.name in tuned else adapter_card(server, a)
                 for a in server.adapters()]
        return {"object": "list", "data": [model_card(server), *cards, *(ft_card(server, r)
                                                                         for r in tuned.values())]}

    @router.get("/v1/models/{model_id:path}", summary="One model's card")
    async def get_model(request: Request, model_id: str) -> dict:
        server: ServerState = request.app.state.server
        if model_id in server.model_ids:
            return model_card(server)
        row = await asyncio.to_thread(server.platform.store.get, "models", model_id)
        if row is not None:
            return ft_card(server, row)
        info = server.adapter(model_id)
        if info is None:
            raise server.not_found(model_id)
        return adapter_card(server, info)

    @router.delete("/v1/models/{model_id:path}", summary="Delete a fine-tuned model: its adapter and its record")
    async def delete_model(request: Request, model_id: str) -> dict:
        return await finetuning.delete_model(request, model_id)

    return router


def fine_tuned_rows(server: ServerState) -> list[dict]:
    return server.platform.store.select("models", where={"base": server.model_id}, descending=False)


def _ops_router() -> APIRouter:
    router = APIRouter(tags=["operations"])

    @router.get("/health", summary="200 while the engine runs; 503 when it failed or the server drains")
    async def health(request: Request) -> Response:
        server: ServerState = request.app.state.server
        engine = server.engine
        if engine is None or engine.errored:
            return JSONResponse({"status": "engine failed" if engine is not None else "not started"}, status_code=503)
        if server.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ok", "model": server.model_id})

    @router.get("/metrics", summary="Prometheus metrics")
    async def metrics(request: Request) -> Response:
        return Response(request.app.state.server.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return router


# ------------------------------------------------------------------ plumbing


class _Tracking:
    """Pure ASGI middleware: counts requests in flight (a stream until its last byte)
    and every answer's status by route, and turns an unexpected exception into a 500 in
    the dialect's envelope."""

    def __init__(self, app, server: ServerState):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        server, status, started = self.server, 500, False

        async def tracked_send(message):
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
            await send(message)

        server.in_flight += 1
        server.metrics.in_flight.inc()
        if server.idle is not None:
            server.idle.clear()
        try:
            await self.app(scope, receive, tracked_send)
        except Exception as e:
            # A bug: log it once, answer 500 in the dialect's envelope (if nothing was sent yet).
            request = Request(scope)
            log.exception("unhandled error on %s %s", request.method, request.url.path)
            if started:
                raise
            await errors.error_response(e, dialects.of(request))(scope, receive, tracked_send)
        finally:
            server.in_flight -= 1
            server.metrics.in_flight.dec()
            if server.in_flight == 0 and server.idle is not None:
                server.idle.set()
            route = scope.get("route")
            server.metrics.request(getattr(route, "path", "other"), status)


def _openapi(app: FastAPI) -> dict:
    """FastAPI's spec, plus the request schemas the routes validate themselves (the chat
    route picks its schema by dialect, so FastAPI cannot infer it)."""
    if app.openapi_schema is None:
        spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        _, defs = models_json_schema([(m, "validation") for m in WIRE_MODELS], ref_template="#/components/schemas/{model}")
        spec.setdefault("components", {}).setdefault("schemas", {}).update(defs["$defs"])
        app.openapi_schema = spec
    return app.openapi_schema


