"""Events and alarms on SQL: :class:`SqlEventMixin` implements :class:`~ferryman.cmdb.repository.EventRepository`
for :class:`~ferryman.cmdb.sql.SqlRepository`.

The event log is append-only and a hash chain (:mod:`ferryman.cmdb.audit_chain`): :func:`insert_event`, the only
writer of the events table, locks the one-row chain head (``SELECT ... FOR UPDATE``; SQLite's write transactions are
serialised already), takes the next id, hashes the entry after the head's hash and moves the head, all in the caller's
transaction, so an event and its link commit together and concurrent writers extend one linear chain.
:class:`SqlAuditLog` reads the chain back in id-ordered batches and keeps the signed checkpoints.

An alarm is opened once per (kind, VM, host) while the discrepancy lasts (``uq_alarms_open_key`` turns a racing second
opening into a bump of the first) and resolved once. Nothing here decides what is an alarm: reconciliation does.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Collection, Iterator, Sequence
from typing import Any

import sqlalchemy as sa

from ferryman.cmdb.audit_chain import COLUMNS, Checkpoint, Entry, link_hash
from ferryman.cmdb.repository import Alarm
from ferryman.cmdb.schema import alarms, audit_chain_head, audit_checkpoints, events
from ferryman.cmdb.sql_base import SqlBase, from_row, new_id
from ferryman.cmdb.values import as_json as _json
from ferryman.cmdb.values import utc as _utc
from ferryman.core.errors import Conflict, InvalidInput
from ferryman.core.models import Event, Severity

_SEVERITY_RANK = {Severity.INFO: 0, Severity.WARNING: 1, Severity.ALARM: 2}

AlarmKey = tuple[str, str | None, str | None]


def _eq_or_null(column: sa.ColumnElement[Any], value: Any) -> sa.ColumnElement[bool]:
    return column.is_(None) if value is None else column == value


def insert_event(conn: sa.Connection, event: Event) -> Event:
    """Append ``event`` to the log inside the caller's transaction (an audited change and its event land together),
    as the next link of the hash chain."""
    recorded = dataclasses.replace(
        event,
        time=_utc(event.time),
        severity=Severity(event.severity),
        data=_json(event.data, "event data"),
        id=None,
    )
    head = conn.execute(
        sa.select(audit_chain_head.c.event_id, audit_chain_head.c.hash)
        .where(audit_chain_head.c.id == 1)
        .with_for_update()
    ).first()
    if head is None:
        raise Conflict("the audit chain has no head: the CMDB was not migrated, or its chain head was deleted")
    entry = Entry(
        id=head.event_id + 1,
        time=recorded.time,
        kind=recorded.kind,
        severity=recorded.severity.value,
        principal=recorded.principal,
        vm=recorded.vm,
        host=recorded.host,
        message=recorded.message,
        # what the JSON column gives back (string keys, lists): exactly what is hashed is stored
        data=json.loads(json.dumps(recorded.data)),
        prev_hash=head.hash,
        hash="",
    )
    entry = entry._replace(hash=link_hash(head.hash, entry))
    conn.execute(sa.insert(events).values(**entry._asdict()))
    conn.execute(
        sa.update(audit_chain_head).where(audit_chain_head.c.id == 1).values(event_id=entry.id, hash=entry.hash)
    )
    return dataclasses.replace(recorded, id=entry.id)


def _event(row: sa.Row[Any]) -> Event:
    return from_row(Event, row, severity=Severity(row.severity), data=dict(row.data))


def _alarm(row: sa.Row[Any]) -> Alarm:
    return from_row(Alarm, row)


class SqlEventMixin(SqlBase):
    """:class:`~ferryman.cmdb.repository.EventRepository` for :class:`~ferryman.cmdb.sql.SqlRepository`."""

    def record_event(self, event: Event) -> Event:
        with self._write() as conn:
            return insert_event(conn, event)

    def list_events(
        self,
        *,
        since: dt.datetime | None = None,
        kind_prefix: str | None = None,
        vm_id: str | None = None,
        host: str | None = None,
        min_severity: Severity | None = None,
        limit: int = 200,
        until: dt.datetime | None = None,
        vm_ids: Collection[str] | None = None,
    ) -> list[Event]:
        """Events newest first; ``since`` is inclusive, ``until`` exclusive, ``kind_prefix`` matches literally;
        ``vm_ids`` keeps the events of those VMs only (none for an empty collection)."""
        if limit < 1:
            raise InvalidInput(f"limit must be at least 1, got {limit}")
        query = sa.select(events).order_by(events.c.time.desc(), events.c.id.desc()).limit(limit)
        if since is not None:
            query = query.where(events.c.time >= _utc(since, "since"))
        if until is not None:
            query = query.where(events.c.time < _utc(until, "until"))
        if kind_prefix:
            query = query.where(events.c.kind.startswith(kind_prefix, autoescape=True))
        if vm_id is not None:
            query = query.where(events.c.vm == vm_id)
        if vm_ids is not None:
            query = query.where(events.c.vm.in_(list(vm_ids)))
        if host is not None:
            query = query.where(events.c.host == host)
        if min_severity is not None:
            floor = _SEVERITY_RANK[Severity(min_severity)]
            query = query.where(events.c.severity.in_([s.value for s, rank in _SEVERITY_RANK.items() if rank >= floor]))
        with self._read() as conn:
            return [_event(r) for r in conn.execute(query)]

    def open_alarm(self, kind: str, vm_id: str | None, host: str | None, message: str, at: dt.datetime) -> Alarm | None:
        """Open an alarm; if the same (kind, vm_id, host) is already open, bump last_seen and return None."""
        at = _utc(at)
        try:
            return self._open_alarm_once(kind, vm_id, host, message, at)
        except Conflict:
            # Another controller opened the same alarm between our check and our insert: it is open now.
            return self._open_alarm_once(kind, vm_id, host, message, at)

    def _open_alarm_once(
        self, kind: str, vm_id: str | None, host: str | None, message: str, at: dt.datetime
    ) -> Alarm | None:
        key = sa.and_(
            alarms.c.kind == kind,
            _eq_or_null(alarms.c.vm_id, vm_id),
            _eq_or_null(alarms.c.host, host),
            alarms.c.resolved_at.is_(None),
        )
        with self._write() as conn:
            bumped = conn.execute(sa.update(alarms).where(key).values(last_seen=at, message=message))
            if bumped.rowcount:
                return None
            values = {"kind": kind, "vm_id": vm_id, "host": host, "message": message, "first_seen": at, "last_seen": at}
            alarm_id = new_id(conn.execute(sa.insert(alarms).values(**values)))
        return Alarm(id=alarm_id, kind=kind, vm_id=vm_id, host=host, message=message, first_seen=at, last_seen=at)

    def resolve_alarms(self, keep: Sequence[AlarmKey], at: dt.datetime, *, host: str | None = None) -> list[Alarm]:
        """Resolve every open alarm whose key is not in ``keep``; return those resolved.

        With ``host``, only alarms about that host are considered, so reconciling one host leaves the others' alarms
        alone.
        """
        at = _utc(at)
        keep_set = set(keep)
        query = sa.select(alarms).where(alarms.c.resolved_at.is_(None)).order_by(alarms.c.id)
        if host is not None:
            query = query.where(alarms.c.host == host)
        with self._write() as conn:
            open_rows = conn.execute(query)
            gone = [_alarm(r) for r in open_rows if (r.kind, r.vm_id, r.host) not in keep_set]
            if gone:
                conn.execute(
                    sa.update(alarms)
                    .where(alarms.c.id.in_([a.id for a in gone]), alarms.c.resolved_at.is_(None))
                    .values(resolved_at=at)
                )
        return [dataclasses.replace(a, resolved_at=at) for a in gone]

    def list_alarms(self, *, open_only: bool = True) -> list[Alarm]:
        query = sa.select(alarms).order_by(alarms.c.first_seen, alarms.c.id)
        if open_only:
            query = query.where(alarms.c.resolved_at.is_(None))
        with self._read() as conn:
            return [_alarm(r) for r in conn.execute(query)]


_CHAIN_COLUMNS = [events.c[name] for name in COLUMNS]


class SqlAuditLog(SqlBase):
    """The audit chain read back for verification and export, and its signed checkpoints (``SqlAuditLog(engine)``).

    Reads go in id-ordered batches, one short transaction each, so a walk over millions of entries holds neither
    memory nor a snapshot; entries committed during a walk are simply walked too. Nothing here judges the chain.
    """

    def head(self) -> tuple[int, str] | None:
        """The chain head the writers recorded: (entry id, hash); None while the log is empty."""
        with self._read() as conn:
            row = conn.execute(sa.select(audit_chain_head.c.event_id, audit_chain_head.c.hash)).first()
        return (row.event_id, row.hash) if row is not None and row.event_id > 0 else None

    def entry_before(self, event_id: int) -> tuple[int, str] | None:
        """(id, hash) of the last entry with an id below ``event_id``; None if there is none."""
        query = sa.select(events.c.id, events.c.hash).where(events.c.id < event_id).order_by(events.c.id.desc())
        with self._read() as conn:
            row = conn.execute(query.limit(1)).first()
        return (row.id, row.hash) if row is not None else None

    def batches(self, after: int = 0, *, since: dt.datetime | None = None, size: int = 5000) -> Iterator[list[Entry]]:
        """The entries with an id above ``after`` (and a time at or after ``since``), in id order, ``size`` at a
        time."""
        query = sa.select(*_CHAIN_COLUMNS).order_by(events.c.id).limit(size)
        if since is not None:
            query = query.where(events.c.time >= _utc(since, "since"))
        while True:
            with self._read() as conn:
                # plain tuples: a walk reads every field of every row, and a Row's attribute lookup costs more
                # than the hashing
                rows = [Entry._make(row) for row in conn.execute(query.where(events.c.id > after))]
            if not rows:
                return
            yield rows
            after = rows[-1].id

    def checkpoints(self, *, from_event: int = 0) -> list[Checkpoint]:
        """The checkpoints of entries from ``from_event`` on, oldest first."""
        query = sa.select(audit_checkpoints).where(audit_checkpoints.c.event_id >= from_event)
        with self._read() as conn:
            rows = conn.execute(query.order_by(audit_checkpoints.c.id)).all()
        return [from_row(Checkpoint, r) for r in rows]

    def latest_checkpoint(self) -> Checkpoint | None:
        query = sa.select(audit_checkpoints).order_by(audit_checkpoints.c.id.desc()).limit(1)
        with self._read() as conn:
            row = conn.execute(query).first()
        return from_row(Checkpoint, row) if row is not None else None

    def add_checkpoint(self, event_id: int, hash_: str, at: dt.datetime, signature: str) -> Checkpoint:
        at = _utc(at)
        values = {"event_id": event_id, "hash": hash_, "at": at, "signature": signature}
        with self._write() as conn:
            checkpoint_id = new_id(conn.execute(sa.insert(audit_checkpoints).values(**values)))
        return Checkpoint(checkpoint_id, event_id, hash_, at, signature)
