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


# --------------------------------------------------------------------------- run folders

MANIFEST = "galerne_run.json"
STAGING_PREFIX = ".tmp_"
_SHOWN = 3


def _describe(paths: list[str]) -> str:
    more = f", ... ({len(paths)} in all)" if len(paths) > _SHOWN else ""
    return ", ".join(paths[:_SHOWN]) + more


class RunDir:
    """A fine-tuning run's folder, and the manifest (``galerne_run.json``) of every file and
    folder that runs created in it.

    An entry is recorded before what it names is created, so a run that dies leaves nothing
    of its own unlisted (but for the insides of a staging folder, below). Only listed things
    are ever removed or replaced: a listed file that became a symlink, or a file the user
    added in a listed folder, is left alone.

    Folders whose content galerne's writers choose (a checkpoint, ``adapter/``, ``model/``) are
    written into a fresh staging folder (``.tmp_NAME``, listed as such), whose content is then
    listed under the final name before the staging folder is renamed to it. A staging folder
    left by a run that died is the run's own, content included, and the next run removes it.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = self.path / MANIFEST
        self.entries: dict[str, str] = {}  # relative POSIX path -> "file" | "dir" | "staging"

    # -- reading
    def exists(self, rel: str) -> bool:
        return os.path.lexists(self.path / rel)

    def owns(self, rel: str) -> bool:
        return rel in self.entries

    def is_run(self) -> bool:
        return self.manifest.is_file()

    def load(self) -> RunDir:
        try:
            data = json.loads(self.manifest.read_text())
            entries = data["entries"]
            if not (isinstance(entries, dict) and all(v in ("file", "dir", "staging") for v in entries.values())):
                raise ValueError("entries must map paths to file, dir or staging")
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"run_dir: cannot read the run's manifest: {e}", path=str(self.manifest)) from None
        self.entries = dict(entries)
        return self

    def _intruders(self, rel: str) -> list[str]:
        """What is at or under ``rel`` but not the run's (a symlink never is)."""
        out = []
        path = self.path / rel
        kind = self.entries.get(rel)
        if not os.path.lexists(path):
            return out
        if kind is None or path.is_symlink() or (kind == "file") != path.is_file() or (kind != "file") != path.is_dir():
            return [rel + ("/" if path.is_dir() and not path.is_symlink() else "")]
        if kind == "dir":
            for child in sorted(os.listdir(path)):
                out += self._intruders(f"{rel}/{child}")
        return out

    def check(self, *, resuming: bool, results: tuple[str, ...], strict: tuple[str, ...], has_checkpoint: bool) -> None:
        """Before a run writes anything: ``run_dir`` must be new or empty; resuming, it must be
        a run whose ``strict`` outputs (top-level names) hold nothing but the run's own files.
        ``results``: the names whose presence means the run produced something."""
        if os.path.lexists(self.path) and not self.path.is_dir():
            raise ConfigError(f"run_dir: {self.path} exists and is not a folder")
        content = sorted(os.listdir(self.path)) if self.path.is_dir() else []
        if not content:
            return
        if not self.is_run():
            shown = _describe([c + ("/" if (self.path / c).is_dir() else "") for c in content])
            raise ConfigError(f"run_dir: {self.path} is not empty ({shown}) and holds no galerne run ({MANIFEST}): "
                              "choose a new or empty folder (a run never writes over files it did not create)")
        self.load()
        if not resuming:
            if any(self.owns(r) and self.exists(r) for r in results):
                hint = ("pass --resume to continue it" if has_checkpoint
                        else "it has no checkpoint to resume from: delete the folder to start over")
                raise ConfigError(f"run_dir: {self.path} already holds a run ({MANIFEST}): {hint}, or choose another run_dir")
            strict = tuple(sorted(set(strict) | set(results)))  # a fresh run writes them all
        bad = [p for name in strict for p in self._intruders(name)]
        if bad:
            raise ConfigError(f"run_dir: {self.path} holds {_describe(bad)}, which no galerne run wrote (or a link now "
                              "stands in place of what it wrote): move it out of the run folder")

    # -- writing
    def _save(self) -> None:
        with atomic_write(self.manifest, "w") as f:
            json.dump({"galerne_run": 1, "entries": dict(sorted(self.entries.items()))}, f, indent=1)
            f.write("\n")

    def open(self) -> None:
        """Create the folder and its manifest (or load it), drop the entries of things that
        are gone, and remove the staging folders a run that died left."""
        self.path.mkdir(parents=True, exist_ok=True)
        if self.is_run():
            self.load()
        for rel, kind in list(self.entries.items()):
            if kind == "staging":
                self.remove(rel)
            elif not self.exists(rel):
                del self.entries[rel]
        self._save()

    def claim(self, rel: str, kind: str) -> Path:
        """List ``rel`` (before it is created); its path."""
        if self.entries.get(rel) != kind:
            self.entries[rel] = kind
            self._save()
        return self.path / rel

    def mkdir(self, rel: str) -> Path:
        """``rel`` as a folder of the run (its parents too, inside the run folder)."""
        parts = rel.split("/")
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            if not (self.path / sub).is_dir():
                self.claim(sub, "dir").mkdir()
        return self.path / rel

    def write_text(self, rel: str, text: str) -> Path:
        """Write a file of the run, whole or not at all."""
        path = self.claim(rel, "file")
        with atomic_write(path, "w") as f:
            f.write(text)
        return path

    def claim_new_files(self, rel: str) -> None:
        """List what a writer outside the manifest's knowledge (TensorBoard) created in the
        run's folder ``rel``."""
        added = False
        for root, dirs, files in os.walk(self.path / rel):
            base = Path(root).relative_to(self.path).as_posix()
            for name, kind in [(d, "dir") for d in dirs] + [(f, "file") for f in files]:
                key = f"{base}/{name}"
                if key not in self.entries and not os.path.islink(self.path / key):
                    self.entries[key] = kind
                    added = True
        if added:
            self._save()

    @contextlib.contextmanager
    def staged(self, rel: str) -> Iterator[Path]:
        """A fresh, empty folder to write ``rel``'s content into; on a clean exit the run's
        previous ``rel`` is removed, the new content listed under ``rel`` and the folder renamed
        to it. Should something that is not the run's stand at ``rel`` (``check`` refused that
        at the start: it came during the run), the content goes to ``rel.1`` (or .2, ...) and
        a ConfigError says so."""
        parent, _, name = rel.rpartition("/")
        staging = f"{parent}/{STAGING_PREFIX}{name}" if parent else f"{STAGING_PREFIX}{name}"
        if parent:
            self.mkdir(parent)
        if self.exists(staging):
            self.remove(staging)
        self.claim(staging, "staging")
        tmp = self.path / staging
        tmp.mkdir()
        yield tmp
        if self.exists(rel):
            self.remove(rel)
        target, blocked = rel, self.exists(rel)
        n = 0
        while self.exists(target):
            n += 1
            target = f"{rel}.{n}"
        self.entries[target] = "dir"
        for root, dirs, files in os.walk(tmp):
            sub = Path(root).relative_to(tmp).as_posix()
            base = target if sub == "." else f"{target}/{sub}"
            self.entries.update({f"{base}/{d}": "dir" for d in dirs})
            self.entries.update({f"{base}/{f}": "file" for f in files})
        self._save()
        os.replace(tmp, self.path / target)
        del self.entries[staging]
        self._save()
        if blocked:
            raise ConfigError(f"run_dir: {self.path / rel} holds files no galerne run wrote: wrote {self.path / target} "
                              "instead")

    def remove(self, rel: str, *, keep_entries: bool = False) -> None:
        """Remove the run's files at and under ``rel`` and, once empty, its folders. What is
        not the run's stays (a warning names it). A staging folder goes whole."""
        path = self.path / rel
        kind = self.entries.get(rel)
        if kind == "staging" and path.is_dir() and not path.is_symlink():
            import shutil

            shutil.rmtree(path)
        elif kind in ("file", "dir"):
            under = sorted((k for k in self.entries if k == rel or k.startswith(rel + "/")),
                           key=lambda k: k.count("/"), reverse=True)
            for key in under:
                p = self.path / key
                if p.is_symlink() or not os.path.lexists(p):
                    continue
                if self.entries[key] == "file" and p.is_file():
                    p.unlink()
                elif self.entries[key] == "dir" and p.is_dir():
                    with contextlib.suppress(OSError):  # not empty: something of the user's is in it
                        p.rmdir()
            if os.path.lexists(path):
                log.warning("kept %s: it holds files no galerne run wrote", path)
        if not keep_entries:
            for key in [k for k in self.entries if k == rel or k.startswith(rel + "/")]:
                del self.entries[key]
        self._save()
