"""Files, in both APIs' shapes (one object carries OpenAI's and Mistral's fields):

    POST   /v1/files                 multipart: file, purpose ("fine-tune" | "batch")
    POST   /v1/files/validate        the same form: every line's problem, nothing stored (the console's check)
    GET    /v1/files                 OpenAI's paging (after, limit, order) or Mistral's (page, page_size)
    GET    /v1/files/{id}
    GET    /v1/files/{id}/content
    GET    /v1/files/{id}/url        Mistral's signed URL: here, the content route's
    DELETE /v1/files/{id}

An upload is received into the data directory's ``tmp/`` (at most ``--max-upload-mb``),
checked, then moved into ``files/`` and recorded. A ``fine-tune`` file gets the checks of
``galerne data validate`` with the served model's tokenizer (a line it could not train on
is a 400 that names the line and the problem, and nothing is stored); a ``batch`` file,
one JSON object with a ``body`` per line. ``POST /v1/files/validate`` runs the same checks
(``examine``) and answers all of the problems, line by line, without storing anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Query
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse

from ..errors import InvalidParameter, NotFound, WrongState
from ..finetune.data import DataError
from ..finetune.validate import Problem, check_file
from ..platform.files import UPLOAD_PURPOSES, add_file, delete_file, file_object
from ..platform.store import new_id
from .auth import require_api_key
from .errors import ClientGone
from .protocol import id_bounds, page_of
from .state import ServerState

router = APIRouter(dependencies=[Depends(require_api_key)], tags=["files"])

MAX_FILENAME = 255
SHOWN_PROBLEMS = 5
LISTED_PROBLEMS = 1000  # what POST /v1/files/validate lists (it counts them all)
COPY_CHUNK = 1 << 20
# Jobs that still read their input files: a file they name cannot be deleted meanwhile.
ACTIVE_JOB_STATUSES = ("VALIDATING", "VALIDATED", "QUEUED", "STARTED", "RUNNING", "PAUSED", "CANCELLATION_REQUESTED",
                       "PAUSE_REQUESTED")


def platform_of(request: Request):
    return request.app.state.server.platform


UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file", "purpose"],
    "properties": {"file": {"type": "string", "format": "binary"},
                   "purpose": {"type": "string", "enum": list(UPLOAD_PURPOSES)}}}}}}}


@router.post("/v1/files", summary="Upload a file (multipart: file, purpose)", openapi_extra=UPLOAD_BODY)
async def upload_file(request: Request) -> dict:
    server: ServerState = request.app.state.server
    platform = server.platform
    async with _received(request) as (tmp, filename, purpose, content_type):
        doc = await asyncio.to_thread(inspect, server, tmp, filename, purpose)
        record = await asyncio.to_thread(add_file, platform, tmp, filename=filename, purpose=purpose,
                                         mimetype=content_type or "application/jsonl", **doc)
    return file_object(record)


@router.post("/v1/files/validate", summary="Check a file as an upload is checked, line by line; nothing is stored",
             openapi_extra=UPLOAD_BODY)
async def validate_file(request: Request) -> dict:
    """``ok``, the line count, every problem (``line``, ``reason``; the first LISTED_PROBLEMS
    of them, ``num_problems`` counts all), a problem of the whole file (``error``: unreadable,
    empty), and the record's fields an upload would store (``details``)."""
    server: ServerState = request.app.state.server
    async with _received(request) as (tmp, filename, purpose, _):
        found = await asyncio.to_thread(examine, server, tmp, filename, purpose)
    return {"object": "file.validation", "filename": filename, "purpose": purpose, "ok": found.ok,
            "num_lines": found.lines, "num_problems": len(found.problems), "error": found.error,
            "problems": [{"line": p.line, "reason": p.reason} for p in found.problems[:LISTED_PROBLEMS]],
            "details": found.doc if found.ok else None}


