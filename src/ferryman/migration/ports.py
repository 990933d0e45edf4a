"""What the migration runner needs from the world, as narrow Protocols (STYLE.md habit 7).

The runner (:mod:`ferryman.migration.runner`) drives the pure machine and talks to nothing else: the controller
supplies adapters for these ports (:mod:`ferryman.controller.migrations`), and :mod:`ferryman.testing.migration` ships
fakes, so the whole protocol runs in unit tests without QEMU, a database or a network.

Every port that may block (a database transaction, a signature, an HTTP call) is a coroutine: the controller's
adapters run blocking work in worker threads, so the event loop that drives every migration never waits on it.

What this module must not do: import an implementation (controller, agent, SQL, HTTP).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any, Protocol, TypeVar

from ferryman.cmdb.journal import MigrationRecord
from ferryman.core.models import VM, Event, ImageRef, NicSpec, Placement, Severity
from ferryman.wire.base import AgentCall, Reply
from ferryman.wire.network import NicState
from ferryman.wire.vms import Receipt

R = TypeVar("R", bound=Reply)


class Journal(Protocol):
    """The durable record of each migration, and the VM rows its commit moves (the CMDB)."""

    async def get_migration(self, migration_id: str) -> MigrationRecord: ...

    async def list_migrations(
        self, *, vm_id: str | None = None, active_only: bool = False, limit: int = 200
    ) -> list[MigrationRecord]: ...

    async def advance_migration(
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
        """Persist a phase (and merge ``data``), with ``event`` (its audit event) in the same transaction; see
        :class:`ferryman.cmdb.journal.JournalRepository`."""
        ...

    async def commit_migration(
        self, migration_id: str, at: dt.datetime, *, data: dict[str, Any] | None = None
    ) -> tuple[MigrationRecord, VM, Placement]:
        """THE commit: placement, generation, phase and ``data`` in one transaction (Conflict: nothing changed)."""
        ...

    async def get_vm(self, name_or_id: str) -> VM: ...


class Agents(Protocol):
    """The host agents, by host name."""

    async def call(self, host: str, target: str, request: AgentCall[R], *, limit_s: float = 120) -> R:
        """Send ``request`` about ``target`` (a migration id) to ``host``'s agent; the agent's error comes back as
        the same :class:`ferryman.core.errors.FerrymanError` class, an unreachable agent as ``AgentUnreachable``."""
        ...


class Credentials(Protocol):
    """What the controller signs, and the disk keys of the copies a migration touches."""

    async def ticket(self, record: MigrationRecord) -> str:
        """A signed, single-use migration ticket for this migration's host pair and generation."""
        ...

    async def lease(self, vm_id: str, host: str, generation: int) -> str:
        """A signed permission for ``host`` to run ``vm_id`` at ``generation`` (fencing)."""
        ...

    async def crl(self) -> str:
        """The current certificate revocation list (PEM), for the hosts' TLS peers checks."""
        ...

    async def disk_key(self, vm: VM, host: str, generation: int) -> bytes | None:
        """The key of ``vm``'s copy on ``host`` at ``generation``; None for a plain VM."""
        ...

    async def destination_key(self, vm: VM, record: MigrationRecord, *, make: bool) -> bytes | None:
        """The key of the destination copy (generation + 1); ``make`` (preparation only) creates it on first use: a
        new key, or the source's for shared storage. None for a plain VM."""
        ...

    async def destroy_keys(self, vm: VM, reason: str, *, host: str, generation: int) -> list[str]:
        """Destroy the keys of one losing copy first (crypto-erase that holds if its host never answers)."""
        ...


class Images(Protocol):
    """The registry images VMs boot from."""

    async def ref(self, vm: VM) -> ImageRef | None:
        """What a host needs to boot ``vm``'s image, checked now (revoked, untrusted or altered: an error); None for
        a VM that boots from its host's own boot image."""
        ...

    async def ensure_on(self, host: str, ref: ImageRef) -> None:
        """``host`` holds the image's files (sent now if it lacks them; it checks each digest on arrival)."""
        ...


class Networks(Protocol):
    """The VMs' NICs: what a destination must plumb, and the check of the rules it read back."""

    async def nics(self, vm: VM, host: str) -> tuple[NicSpec, ...]:
        """The NIC specs ``host`` needs for ``vm`` (none for a VM without NICs)."""
        ...

    async def verified(self, vm: VM, host: str, applied: Sequence[NicState]) -> str:
        """Check the rules ``host`` installed and read back before its QEMU started against the CMDB (NetworkError
        if a NIC's rules are missing or differ); a short summary for the journal."""
        ...


class Inventory(Protocol):
    """The rest of the controller that hears of a migration's effects."""

    async def committed(self, vm: VM) -> None:
        """The VM's placement moved: reconciliation and compliance must look at it again."""
        ...

    async def store_receipts(self, host: str, receipts: Sequence[Receipt], migration_id: str) -> list[dict[str, Any]]:
        """Keep scrub receipts in the CMDB; their short form for the audit event."""
        ...


class Audit(Protocol):
    """The audit trail: every decision and phase change is an event."""

    async def __call__(
        self,
        kind: str,
        message: str,
        principal: str,
        *,
        vm: str | None = None,
        host: str | None = None,
        severity: Severity = Severity.INFO,
        **data: Any,
    ) -> object: ...


class Clock(Protocol):
    """Time for the runner: wall-clock for the journal, a monotonic clock and sleeps for its bounded waits."""

    def now(self) -> dt.datetime: ...

    def monotonic(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class Pause(Protocol):
    """Called before each command with the persisted phase (fault injection holds the runner here)."""

    async def __call__(self, phase: str, migration_id: str, step: str | None) -> None: ...
