"""Batch jobs' routes, in both dialects, over one kind of record (``galerne.platform.batches``).

OpenAI's (the ``openai`` client's ``client.batches``)::

    POST /v1/batches                       {input_file_id, endpoint, completion_window: "24h", metadata}
    GET  /v1/batches?after=ID&limit=N      {object: "list", data, first_id, last_id, has_more}
    GET  /v1/batches/{batch_id}
    POST /v1/batches/{batch_id}/cancel

Mistral's (``mistralai``'s ``client.batch.jobs``)::

    POST   /v1/batch/jobs                  {input_files | requests, endpoint, model, metadata, timeout_hours}
    GET    /v1/batch/jobs?page=&page_size=&model=&status=&created_after=&metadata=&order_by=
                                           {data, object: "list", total}
    GET    /v1/batch/jobs/{job_id}?inline=true   (with ``outputs``: the output lines, once it ended)
    POST   /v1/batch/jobs/{job_id}/cancel
    DELETE /v1/batch/jobs/{job_id}         (an ended job's record; its files stay)

Creating a job checks at once what can be checked at once: the body (400, 422 for
Mistral, naming the field), the endpoint (one of ``endpoints.ENDPOINTS`` of the
dialect), the input files (they exist, 404; of purpose "batch"; 1 to MAX_REQUESTS
requests in all), Mistral's job ``model`` when given (404 if not served); then the
runner is woken. Each request is checked when it runs, as its route checks it: a bad
one becomes an error line, never a failed job.

Cancelling a queued job cancels it at once; a running one goes ``cancelling`` while
its runner aborts the requests in flight and writes the files of what ran, then
``cancelled``; a cancelling or cancelled one is answered as it is; an ended one is a
409.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query
from starlette.requests import Request

from ...errors import InvalidParameter, NotFound, WrongState
from ...platform import batches as b
from ...platform.files import write_file
from ...platform.store import new_id, now
from ..auth import require_api_key
from ..dialect import Dialect
from ..errors import FieldError, RequestInvalid
from ..mistral.routes import body_schema
from ..protocol import id_bounds
from ..serving import read_json, read_request
from ..state import ServerState
from .protocol import (
    STATUS,
    MistralBatchCreate,
    OpenAIBatchCreate,
    from_mistral_status,
    mistral_job,
    openai_batch,
)

router = APIRouter(dependencies=[Depends(require_api_key)], tags=["batch"])

MAX_INLINE_OUTPUTS = 10_000  # output lines a GET ?inline=true returns at most
MistralStatus = Literal[tuple(m for _, m in STATUS.values())]


# ------------------------------------------------------------------ OpenAI


@router.post("/v1/batches", summary="Create a batch job (OpenAI)", openapi_extra=body_schema("OpenAIBatchCreate"))
async def create_openai_batch(request: Request) -> dict:
    req = await read_request(request, OpenAIBatchCreate)
    server: ServerState = request.app.state.server
    job = await asyncio.to_thread(create_job, server, Dialect.OPENAI, new_id("batch_"), req.endpoint,
                                  [req.input_file_id], field="input_file_id", metadata=req.metadata,
                                  window_s=24 * 3600)
    server.batches.wake()
    return openai_batch(job)


@router.get("/v1/batches", summary="Batch jobs, newest first (OpenAI)")
async def list_openai_batches(request: Request, after: str | None = None,
                              limit: Annotated[int, Query(ge=1, le=100)] = 20) -> dict:
    store = request.app.state.server.platform.store
    rows = await asyncio.to_thread(store.select, "jobs", where={"kind": b.KIND}, after=after, limit=limit + 1)
    data = [openai_batch(r) for r in rows[:limit]]
    return {"object": "list", "data": data, **id_bounds(data), "has_more": len(rows) > limit}


@router.get("/v1/batches/{batch_id}", summary="One batch job (OpenAI)")
async def get_openai_batch(request: Request, batch_id: str) -> dict:
    return openai_batch(await asyncio.to_thread(find, request.app.state.server, batch_id))


@router.post("/v1/batches/{batch_id}/cancel", summary="Cancel a batch job (OpenAI)")
async def cancel_openai_batch(request: Request, batch_id: str) -> dict:
    return openai_batch(await cancel(request.app.state.server, batch_id))


# ------------------------------------------------------------------ Mistral


@router.post("/v1/batch/jobs", summary="Create a batch job (Mistral)", openapi_extra=body_schema("MistralBatchCreate"))
async def create_mistral_job(request: Request) -> dict:
    # Inline requests may hold more text in all than one prompt may: each is checked when it runs.
    req = await read_request(request, MistralBatchCreate, await read_json(request, one_prompt=False))
    server: ServerState = request.app.state.server
    if (req.input_files is None) == (req.requests is None):
        raise RequestInvalid([FieldError(("body", "input_files"), "give either input_files or requests (not both)")])
    if req.agent_id is not None:
        raise RequestInvalid([FieldError(("body", "agent_id"), "agents are not supported here: give a model")])
    if req.model is not None:
        server.check_model(req.model)
    job_id = new_id()
    files, field = req.input_files, "input_files"
    if req.requests is not None:  # kept as a file of its own, as if uploaded: the runner reads only files
        lines = [json.dumps(r.model_dump(exclude_none=True), ensure_ascii=False) for r in req.requests]
        record = await asyncio.to_thread(write_file, server.platform, ("\n".join(lines) + "\n").encode(),
                                         filename=f"{job_id}_requests.jsonl", purpose="batch", num_lines=len(lines),
                                         mimetype="application/jsonl")
        files, field = [record["id"]], "requests"
    job = await asyncio.to_thread(create_job, server, Dialect.MISTRAL, job_id, req.endpoint, files, field=field,
                                  model=req.model, metadata=req.metadata, window_s=req.timeout_hours * 3600)
    server.batches.wake()
    return mistral_job(job)


@router.get("/v1/batch/jobs", summary="Batch jobs (Mistral)")
async def list_mistral_jobs(
    request: Request,
    page: Annotated[int, Query(ge=0)] = 0,
    page_size: Annotated[int, Query(ge=1, le=1000)] = 100,
    model: str | None = None,
    agent_id: str | None = None,
    metadata: Annotated[str | None, Query(description=(
        "a JSON object the jobs' metadata must hold; any other query parameter KEY=VALUE counts as one "
        "pair too (the mistralai client sends a metadata filter so)"))] = None,
    created_after: datetime | None = None,
    created_by_me: bool = False,
    status: Annotated[list[MistralStatus] | None, Query()] = None,
    order_by: Literal["created", "-created"] = "-created",
) -> dict:
    store = request.app.state.server.platform.store
    wanted = _metadata_filter(request, metadata)
    where: dict = {"kind": b.KIND}
    if status:
        where["status"] = from_mistral_status(status)
    if model is not None:
        where["model"] = model
    rows = await asyncio.to_thread(store.select, "jobs", where=where, descending=order_by == "-created")
    if created_after is not None:
        since = (created_after if created_after.tzinfo else created_after.replace(tzinfo=UTC)).timestamp()
        rows = [r for r in rows if r["created_at"] > since]
    if agent_id is not None:
        rows = []  # no job here runs an agent
    rows = [r for r in rows if all((r.get("metadata") or {}).get(k) == v for k, v in wanted.items())]
    start = page * page_size
    return {"data": [mistral_job(r) for r in rows[start:start + page_size]], "object": "list", "total": len(rows)}


@router.get("/v1/batch/jobs/{job_id}", summary="One batch job (Mistral)")
async def get_mistral_job(request: Request, job_id: str, inline: bool | None = None) -> dict:
    server: ServerState = request.app.state.server
    job = await asyncio.to_thread(find, server, job_id)
    outputs = None
    if inline and job.get("output_file"):
        outputs = await asyncio.to_thread(_read_outputs, server, job["output_file"])
    return mistral_job(job, outputs)


@router.post("/v1/batch/jobs/{job_id}/cancel", summary="Cancel a batch job (Mistral)")
async def cancel_mistral_job(request: Request, job_id: str) -> dict:
    return mistral_job(await cancel(request.app.state.server, job_id))


@router.delete("/v1/batch/jobs/{job_id}", summary="Delete an ended batch job's record (Mistral); its files stay")
async def delete_mistral_job(request: Request, job_id: str) -> dict:
    server: ServerState = request.app.state.server
    job = await asyncio.to_thread(find, server, job_id)
    if job["status"] not in b.ENDED:
        raise WrongState(f"batch job {job_id} is {STATUS[job['status']][1]}: cancel it first, then delete it",
                         "batch_not_ended")
    await asyncio.to_thread(server.platform.store.delete, "jobs", job_id)
    return {"id": job_id, "object": "batch", "deleted": True}


# ------------------------------------------------------------------ shared


def create_job(server: ServerState, dialect: Dialect, job_id: str, endpoint: str, files: list[str], *, field: str,
               model: str | None = None, metadata: dict | None = None, window_s: int) -> dict:
    """Check the input files (``field``: the body's field that names them) and record a
    queued job over them (the caller wakes the runner)."""
    platform = server.platform
    total, shown = 0, model
    for k, file_id in enumerate(files):
        where = field if field != "input_files" else f"input_files[{k}]"
        record = platform.store.get("files", file_id)
        if record is None:
            raise NotFound(f"No file with id '{file_id}' found.", "file_not_found", where)
        if record["purpose"] != "batch":
            raise InvalidParameter(where, f"file {file_id!r} has purpose {record['purpose']!r}; a batch reads files "
                                          "of purpose 'batch'")
        n, first = b.scan(platform.data.file(file_id))
        total += n
        if shown is None and dialect is Dialect.OPENAI:  # OpenAI's Batch.model: what its requests name
            shown = first
    if total == 0:
        raise InvalidParameter(field, "holds no request: one JSON request per line")
    if total > b.MAX_REQUESTS:
        raise InvalidParameter(field, f"holds {total:,} requests, more than the {b.MAX_REQUESTS:,} a batch may")
    job = b.create(platform.store, job_id=job_id, dialect=dialect.value, endpoint=endpoint, input_file_ids=files,
                   total=total, base=platform.base_id, model=shown, metadata=metadata, window_s=window_s)
    return job


def find(server: ServerState, job_id: str) -> dict:
    job = b.get(server.platform.store, job_id)
    if job is None:
        raise NotFound(f"No batch job with id '{job_id}' found.", "batch_not_found")
    return job


async def cancel(server: ServerState, job_id: str) -> dict:
    """Cancel ``job_id`` (see the module's doc for each status); the job as it is after."""
    store = server.platform.store
    for _ in range(3):  # a queued job may start meanwhile, a running one end: look again
        job = await asyncio.to_thread(find, server, job_id)
        status, t = job["status"], now()
        if status == b.QUEUED:
            done = await asyncio.to_thread(store.transition, job_id, [b.QUEUED], b.CANCELLED, cancelling_at=t,
                                           cancelled_at=t)
        elif status == b.RUNNING:
            done = await asyncio.to_thread(store.transition, job_id, [b.RUNNING], b.CANCELLING, cancelling_at=t)
            if done is not None:
                server.batches.cancel(job_id)
        elif status in (b.CANCELLING, b.CANCELLED):
            return job
        else:
            raise WrongState(f"batch job {job_id} is {STATUS[status][0]} ({STATUS[status][1]}): only a queued or "
                             "running job can be cancelled", "batch_ended")
        if done is not None:
            return done
    raise WrongState(f"batch job {job_id} changed status while being cancelled; try again")


def _metadata_filter(request: Request, metadata: str | None) -> dict[str, str]:
    """The pairs a Mistral list asks the jobs' metadata to hold."""
    known = {"page", "page_size", "model", "agent_id", "metadata", "created_after", "created_by_me", "status",
             "order_by"}
    wanted = {k: v for k, v in request.query_params.items() if k not in known}
    if metadata:
        try:
            given = json.loads(metadata)
        except ValueError:
            given = None
        if not isinstance(given, dict):
            raise RequestInvalid([FieldError(("query", "metadata"), "must be a JSON object")])
        wanted.update({k: str(v) for k, v in given.items()})
    return wanted


def _read_outputs(server: ServerState, file_id: str) -> list[dict] | None:
    record = server.platform.store.get("files", file_id)
    if record is None:
        return None
    if (record.get("num_lines") or 0) > MAX_INLINE_OUTPUTS:
        raise InvalidParameter("inline", f"the output holds {record['num_lines']:,} lines, more than "
                                         f"{MAX_INLINE_OUTPUTS:,} inline: read its file ({file_id}) instead")
    with open(server.platform.data.file(file_id), "rb") as f:
        return [json.loads(line) for line in f if line.strip()]