@contextlib.asynccontextmanager
async def _received(request: Request):
    """The multipart upload (file, purpose), copied into the data directory's ``tmp/``:
    (its path, filename, purpose, content type); the copy is removed afterwards."""
    platform = platform_of(request)
    try:
        form = await request.form(max_files=1, max_fields=8)
    except ClientDisconnect:
        raise ClientGone() from None
    except MultiPartException as e:  # a malformed body
        raise InvalidParameter("file", f"the body is not a readable multipart form: {e}") from None
    try:
        upload = form.get("file")
        purpose = form.get("purpose")
        if not isinstance(upload, UploadFile):
            raise InvalidParameter("file", "missing: send the file as the multipart field 'file'")
        if not isinstance(purpose, str) or purpose not in UPLOAD_PURPOSES:
            raise InvalidParameter("purpose", f"must be one of {', '.join(UPLOAD_PURPOSES)}, got {purpose!r}")
        filename = _filename(upload.filename)
        tmp = platform.data.tmp(new_id("up-"))
        try:
            await asyncio.to_thread(_copy, upload.file, tmp)
            yield tmp, filename, purpose, upload.content_type
        finally:
            tmp.unlink(missing_ok=True)
    finally:
        await form.close()


def _filename(raw: str | None) -> str:
    name = os.path.basename((raw or "").replace("\\", "/"))
    if not name:
        raise InvalidParameter("file", "the file part has no filename")
    if len(name) > MAX_FILENAME or not name.isprintable():
        raise InvalidParameter("file", f"the filename must be 1 to {MAX_FILENAME} printable characters")
    return name


def _copy(src, dest: Path) -> None:
    src.seek(0)
    with open(dest, "wb") as out:
        while chunk := src.read(COPY_CHUNK):
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())


@dataclass
class Examined:
    """What the checks of an uploaded file found: its lines, the problems of its lines, a
    problem of the whole file (``error``), and the record's fields when it has none."""

    lines: int = 0
    problems: list[Problem] = field(default_factory=list)
    error: str | None = None
    doc: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems and self.error is None


def inspect(server: ServerState, path: Path, filename: str, purpose: str) -> dict[str, Any]:
    """The record's fields of an uploaded file, after its checks (an InvalidParameter on
    ``file`` naming the lines at fault when it fails them)."""
    found = examine(server, path, filename, purpose)
    if found.error is not None:
        raise InvalidParameter("file", f"{filename}: {found.error}")
    if found.problems:
        raise _refuse(filename, found.problems, found.lines)
    return found.doc


def examine(server: ServerState, path: Path, filename: str, purpose: str) -> Examined:
    """The checks of an uploaded file of ``purpose``, every line's (upload and validation share them)."""
    if purpose == "fine-tune":
        return _examine_finetune(server, path, filename)
    return _examine_batch(path, filename)


def _refuse(filename: str, problems: list[Problem], lines: int) -> InvalidParameter:
    shown = "; ".join(f"line {p.line}: {p.reason}" for p in problems[:SHOWN_PROBLEMS])
    more = f" (and {len(problems) - SHOWN_PROBLEMS} more)" if len(problems) > SHOWN_PROBLEMS else ""
    return InvalidParameter("file", f"{filename}: {len(problems)} of {lines} lines cannot be used: {shown}{more}; "
                                    "nothing was stored (galerne data validate shows every problem)")


def _examine_finetune(server: ServerState, path: Path, filename: str) -> Examined:
    found = Examined()
    tokens = trained = longest = pretrain = 0
    try:
        for _raw, sample in check_file(path, server.tokenizer, server.max_model_len):
            found.lines += 1
            if isinstance(sample, Problem):
                found.problems.append(Problem(filename, sample.line, sample.reason))
                continue
            tokens += len(sample.tokens)
            trained += sample.trained_tokens
            longest = max(longest, len(sample.tokens))
            pretrain += _is_pretrain(_raw)
    except DataError as e:
        found.error = e.reason
        return found
    if found.lines == 0:
        found.error = "the file is empty: a fine-tuning file holds one JSON conversation per line"
    found.doc = {"num_lines": found.lines, "sample_type": "pretrain" if pretrain == found.lines else "instruct",
                 "tokens": tokens, "trained_tokens": trained, "longest_sample": longest}
    return found


