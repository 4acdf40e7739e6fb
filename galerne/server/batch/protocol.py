"""Batch jobs on the wire, in both dialects: the bodies that create them, the lines of
their input and output files, and the job objects (OpenAI's ``Batch``, Mistral's
``BatchJob``) made from a job's record (``galerne.platform.batches``).

One record, two views: each API shows our statuses in its own words (STATUS), and the
counters as it counts them (OpenAI's ``request_counts.completed`` is the requests that
succeeded; Mistral's ``completed_requests`` is every request answered).
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from ...platform import batches as b
from ...platform.store import new_id
from ..dialect import Dialect
from ..endpoints import ENDPOINTS
from ..protocol import RequestBody, Wire

# our status -> (OpenAI's, Mistral's)
STATUS = {
    b.QUEUED: ("validating", "QUEUED"),
    b.RUNNING: ("in_progress", "RUNNING"),
    b.FINALIZING: ("finalizing", "RUNNING"),
    b.SUCCEEDED: ("completed", "SUCCESS"),
    b.FAILED: ("failed", "FAILED"),
    b.EXPIRED: ("expired", "TIMEOUT_EXCEEDED"),
    b.CANCELLING: ("cancelling", "CANCELLATION_REQUESTED"),
    b.CANCELLED: ("cancelled", "CANCELLED"),
}

def from_mistral_status(statuses: list[str]) -> list[str]:
    """Our statuses that Mistral shows as one of ``statuses``."""
    return [ours for ours, (_, m) in STATUS.items() if m in statuses]


MAX_METADATA = 16  # pairs (OpenAI's limit)


def _check_metadata(value: dict[str, str] | None) -> dict[str, str] | None:
    if value is not None:
        if len(value) > MAX_METADATA:
            raise ValueError(f"at most {MAX_METADATA} pairs, got {len(value)}")
        for k, v in value.items():
            if len(k) > 64 or len(v) > 512:
                raise ValueError(f"keys hold at most 64 characters and values 512 ({k[:64]!r} is past that)")
    return value


class OpenAIBatchCreate(RequestBody):
    input_file_id: str = Field(description="an uploaded JSONL file of purpose 'batch': one request per line")
    endpoint: Literal[tuple(ENDPOINTS[Dialect.OPENAI])] = Field(description="where every line's request goes")
    completion_window: Literal["24h"] = Field(description="the time the batch has to end (only '24h')")
    metadata: dict[str, str] | None = Field(None, description=f"up to {MAX_METADATA} key-value pairs of yours")

    _metadata = field_validator("metadata")(_check_metadata)


class MistralBatchRequest(Wire):
    custom_id: str | None = None
    body: dict[str, Any]


class MistralBatchCreate(RequestBody):
    endpoint: Literal[tuple(ENDPOINTS[Dialect.MISTRAL])] = Field(description="where every line's request goes")
    input_files: list[str] | None = Field(None, min_length=1, description="uploaded JSONL files of purpose 'batch'")
    requests: list[MistralBatchRequest] | None = Field(None, min_length=1, description=(
        "the requests inline (instead of input_files): {custom_id, body} each"))
    model: str | None = Field(None, description="the model of the requests whose body names none")
    agent_id: str | None = Field(None, description="not supported (no agents here)")
    metadata: dict[str, str] | None = Field(None, description=f"up to {MAX_METADATA} key-value pairs of yours")
    timeout_hours: Annotated[int, Field(ge=1, le=168)] = Field(24, description="the time the batch has to end")

    _metadata = field_validator("metadata")(_check_metadata)


# ------------------------------------------------------------------ input lines


class OpenAIBatchLine(Wire):
    custom_id: str = Field(min_length=1)
    method: Literal["POST"]
    url: str
    body: dict[str, Any]


class MistralBatchLine(Wire):
    custom_id: str | None = None
    body: dict[str, Any]


LINE_WIRE = {Dialect.OPENAI: OpenAIBatchLine, Dialect.MISTRAL: MistralBatchLine}


# ------------------------------------------------------------------ output lines


def output_line(dialect: Dialect, custom_id: str | None, status: int, body: dict) -> tuple[bool, dict]:
    """(success, the line) of one request's answer: status 200 goes to the output file;
    any other, with its error body, to the error file, and ``error`` repeats its code
    and message."""
    error = None
    if status != 200:
        inner = body.get("error", body) if dialect is Dialect.OPENAI else body
        error = {"code": inner.get("code") or str(status), "message": inner.get("message") or "error"}
    response: dict[str, Any] = {"status_code": status}
    if dialect is Dialect.OPENAI:
        response["request_id"] = new_id("req_")
    response["body"] = body
    return status == 200, {"id": _line_id(dialect), "custom_id": custom_id, "response": response, "error": error}


def unanswered_line(dialect: Dialect, custom_id: str | None, code: str, message: str) -> dict:
    """The error line of a request that got no HTTP answer (the batch expired first)."""
    return {"id": _line_id(dialect), "custom_id": custom_id, "response": None,
            "error": {"code": code, "message": message}}


def _line_id(dialect: Dialect) -> str:
    return new_id("batch_req_") if dialect is Dialect.OPENAI else uuid.uuid4().hex


# ------------------------------------------------------------------ job objects


def openai_batch(job: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's ``Batch`` of a job's record."""
    errors = [{"code": e.get("code"), "message": e.get("message"), "param": e.get("param"), "line": e.get("line")}
              for e in job.get("errors") or []]
    u = job.get("usage") or {}
    return {
        "id": job["id"], "object": "batch", "endpoint": job["endpoint"],
        "errors": {"object": "list", "data": errors} if errors else None,
        "input_file_id": (job.get("input_file_ids") or [None])[0], "completion_window": "24h",
        "status": STATUS[job["status"]][0], "output_file_id": job.get("output_file"), "error_file_id": job.get("error_file"),
        "created_at": job["created_at"], "in_progress_at": job.get("started_at"), "expires_at": job.get("expires_at"),
        "finalizing_at": job.get("finalizing_at"), "completed_at": job.get("completed_at"),
        "failed_at": job.get("failed_at"), "expired_at": job.get("expired_at"),
        "cancelling_at": job.get("cancelling_at"), "cancelled_at": job.get("cancelled_at"),
        "request_counts": {"total": job.get("total", 0), "completed": job.get("succeeded", 0),
                           "failed": job.get("failed", 0)},
        "metadata": job.get("metadata"), "model": job.get("model") or None,
        "usage": {"input_tokens": u.get("input_tokens", 0),
                  "input_tokens_details": {"cached_tokens": u.get("cached_tokens", 0)},
                  "output_tokens": u.get("output_tokens", 0),
                  "output_tokens_details": {"reasoning_tokens": u.get("reasoning_tokens", 0)},
                  "total_tokens": u.get("input_tokens", 0) + u.get("output_tokens", 0)},
    }


def mistral_job(job: dict[str, Any], outputs: list[dict] | None = None) -> dict[str, Any]:
    """Mistral's ``BatchJob`` of a job's record; ``outputs``: its output lines (``inline``)."""
    errors = [{"message": e["message"], "count": e.get("count", 1)} for e in job.get("errors") or []]
    errors += [{"message": m, "count": n} for m, n in (job.get("line_errors") or {}).items()]
    ended = next((job.get(k) for k in ("completed_at", "failed_at", "expired_at", "cancelled_at") if job.get(k)), None)
    return {
        "id": job["id"], "object": "batch", "input_files": job.get("input_file_ids") or [], "metadata": job.get("metadata"),
        "endpoint": job["endpoint"], "model": job.get("model") or None, "agent_id": None,
        "output_file": job.get("output_file"), "error_file": job.get("error_file"), "errors": errors,
        "outputs": outputs, "status": STATUS[job["status"]][1], "created_at": job["created_at"],
        "total_requests": job.get("total", 0), "completed_requests": job.get("succeeded", 0) + job.get("failed", 0),
        "succeeded_requests": job.get("succeeded", 0), "failed_requests": job.get("failed", 0),
        "started_at": job.get("started_at"), "completed_at": ended,
    }
