"""Fine-tuning jobs: what a job is, its statuses, and every change of status.

A job is created from either API's body (the routes turn both into :class:`JobSpec`), is
checked against its files at once (:func:`create_job`: the token counts, the steps and an
estimate of its duration come from the files' records), and then moves through Mistral's
statuses, plus a pause:

::

    VALIDATING -> FAILED_VALIDATION
               -> VALIDATED (auto_start: false) --start--> QUEUED
               -> QUEUED -> RUNNING -> SUCCESS | FAILED
    QUEUED, VALIDATED, PAUSED --cancel--> CANCELLED
    RUNNING --cancel--> CANCELLATION_REQUESTED -> CANCELLED      (the worker stops at its next step)
    RUNNING --pause--> PAUSE_REQUESTED -> PAUSED --resume--> QUEUED   (then resumes from its checkpoint)
    QUEUED --pause--> PAUSED

Every change goes through ``Store.transition`` (status A -> B only if the job is still in
A), so that a cancel racing the end of a job, or two servers claiming a queued job, leave
one winner. Each change is an event of the job (``status-updated``).
"""

from __future__ import annotations

import math
import random
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from galerne.errors import InvalidParameter, NotFound, WrongState
from galerne.platform.store import new_id, now

# Statuses (Mistral's names; PAUSE_REQUESTED and PAUSED are for OpenAI's pause).
VALIDATING, VALIDATED, FAILED_VALIDATION = "VALIDATING", "VALIDATED", "FAILED_VALIDATION"
QUEUED, RUNNING, SUCCESS, FAILED = "QUEUED", "RUNNING", "SUCCESS", "FAILED"
CANCELLATION_REQUESTED, CANCELLED = "CANCELLATION_REQUESTED", "CANCELLED"
PAUSE_REQUESTED, PAUSED = "PAUSE_REQUESTED", "PAUSED"
FINISHED = (SUCCESS, FAILED, FAILED_VALIDATION, CANCELLED)
WORKING = (RUNNING, CANCELLATION_REQUESTED, PAUSE_REQUESTED)  # a worker holds the job
ACTIVE = (VALIDATING, VALIDATED, QUEUED, PAUSED) + WORKING  # not finished

JOB_ID_PREFIX = "ftjob-"
MAX_SUFFIX = 18  # OpenAI's limit, and Mistral's
DEFAULT_LR = 1e-4  # Mistral's default learning rate; OpenAI's learning_rate_multiplier scales it
DEFAULT_EPOCHS = 3  # OpenAI's "auto" for n_epochs, and Mistral's when neither steps nor epochs are given
DEFAULT_RANK = 16
DEFAULT_SEQ_LEN = 2048
CHECKPOINTS_PER_JOB = 10  # a job saves a checkpoint every 1/10 of its steps (and resumes from the last)
CHECKPOINTS_KEPT = 3  # OpenAI keeps the last 3
MAX_ATTEMPTS = 3  # a job whose worker died is resumed this many times before it fails
# Until a job on this server has measured it, the duration estimate assumes training runs
# at this many model FLOPs per second (6 x parameters x tokens): a 2-core CPU's order.
GUESS_FLOPS = {"cpu": 1.5e11, "cuda": 2e14}


@dataclass
class TrainingFile:
    file_id: str
    weight: float = 1.0


@dataclass
class Hyperparameters:
    """A job's training settings, in both APIs' terms: Mistral's (training_steps,
    learning_rate, weight_decay, warmup_fraction, epochs, seq_len) and OpenAI's (n_epochs,
    batch_size, learning_rate_multiplier), resolved to values at creation."""

    training_steps: int | None = None
    epochs: float | None = None
    learning_rate: float = DEFAULT_LR
    learning_rate_multiplier: float | None = None
    weight_decay: float = 0.1
    warmup_fraction: float = 0.05
    seq_len: int | None = None
    batch_size: int = 1
    lora_rank: int = DEFAULT_RANK
    fim_ratio: float | None = None


@dataclass
class JobSpec:
    """A job as asked, whichever API's body it came in."""

    model: str
    training_files: list[TrainingFile]
    validation_files: list[str] = field(default_factory=list)
    hyperparameters: Hyperparameters = field(default_factory=Hyperparameters)
    suffix: str | None = None
    seed: int | None = None
    auto_start: bool = True
    metadata: dict[str, str] | None = None
    integrations: list[Any] = field(default_factory=list)
    dialect: str = "openai"  # the API whose body created it: its answers' default shape


