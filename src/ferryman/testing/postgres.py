"""A private, throwaway PostgreSQL cluster for tests.

:class:`PostgresServer` runs ``initdb`` and ``pg_ctl`` on a data directory of its own under a fresh temporary directory,
listening on 127.0.0.1 only, on a free port, with trust authentication and no durability (``fsync=off``): it exists so
tests can exercise the PostgreSQL backend without touching any server the machine already runs. PostgreSQL refuses to
run as root, so as root the binaries run as the ``postgres`` user through ``runuser``; otherwise they run directly as
the current user. Every wait is bounded.

It is test tooling only: never point it at a real data directory, never use it in production.

::

    with PostgresServer() as pg:
        engine = sqlalchemy.create_engine(pg.url)          # .../ferryman_test
        pg.create_database("scratch")                      # more databases, each with pg.url_for(name)
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import psycopg
from psycopg import sql

DEFAULT_BINDIRS = ("/usr/lib/postgresql/15/bin",)
BINDIR_ENV = "FERRYMAN_PG_BINDIR"
DEFAULT_DATABASE = "ferryman_test"
SUPERUSER = "postgres"
TOOLS = ("initdb", "pg_ctl", "postgres")


class PostgresUnavailable(RuntimeError):
    """The PostgreSQL binaries (or, as root, the ``postgres`` user) are missing."""


class PostgresStartError(RuntimeError):
    """The private cluster could not be initialised or started; the message carries the server log's tail."""


def find_bindir() -> Path | None:
    """The directory holding ``initdb``/``pg_ctl``: ``$FERRYMAN_PG_BINDIR``, else PostgreSQL 15's Debian path."""
    candidates = [os.environ[BINDIR_ENV]] if os.environ.get(BINDIR_ENV) else list(DEFAULT_BINDIRS)
    return next((Path(c) for c in candidates if _has_tools(Path(c))), None)


def _has_tools(bindir: Path) -> bool:
    return all(os.access(bindir / tool, os.X_OK) for tool in TOOLS)


