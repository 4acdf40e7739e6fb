"""The platform's records: files, jobs (fine-tuning and batch), their events and
checkpoints, and the fine-tuned models. One SQLAlchemy schema, stored in SQLite by
default (a file in the data directory, nothing to install) or in PostgreSQL
(``--database-url postgresql://...``), so that several servers can share one store.

Every record is a row of a few indexed columns (id, kind, status, times) and a JSON
document (``doc``) for the rest, so that the two API dialects' fields can grow without a
migration. Rows come back as plain dicts (``doc``'s keys merged in). A status change
that must not race (a worker claiming a queued job, a cancel against a finishing job)
goes through :meth:`Store.transition`, one ``UPDATE ... WHERE status IN (...)``: of two
processes, one wins and the other learns it lost.

The server and the job workers (other processes, other hosts under Ray) open the same
store; SQLite runs in WAL mode with a busy timeout, so that the worker's writes and the
server's reads do not block each other.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from galerne.errors import ConfigError

SCHEMA_VERSION = 1
_SCHEMA_LOCK = 0x67616C65726E65  # "galerne": PostgreSQL's advisory lock key for the schema's creation

metadata = sa.MetaData()

files = sa.Table(
    "galerne_files", metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("created_at", sa.Integer, nullable=False),
    sa.Column("purpose", sa.String(32), nullable=False, index=True),
    sa.Column("doc", sa.JSON, nullable=False),
)

jobs = sa.Table(
    "galerne_jobs", metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("kind", sa.String(16), nullable=False, index=True),  # "fine_tune" | "batch"
    sa.Column("status", sa.String(32), nullable=False, index=True),
    sa.Column("model", sa.String(256), nullable=False, default=""),
    sa.Column("created_at", sa.Integer, nullable=False, index=True),
    sa.Column("modified_at", sa.Integer, nullable=False),
    sa.Column("owner", sa.String(256), nullable=True),  # who runs it now: a launcher's handle
    sa.Column("heartbeat", sa.Float, nullable=True),  # the runner's last sign of life (time.time())
    sa.Column("doc", sa.JSON, nullable=False),
)

events = sa.Table(
    "galerne_events", metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(64), nullable=False, unique=True),
    sa.Column("job_id", sa.String(64), sa.ForeignKey("galerne_jobs.id", ondelete="CASCADE"), nullable=False, index=True),
    sa.Column("created_at", sa.Integer, nullable=False),
    sa.Column("doc", sa.JSON, nullable=False),
)

checkpoints = sa.Table(
    "galerne_checkpoints", metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("job_id", sa.String(64), sa.ForeignKey("galerne_jobs.id", ondelete="CASCADE"), nullable=False, index=True),
    sa.Column("step", sa.Integer, nullable=False),
    sa.Column("created_at", sa.Integer, nullable=False),
    sa.Column("doc", sa.JSON, nullable=False),
)

models = sa.Table(
    "galerne_models", metadata,
    sa.Column("id", sa.String(256), primary_key=True),
    sa.Column("base", sa.String(256), nullable=False, index=True),
    sa.Column("job_id", sa.String(64), nullable=True),
    sa.Column("created_at", sa.Integer, nullable=False),
    sa.Column("archived", sa.Boolean, nullable=False, default=False),
    sa.Column("doc", sa.JSON, nullable=False),
)

meta = sa.Table(
    "galerne_meta", metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.String(256), nullable=False),
)

TABLES = {"files": files, "jobs": jobs, "events": events, "checkpoints": checkpoints, "models": models}


def now() -> int:
    return int(time.time())


def new_id(prefix: str = "") -> str:
    """A fresh id: ``prefix`` + 24 hex digits (OpenAI's ids carry a prefix: ``file-``,
    ``ftjob-``, ``batch_``); without a prefix, a UUID (Mistral's ids)."""
    return f"{prefix}{secrets.token_hex(12)}" if prefix else str(uuid.uuid4())


def _row(row: Any) -> dict[str, Any]:
    d = dict(row._mapping)
    doc = d.pop("doc", None) or {}
    return {**doc, **d}


class Store:
    """The platform's records in one database (``url``: ``sqlite:///path`` or
    ``postgresql://...``). Thread-safe; processes share it through the database."""

    def __init__(self, url: str):
        self.url = url
        kwargs: dict[str, Any] = {"future": True}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
            path = sa.engine.make_url(url).database
            if path and path != ":memory:":
                try:
                    Path(path).parent.mkdir(parents=True, exist_ok=True)
                except OSError as e:
                    raise ConfigError(f"database_url: cannot use {_redact(self.url)!r}: {e}") from None
        elif url.startswith(("postgresql://", "postgres://")):
            url = "postgresql+psycopg://" + url.split("://", 1)[1]  # psycopg 3, the maintained driver
            kwargs["pool_pre_ping"] = True
        try:
            self.engine = sa.create_engine(url, **kwargs)
        except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError, ImportError) as e:
            raise ConfigError(f"database_url: cannot use {_redact(self.url)!r}: {e}") from None
        if self.engine.dialect.name == "sqlite":
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
            sa.event.listen(self.engine, "begin", _sqlite_begin)
        self._lock = threading.Lock()
        try:
            # Processes opening a new store at once queue for the schema: on SQLite with
            # BEGIN IMMEDIATE (a plain BEGIN that read the schema, then writes, fails at
            # once with "database is locked" when another one wrote in between); on
            # PostgreSQL with a lock of the transaction (else the second one's CREATE TABLE
            # can fail with "relation already exists").
            with self._write() as c:
                if self.engine.dialect.name == "postgresql":
                    c.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK})
                metadata.create_all(c)
                version = c.execute(sa.select(meta.c.value).where(meta.c.key == "schema")).scalar()
                if version is None:
                    c.execute(meta.insert().values(key="schema", value=str(SCHEMA_VERSION)))
                elif int(version) > SCHEMA_VERSION:
                    raise ConfigError(f"database_url: {_redact(self.url)} holds schema {version}, newer than this "
                                      f"galerne's ({SCHEMA_VERSION}): upgrade galerne")
        except sa.exc.IntegrityError:  # another process created it at the same moment
            pass
        except sa.exc.OperationalError as e:
            raise ConfigError(f"database_url: cannot open {_redact(self.url)}: {' '.join(str(e.orig).split())}") from None

    @contextlib.contextmanager
    def _write(self):
        """A transaction that reads then writes: on SQLite it takes the write lock at its
        start (BEGIN IMMEDIATE), so that two processes never both read then both write;
        on PostgreSQL the SELECT ... FOR UPDATE does that."""
        with self.engine.connect().execution_options(immediate=True) as c, c.begin():
            yield c

    @property
    def kind(self) -> str:
        return self.engine.dialect.name

    def close(self) -> None:
        self.engine.dispose()

    # ------------------------------------------------------------------ generic

    def insert(self, table: str, row: dict[str, Any]) -> dict[str, Any]:
        t = TABLES[table]
        cols = {c.name for c in t.columns} - {"doc"}
        values = {k: v for k, v in row.items() if k in cols}
        values["doc"] = {k: v for k, v in row.items() if k not in cols}
        with self.engine.begin() as c:
            c.execute(t.insert().values(**values))
        return dict(row)

    def get(self, table: str, id: str) -> dict[str, Any] | None:
        t = TABLES[table]
        with self.engine.connect() as c:
            row = c.execute(sa.select(t).where(t.c.id == id)).first()
        return None if row is None else _row(row)

    def update(self, table: str, id: str, *, expect: Sequence[str] | None = None, **values: Any) -> dict[str, Any] | None:
        """Set ``values`` (columns, or keys of the JSON document; a key set to None is kept
        as null) on the row ``id``; with ``expect``, only if its status is one of them.
        Returns the updated row, or None when no row matched (absent, or another status)."""
        t = TABLES[table]
        cols = {c.name for c in t.columns} - {"doc"}
        col_values = {k: v for k, v in values.items() if k in cols}
        doc_values = {k: v for k, v in values.items() if k not in cols}
        if "modified_at" in cols and "modified_at" not in col_values:
            col_values["modified_at"] = now()
        with self._lock, self._write() as c:
            where = t.c.id == id
            if expect is not None:
                where = where & t.c.status.in_(list(expect))
            row = c.execute(sa.select(t).where(where).with_for_update()).first()
            if row is None:
                return None
            doc = dict(row._mapping["doc"] or {})
            doc.update(doc_values)
            res = c.execute(t.update().where(where).values(doc=doc, **col_values))
            if res.rowcount != 1:
                return None
            out = _row(row)
            out.update(doc_values)
            out.update(col_values)
            return out

    def transition(self, id: str, expect: Sequence[str], status: str, **values: Any) -> dict[str, Any] | None:
        """A job's status from one of ``expect`` to ``status`` (with ``values``), atomically;
        None when the job is not (any more) in one of ``expect``."""
        return self.update("jobs", id, expect=expect, status=status, **values)

    def delete(self, table: str, id: str) -> bool:
        t = TABLES[table]
        with self.engine.begin() as c:
            return c.execute(t.delete().where(t.c.id == id)).rowcount == 1

    def select(self, table: str, *, where: dict[str, Any] | None = None, order: str = "created_at",
               descending: bool = True, limit: int | None = None, offset: int = 0, after: str | None = None) -> list[dict]:
        """Rows whose columns equal ``where`` (a list value: one of them), newest first by
        default. ``after``: only the rows that come after the row of that id in this order."""
        t = TABLES[table]
        q = sa.select(t)
        for k, v in (where or {}).items():
            q = q.where(t.c[k].in_(list(v)) if isinstance(v, (list, tuple, set)) else t.c[k] == v)
        key = t.c[order]
        tie = t.c.seq if "seq" in t.c else t.c.id
        if after is not None:
            with self.engine.connect() as c:
                ref = c.execute(sa.select(key, tie).where(t.c.id == after)).first()
            if ref is not None:
                k0, t0 = ref
                q = q.where((key < k0) | ((key == k0) & (tie < t0))) if descending else \
                    q.where((key > k0) | ((key == k0) & (tie > t0)))
        q = q.order_by(key.desc(), tie.desc()) if descending else q.order_by(key.asc(), tie.asc())
        if offset:
            q = q.offset(offset)
        if limit is not None:
            q = q.limit(limit)
        with self.engine.connect() as c:
            return [_row(r) for r in c.execute(q)]

    def count(self, table: str, *, where: dict[str, Any] | None = None) -> int:
        t = TABLES[table]
        q = sa.select(sa.func.count()).select_from(t)
        for k, v in (where or {}).items():
            q = q.where(t.c[k].in_(list(v)) if isinstance(v, (list, tuple, set)) else t.c[k] == v)
        with self.engine.connect() as c:
            return int(c.execute(q).scalar() or 0)

    # ------------------------------------------------------------------ jobs' events and checkpoints

    def add_event(self, job_id: str, **doc: Any) -> dict[str, Any]:
        """An event of a job (``doc``: name, level, message, type, data ...), in order."""
        row = {"id": new_id("ftevent-"), "job_id": job_id, "created_at": doc.pop("created_at", None) or now(), **doc}
        return self.insert("events", row)

    def events(self, job_id: str, *, after: str | None = None, limit: int | None = None,
               newest_first: bool = False) -> list[dict[str, Any]]:
        return self.select("events", where={"job_id": job_id}, order="seq", descending=newest_first,
                           after=after, limit=limit)

    def add_checkpoint(self, job_id: str, step: int, **doc: Any) -> dict[str, Any]:
        row = {"id": new_id("ftckpt-"), "job_id": job_id, "step": step, "created_at": now(), **doc}
        return self.insert("checkpoints", row)

    def checkpoints(self, job_id: str) -> list[dict[str, Any]]:
        """A job's checkpoints, newest first."""
        return self.select("checkpoints", where={"job_id": job_id}, order="step")

    def jobs_where(self, kind: str, statuses: Iterable[str]) -> list[dict[str, Any]]:
        return self.select("jobs", where={"kind": kind, "status": list(statuses)}, descending=False)


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    dbapi_conn.isolation_level = None  # transactions begin in _sqlite_begin
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def _sqlite_begin(conn) -> None:
    # pysqlite's own BEGIN is off (isolation_level None in _sqlite_pragmas): ours says which kind.
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("immediate") else "BEGIN")


def _redact(url: str) -> str:
    """``url`` without its password."""
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1]


def default_url(data_dir: str | os.PathLike) -> str:
    return f"sqlite:///{Path(data_dir).resolve() / 'galerne.db'}"
