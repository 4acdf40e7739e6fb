"""Fine-tuning jobs and fine-tuned models, in both APIs' shapes, on the same routes:

    POST /v1/fine_tuning/jobs                  OpenAI's body (training_file) or Mistral's (training_files)
    GET  /v1/fine_tuning/jobs                  OpenAI's paging (after, limit) or Mistral's (page, page_size, ...)
    GET  /v1/fine_tuning/jobs/{id}
    POST /v1/fine_tuning/jobs/{id}/cancel
    POST /v1/fine_tuning/jobs/{id}/start       Mistral: a job made with auto_start false
    POST /v1/fine_tuning/jobs/{id}/pause       OpenAI
    POST /v1/fine_tuning/jobs/{id}/resume      OpenAI
    GET  /v1/fine_tuning/jobs/{id}/events      OpenAI
    GET  /v1/fine_tuning/jobs/{id}/checkpoints OpenAI
    DELETE /v1/models/{id}                     a fine-tuned model (both)
    PATCH  /v1/fine_tuning/models/{id}         Mistral: name, description
    POST   /v1/fine_tuning/models/{id}/archive   DELETE .../archive   Mistral

A job answers in the shape of the API that asks (the official clients say who they are,
``dialect.from_headers``), else in the shape of the API that created it. The job's
lifecycle is galerne.platform.jobs'; its worker galerne.platform.worker's.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request

from ..errors import InvalidParameter, NotFound, WrongState
from ..platform import jobs as J
from . import dialect as dialects
from .auth import require_api_key
from .cards import ft_card
from .dialect import Dialect
from .mistral.routes import body_schema
from .protocol import id_bounds, page_of
from .serving import read_json, validate
from .state import ServerState

router = APIRouter(dependencies=[Depends(require_api_key)], tags=["fine-tuning"])

Auto = Literal["auto"]
MAX_FILES = 100  # training (or validation) files of one job


# ------------------------------------------------------------------ wire types: OpenAI


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OpenAIHyperparameters(_Strict):
    n_epochs: Auto | int | None = None
    batch_size: Auto | int | None = None
    learning_rate_multiplier: Auto | float | None = None
    # galerne's own (extra_body): the adapter's rank, the packed sequence length, exact steps
    lora_rank: int | None = None
    seq_len: int | None = None
    training_steps: int | None = None


class OpenAISupervised(_Strict):
    hyperparameters: OpenAIHyperparameters | None = None


class OpenAIMethod(_Strict):
    type: str
    supervised: OpenAISupervised | None = None
    dpo: dict | None = None
    reinforcement: dict | None = None


class OpenAIFineTuningJobRequest(_Strict):
    model: str
    training_file: str
    validation_file: str | None = None
    hyperparameters: OpenAIHyperparameters | None = None
    method: OpenAIMethod | None = None
    suffix: str | None = None
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    integrations: list[dict] | None = None
    metadata: dict[str, str] | None = Field(None, max_length=16)  # OpenAI's limits: 16 pairs

    def spec(self) -> J.JobSpec:
        for k, v in (self.metadata or {}).items():
            if len(k) > 64 or len(v) > 512:
                raise InvalidParameter("metadata", "keys are at most 64 characters and values at most 512")
        if self.method is not None and self.method.type != "supervised":
            raise InvalidParameter("method.type", f"only 'supervised' fine-tuning is supported, got {self.method.type!r}")
        given = self.hyperparameters
        if self.method is not None and self.method.supervised is not None and self.method.supervised.hyperparameters:
            given = self.method.supervised.hyperparameters
        given = given or OpenAIHyperparameters()
        for name, upper in (("n_epochs", 1000), ("batch_size", 1024), ("learning_rate_multiplier", 1000)):
            value = getattr(given, name)
            if value not in (None, "auto") and not 0 < value <= upper:
                raise InvalidParameter(f"hyperparameters.{name}", f"must be 'auto' or a positive number up to {upper}, "
                                                                 f"got {value!r}")
        hp = J.Hyperparameters(
            epochs=None if given.n_epochs in (None, "auto") else given.n_epochs,
            batch_size=1 if given.batch_size in (None, "auto") else given.batch_size,
            learning_rate_multiplier=None if given.learning_rate_multiplier in (None, "auto")
            else given.learning_rate_multiplier,
            lora_rank=given.lora_rank or J.DEFAULT_RANK, seq_len=given.seq_len, training_steps=given.training_steps)
        return J.JobSpec(model=self.model, training_files=[J.TrainingFile(self.training_file)],
                         validation_files=[self.validation_file] if self.validation_file else [], hyperparameters=hp,
                         suffix=J.check_suffix(self.suffix), seed=self.seed, metadata=self.metadata,
                         integrations=_no_integrations(self.integrations), dialect="openai")


def _no_integrations(integrations: list | None) -> list:
    if integrations:
        raise InvalidParameter("integrations", "integrations (Weights & Biases) are not supported: the job's metrics "
                                               "are in its events (GET /v1/fine_tuning/jobs/{id}/events)")
    return []


# ------------------------------------------------------------------ wire types: Mistral (mistralai 2.5)


class MistralTrainingFile(_Strict):
    file_id: str
    weight: float = Field(1.0, gt=0)


class MistralHyperparameters(_Strict):
    training_steps: int | None = None
    learning_rate: float = J.DEFAULT_LR
    weight_decay: float | None = None
    warmup_fraction: float | None = None
    epochs: float | None = None
    seq_len: int | None = None
    fim_ratio: float | None = None
    lora_rank: int | None = None  # galerne's own
    batch_size: int | None = None  # galerne's own


class MistralFineTuningJobRequest(_Strict):
    model: str
    hyperparameters: MistralHyperparameters
    training_files: list[MistralTrainingFile] = Field(default_factory=list, max_length=MAX_FILES)
    validation_files: list[str] | None = Field(None, max_length=MAX_FILES)
    suffix: str | None = None
    integrations: list[dict] | None = None
    auto_start: bool | None = None
    invalid_sample_skip_percentage: float | None = Field(0, ge=0, le=0)
    job_type: Literal["completion"] | None = None
    repositories: list[dict] | None = None
    classifier_targets: list[dict] | None = None

    def spec(self) -> J.JobSpec:
        if not self.training_files:
            raise InvalidParameter("training_files", "give at least one training file")
        if self.repositories:
            raise InvalidParameter("repositories", "repositories (GitHub) are not supported")
        if self.classifier_targets:
            raise InvalidParameter("classifier_targets", "classifier fine-tuning is not supported")
        h = self.hyperparameters
        hp = J.Hyperparameters(
            training_steps=h.training_steps, epochs=h.epochs, learning_rate=h.learning_rate,
            weight_decay=0.1 if h.weight_decay is None else h.weight_decay,
            warmup_fraction=0.05 if h.warmup_fraction is None else h.warmup_fraction,
            seq_len=h.seq_len, fim_ratio=h.fim_ratio, lora_rank=h.lora_rank or J.DEFAULT_RANK, batch_size=h.batch_size or 1)
        return J.JobSpec(model=self.model, training_files=[J.TrainingFile(f.file_id, f.weight) for f in self.training_files],
                         validation_files=list(self.validation_files or []), hyperparameters=hp,
                         suffix=J.check_suffix(self.suffix), auto_start=True if self.auto_start is None else self.auto_start,
                         integrations=_no_integrations(self.integrations), dialect="mistral")




# ------------------------------------------------------------------ rendering


OPENAI_STATUS = {
    J.VALIDATING: "validating_files", J.VALIDATED: "queued", J.QUEUED: "queued", J.RUNNING: "running",
    J.PAUSE_REQUESTED: "running", J.PAUSED: "paused", J.SUCCESS: "succeeded", J.FAILED: "failed",
    J.FAILED_VALIDATION: "failed", J.CANCELLATION_REQUESTED: "cancelled", J.CANCELLED: "cancelled",
}
# Mistral has no pause: a paused job is QUEUED to it (it will run again).
MISTRAL_STATUS = {J.PAUSE_REQUESTED: J.RUNNING, J.PAUSED: J.QUEUED}


def dialect_for(request: Request, job: dict[str, Any] | None = None) -> Dialect:
    d = dialects.from_headers(request)
    if d is None:
        d = Dialect(job["dialect"]) if job is not None else Dialect.OPENAI
    request.state.dialect = d
    return d


def openai_job(job: dict[str, Any]) -> dict[str, Any]:
    hp = job["hyperparameters"]
    estimate = job.get("estimate") or {}
    begun = job.get("started_at") or job["created_at"]
    hyper = {"n_epochs": hp["epochs"], "batch_size": hp["batch_size"],
             "learning_rate_multiplier": hp.get("learning_rate_multiplier") or 1.0}
    return {
        "id": job["id"], "object": "fine_tuning.job", "created_at": job["created_at"], "error": job.get("error"),
        "fine_tuned_model": job.get("fine_tuned_model"), "finished_at": job.get("finished_at"),
        "hyperparameters": hyper, "model": job["model"], "organization_id": "galerne", "result_files": [],
        "seed": job["seed"], "status": OPENAI_STATUS.get(job["status"], job["status"].lower()),
        "trained_tokens": job.get("trained_tokens"), "training_file": job["training_files"][0]["file_id"],
        "validation_file": (job.get("validation_files") or [None])[0],
        "estimated_finish": None if job["status"] in J.FINISHED else begun + estimate.get("expected_duration_seconds", 0),
        "integrations": [], "metadata": job.get("metadata"), "user_provided_suffix": job.get("suffix"),
        "method": {"type": "supervised", "supervised": {"hyperparameters": hyper}},
    }


def mistral_job(job: dict[str, Any], *, details: bool, events: list[dict] | None = None,
                checkpoints: list[dict] | None = None) -> dict[str, Any]:
    hp = job["hyperparameters"]
    estimate = job.get("estimate") or {}
    out = {
        "id": job["id"], "object": "job", "auto_start": job.get("auto_start", True), "model": job["model"],
        "status": MISTRAL_STATUS.get(job["status"], job["status"]), "job_type": "completion",
        "created_at": job["created_at"], "modified_at": job["modified_at"],
        "training_files": [f["file_id"] for f in job["training_files"]], "validation_files": job.get("validation_files"),
        "fine_tuned_model": job.get("fine_tuned_model"), "suffix": job.get("suffix"), "integrations": [],
        "trained_tokens": job.get("trained_tokens"), "repositories": [],
        "hyperparameters": {"training_steps": hp["training_steps"], "learning_rate": hp["learning_rate"],
                            "weight_decay": hp["weight_decay"], "warmup_fraction": hp["warmup_fraction"],
                            "epochs": hp["epochs"], "seq_len": hp["seq_len"], "fim_ratio": hp.get("fim_ratio")},
        "metadata": {k: estimate.get(k) for k in ("expected_duration_seconds", "cost", "cost_currency",
                                                   "train_tokens_per_step", "train_tokens", "data_tokens",
                                                   "estimated_start_time")},
    }
    if job.get("error"):
        out["error"] = job["error"]
    if details:
        # La Plateforme's events are the job's changes; its metrics are in its checkpoints
        out["events"] = [{"name": e["name"], "data": e.get("data"), "created_at": e["created_at"]}
                         for e in events or [] if e.get("type") != "metrics"]
        out["checkpoints"] = [{"metrics": {"train_loss": (c.get("metrics") or {}).get("train_loss"),
                                           "valid_loss": (c.get("metrics") or {}).get("valid_loss"),
                                           "valid_mean_token_accuracy": None},
                               "step_number": c["step"], "created_at": c["created_at"]} for c in checkpoints or []]
    return out


def render(server: ServerState, job: dict[str, Any], dialect: Dialect, *, details: bool = True) -> dict[str, Any]:
    """The job in ``dialect``'s shape (a thread: Mistral's details read the events)."""
    if dialect is Dialect.OPENAI:
        return openai_job(job)
    store = server.platform.store
    events = store.events(job["id"]) if details else None
    checkpoints = store.checkpoints(job["id"]) if details else None
    return mistral_job(job, details=details, events=events, checkpoints=checkpoints)


# ------------------------------------------------------------------ jobs


def get_job(server: ServerState, job_id: str) -> dict[str, Any]:
    job = server.platform.store.get("jobs", job_id)
    if job is None or job.get("kind") != "fine_tune":
        raise NotFound(f"No fine-tuning job with id '{job_id}' found.", "job_not_found", "job_id")
    return job


def check_fine_tunable(server: ServerState, model: str) -> None:
    if model not in server.model_ids:
        if server.adapter(model) is not None:
            raise InvalidParameter("model", f"{model!r} is an adapter: fine-tune its base, {server.model_id!r}")
        raise server.not_found(model)
    if not server.platform.base_path:
        raise WrongState(f"{server.model_id!r} cannot be fine-tuned here: it was built in memory or has an adapter "
                         "merged into it (serve the model folder itself)", "model_not_fine_tunable", "model")


JOB_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {"oneOf": [
    {"$ref": "#/components/schemas/OpenAIFineTuningJobRequest"},
    {"$ref": "#/components/schemas/MistralFineTuningJobRequest"}]}}}}}


@router.post("/v1/fine_tuning/jobs", summary="Create a fine-tuning job (OpenAI's body or Mistral's)",
             openapi_extra=JOB_BODY)
async def create_job(request: Request, dry_run: bool = False) -> dict:
    server: ServerState = request.app.state.server
    body = await read_json(request)
    mistral = isinstance(body, dict) and ("training_files" in body or ("training_file" not in body and
                                                                      dialects.from_headers(request) is Dialect.MISTRAL))
    request.state.dialect = Dialect.MISTRAL if mistral else Dialect.OPENAI
    wire = validate(MistralFineTuningJobRequest if mistral else OpenAIFineTuningJobRequest, body)
    spec = wire.spec()
    check_fine_tunable(server, spec.model)
    spec.model = server.model_id  # an alias names the base too
    llm = server.llm
    kwargs = {"max_model_len": server.max_model_len, "max_rank": llm.engine.adapters.max_rank,
              "n_params": llm.model.args.n_params, "device": llm.device.type}
    if dry_run:
        out = await asyncio.to_thread(J.create_job, server.platform, spec, dry_run=True, **kwargs)
        e, hp = out["estimate"], out["hyperparameters"]
        return {"object": "job.metadata", "details": (out["error"] or {}).get("message", ""), "deprecated": False,
                "epochs": hp["epochs"], "training_steps": hp["training_steps"],
                **{k: e[k] for k in ("expected_duration_seconds", "cost", "cost_currency", "train_tokens_per_step",
                                     "train_tokens", "data_tokens", "estimated_start_time")}}
    job = await asyncio.to_thread(J.create_job, server.platform, spec, **kwargs)
    return await asyncio.to_thread(render, server, job, request.state.dialect)


@router.get("/v1/fine_tuning/jobs", summary="The fine-tuning jobs, newest first (OpenAI's or Mistral's paging)")
async def list_jobs(request: Request, after: str | None = None, limit: int = Query(20, ge=1, le=1000),
                    page: int | None = Query(None, ge=0), page_size: int | None = Query(None, ge=1, le=1000),
                    model: str | None = None, status: str | None = None, created_after: str | None = None,
                    created_by_me: bool | None = None, wandb_project: str | None = None,
                    wandb_name: str | None = None, suffix: str | None = None) -> dict:
    server: ServerState = request.app.state.server
    asked = dialects.from_headers(request)

    def run() -> dict:
        where: dict[str, Any] = {"kind": "fine_tune"}
        if model:
            where["model"] = model
        if status:
            where["status"] = [s for s, m in MISTRAL_STATUS.items() if m == status] + [status]
        rows = server.platform.store.select("jobs", where=where)
        if suffix:
            rows = [r for r in rows if r.get("suffix") == suffix]
        if created_after:
            rows = [r for r in rows if r["created_at"] > _timestamp(created_after)]
        chosen, more = page_of(rows, after=after, limit=limit, page=page, page_size=page_size)
        data = [render(server, j, asked or Dialect(j["dialect"]), details=False) for j in chosen]
        return {"object": "list", "data": data, "has_more": more, "total": len(rows)}

    return await asyncio.to_thread(run)


def _timestamp(value: str) -> int:
    from datetime import datetime

    try:
        return int(value) if value.isdigit() else int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp())
    except ValueError:
        raise InvalidParameter("created_after", f"must be a date-time (ISO 8601) or a Unix time, got {value!r}") from None


@router.get("/v1/fine_tuning/jobs/{job_id}", summary="A fine-tuning job (Mistral's: with its events and checkpoints)")
async def retrieve_job(request: Request, job_id: str) -> dict:
    server: ServerState = request.app.state.server
    job = await asyncio.to_thread(get_job, server, job_id)
    model = job.get("fine_tuned_model")
    if job["status"] == J.SUCCESS and model and server.adapter(model) is None and server.jobs is not None:
        await server.jobs.sync_models()  # a client that sees it done may use it at once
    return await asyncio.to_thread(render, server, job, dialect_for(request, job))


async def _act(request: Request, job_id: str, action) -> dict:
    server: ServerState = request.app.state.server
    job = await asyncio.to_thread(get_job, server, job_id)
    dialect = dialect_for(request, job)
    job = await asyncio.to_thread(action, server.platform, job)
    return await asyncio.to_thread(render, server, job, dialect)


@router.post("/v1/fine_tuning/jobs/{job_id}/cancel", summary="Cancel a job, at any status but a finished one")
async def cancel_job(request: Request, job_id: str) -> dict:
    return await _act(request, job_id, J.cancel)


@router.post("/v1/fine_tuning/jobs/{job_id}/start", summary="Start a job made with auto_start false (Mistral)")
async def start_job(request: Request, job_id: str) -> dict:
    return await _act(request, job_id, J.start)


@router.post("/v1/fine_tuning/jobs/{job_id}/pause", summary="Pause a job after a checkpoint (OpenAI)")
async def pause_job(request: Request, job_id: str) -> dict:
    return await _act(request, job_id, J.pause)


@router.post("/v1/fine_tuning/jobs/{job_id}/resume", summary="Resume a paused job from its checkpoint (OpenAI)")
async def resume_job(request: Request, job_id: str) -> dict:
    return await _act(request, job_id, J.resume)


@router.get("/v1/fine_tuning/jobs/{job_id}/events", summary="A job's events, newest first (OpenAI)")
async def job_events(request: Request, job_id: str, after: str | None = None,
                     limit: int = Query(20, ge=1, le=10000)) -> dict:
    server: ServerState = request.app.state.server

    def run() -> dict:
        get_job(server, job_id)
        rows = server.platform.store.events(job_id, after=after, limit=limit + 1, newest_first=True)
        data = [{"id": e["id"], "object": "fine_tuning.job.event", "created_at": e["created_at"],
                 "level": e.get("level", "info"), "message": e.get("message", e["name"]), "data": e.get("data"),
                 "type": e.get("type", "message")} for e in rows[:limit]]
        return {"object": "list", "data": data, "has_more": len(rows) > limit}

    return await asyncio.to_thread(run)


@router.get("/v1/fine_tuning/jobs/{job_id}/checkpoints", summary="A job's checkpoints, newest first (OpenAI)")
async def job_checkpoints(request: Request, job_id: str, after: str | None = None,
                          limit: int = Query(10, ge=1, le=1000)) -> dict:
    server: ServerState = request.app.state.server

    def run() -> dict:
        job = get_job(server, job_id)
        chosen, more = page_of(server.platform.store.checkpoints(job_id), after=after, limit=limit)
        name = J.model_id_for(job["model"], job.get("suffix"), job["id"])
        data = [{"id": c["id"], "object": "fine_tuning.job.checkpoint", "created_at": c["created_at"],
                 "fine_tuned_model_checkpoint": f"{name}:ckpt-step-{c['step']}", "step_number": c["step"],
                 "fine_tuning_job_id": job_id,
                 "metrics": {"step": c["step"], **{k: v for k, v in (c.get("metrics") or {}).items() if k != "step"}}}
                for c in chosen]
        return {"object": "list", "data": data, "has_more": more, **id_bounds(data)}

    return await asyncio.to_thread(run)


# ------------------------------------------------------------------ fine-tuned models


def get_model(server: ServerState, model_id: str) -> dict[str, Any]:
    row = server.platform.store.get("models", model_id)
    if row is None:
        if model_id in server.model_ids:
            raise WrongState(f"{model_id!r} is the base model, not a fine-tuned one", "not_fine_tuned", "model_id")
        raise NotFound(f"No fine-tuned model with id '{model_id}' found.", "model_not_found", "model_id")
    return row


async def delete_model(request: Request, model_id: str) -> dict:
    server: ServerState = request.app.state.server

    def run() -> dict:
        row = get_model(server, model_id)
        server.platform.store.delete("models", model_id)
        return row

    row = await asyncio.to_thread(run)
    if server.jobs is not None:
        await server.jobs.sync_models()  # unloaded: requests through it already running finish first
    if row.get("job_id"):
        await asyncio.to_thread(server.platform.data.remove_tree, server.platform.data.model(row["job_id"]))
    return {"id": model_id, "object": "model", "deleted": True}


class UpdateModelRequest(_Strict):
    name: str | None = Field(None, max_length=256)
    description: str | None = Field(None, max_length=4096)


WIRE_MODELS = (OpenAIFineTuningJobRequest, MistralFineTuningJobRequest, UpdateModelRequest)


@router.patch("/v1/fine_tuning/models/{model_id}", summary="Rename or describe a fine-tuned model (Mistral)",
              openapi_extra=body_schema("UpdateModelRequest"))
async def update_model(request: Request, model_id: str) -> dict:
    server: ServerState = request.app.state.server
    request.state.dialect = Dialect.MISTRAL
    req = validate(UpdateModelRequest, await read_json(request))

    def run() -> dict:
        get_model(server, model_id)
        values = {k: v for k, v in (("name", req.name), ("description", req.description)) if v is not None}
        return server.platform.store.update("models", model_id, **values) or get_model(server, model_id)

    return ft_card(server, await asyncio.to_thread(run))


async def _archive(request: Request, model_id: str, archived: bool) -> dict:
    server: ServerState = request.app.state.server
    request.state.dialect = Dialect.MISTRAL

    def run() -> None:
        get_model(server, model_id)
        server.platform.store.update("models", model_id, archived=archived)

    await asyncio.to_thread(run)
    if server.jobs is not None:
        await server.jobs.sync_models()
    return {"id": model_id, "object": "model", "archived": archived}


@router.post("/v1/fine_tuning/models/{model_id}/archive", summary="Archive a fine-tuned model: no longer served")
async def archive_model(request: Request, model_id: str) -> dict:
    return await _archive(request, model_id, True)


@router.delete("/v1/fine_tuning/models/{model_id}/archive", summary="Unarchive a fine-tuned model: served again")
async def unarchive_model(request: Request, model_id: str) -> dict:
    return await _archive(request, model_id, False)
