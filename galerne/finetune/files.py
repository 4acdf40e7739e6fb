"""Files that fine-tuning writes: whole or not at all, and never over what the user gave.

:func:`atomic_write` writes a file next to its destination under a temporary name and
renames it over the destination only once it is complete: an interrupted or failed write
leaves the destination as it was. :class:`RunDir` (a run's ``run_dir``) keeps a manifest of
every file and folder the run created, and removes or replaces only those.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from galerne.errors import ConfigError

log = logging.getLogger(__name__)


def _new_file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file in ``path``'s folder; on a clean exit, flush it and rename it
    to ``path`` (a symlink at ``path`` is followed: its target is replaced, the link kept);
    on an exception, remove it. The new file gets the old one's permissions, or the usual
    ones of a new file."""
    target = Path(os.path.realpath(path))
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        try:
            os.chmod(tmp, target.stat().st_mode & 0o7777)
        except FileNotFoundError:
            os.chmod(tmp, _new_file_mode())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
