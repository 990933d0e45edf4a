"""Disk keys on SQL: :class:`SqlKeyMixin` implements :class:`~ferryman.cmdb.key_store.KeyRepository` for
:class:`~ferryman.cmdb.sql.SqlRepository`, which inherits it; the transactions come from
:class:`~ferryman.cmdb.sql_base.SqlBase`.
``uq_disk_keys_live_copy`` keeps one live key per copy (VM, host, generation)."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

import sqlalchemy as sa

from ferryman.cmdb.key_store import DiskKeyRecord
from ferryman.cmdb.schema import disk_keys
from ferryman.cmdb.sql_base import SqlBase, from_row, require_host, vm_row
from ferryman.cmdb.values import utc
from ferryman.core.errors import Conflict, InvalidInput, NotFound


def _key(row: sa.Row[Any]) -> DiskKeyRecord:
    return from_row(DiskKeyRecord, row, wrapped=bytes(row.wrapped) if row.wrapped is not None else None)


class SqlKeyMixin(SqlBase):
    """:class:`~ferryman.cmdb.key_store.KeyRepository` for :class:`~ferryman.cmdb.sql.SqlRepository`."""

    def add_disk_key(self, record: DiskKeyRecord) -> DiskKeyRecord:
        if record.wrapped is None or record.kek_id is None or not record.live:
            raise InvalidInput("a new disk key needs its wrapped key and KEK id, and cannot be destroyed already")
        record = dataclasses.replace(record, created_at=utc(record.created_at, "created_at"))
        with self._write() as conn:
            vm_row(conn, record.vm_id)
            require_host(conn, record.host)
            if self._live(conn, record.vm_id, record.host, record.generation) is not None:
                raise Conflict(
                    f"copy of VM {record.vm_id} on {record.host} at generation {record.generation} already has a key"
                )
            conn.execute(sa.insert(disk_keys).values(**dataclasses.asdict(record)))
        return record

    @staticmethod
    def _live(conn: sa.Connection, vm_id: str, host: str, generation: int) -> sa.Row[Any] | None:
        query = sa.select(disk_keys).where(
            disk_keys.c.vm_id == vm_id,
            disk_keys.c.host == host,
            disk_keys.c.generation == generation,
            disk_keys.c.destroyed_at.is_(None),
        )
        return conn.execute(query).first()

    def live_disk_key(self, vm_id: str, host: str, generation: int) -> DiskKeyRecord | None:
        with self._read() as conn:
            row = self._live(conn, vm_id, host, generation)
        return _key(row) if row is not None else None

    def list_disk_keys(self, vm_id: str | None = None, *, live_only: bool = False) -> list[DiskKeyRecord]:
        query = sa.select(disk_keys).order_by(disk_keys.c.created_at, disk_keys.c.id)
        if vm_id is not None:
            query = query.where(disk_keys.c.vm_id == vm_id)
        if live_only:
            query = query.where(disk_keys.c.destroyed_at.is_(None))
        with self._read() as conn:
            return [_key(row) for row in conn.execute(query)]

    def destroy_disk_keys(
        self, vm_id: str, at: dt.datetime, reason: str, *, host: str | None = None, generation: int | None = None
    ) -> list[DiskKeyRecord]:
        at = utc(at, "destroyed_at")
        where = [disk_keys.c.vm_id == vm_id, disk_keys.c.destroyed_at.is_(None)]
        if host is not None:
            where.append(disk_keys.c.host == host)
        if generation is not None:
            where.append(disk_keys.c.generation == generation)
        with self._write() as conn:
            rows = [_key(row) for row in conn.execute(sa.select(disk_keys).where(*where))]
            if rows:
                ids = [r.id for r in rows]
                changes = {"destroyed_at": at, "destroyed_reason": reason, "wrapped": None, "kek_id": None}
                conn.execute(sa.update(disk_keys).where(disk_keys.c.id.in_(ids)).values(**changes))
        return [
            dataclasses.replace(r, destroyed_at=at, destroyed_reason=reason, wrapped=None, kek_id=None) for r in rows
        ]

    def rewrap_disk_keys(self, rewrapped: dict[str, tuple[int, bytes]]) -> int:
        """Replace the wrapping of live keys (KEK rotation), all in one transaction; NotFound if one is gone."""
        with self._write() as conn:
            for key_id, (kek_id, wrapped) in rewrapped.items():
                done = conn.execute(
                    sa.update(disk_keys)
                    .where(disk_keys.c.id == key_id, disk_keys.c.destroyed_at.is_(None))
                    .values(kek_id=kek_id, wrapped=wrapped)
                )
                if done.rowcount != 1:
                    raise NotFound(f"disk key {key_id} is not live any more")
        return len(rewrapped)
