"""A fine-tuning job's worker: ``python -m galerne.platform.worker --job ID --database-url URL
--data-dir DIR``, started by a launcher (a process of the server's machine, or a Ray Job),
never inside the server's process.

It trains with ``galerne finetune``'s trainer, in the job's run folder under the data
directory, resuming from the run's last checkpoint when there is one (a job resumed after
a pause, or after its server or worker died). It reports to the store, which the servers
read:

* a heartbeat every few seconds (a job whose heartbeat stops is taken back by a server);
* a ``metrics`` event per logged step (step, train_loss, lr, tokens/s, ETA) and per
  evaluation (valid_loss), and the job's ``progress``;
* a checkpoint record per checkpoint saved;
* at the end: the adapter copied to ``DATA_DIR/models/<job id>``, the fine-tuned model
  recorded (``ft:<base>:<suffix>:<id>``), and the job SUCCESS; or FAILED with the reason.

A cancel or a pause is a status the servers write (CANCELLATION_REQUESTED,
PAUSE_REQUESTED); the heartbeat thread sees it and stops the trainer as Ctrl-C does (after
the current step, with a checkpoint), wherever the worker runs. Under torchrun, only
process 0 writes to the store.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from galerne.platform import Platform
from galerne.platform import jobs as J
from galerne.platform.datadir import DataDir
from galerne.platform.store import Store, now

log = logging.getLogger("galerne.worker")

HEARTBEAT_S = 2.0


class Reporter:
    """What the worker tells the store (process 0 only)."""

    def __init__(self, store: Store, job: dict[str, Any]):
        self.store = store
        self.id = job["id"]
        self.total = job["hyperparameters"]["training_steps"]
        self.last_loss: float | None = None
        self.last_valid: float | None = None
        self.progress: dict[str, Any] = dict(job.get("progress") or {})
        self.stop_reason: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                job = self.store.update("jobs", self.id, heartbeat=time.time())
            except Exception as e:  # the database is away for a moment: try again next beat
                log.warning("heartbeat failed: %s", e)
                continue
            if job is None:
                continue
            if job["status"] in (J.CANCELLATION_REQUESTED, J.PAUSE_REQUESTED) and self.stop_reason is None:
                self.stop_reason = job["status"]
                log.info("job %s: %s: stopping after this step", self.id, job["status"])
                os.kill(os.getpid(), signal.SIGINT)  # the trainer's StopRequest: checkpoint, then return

    def on_log(self, row: dict[str, Any]) -> None:
        step = row["step"]
        if "loss" in row:
            self.last_loss = row["loss"]
            speed = row.get("tokens_per_s") or 0.0
            left = (self.total - step) * (row.get("elapsed", 0) / step if step else 0)
            data = {"step": step, "total_steps": self.total, "train_loss": row["loss"], "learning_rate": row["lr"],
                    "tokens": row.get("tokens"), "tokens_per_s": round(speed, 1), "elapsed_s": round(row["elapsed"], 1),
                    "eta_seconds": int(left), "grad_norm": row.get("grad_norm")}
            message = f"Step {step}/{self.total}: training loss={row['loss']:.4f}"
        else:
            self.last_valid = row.get("eval_loss")
            data = {"step": step, "total_steps": self.total, "valid_loss": self.last_valid,
                    "valid_perplexity": row.get("eval_perplexity")}
            message = f"Step {step}/{self.total}: validation loss={self.last_valid:.4f}"
        self.progress.update({k: v for k, v in data.items() if v is not None})
        self.store.add_event(self.id, name="metrics", level="info", type="metrics", message=message, data=data)
        self.store.update("jobs", self.id, progress=self.progress, heartbeat=time.time())

    def on_checkpoint(self, folder: Path, step: int) -> None:
        """Record the checkpoint; forget those the trainer removed (it keeps the newest few)."""
        metrics = {"step": step, "train_loss": self.last_loss, "valid_loss": self.last_valid}
        self.store.add_checkpoint(self.id, step, path=str(folder), metrics=metrics)
        for old in self.store.checkpoints(self.id):
            if not Path(old["path"]).is_dir():
                self.store.delete("checkpoints", old["id"])


def run(job_id: str, database_url: str, data_dir: str) -> int:
    store = Store(database_url)
    data = DataDir(data_dir)
    rank = int(os.environ.get("RANK", "0"))
    job = store.get("jobs", job_id)
    if job is None:
        log.error("job %s: no such job in %s", job_id, database_url)
        return 2
    if job["status"] not in J.WORKING:
        log.error("job %s is %s, not running: nothing to do", job_id, job["status"])
        return 0
    platform = Platform(data, store, job["model"], job.get("base_path") or "")
    reporter = Reporter(store, job) if rank == 0 else None
    try:
        return _train(platform, job, reporter)
    except BaseException as e:  # everything that ends a job is said in its record
        if reporter is None:
            raise
        if isinstance(e, KeyboardInterrupt) and reporter.stop_reason is not None:  # asked before training began
            target = J.CANCELLED if reporter.stop_reason == J.CANCELLATION_REQUESTED else J.PAUSED
            J.move(platform, job_id, (reporter.stop_reason,), target)
            return 0
        reason = _reason(e)
        log.error("job %s failed: %s\n%s", job_id, reason, traceback.format_exc())
        J.move(platform, job_id, J.WORKING, J.FAILED, reason,
               error={"code": "training_failed", "message": reason, "param": None})
        return 1
    finally:
        if reporter is not None:
            reporter.close()


def _reason(e: BaseException) -> str:
    from galerne.errors import GalerneError

    if isinstance(e, (GalerneError, FileNotFoundError)):
        return str(e)
    if isinstance(e, MemoryError) or "out of memory" in str(e).lower():
        return f"out of memory: {e}"
    return f"{type(e).__name__}: {e}"


def _train(platform: Platform, job: dict[str, Any], reporter: Reporter | None) -> int:
    from galerne.finetune.trainer import checkpoint_dirs, train

    store = platform.store
    cfg = J.finetune_config(platform, job)
    run_dir = Path(cfg.run_dir)
    resume = bool(checkpoint_dirs(run_dir)) if run_dir.is_dir() else False
    if reporter is not None:
        reporter.start()
        where = "resuming from its last checkpoint" if resume else "from the start"
        store.add_event(job["id"], name="training-started", level="info", type="message",
                        message=f"Training {cfg.max_steps} steps of {cfg.seq_len * cfg.num_microbatches} tokens, "
                                f"{where}", data={"steps": cfg.max_steps, "resumed": resume})
    result = train(cfg, resume="latest" if resume else None,
                   on_log=reporter.on_log if reporter is not None else None,
                   on_checkpoint=reporter.on_checkpoint if reporter is not None else None, progress_bar=False)
    if reporter is None:
        return 0
    trained = result.step * cfg.seq_len * cfg.num_microbatches * cfg.batch_size
    if result.interrupted:
        asked = reporter.stop_reason or store.get("jobs", job["id"])["status"]
        if asked == J.CANCELLATION_REQUESTED:
            J.move(platform, job["id"], J.WORKING, J.CANCELLED, trained_tokens=trained)
        elif asked == J.PAUSE_REQUESTED:
            J.move(platform, job["id"], (J.PAUSE_REQUESTED,), J.PAUSED, f"checkpoint at step {result.step}",
                   trained_tokens=trained)
        else:  # stopped from outside (SIGTERM: Ray's stop, a shutdown): a server requeues it
            J.move(platform, job["id"], J.WORKING, J.QUEUED, f"the worker was stopped at step {result.step}; "
                   "it resumes from its checkpoint", owner=None)
        return 0
    _publish(platform, job, result.output, trained)
    return 0


def _publish(platform: Platform, job: dict[str, Any], adapter: Path | None, trained: int) -> None:
    """The adapter into the registry, then the job SUCCESS: a server that sees the job done
    finds its model."""
    if adapter is None or not adapter.is_dir():
        raise RuntimeError("the trainer wrote no adapter")
    dest = platform.data.model(job["id"])
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(adapter, tmp)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    model_id = J.model_id_for(job["model"], job.get("suffix"), job["id"])
    if platform.store.get("models", model_id) is None:
        platform.store.insert("models", {"id": model_id, "base": job["model"], "job_id": job["id"], "created_at": now(),
                                         "archived": False, "path": str(dest), "name": model_id, "description": None})
    speed = ((platform.store.get("jobs", job["id"]) or job).get("progress") or {}).get("tokens_per_s")
    done = J.move(platform, job["id"], J.WORKING, J.SUCCESS, f"fine-tuned model {model_id}", fine_tuned_model=model_id,
                  trained_tokens=trained)
    if done is None:  # cancelled at the very end: the model stays registered, the job says cancelled
        log.warning("job %s finished while being cancelled", job["id"])
    log.info("job %s: fine-tuned model %s (%s tokens/s)", job["id"], model_id, speed)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m galerne.platform.worker", description=__doc__.splitlines()[0])
    ap.add_argument("--job", required=True)
    ap.add_argument("--database-url", required=True)
    ap.add_argument("--data-dir", required=True)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch_threads = os.environ.get("GALERNE_WORKER_THREADS")
    if torch_threads:
        import torch

        torch.set_num_threads(max(1, int(torch_threads)))
    return run(a.job, a.database_url, a.data_dir)


if __name__ == "__main__":
    sys.exit(main())

