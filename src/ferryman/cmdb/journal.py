"""The migration journal: one row per migration (its current phase and outcome) and an append-only list of the steps
it went through, plus the scrub receipts of what it left behind.

The runner persists "about to enter phase X" here BEFORE doing X's side effect, so that recovery after a controller
restart knows where every migration stood (DESIGN.md: every state is persisted before its side effects). The commit
(:meth:`JournalRepository.commit_migration`) moves the VM's placement to the destination, bumps its generation and
marks the migration COMMITTED in ONE transaction: it is the linearisation point of the protocol.

Phases are strings here (``ferryman.migration.states.Phase`` values); the CMDB does not interpret them beyond the
compare-and-set checks documented on each method.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any, Protocol

from ferryman.core.models import VM, Event, Placement

SWITCHED_OVER = "switched_over"
COMMITTED = "committed"


@dataclass(frozen=True)
class MigrationRecord:
    id: str
    vm_id: str
    source: str
    destination: str
    shared_storage: bool
    phase: str
    principal: str
    generation: int  # the VM's generation when the migration was requested
    requested_at: dt.datetime
    updated_at: dt.datetime
    finished_at: dt.datetime | None = None
    outcome: str | None = None  # done | rolled_back | refused | stuck
    error: str | None = None
    cancel_requested: bool = False
    bytes_transferred: int = 0
    downtime_ms: int | None = None
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MigrationStep:
    migration_id: str
    seq: int
    phase: str
    at: dt.datetime
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ScrubReceiptRecord:
    host: str
    path: str
    bytes: int
    mode: str
    duration_s: float
    sample_hash: str
    at: dt.datetime
    migration_id: str | None = None
    id: int | None = None


class JournalRepository(Protocol):
    def add_migration(self, record: MigrationRecord) -> MigrationRecord:
        """Insert a new migration (phase as given, usually ``requested``) and its first step, one transaction.
        Conflict if the VM already has an active migration (outcome None)."""
        ...

    def get_migration(self, migration_id: str) -> MigrationRecord: ...  # NotFound

    def list_migrations(
        self, *, vm_id: str | None = None, active_only: bool = False, limit: int = 200
    ) -> list[MigrationRecord]:
        """Newest first."""
        ...

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
        """Set the phase (and optional fields; ``data`` is merged into the record's data) and append a step, one
        transaction; the step carries ``step_data`` (default ``data``). With ``expected_phase`` it is a compare-and-set
        (Conflict if the phase differs). An ``outcome`` finishes the migration (finished_at = at). Refuses (Conflict) to
        change a finished migration, and to set ``committed`` on a migration not yet committed (only
        :meth:`commit_migration` commits). An ``event`` is appended to the event log by the same transaction."""
        ...

    def commit_migration(
        self, migration_id: str, at: dt.datetime, *, data: dict[str, Any] | None = None
    ) -> tuple[MigrationRecord, VM, Placement]:
        """THE commit, one transaction: the migration must be in ``switched_over`` and the VM still at the
        migration's generation, placed on its source; close the source placement, open one on the destination with
        generation + 1, set the phase ``committed``, merge ``data`` and append the step. Conflict (nothing changed)
        otherwise."""
        ...

    def request_cancel(self, migration_id: str, at: dt.datetime) -> MigrationRecord: ...

    def migration_steps(self, migration_id: str) -> list[MigrationStep]: ...  # oldest first

    def add_scrub_receipt(self, receipt: ScrubReceiptRecord) -> ScrubReceiptRecord: ...

    def list_scrub_receipts(self, migration_id: str) -> list[ScrubReceiptRecord]: ...
