"""The migration journal on SQL: :class:`SqlJournalMixin` implements :class:`~ferryman.cmdb.journal.JournalRepository`
for :class:`~ferryman.cmdb.sql.SqlRepository`, which inherits it; the transactions come from
:class:`~ferryman.cmdb.sql_base.SqlBase` and the move of the VM from :func:`~ferryman.cmdb.inventory_sql.move_vm_in`.

It exists so that the runner's progress is durable before each side effect, and so that the linearisation point of the
protocol, :meth:`SqlJournalMixin.commit_migration`, moves the placement and marks the migration committed in one
transaction. Each public method is one transaction. On SQLite writers queue on ``BEGIN IMMEDIATE``. On PostgreSQL a
change to a migration first locks its row (``FOR UPDATE``) and only then reads what it compares; the commit then locks
the VM row. Nothing locks a VM row before a migration row, so these locks cannot deadlock with each other or with
:meth:`~ferryman.cmdb.sql.SqlRepository.move_vm`. Updates are guarded as well (``WHERE phase = p AND outcome IS
NULL``), and ``uq_migrations_active_vm`` turns a racing second active migration into a Conflict.

It does not decide transitions (``ferryman.migration`` does): phases are opaque strings except ``switched_over``, the
only phase that may commit, and ``committed``, which only the commit sets. Steps and scrub receipts are append-only;
nothing here updates or deletes them.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

import sqlalchemy as sa

from ferryman.cmdb.event_sql import insert_event
from ferryman.cmdb.inventory_sql import move_vm_in
from ferryman.cmdb.journal import COMMITTED, SWITCHED_OVER, MigrationRecord, MigrationStep, ScrubReceiptRecord
from ferryman.cmdb.schema import migration_steps, migrations, scrub_receipts
from ferryman.cmdb.sql_base import SqlBase, first_or_not_found, from_row, new_id, require_host, vm_row
from ferryman.cmdb.values import as_json as _json
from ferryman.cmdb.values import utc as _utc
from ferryman.core.errors import Conflict, InvalidInput
from ferryman.core.models import VM, Event, Placement, VMState

_MIGRATION_FIELDS = tuple(f.name for f in dataclasses.fields(MigrationRecord))


# -- value helpers -----------------------------------------------------------------------------------------------------


def _migration(row: sa.Row[Any]) -> MigrationRecord:
    return from_row(MigrationRecord, row, data=dict(row.data))


def _step(row: sa.Row[Any]) -> MigrationStep:
    return from_row(MigrationStep, row, data=dict(row.data))


def _receipt(row: sa.Row[Any]) -> ScrubReceiptRecord:
    return from_row(ScrubReceiptRecord, row)


def _new_record_values(record: MigrationRecord) -> dict[str, Any]:
    """The row for a new migration, or InvalidInput if the record could never be a valid one."""
    if record.source == record.destination:
        raise InvalidInput(f"migration {record.id!r}: source and destination are both {record.source!r}")
    if record.phase == COMMITTED:
        raise InvalidInput(f"migration {record.id!r}: only commit_migration may set the phase {COMMITTED!r}")
    if (record.outcome is None) != (record.finished_at is None):
        raise InvalidInput(f"migration {record.id!r}: outcome and finished_at must be given together")
    values = {name: getattr(record, name) for name in _MIGRATION_FIELDS}
    for name in ("requested_at", "updated_at", "finished_at"):
        if values[name] is not None:
            values[name] = _utc(values[name], name)
    values["data"] = _json(dict(record.data), "migration data")
    return values


# -- statements used inside transactions -------------------------------------------------------------------------------


def _migration_row(conn: sa.Connection, migration_id: str, *, lock: bool = False) -> sa.Row[Any]:
    query = sa.select(migrations).where(migrations.c.id == migration_id)
    return first_or_not_found(conn, query, f"migration {migration_id!r}", lock=lock)


def _require_unfinished(row: sa.Row[Any]) -> None:
    if row.outcome is not None:
        raise Conflict(f"migration {row.id!r} finished with outcome {row.outcome!r} and cannot change")


def _update(conn: sa.Connection, row: sa.Row[Any], values: dict[str, Any]) -> None:
    """Update the migration read as ``row``, guarded so that a concurrent change makes it a Conflict."""
    updated = conn.execute(
        sa.update(migrations)
        .where(migrations.c.id == row.id, migrations.c.phase == row.phase, migrations.c.outcome.is_(None))
        .values(**values)
    )
    if updated.rowcount != 1:
        raise Conflict(f"migration {row.id!r} changed concurrently")


def _append_step(conn: sa.Connection, migration_id: str, phase: str, at: dt.datetime, data: dict[str, Any]) -> None:
    # The caller holds the migration row (or just inserted it), so no other writer numbers steps for it meanwhile;
    # uq_migration_steps_migration_id_seq backs that up.
    last = sa.select(sa.func.coalesce(sa.func.max(migration_steps.c.seq), 0)).where(
        migration_steps.c.migration_id == migration_id
    )
    seq = int(conn.scalar(last) or 0) + 1
    conn.execute(sa.insert(migration_steps).values(migration_id=migration_id, seq=seq, phase=phase, at=at, data=data))


# -- the mixin ---------------------------------------------------------------------------------------------------------


class SqlJournalMixin(SqlBase):
    """:class:`~ferryman.cmdb.journal.JournalRepository` for :class:`~ferryman.cmdb.sql.SqlRepository`."""

    def add_migration(self, record: MigrationRecord) -> MigrationRecord:
        """Insert the migration and its first step (``record.phase`` at ``record.updated_at``), one transaction.

        NotFound for an unknown VM or host. Conflict if the id is taken, the VM is deleted, or (for a record without
        an outcome) the VM already has an active migration. InvalidInput if source and destination are one host, the
        phase is ``committed``, or only one of ``outcome`` and ``finished_at`` is given. The VM's placement and
        generation are not checked here: :meth:`commit_migration` checks them when it matters.
        """
        values = _new_record_values(record)
        with self._write() as conn:
            vm = vm_row(conn, record.vm_id)
            if vm.state == VMState.DELETED.value:
                raise Conflict(f"VM {record.vm_id!r} is deleted and cannot migrate")
            require_host(conn, record.source)
            require_host(conn, record.destination)
            if conn.scalar(sa.select(migrations.c.id).where(migrations.c.id == record.id)) is not None:
                raise Conflict(f"a migration with id {record.id!r} already exists")
            if record.outcome is None:
                active = conn.scalar(
                    sa.select(migrations.c.id).where(migrations.c.vm_id == record.vm_id, migrations.c.outcome.is_(None))
                )
                if active is not None:
                    raise Conflict(f"VM {record.vm_id!r} already has an active migration, {active!r}")
            conn.execute(sa.insert(migrations).values(**values))
            _append_step(conn, record.id, record.phase, values["updated_at"], values["data"])
            return _migration(_migration_row(conn, record.id))

    def get_migration(self, migration_id: str) -> MigrationRecord:
        with self._read() as conn:
            return _migration(_migration_row(conn, migration_id))

    def list_migrations(
        self, *, vm_id: str | None = None, active_only: bool = False, limit: int = 200
    ) -> list[MigrationRecord]:
        """Newest (by ``requested_at``) first."""
        if limit < 1:
            raise InvalidInput(f"limit must be at least 1, got {limit}")
        query = sa.select(migrations).order_by(migrations.c.requested_at.desc(), migrations.c.id.desc()).limit(limit)
        if vm_id is not None:
            query = query.where(migrations.c.vm_id == vm_id)
        if active_only:
            query = query.where(migrations.c.outcome.is_(None))
        with self._read() as conn:
            return [_migration(r) for r in conn.execute(query)]

    def advance_migration(
        self,
        migration_id: str,
        phase: str,
        at: dt.datetime,
        *,
        expected_phase: str | None = None,
        outcome: str | None = None,
        error: str | None = None,
        bytes_transferred: int | None = None,
        downtime_ms: int | None = None,
        data: dict[str, Any] | None = None,
        step_data: dict[str, Any] | None = None,
        event: Event | None = None,
    ) -> MigrationRecord:
        """Set the phase and the given fields, merge ``data`` into the record's data (top-level keys replaced) and
        append a step carrying ``step_data`` (default: ``data``), one transaction; an ``outcome`` finishes the
        migration at ``at``. An ``event`` (the transition's audit event) is appended to the event log by the same
        transaction.

        NotFound for an unknown migration. Conflict, with nothing written, if the phase asked for is ``committed`` while
        the migration is not committed yet (only :meth:`commit_migration` commits), the migration is finished, or
        ``expected_phase`` is given and differs from the current phase.
        """
        at = _utc(at)
        delta = _json(dict(data or {}), "migration data")
        step_delta = delta if step_data is None else _json(dict(step_data), "step data")
        with self._write() as conn:
            row = _migration_row(conn, migration_id, lock=True)
            if phase == COMMITTED and row.phase != COMMITTED:
                raise Conflict(f"migration {migration_id!r}: only commit_migration may set the phase {COMMITTED!r}")
            _require_unfinished(row)
            if expected_phase is not None and row.phase != expected_phase:
                raise Conflict(f"migration {migration_id!r} is in phase {row.phase!r}, not {expected_phase!r}")
            values: dict[str, Any] = {"phase": phase, "updated_at": at, "data": {**row.data, **delta}}
            if outcome is not None:
                values |= {"outcome": outcome, "finished_at": at}
            optional = {"error": error, "bytes_transferred": bytes_transferred, "downtime_ms": downtime_ms}
            values |= {name: value for name, value in optional.items() if value is not None}
            _update(conn, row, values)
            _append_step(conn, migration_id, phase, at, step_delta)
            if event is not None:
                insert_event(conn, event)
            return _migration(_migration_row(conn, migration_id))

    def commit_migration(
        self, migration_id: str, at: dt.datetime, *, data: dict[str, Any] | None = None
    ) -> tuple[MigrationRecord, VM, Placement]:
        """THE commit, one transaction: move the VM from the migration's source to its destination (close the source
        placement at ``at``, open the destination one with generation + 1), set the phase ``committed`` and append
        the step.

        The move is :meth:`~ferryman.cmdb.sql.SqlRepository.move_vm` with ``expected_generation`` = the migration's
        generation, and also requires the open placement to be on the source. NotFound for an unknown migration;
        Conflict, with nothing changed, if the migration is finished or not in ``switched_over``, or the move is
        refused. A cancel request does not stop it: the runner reads ``cancel_requested`` before it commits. ``data``
        is merged into the record's data in the same transaction (the runner's post-commit state).
        """
        at = _utc(at)
        delta = _json(dict(data or {}), "migration data")
        with self._write() as conn:
            row = _migration_row(conn, migration_id, lock=True)
            _require_unfinished(row)
            if row.phase != SWITCHED_OVER:
                raise Conflict(
                    f"migration {migration_id!r} is in phase {row.phase!r}; only a migration in {SWITCHED_OVER!r} "
                    "can commit"
                )
            vm, placement = move_vm_in(
                conn, row.vm_id, row.destination, at, expected_generation=row.generation, from_host=row.source
            )
            _update(conn, row, {"phase": COMMITTED, "updated_at": at, "data": {**row.data, **delta}})
            _append_step(conn, migration_id, COMMITTED, at, {"generation": placement.generation})
            committed = _migration(_migration_row(conn, migration_id))
        return committed, vm, placement

    def request_cancel(self, migration_id: str, at: dt.datetime) -> MigrationRecord:
        """Flag the migration for cancellation; the runner acts on the flag (before the commit it rolls back, after
        it the flag no longer matters). Asking again changes nothing. NotFound for an unknown migration; Conflict if it
        is finished."""
        at = _utc(at)
        with self._write() as conn:
            row = _migration_row(conn, migration_id, lock=True)
            _require_unfinished(row)
            if row.cancel_requested:
                return _migration(row)
            _update(conn, row, {"cancel_requested": True, "updated_at": at})
            return _migration(_migration_row(conn, migration_id))

    def migration_steps(self, migration_id: str) -> list[MigrationStep]:
        """Every step of the migration, oldest (seq 1) first. NotFound for an unknown migration."""
        query = (
            sa.select(migration_steps)
            .where(migration_steps.c.migration_id == migration_id)
            .order_by(migration_steps.c.seq)
        )
        with self._read() as conn:
            _migration_row(conn, migration_id)
            return [_step(r) for r in conn.execute(query)]

    def add_scrub_receipt(self, receipt: ScrubReceiptRecord) -> ScrubReceiptRecord:
        """Store the receipt and return it with its id. NotFound if it names an unknown migration; the host need not
        be known to the CMDB."""
        recorded = dataclasses.replace(receipt, at=_utc(receipt.at), id=None)
        values = dataclasses.asdict(recorded)
        del values["id"]
        with self._write() as conn:
            if receipt.migration_id is not None:
                _migration_row(conn, receipt.migration_id)
            receipt_id = new_id(conn.execute(sa.insert(scrub_receipts).values(**values)))
        return dataclasses.replace(recorded, id=receipt_id)

    def list_scrub_receipts(self, migration_id: str) -> list[ScrubReceiptRecord]:
        """The migration's receipts, oldest first. NotFound for an unknown migration."""
        query = (
            sa.select(scrub_receipts)
            .where(scrub_receipts.c.migration_id == migration_id)
            .order_by(scrub_receipts.c.at, scrub_receipts.c.id)
        )
        with self._read() as conn:
            _migration_row(conn, migration_id)
            return [_receipt(r) for r in conn.execute(query)]
