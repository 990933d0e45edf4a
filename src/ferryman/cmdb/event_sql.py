"""Events and alarms on SQL: :class:`SqlEventMixin` implements :class:`~ferryman.cmdb.repository.EventRepository`
for :class:`~ferryman.cmdb.sql.SqlRepository`.

The event log is append-only; an alarm is opened once per (kind, VM, host) while the discrepancy lasts
(``uq_alarms_open_key`` turns a racing second opening into a bump of the first) and resolved once. Nothing here decides
what is an alarm: reconciliation does.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

from ferryman.cmdb.repository import Alarm
from ferryman.cmdb.schema import alarms, events
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
    """Append ``event`` to the log inside the caller's transaction (an audited change and its event land together)."""
    recorded = dataclasses.replace(
        event,
        time=_utc(event.time),
        severity=Severity(event.severity),
        data=_json(event.data, "event data"),
        id=None,
    )
    values = dataclasses.asdict(recorded) | {"severity": recorded.severity.value}
    del values["id"]
    return dataclasses.replace(recorded, id=new_id(conn.execute(sa.insert(events).values(**values))))


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
    ) -> list[Event]:
        """Events newest first; ``since`` is inclusive, ``until`` exclusive, ``kind_prefix`` matches literally."""
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