def unavailable_reason(bindir: Path | str | None = None) -> str | None:
    """Why :class:`PostgresServer` cannot run here (with ``bindir``, else the default one), or None if it can."""
    if bindir is not None and not _has_tools(Path(bindir)):
        return f"PostgreSQL binaries ({', '.join(TOOLS)}) not found in {bindir}"
    if bindir is None and find_bindir() is None:
        where = os.environ.get(BINDIR_ENV) or ", ".join(DEFAULT_BINDIRS)
        return (
            f"PostgreSQL binaries ({', '.join(TOOLS)}) not found in {where}; install postgresql-15 or set {BINDIR_ENV}"
        )
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SUPERUSER)
        except KeyError:
            return f"running as root but there is no {SUPERUSER!r} user to run PostgreSQL as"
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the caller retries if another process takes it first)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class PostgresServer:
    """A private PostgreSQL cluster: ``start()`` / ``stop()``, or use it as a context manager.

    ``url`` is ``postgresql+psycopg://postgres@127.0.0.1:PORT/ferryman_test``; the database exists once started.
    """

    def __init__(
        self,
        bindir: Path | str | None = None,
        *,
        database: str = DEFAULT_DATABASE,
        start_timeout: float = 60.0,
        stop_timeout: float = 30.0,
    ) -> None:
        reason = unavailable_reason(bindir)
        found = Path(bindir) if bindir is not None else find_bindir()
        if reason is not None or found is None:
            raise PostgresUnavailable(reason or "PostgreSQL binaries not found")
        self.bindir = found
        self.database = database
        self.host = "127.0.0.1"
        self.port = 0
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self._as_postgres = os.geteuid() == 0
        self._root: Path | None = None
        self._running = False

    # -- lifecycle -----------------------------------------------------------------------------------------------------

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def datadir(self) -> Path:
        if self._root is None:
            raise PostgresStartError("the server has not been started")
        return self._root / "data"

    @property
    def url(self) -> str:
        return self.url_for(self.database)

    def url_for(self, database: str) -> str:
        """SQLAlchemy URL of ``database`` on this server."""
        return f"postgresql+psycopg://{SUPERUSER}@{self.host}:{self.port}/{database}"

    def start(self, attempts: int = 3) -> None:
        """Create the cluster, start it on a free port (trying ``attempts`` ports) and create :attr:`database`."""
        if self._running:
            return
        self._root = Path(tempfile.mkdtemp(prefix="ferryman-pg-"))
        try:
            if self._as_postgres:
                entry = pwd.getpwnam(SUPERUSER)
                os.chown(self._root, entry.pw_uid, entry.pw_gid)
            self._initdb()
            for attempt in range(1, attempts + 1):
                self.port = free_port(self.host)
                try:
                    self._run_pg_ctl(
                        self._root, "start", "-w", "-t", str(int(self.start_timeout)), "-l", str(self._log)
                    )
                    break
                except PostgresStartError:
                    self._halt(self._root)  # a postmaster still starting up would block the next attempt
                    if attempt == attempts:
                        raise
            self._running = True
            atexit.register(self.stop)
            self._wait_until_ready()
            self.create_database(self.database)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the server (fast shutdown, then immediate) and delete its directory. Safe to call twice."""
        root, self._root = self._root, None
        if root is None:
            return
        try:
            self._halt(root)
        finally:
            self._running = False
            atexit.unregister(self.stop)
            shutil.rmtree(root, ignore_errors=True)

    # -- databases -----------------------------------------------------------------------------------------------------

    def connect(self, database: str = "postgres") -> psycopg.Connection[tuple[object, ...]]:
        """An autocommit psycopg connection as the superuser (close it when done)."""
        return psycopg.connect(
            host=self.host, port=self.port, user=SUPERUSER, dbname=database, autocommit=True, connect_timeout=10
        )

    def create_database(self, name: str, *, template: str | None = None) -> str:
        """Create ``name`` (optionally as a copy of ``template``) and return its URL."""
        statement = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template is not None:
            statement = sql.SQL("{} TEMPLATE {}").format(statement, sql.Identifier(template))
        with self.connect() as conn:
            conn.execute(statement)
        return self.url_for(name)

    def drop_database(self, name: str) -> None:
        """Drop ``name`` if it exists, disconnecting anyone still using it."""
        with self.connect() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def reset_schema(self, database: str | None = None, schema: str = "public") -> None:
        """Drop ``schema`` of ``database`` (default :attr:`database`) with everything in it and create it empty.

        Much faster than a new database per test; nobody may hold a connection to the database meanwhile.
        """
        with self.connect(database or self.database) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))

    # -- helpers -------------------------------------------------------------------------------------------------------

    @property
    def _log(self) -> Path:
        return self.datadir.parent / "server.log"

    def _command(self, tool: str, *args: str) -> list[str]:
        argv = [str(self.bindir / tool), *args]
        return ["runuser", "-u", SUPERUSER, "--", *argv] if self._as_postgres else argv

    def _run(self, argv: list[str], cwd: Path, timeout: float) -> None:
        try:
            done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired as err:
            raise PostgresStartError(f"{argv[-1]}: timed out after {timeout:.0f}s\n{self._log_tail(cwd)}") from err
        if done.returncode != 0:
            output = (done.stdout + done.stderr).strip()
            raise PostgresStartError(f"{' '.join(argv)} failed ({done.returncode}):\n{output}\n{self._log_tail(cwd)}")

    def _initdb(self) -> None:
        self._run(
            self._command(
                "initdb", "-D", str(self.datadir), "-U", SUPERUSER, "-A", "trust", "-E", "UTF8", "--locale=C", "-N"
            ),
            cwd=self.datadir.parent,
            timeout=self.start_timeout,
        )
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": f"'{self.datadir.parent}'",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "100",
            "shared_buffers": "32MB",
        }
        # Appended as whoever we are; the file stays owned by the cluster's user.
        with (self.datadir / "postgresql.conf").open("a", encoding="utf-8") as conf:
            conf.write("\n# ferryman.testing.postgres\n")
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())

    def _run_pg_ctl(self, root: Path, *args: str) -> None:
        # The port travels on the command line so a retry on another port needs no config rewrite.
        argv = self._command("pg_ctl", "-D", str(root / "data"), "-o", f"-p {self.port}", *args)
        self._run(argv, cwd=root, timeout=max(self.start_timeout, self.stop_timeout) + 10)

    def _halt(self, root: Path) -> None:
        """Stop a postmaster running on ``root``'s data directory, if any: fast shutdown, else immediate."""
        if not (root / "data" / "postmaster.pid").exists():
            return
        try:
            self._run_pg_ctl(root, "stop", "-m", "fast", "-w", "-t", str(int(self.stop_timeout)))
        except PostgresStartError:
            self._run_pg_ctl(root, "stop", "-m", "immediate", "-w", "-t", str(int(self.stop_timeout)))

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while True:
            try:
                self.connect().close()
                return
            except psycopg.OperationalError as err:
                if time.monotonic() >= deadline:
                    raise PostgresStartError(
                        f"PostgreSQL on port {self.port} not ready after {self.start_timeout:.0f}s"
                    ) from err
                time.sleep(0.1)

    @staticmethod
    def _log_tail(root: Path, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            text = (root / "server.log").read_text(encoding="utf-8", errors="replace")
            return "server log (tail):\n" + "\n".join(text.splitlines()[-lines:])
        return ""
