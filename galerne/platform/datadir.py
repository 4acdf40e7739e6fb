"""The server's data directory: what must outlive a restart, beside the store's records.

::

    DATA_DIR/
      galerne.db            the SQLite store (unless --database-url names another)
      files/<file id>       uploaded files, and batch jobs' output and error files
      jobs/<job id>/        a fine-tuning job's run folder (the trainer's run_dir: checkpoints,
                            metrics.jsonl, the adapter) and its worker's log
      models/<job id>/      a fine-tuned model's adapter (PEFT + Mistral layouts)
      tmp/                  uploads being received (removed at start)

Everything here is written whole or not at all: an upload goes to ``tmp/`` and is renamed
into ``files/`` once complete and checked; a record is written after its file, and a file
is removed after its record.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path

from galerne.errors import ConfigError

_SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "galerne"


class DataDir:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()
        try:
            for sub in ("files", "jobs", "models", "tmp"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"data_dir: cannot use {self.root}: {e.strerror or e} (give another with --data-dir)") \
                from None
        for leftover in (self.root / "tmp").iterdir():  # uploads cut short by a stop
            with contextlib.suppress(OSError):
                leftover.unlink() if not leftover.is_dir() else shutil.rmtree(leftover)

    @staticmethod
    def _name(id: str) -> str:
        if not _SAFE.fullmatch(id):
            raise ValueError(f"not a safe id for a path: {id!r}")
        return id

    def file(self, file_id: str) -> Path:
        return self.root / "files" / self._name(file_id)

    def job(self, job_id: str) -> Path:
        return self.root / "jobs" / self._name(job_id)

    def model(self, job_id: str) -> Path:
        return self.root / "models" / self._name(job_id)

    def tmp(self, name: str) -> Path:
        return self.root / "tmp" / self._name(name)

    def remove_tree(self, path: Path) -> None:
        """Remove ``path`` (a folder or file this data directory made), if it is inside it."""
        path = Path(path)
        if not path.resolve().is_relative_to(self.root) or path.resolve() == self.root:
            raise ValueError(f"{path} is not inside the data directory {self.root}")
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