def _is_pretrain(raw: bytes) -> bool:
    try:
        obj = json.loads(raw)
    except ValueError:
        return False
    return isinstance(obj, dict) and "text" in obj and "messages" not in obj


def _examine_batch(path: Path, filename: str) -> Examined:
    found = Examined()
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            found.lines += 1
            try:
                obj = json.loads(raw)
            except (ValueError, RecursionError) as e:
                found.problems.append(Problem(filename, n, f"bad JSON: {getattr(e, 'msg', e)}"))
                continue
            if not isinstance(obj, dict) or not isinstance(obj.get("body"), dict):
                found.problems.append(Problem(filename, n, 'not a request: a batch line is {"custom_id": ..., '
                                                           '"body": {...}}'))
    if found.lines == 0:
        found.error = "the file is empty: a batch file holds one request per line"
    found.doc = {"num_lines": found.lines, "sample_type": "batch_request"}
    return found


# ------------------------------------------------------------------ reading


def get_record(request: Request, file_id: str) -> dict[str, Any]:
    record = platform_of(request).store.get("files", file_id)
    if record is None:
        raise NotFound(f"No file with id '{file_id}' found.", "file_not_found", "file_id")
    return record


@router.get("/v1/files", summary="The files, newest first (OpenAI's or Mistral's paging)")
async def list_files(request: Request, purpose: str | None = None, after: str | None = None,
                     limit: int = Query(10000, ge=1, le=10000), order: str = Query("desc", pattern="^(asc|desc)$"),
                     page: int | None = Query(None, ge=0), page_size: int | None = Query(None, ge=1, le=10000),
                     sample_type: list[str] | None = Query(None), search: str | None = None) -> dict:
    store = platform_of(request).store
    where: dict[str, Any] = {"purpose": purpose} if purpose else {}

    def run() -> tuple[list[dict], int]:
        rows = store.select("files", where=where, descending=order == "desc")
        if sample_type:
            rows = [r for r in rows if r.get("sample_type") in sample_type]
        if search:
            rows = [r for r in rows if search.lower() in r["filename"].lower()]
        return rows, len(rows)

    rows, total = await asyncio.to_thread(run)
    chosen, more = page_of(rows, after=after, limit=limit, page=page, page_size=page_size)
    data = [file_object(r) for r in chosen]
    return {"object": "list", "data": data, "has_more": more, "total": total, **id_bounds(data)}


@router.get("/v1/files/{file_id}", summary="A file's record")
async def retrieve_file(request: Request, file_id: str) -> dict:
    return file_object(await asyncio.to_thread(get_record, request, file_id))


@router.get("/v1/files/{file_id}/content", summary="A file's bytes", response_class=FileResponse)
async def file_content(request: Request, file_id: str) -> FileResponse:
    record = await asyncio.to_thread(get_record, request, file_id)
    path = platform_of(request).data.file(file_id)
    if not path.is_file():
        raise NotFound(f"the content of file '{file_id}' is missing from the data directory", "file_not_found", "file_id")
    return FileResponse(path, media_type="application/octet-stream", filename=record["filename"])


@router.get("/v1/files/{file_id}/url", summary="Where to download a file (Mistral's signed URL)")
async def file_url(request: Request, file_id: str, expiry: int = 24) -> dict:
    await asyncio.to_thread(get_record, request, file_id)
    return {"url": str(request.url_for("file_content", file_id=file_id))}


@router.delete("/v1/files/{file_id}", summary="Delete a file (not one a job still reads)")
async def remove_file(request: Request, file_id: str) -> dict:
    platform = platform_of(request)

    def run() -> None:
        get_record(request, file_id)
        for job in platform.store.select("jobs", where={"status": list(ACTIVE_JOB_STATUSES)}):
            if file_id in job.get("input_file_ids", ()):
                raise WrongState(f"file '{file_id}' is an input of job '{job['id']}' ({job['status'].lower()}): "
                                 "cancel the job or let it finish first", "file_in_use", "file_id")
        if not delete_file(platform, file_id):
            raise NotFound(f"No file with id '{file_id}' found.", "file_not_found", "file_id")

    await asyncio.to_thread(run)
    return {"id": file_id, "object": "file", "deleted": True}
