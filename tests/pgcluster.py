"""A throwaway PostgreSQL cluster for the tests: ``initdb`` into a temporary folder,
``pg_ctl start`` listening on a Unix socket in that folder only (no TCP port, so no clash
with another cluster or another test session), trust authentication, no fsync; then
``pg_ctl stop -m immediate`` and the folder removed.

PostgreSQL refuses to run as root (initdb and postgres both check the effective uid), and
the tests do run as root in CI and in containers; so as root the cluster's programs run as
an unprivileged user (``postgres`` when the system has one, else ``nobody``) through
``runuser`` (or ``setpriv``), in a folder that user owns. The test process itself stays
root and connects through the socket as the cluster's superuser: with trust
authentication the operating system user does not matter.

``PgCluster.start`` raises :class:`PgUnavailable` with the reason when the binaries are
missing or the cluster does not come up; the fixtures turn that into a skip.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

SUPERUSER = "galerne"
# Only the name of the socket file (.s.PGSQL.<port>) comes from the port: nothing listens
# on TCP, so the usual port is as good as any.
PORT = 5432

CONF = """
listen_addresses = ''
unix_socket_directories = '{sock}'
port = {port}
max_connections = 100
shared_buffers = 16MB
fsync = off
synchronous_commit = off
full_page_writes = off
"""


class PgUnavailable(Exception):
    """No PostgreSQL cluster for the tests: the reason, for a skip."""


def find_bin(name: str) -> str | None:
    """``name`` on the PATH, else in Debian's versioned folders (newest first): Debian and
    Ubuntu keep initdb and pg_ctl out of the PATH."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    return candidates[-1] if candidates else None


def _unprivileged_user() -> pwd.struct_passwd:
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise PgUnavailable("running as root, and neither a 'postgres' nor a 'nobody' user to run PostgreSQL as")


class PgCluster:
    """One cluster in a temporary folder. ``url(db)``: a URL for ``galerne.platform.store.Store``."""

    def __init__(self) -> None:
        self.root: Path | None = None
        self.started = False
        self._as: list[str] = []

    @property
    def sock(self) -> Path:
        return self.root / "sock"

    @property
    def data(self) -> Path:
        return self.root / "data"

    def _run(self, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([*self._as, *cmd], check=False, cwd=self.root, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=timeout)

    def start(self) -> None:
        initdb, pg_ctl = find_bin("initdb"), find_bin("pg_ctl")
        if not initdb or not pg_ctl:
            raise PgUnavailable("PostgreSQL's initdb and pg_ctl not found (on the PATH nor in /usr/lib/postgresql/*/bin)")
        self.pg_ctl = pg_ctl
        # /tmp, not pytest's tmp_path: the unprivileged user must reach the folder, and
        # pytest's base folder is root's, mode 700. Short, too: a socket path has at most
        # 107 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="galerne-pg-"))
        self.sock.mkdir()
        if os.geteuid() == 0:
            user = _unprivileged_user()
            if shutil.which("runuser"):
                self._as = ["runuser", "-u", user.pw_name, "--"]
            elif shutil.which("setpriv"):
                self._as = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups"]
            else:
                raise PgUnavailable("running as root, and neither runuser nor setpriv to run PostgreSQL as another user")
            for p in (self.root, self.sock):
                os.chown(p, user.pw_uid, user.pw_gid)
        try:
            res = self._run(initdb, "-D", str(self.data), "-U", SUPERUSER, "--auth=trust", "--no-locale",
                            "-E", "UTF8", "--no-sync")
            if res.returncode != 0:
                raise PgUnavailable(f"initdb failed: {(res.stderr or res.stdout).strip()[-800:]}")
            with open(self.data / "postgresql.conf", "a") as f:
                f.write(CONF.format(sock=self.sock, port=PORT))
            # -l: the server's output goes to a file, not to our pipes (else run() waits
            # for the server to close them, that is forever).
            res = self._run(pg_ctl, "-D", str(self.data), "-l", str(self.root / "server.log"), "-w", "-t", "60", "start",
                            timeout=90)
            self.started = True  # even if pg_ctl says otherwise: stop() then cleans up what may run
            if res.returncode != 0:
                log = (self.root / "server.log").read_text(errors="replace").strip()[-800:] \
                    if (self.root / "server.log").exists() else ""
                raise PgUnavailable(f"pg_ctl start failed: {(res.stderr or res.stdout).strip()[-400:]} {log}")
        except (OSError, subprocess.TimeoutExpired) as e:
            self.stop()
            raise PgUnavailable(f"cannot run PostgreSQL: {e}") from None
        except PgUnavailable:
            self.stop()
            raise

    def stop(self) -> None:
        if self.root is None:
            return
        if self.started:
            try:
                self._run(self.pg_ctl, "-D", str(self.data), "-m", "immediate", "-w", "stop", timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                pass
            self.started = False
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@/{database}?host={self.sock}&port={PORT}"

    def new_database(self, prefix: str = "t") -> str:
        """A fresh, empty database; its URL."""
        import psycopg

        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(host=str(self.sock), port=PORT, user=SUPERUSER, dbname="postgres", autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)
