"""A throwaway PostgreSQL server for the tests: initdb into a temporary directory, started
with `pg_ctl` on a free port of 127.0.0.1 (fsync off, its unix socket in that directory),
stopped and deleted at the end.

PostgreSQL refuses to run as root, and CI runs as root: then the server runs as `nobody`
(the directory is made theirs), as an unprivileged user would run it anyway. The binaries
are found on PATH, or under /usr/lib/postgresql/<version>/bin (Debian's layout, where
`initdb` is not on PATH).

    with PgServer.start() as pg:
        url = pg.url("postgres")              # postgresql://postgres@127.0.0.1:PORT/postgres
        pg.create_database("app")
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

__all__ = ["PASSWORD", "PASSWORD_USER", "PgServer", "PgUnavailable", "find_bin_dir"]

SUPERUSER = "postgres"
# A role that must give its password (scram-sha-256), for the tests that check it never
# comes out; every other role is trusted on 127.0.0.1.
PASSWORD_USER = "secretive"
PASSWORD = "PLANTEDpgPassword0015"


class PgUnavailable(RuntimeError):
    """No PostgreSQL server could be started here (the reason is the message)."""


def find_bin_dir() -> Path | None:
    """The directory holding initdb and pg_ctl: PATH first, then Debian's layout (the
    newest version)."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(os.path.realpath(found)).parent
    versions = [Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")]
    versions.sort(key=lambda d: int(d.parent.name) if d.parent.name.isdigit() else 0)
    return versions[-1] if versions else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PgServer:
    """One running server; `url()` names a database on it."""

    def __init__(self, bin_dir: Path, directory: Path, port: int, user: str | None) -> None:
        self.bin_dir = bin_dir
        self.directory = directory
        self.data = directory / "data"
        self.port = port
        self._user = user  # run the binaries as this user (we are root), or None: as us

    # -- starting and stopping ------------------------------------------------------------

    @classmethod
    @contextmanager
    def start(cls) -> Iterator[PgServer]:
        """A new server, stopped and deleted when the block ends; PgUnavailable when none
        can be started."""
        bin_dir = find_bin_dir()
        if bin_dir is None:
            raise PgUnavailable("no PostgreSQL binaries (initdb, pg_ctl) on this machine")
        user = "nobody" if os.geteuid() == 0 else None
        # Not under pytest's tmp_path: that is private to root, and the server's user must
        # reach its directory.
        directory = Path(tempfile.mkdtemp(prefix="offload-pg-"))
        if user is not None:
            try:
                entry = pwd.getpwnam(user)
            except KeyError:
                shutil.rmtree(directory, ignore_errors=True)
                raise PgUnavailable(f"running as root, and there is no user {user!r}") from None
            os.chown(directory, entry.pw_uid, entry.pw_gid)
        server = cls(bin_dir, directory, _free_port(), user)
        try:
            server._init()
            server._start()
        except BaseException:
            server._stop()
            shutil.rmtree(directory, ignore_errors=True)
            raise
        try:
            yield server
        finally:
            server._stop()
            shutil.rmtree(directory, ignore_errors=True)

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        kwargs: dict[str, object] = {}
        if self._user is not None:
            entry = pwd.getpwnam(self._user)
            kwargs = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "LANG": "C"}
        try:
            done = subprocess.run(
                [str(self.bin_dir / args[0]), *args[1:]],
                capture_output=True,
                text=True,
                timeout=timeout,
                env=env,
                cwd=self.directory,
                check=False,
                **kwargs,  # type: ignore[arg-type]
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise PgUnavailable(f"{args[0]} could not run: {exc}") from exc
        if done.returncode != 0:
            log = self.directory / "server.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise PgUnavailable(
                f"{args[0]} failed ({done.returncode}): {done.stderr.strip()} {tail}".strip()
            )
        return done

    def _init(self) -> None:
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            SUPERUSER,
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-locale",
            "--no-sync",
            "--no-instructions",
        )
        # The password role must authenticate; the rest is trusted on the loopback only.
        (self.data / "pg_hba.conf").write_text(
            f"host all {PASSWORD_USER} 127.0.0.1/32 scram-sha-256\n"
            "host all all 127.0.0.1/32 trust\n"
            "local all all trust\n"
        )

    def _start(self) -> None:
        options = " ".join(
            [
                f"-p {self.port}",
                "-c listen_addresses=127.0.0.1",
                f"-c unix_socket_directories={self.directory}",
                "-c fsync=off",
                "-c synchronous_commit=off",
                "-c full_page_writes=off",
                "-c max_connections=200",
            ]
        )
        log = str(self.directory / "server.log")
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            log,
            "-w",
            "-t",
            "60",
            "-o",
            options,
            "start",
        )
        self.psql(f"CREATE ROLE {PASSWORD_USER} LOGIN PASSWORD '{PASSWORD}'")
        self.psql(f"CREATE DATABASE {PASSWORD_USER} OWNER {PASSWORD_USER}")

    def _stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            with suppress(PgUnavailable):  # already gone: nothing to stop
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")

    # -- using it -------------------------------------------------------------------------

    def url(self, database: str = SUPERUSER, *, user: str = SUPERUSER, query: str = "") -> str:
        """A postgresql:// URL for `database` on this server."""
        tail = f"?{query}" if query else ""
        return f"postgresql://{user}@127.0.0.1:{self.port}/{database}{tail}"

    def psql(self, sql: str, database: str = SUPERUSER) -> str:
        """Run `sql` as the superuser; its output."""
        done = self._run(
            "psql",
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-U",
            SUPERUSER,
            "-d",
            database,
            "-c",
            sql,
        )
        return done.stdout

    def create_database(self, name: str) -> str:
        """A new, empty database; its URL."""
        self.psql(f'CREATE DATABASE "{name}"')
        return self.url(name)


def assert_waits_for_a_lock(postgres: Any, statement: str) -> None:
    """Some session's statement beginning with `statement` waits for a lock (seen by the
    server: pg_stat_activity), within a few seconds."""
    import psycopg

    with psycopg.connect(postgres.url(), autocommit=True) as watcher:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if watcher.execute(
                "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE %s",
                (f"%{statement}%",),
            ).fetchone():
                return
            time.sleep(0.01)  # the server announces no wait: look again
    raise AssertionError(f"no statement {statement!r} waited for a lock")
