"""Incidents on SQL: :class:`SqlIncidentMixin` implements :class:`~ferryman.cmdb.incidents.IncidentRepository` for
:class:`~ferryman.cmdb.sql.SqlRepository`.

Deduplication is decided inside the write transaction: an open incident with the alert's ``dedup_key`` counts the
alert; otherwise a new incident is inserted (the partial unique index on open ``dedup_key`` backs it up against a
race). Closing is written once.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

import sqlalchemy as sa

from ferryman.cmdb.incidents import (
    EvidenceRecord,
    IncidentAction,
    IncidentRecord,
    ManifestRecord,
    PlaybookRun,
    PlaybookVersion,
)
from ferryman.cmdb.schema import evidence, incident_actions, incidents, manifests, playbook_runs, playbook_versions
from ferryman.cmdb.sql_base import SqlBase, first_or_not_found, from_row, new_id
from ferryman.cmdb.values import utc
from ferryman.core.errors import Conflict, InvalidInput


def _incident(row: sa.Row[Any]) -> IncidentRecord:
    return from_row(IncidentRecord, row)


class SqlIncidentMixin(SqlBase):
    """:class:`~ferryman.cmdb.incidents.IncidentRepository` for :class:`~ferryman.cmdb.sql.SqlRepository`."""

    def open_incident(self, incident: IncidentRecord) -> tuple[IncidentRecord, bool]:
        at = utc(incident.opened_at, "opened_at")
        with self._write() as conn:
            if incident.dedup_key is not None:
                query = sa.select(incidents).where(
                    incidents.c.dedup_key == incident.dedup_key, incidents.c.state == "open"
                )
                row = conn.execute(query.with_for_update()).first()
                if row is not None:
                    conn.execute(
                        sa.update(incidents)
                        .where(incidents.c.id == row.id)
                        .values(alerts=incidents.c.alerts + 1, last_alert_at=at)
                    )
                    return _incident(conn.execute(sa.select(incidents).where(incidents.c.id == row.id)).one()), False
            values = dataclasses.asdict(incident) | {"opened_at": at, "state": "open"}
            values.pop("id")
            new = new_id(conn.execute(sa.insert(incidents).values(**values)))
            return _incident(conn.execute(sa.select(incidents).where(incidents.c.id == new)).one()), True

    def get_incident(self, incident_id: int) -> IncidentRecord:
        with self._read() as conn:
            query = sa.select(incidents).where(incidents.c.id == incident_id)
            return _incident(first_or_not_found(conn, query, f"incident {incident_id}"))

    def list_incidents(self, *, open_only: bool = False, vm_id: str | None = None) -> list[IncidentRecord]:
        query = sa.select(incidents).order_by(incidents.c.id.desc())
        if open_only:
            query = query.where(incidents.c.state == "open")
        if vm_id is not None:
            query = query.where(incidents.c.vm_id == vm_id)
        with self._read() as conn:
            return [_incident(r) for r in conn.execute(query)]

    def close_incident(self, incident_id: int, at: dt.datetime, by: str, resolution: str) -> IncidentRecord:
        at = utc(at)
        with self._write() as conn:
            query = sa.select(incidents).where(incidents.c.id == incident_id)
            row = first_or_not_found(conn, query, f"incident {incident_id}", lock=True)
            if row.state == "closed":
                raise Conflict(f"incident {incident_id} was closed already at {row.closed_at:%Y-%m-%d %H:%M:%S}Z")
            conn.execute(
                sa.update(incidents)
                .where(incidents.c.id == incident_id)
                .values(state="closed", closed_at=at, closed_by=by, resolution=resolution)
            )
            return _incident(conn.execute(query).one())

    def add_incident_action(self, action: IncidentAction) -> IncidentAction:
        action = dataclasses.replace(action, at=utc(action.at, "at"))
        values = dataclasses.asdict(action)
        values.pop("id")
        with self._write() as conn:
            first_or_not_found(conn, sa.select(incidents.c.id).where(incidents.c.id == action.incident_id), "incident")
            new = new_id(conn.execute(sa.insert(incident_actions).values(**values)))
        return dataclasses.replace(action, id=new)

    def incident_actions(self, incident_id: int) -> list[IncidentAction]:
        query = (
            sa.select(incident_actions)
            .where(incident_actions.c.incident_id == incident_id)
            .order_by(incident_actions.c.at, incident_actions.c.id)
        )
        with self._read() as conn:
            return [from_row(IncidentAction, r) for r in conn.execute(query)]

    def add_evidence(self, records: list[EvidenceRecord], manifest: ManifestRecord) -> None:
        with self._write() as conn:
            for record in records:
                values = dataclasses.asdict(record)
                values.pop("id")
                conn.execute(sa.insert(evidence).values(**values))
            conn.execute(sa.insert(manifests).values(**dataclasses.asdict(manifest)))

    def list_evidence(self, incident_id: int) -> list[EvidenceRecord]:
        query = sa.select(evidence).where(evidence.c.incident_id == incident_id).order_by(evidence.c.id)
        with self._read() as conn:
            return [from_row(EvidenceRecord, r) for r in conn.execute(query)]

    def list_manifests(self, incident_id: int) -> list[ManifestRecord]:
        query = sa.select(manifests).where(manifests.c.incident_id == incident_id).order_by(manifests.c.created_at)
        with self._read() as conn:
            return [from_row(ManifestRecord, r) for r in conn.execute(query)]

    def add_playbook_version(self, digest: str, text: str, at: dt.datetime, by: str) -> PlaybookVersion:
        at = utc(at)
        values = {"digest": digest, "text": text, "applied_at": at, "applied_by": by}
        with self._write() as conn:
            version = new_id(conn.execute(sa.insert(playbook_versions).values(**values)))
        return PlaybookVersion(version, digest, text, at, by)

    def current_playbook(self) -> PlaybookVersion | None:
        query = sa.select(playbook_versions).order_by(playbook_versions.c.version.desc()).limit(1)
        with self._read() as conn:
            row = conn.execute(query).first()
        return None if row is None else from_row(PlaybookVersion, row)

    def start_playbook_run(self, run: PlaybookRun) -> tuple[PlaybookRun, bool]:
        with self._write() as conn:
            query = sa.select(playbook_runs).where(playbook_runs.c.incident_id == run.incident_id)
            row = conn.execute(query.with_for_update()).first()
            if row is not None:
                return from_row(PlaybookRun, row), False
            first_or_not_found(conn, sa.select(incidents.c.id).where(incidents.c.id == run.incident_id), "incident")
            conn.execute(sa.insert(playbook_runs).values(**dataclasses.asdict(run)))
        return run, True

    def update_playbook_run(self, incident_id: int, **changes: Any) -> PlaybookRun:
        allowed = {"next_step", "attempts", "state", "error", "updated_at"}
        if set(changes) - allowed or "updated_at" not in changes:
            raise InvalidInput(f"a playbook run changes only {sorted(allowed)}, with updated_at")
        changes["updated_at"] = utc(changes["updated_at"], "updated_at")
        with self._write() as conn:
            query = sa.select(playbook_runs).where(playbook_runs.c.incident_id == incident_id)
            first_or_not_found(conn, query, f"playbook run of incident {incident_id}", lock=True)
            conn.execute(sa.update(playbook_runs).where(playbook_runs.c.incident_id == incident_id).values(**changes))
            return from_row(PlaybookRun, conn.execute(query).one())

    def get_playbook_run(self, incident_id: int) -> PlaybookRun | None:
        with self._read() as conn:
            row = conn.execute(sa.select(playbook_runs).where(playbook_runs.c.incident_id == incident_id)).first()
        return None if row is None else from_row(PlaybookRun, row)

    def running_playbook_runs(self) -> list[PlaybookRun]:
        query = sa.select(playbook_runs).where(playbook_runs.c.state == "running").order_by(playbook_runs.c.started_at)
        with self._read() as conn:
            return [from_row(PlaybookRun, r) for r in conn.execute(query)]
