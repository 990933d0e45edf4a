"""What every SQL part of the CMDB shares: :class:`SqlBase`, which opens the transactions, the lookups used inside
them, and the conversions between rows and domain values.

The SQL repository is built from one mixin per protocol (:mod:`.inventory_sql`, :mod:`.event_sql`,
:mod:`.credential_sql`, :mod:`.journal_sql`, :mod:`.policy_sql`, :mod:`.key_sql`), each deriving from
:class:`SqlBase` and composed into :class:`~ferryman.cmdb.sql.SqlRepository`. Nothing here writes on its own or
decides anything; database errors raised inside a transaction are wrapped by :func:`~ferryman.cmdb.engine.db_errors`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from ferryman.cmdb.engine import WRITE, db_errors
from ferryman.cmdb.schema import hosts, vms
from ferryman.core.clock import Clock, SystemClock
from ferryman.core.errors import NotFound

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

_D = TypeVar("_D", bound="DataclassInstance")


class SqlBase:
    """One SQLAlchemy engine and the clock that stamps ``created_at`` defaults. Each public method of a subclass is
    one transaction, opened with :meth:`_write` or :meth:`_read`."""

    def __init__(self, engine: sa.Engine, *, clock: Clock | None = None) -> None:
        self.engine = engine
        self._writer = engine.execution_options(**{WRITE: True})
        self._clock: Clock = clock if clock is not None else SystemClock()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sa.Connection]:
        with db_errors(), self._writer.begin() as conn:
            yield conn

    @contextlib.contextmanager
    def _read(self) -> Iterator[sa.Connection]:
        with db_errors(), self.engine.begin() as conn:
            yield conn


# -- lookups used inside transactions ----------------------------------------------------------------------------------


def first_or_not_found(conn: sa.Connection, query: sa.Select[Any], what: str, *, lock: bool = False) -> sa.Row[Any]:
    """The first row of ``query`` (locked ``FOR UPDATE`` with ``lock``); NotFound, naming ``what``, if there is none."""
    row = conn.execute(query.with_for_update() if lock else query).first()
    if row is None:
        raise NotFound(f"{what} not found")
    return row


def vm_row(conn: sa.Connection, vm_id: str, *, lock: bool = False) -> sa.Row[Any]:
    return first_or_not_found(conn, sa.select(vms).where(vms.c.id == vm_id), f"VM {vm_id!r}", lock=lock)


def require_host(conn: sa.Connection, name: str) -> None:
    if conn.scalar(sa.select(hosts.c.name).where(hosts.c.name == name)) is None:
        raise NotFound(f"host {name!r} not found")


# -- rows and values ---------------------------------------------------------------------------------------------------


def from_row(cls: type[_D], row: sa.Row[Any], **converted: Any) -> _D:
    """Build dataclass ``cls`` from the row's same-named columns, with ``converted`` overriding some of them."""
    columns = row._mapping
    return cls(**{f.name: columns[f.name] for f in dataclasses.fields(cls) if f.name not in converted}, **converted)


def insert_for(conn: sa.Connection, table: sa.Table) -> postgresql.Insert | sqlite.Insert:
    """An INSERT that supports ON CONFLICT on either backend."""
    return postgresql.insert(table) if conn.dialect.name == "postgresql" else sqlite.insert(table)


def new_id(result: sa.CursorResult[Any]) -> int:
    """The primary key the INSERT ``result`` generated."""
    key = result.inserted_primary_key
    assert key is not None
    return int(key[0])