def check_suffix(suffix: str | None) -> str | None:
    if suffix is None or suffix == "":
        return None
    if len(suffix) > MAX_SUFFIX or not re.fullmatch(r"[A-Za-z0-9._-]+", suffix):
        raise InvalidParameter("suffix", f"must be 1 to {MAX_SUFFIX} of A-Z a-z 0-9 . _ -, got {suffix!r}")
    return suffix


def model_id_for(base: str, suffix: str | None, job_id: str) -> str:
    """``ft:<base>:<suffix>:<id>`` (Mistral's naming; no suffix: ``ft:<base>:<id>``), within
    the 64 characters of a served adapter's name."""
    short = job_id.removeprefix(JOB_ID_PREFIX)[:8]
    tail = f":{suffix}:{short}" if suffix else f":{short}"
    room = 64 - len("ft:") - len(tail)
    safe = re.sub(r"[^A-Za-z0-9._-]", "-", base)[:room].strip("-") or "model"
    return f"ft:{safe}{tail}"


# ------------------------------------------------------------------ creation


def create_job(platform, spec: JobSpec, *, max_model_len: int, max_rank: int, n_params: int, device: str,
               dry_run: bool = False) -> dict[str, Any]:
    """Check ``spec`` against its files and the served model, and record the job (VALIDATED
    or QUEUED; FAILED_VALIDATION when the data cannot train at these settings, with the
    reason as its error). ``dry_run``: the estimate only, nothing recorded."""
    hp = spec.hyperparameters
    _check_hyperparameters(hp, max_model_len, max_rank)
    train_records = [_file(platform, f.file_id, "training_files") for f in spec.training_files]
    valid_records = [_file(platform, fid, "validation_files") for fid in spec.validation_files]
    seq_len = hp.seq_len or min(max_model_len, DEFAULT_SEQ_LEN)
    data_tokens = sum(r.get("tokens", 0) for r in train_records)
    per_step = seq_len * hp.batch_size
    if hp.training_steps is not None:
        steps = hp.training_steps
        epochs = steps * per_step / max(data_tokens, 1)
    else:
        epochs = hp.epochs if hp.epochs is not None else DEFAULT_EPOCHS
        steps = max(1, math.ceil(epochs * data_tokens / per_step))
    resolved = {**asdict(hp), "seq_len": seq_len, "training_steps": steps, "epochs": round(epochs, 4)}
    tokens_per_s = measured_speed(platform, spec.model) or GUESS_FLOPS.get(device, GUESS_FLOPS["cpu"]) / (6 * n_params)
    estimate = {
        "train_tokens_per_step": per_step, "train_tokens": steps * per_step, "data_tokens": data_tokens,
        "expected_duration_seconds": int(steps * per_step / tokens_per_s), "cost": 0.0, "cost_currency": None,
        "estimated_start_time": None, "tokens_per_s_assumed": round(tokens_per_s, 1),
    }
    too_long = [r for r in train_records + valid_records if r.get("longest_sample", 0) > seq_len]
    error = None
    if too_long:
        r = too_long[0]
        error = {"code": "invalid_training_file", "param": "hyperparameters.seq_len",
                 "message": f"file {r['id']} ({r['filename']}) has a sample of {r['longest_sample']} tokens, longer "
                            f"than seq_len {seq_len}: raise seq_len (up to {max_model_len}) or shorten the sample"}
    if dry_run:
        return {"estimate": estimate, "hyperparameters": resolved, "error": error}
    job_id = new_id(JOB_ID_PREFIX)
    t = now()
    status = FAILED_VALIDATION if error else (QUEUED if spec.auto_start else VALIDATED)
    record = {
        "id": job_id, "kind": "fine_tune", "status": status, "model": spec.model, "created_at": t, "modified_at": t,
        "dialect": spec.dialect, "training_files": [asdict(f) for f in spec.training_files],
        "validation_files": list(spec.validation_files),
        "input_file_ids": [f.file_id for f in spec.training_files] + list(spec.validation_files),
        "hyperparameters": resolved, "suffix": spec.suffix,
        "seed": spec.seed if spec.seed is not None else random.randrange(2**31),
        "auto_start": spec.auto_start, "metadata": spec.metadata, "integrations": spec.integrations,
        "estimate": estimate, "error": error, "fine_tuned_model": None, "trained_tokens": None,
        "started_at": None, "finished_at": None, "attempts": 0, "progress": None,
        "base_path": platform.base_path,
    }
    platform.store.insert("jobs", record)
    platform.store.add_event(job_id, name="status-updated", level="info", type="message",
                             message="Validating training file(s)", data={"status": VALIDATING})
    event(platform, job_id, status, error["message"] if error else None)
    return record


