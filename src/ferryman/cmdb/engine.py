"""Connecting to the CMDB: the engine with the settings each backend needs, the schema upgrade, and the mapping of
database errors onto Ferryman's.

It exists so that every SQL module opens transactions the same way. SQLite runs with foreign keys on, WAL and a busy
timeout; a transaction opened with the :data:`WRITE` execution option starts with ``BEGIN IMMEDIATE``, so two writers
queue instead of failing on lock upgrade. The schema is created and changed only by the Alembic revisions shipped in
``ferryman/cmdb/alembic`` (no ``alembic.ini``), through :func:`migrate`; this module never calls
``metadata.create_all`` and holds no queries.

Foreign errors are wrapped by :func:`db_errors`: integrity violations become :class:`Conflict`, lost connections and
lock timeouts :class:`TransientError`, unusable values :class:`InvalidInput`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import structlog
from alembic import command
from alembic.config import Config
from sqlalchemy import exc as sa_exc
from sqlalchemy.pool import StaticPool

from ferryman.core.errors import Conflict, InvalidInput, TransientError

log = structlog.get_logger(__name__)

ALEMBIC_DIR = Path(__file__).with_name("alembic")
SQLITE_BUSY_TIMEOUT_MS = 10_000
WRITE = "ferryman_write"  # execution option: this transaction writes (SQLite: BEGIN IMMEDIATE)
_MIGRATION_LOCK = 0x46_45_52_52_59  # PostgreSQL advisory lock key held while migrating ("FERRY")


def create_engine(url: str, *, echo: bool = False) -> sa.Engine:
    """An engine for ``sqlite:///path`` or ``postgresql+psycopg://...`` with the connection settings the CMDB needs."""
    try:
        sa_url = sa.make_url(url)
    except sa_exc.ArgumentError as err:
        raise InvalidInput(f"bad database URL: {err}") from err
    backend = sa_url.get_backend_name()
    if backend == "sqlite":
        kwargs: dict[str, Any] = {}
        if sa_url.database in (None, "", ":memory:"):
            # One shared connection, or every checkout would see a different empty database.
            kwargs = {"poolclass": StaticPool, "connect_args": {"check_same_thread": False}}
        engine = sa.create_engine(sa_url, echo=echo, **kwargs)
        sa.event.listen(engine, "connect", _sqlite_on_connect)
        sa.event.listen(engine, "begin", _sqlite_on_begin)
        return engine
    if backend == "postgresql":
        if sa_url.drivername == "postgresql":
            sa_url = sa_url.set(drivername="postgresql+psycopg")
        return sa.create_engine(sa_url, echo=echo, pool_pre_ping=True)
    raise InvalidInput(f"unsupported database {backend!r}: use sqlite:///PATH or postgresql+psycopg://USER@HOST/DB")


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # Take BEGIN away from the sqlite3 module so _sqlite_on_begin decides how each transaction starts.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA foreign_keys=ON")
        # freed pages are zeroed: a destroyed disk key's wrapping does not linger in the file's free space
        cursor.execute("PRAGMA secure_delete=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode=WAL")
    finally:
        cursor.close()


def _sqlite_on_begin(conn: sa.Connection) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(WRITE) else "BEGIN")


def alembic_config() -> Config:
    """The Alembic configuration, built in code from the revisions shipped inside this package (no alembic.ini)."""
    config = Config()
    config.set_main_option("script_location", str(ALEMBIC_DIR))
    config.set_main_option("path_separator", "os")
    return config


def migrate(engine: sa.Engine, revision: str = "head") -> None:
    """Upgrade the schema to ``revision`` in one transaction; on PostgreSQL, concurrent callers wait for each other."""
    with db_errors(), engine.execution_options(**{WRITE: True}).begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_MIGRATION_LOCK)))
        config = alembic_config()
        config.attributes["connection"] = conn
        command.upgrade(config, revision)
    log.debug("cmdb schema upgraded", revision=revision, backend=engine.dialect.name)


@contextlib.contextmanager
def db_errors() -> Iterator[None]:
    """Turn the database's errors raised inside the block into Ferryman's (see the module docstring)."""
    try:
        yield
    except sa_exc.IntegrityError as err:
        raise Conflict(f"the CMDB refused the change: {_reason(err)}") from err
    except (sa_exc.OperationalError, sa_exc.InterfaceError) as err:
        raise TransientError(f"the CMDB is unavailable: {_reason(err)}", delay=1.0) from err
    except sa_exc.DataError as err:
        raise InvalidInput(f"the CMDB cannot store a value: {_reason(err)}") from err
    except sa_exc.StatementError as err:
        if isinstance(err.orig, ValueError | TypeError | OverflowError):
            raise InvalidInput(f"the CMDB cannot store a value: {err.orig}") from err
        raise
    except OverflowError as err:  # a number out of the column's range, refused by the driver before SQL sees it
        raise InvalidInput(f"the CMDB cannot store a value: {err}") from err


def _reason(err: sa_exc.StatementError) -> str:
    return str(err.orig).strip().splitlines()[0] if err.orig is not None else str(err)