def _file(platform, file_id: str, field: str) -> dict[str, Any]:
    record = platform.store.get("files", file_id)
    if record is None:
        raise NotFound(f"{field}: no file with id '{file_id}' found.", "file_not_found", field)
    if record["purpose"] != "fine-tune":
        raise InvalidParameter(field, f"file '{file_id}' was uploaded for {record['purpose']!r}, not 'fine-tune'")
    return record


def _check_hyperparameters(hp: Hyperparameters, max_model_len: int, max_rank: int) -> None:
    def positive(name: str, value, *, integer: bool = False, upper: float | None = None) -> None:
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0 \
                or (integer and int(value) != value) or (upper is not None and value > upper):
            bound = f" and at most {upper:g}" if upper is not None else ""
            raise InvalidParameter(f"hyperparameters.{name}", f"must be a positive {'integer' if integer else 'number'}"
                                                              f"{bound}, got {value!r}")

    positive("training_steps", hp.training_steps, integer=True, upper=10_000_000)
    positive("epochs", hp.epochs, upper=1000)
    positive("learning_rate", hp.learning_rate, upper=1.0)
    positive("learning_rate_multiplier", hp.learning_rate_multiplier, upper=1000)
    positive("seq_len", hp.seq_len, integer=True, upper=max_model_len)
    positive("batch_size", hp.batch_size, integer=True, upper=1024)
    positive("lora_rank", hp.lora_rank, integer=True, upper=max_rank)
    if hp.training_steps is not None and hp.epochs is not None:
        raise InvalidParameter("hyperparameters", "give training_steps or epochs, not both")
    for name in ("weight_decay", "warmup_fraction"):
        v = getattr(hp, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= (1 if name == "warmup_fraction" else 10):
            raise InvalidParameter(f"hyperparameters.{name}", f"must be a number in [0, {1 if name == 'warmup_fraction' else 10}], got {v!r}")
    if hp.fim_ratio not in (None, 0, 0.0):
        raise InvalidParameter("hyperparameters.fim_ratio", "FIM training is not supported: leave fim_ratio unset or 0")


def measured_speed(platform, model: str) -> float | None:
    """Training tokens per second of the last job on ``model`` that ran here (None: none yet)."""
    for job in platform.store.select("jobs", where={"kind": "fine_tune", "model": model, "status": [SUCCESS]}, limit=5):
        speed = (job.get("progress") or {}).get("tokens_per_s")
        if speed:
            return float(speed)
    return None


# ------------------------------------------------------------------ changes of status


def event(platform, job_id: str, status: str, message: str | None = None, level: str = "info") -> None:
    text = {QUEUED: "Job queued", RUNNING: "Fine-tuning job started", SUCCESS: "The job has successfully completed",
            FAILED: "The job has failed", CANCELLED: "The job was cancelled", PAUSED: "The job was paused",
            VALIDATED: "Files validated: start the job to train", FAILED_VALIDATION: "Validation of the files failed",
            CANCELLATION_REQUESTED: "Cancellation requested: stopping at the next step",
            PAUSE_REQUESTED: "Pause requested: stopping at the next step, after a checkpoint"}.get(status, status)
    if message:
        text = f"{text}: {message}"
    platform.store.add_event(job_id, name="status-updated", level="error" if status in (FAILED, FAILED_VALIDATION)
                             else level, type="message", message=text, data={"status": status})


def move(platform, job_id: str, expect: tuple[str, ...], status: str, message: str | None = None,
         **values: Any) -> dict[str, Any] | None:
    """Status ``expect`` -> ``status`` (atomically), with its event; None when the job was
    not in ``expect``."""
    if status in FINISHED:
        values.setdefault("finished_at", now())
    job = platform.store.transition(job_id, expect, status, **values)
    if job is not None:
        event(platform, job_id, status, message)
    return job


def wrong_state(job: dict[str, Any], action: str):
    return WrongState(f"job '{job['id']}' is {job['status']}: it cannot be {action}", f"job_not_{action.replace(' ', '_')}")


def cancel(platform, job: dict[str, Any]) -> dict[str, Any]:
    """Cancel at any status: at once when no worker holds the job; else ask the worker to
    stop (it stops at its next step). Finished jobs: a WrongState."""
    for _ in range(3):  # the status may change under us: try again from the new one
        if job["status"] in (VALIDATING, VALIDATED, QUEUED, PAUSED):
            done = move(platform, job["id"], (job["status"],), CANCELLED)
        elif job["status"] in (RUNNING, PAUSE_REQUESTED):
            done = move(platform, job["id"], (job["status"],), CANCELLATION_REQUESTED)
        elif job["status"] == CANCELLATION_REQUESTED:
            return job
        else:
            raise wrong_state(job, "cancelled")
        if done is not None:
            return done
        job = platform.store.get("jobs", job["id"])
    raise wrong_state(job, "cancelled")


def start(platform, job: dict[str, Any]) -> dict[str, Any]:
    """Mistral's start of a job created with ``auto_start: false``."""
    done = move(platform, job["id"], (VALIDATED,), QUEUED) if job["status"] == VALIDATED else None
    if done is None:
        raise wrong_state(platform.store.get("jobs", job["id"]) or job, "started")
    return done


def pause(platform, job: dict[str, Any]) -> dict[str, Any]:
    if job["status"] == QUEUED:
        done = move(platform, job["id"], (QUEUED,), PAUSED)
    elif job["status"] == RUNNING:
        done = move(platform, job["id"], (RUNNING,), PAUSE_REQUESTED)
    elif job["status"] in (PAUSED, PAUSE_REQUESTED):
        return job
    else:
        done = None
    if done is None:
        raise wrong_state(platform.store.get("jobs", job["id"]) or job, "paused")
    return done


def resume(platform, job: dict[str, Any]) -> dict[str, Any]:
    done = move(platform, job["id"], (PAUSED,), QUEUED, "resuming from its last checkpoint") \
        if job["status"] == PAUSED else None
    if done is None:
        raise wrong_state(platform.store.get("jobs", job["id"]) or job, "resumed")
    return done


# ------------------------------------------------------------------ training settings


def run_dir(platform, job_id: str) -> Path:
    return platform.data.job(job_id) / "run"


def finetune_config(platform, job: dict[str, Any]):
    """The trainer's settings for ``job`` (its run folder under the data directory)."""
    from galerne.finetune.config import load_config

    hp = job["hyperparameters"]
    by_type: dict[str, list[str]] = {"instruct": [], "pretrain": []}
    for f in job["training_files"]:
        record = platform.store.get("files", f["file_id"])
        if record is None:
            raise FileNotFoundError(f"training file {f['file_id']} was deleted")
        by_type[record.get("sample_type") or "instruct"].append(f"{platform.data.file(f['file_id'])}:{f['weight']:g}")
    valid = []
    for fid in job["validation_files"]:
        if platform.store.get("files", fid) is None:
            raise FileNotFoundError(f"validation file {fid} was deleted")
        valid.append(str(platform.data.file(fid)))
    steps = hp["training_steps"]
    every = max(1, math.ceil(steps / CHECKPOINTS_PER_JOB))
    lr = hp["learning_rate"] * (hp.get("learning_rate_multiplier") or 1.0)
    overrides = {
        "model_id_or_path": job.get("base_path") or platform.base_path, "run_dir": str(run_dir(platform, job["id"])),
        "data": {"instruct_data": ",".join(by_type["instruct"]), "data": ",".join(by_type["pretrain"]),
                 "eval_instruct_data": ",".join(valid)},
        "lora": {"rank": hp["lora_rank"]},
        "optim": {"lr": lr, "weight_decay": hp["weight_decay"], "pct_start": hp["warmup_fraction"]},
        "seq_len": hp["seq_len"], "batch_size": 1, "num_microbatches": hp["batch_size"], "max_steps": steps,
        "seed": job["seed"], "log_freq": max(1, steps // 500), "eval_freq": every if valid else 0,
        "ckpt_freq": every, "num_ckpt_keep": CHECKPOINTS_KEPT,
    }
    return load_config(None, overrides)


def heartbeat_age(job: dict[str, Any]) -> float:
    return time.time() - (job.get("heartbeat") or 0)
