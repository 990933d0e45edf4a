"""Fakes of the migration runner's ports (:mod:`ferryman.migration.ports`), for unit tests of the protocol. They
answer at once, on the event loop; tests set them up and read them back synchronously (``migrations``, ``vms``,
``placements``, ``calls``, ``events``).

With them :class:`~ferryman.migration.runner.MigrationRunner` runs a whole migration, a retry, a cancel or a
recovery in milliseconds: no QEMU, no database, no network, and time that only moves when the runner sleeps. They
keep the contracts that matter to the protocol: the journal's commit is a compare-and-set on the phase and the VM's
generation that moves the placement in one step, and agents answer with the wire's own response types.

What they must not do: stand in for the real parts in integration tests (those use real agents and the CMDB).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ferryman.cmdb.journal import COMMITTED, SWITCHED_OVER, MigrationRecord
from ferryman.core import errors
from ferryman.core.models import VM, Event, ImageRef, Placement, Severity
from ferryman.testing.clock import FakeClock
from ferryman.wire import migration as w
from ferryman.wire.base import AgentCall, Empty, Message, R
from ferryman.wire.vms import Receipt


class FakeJournal:
    """An in-memory migration journal and the VM rows its commit moves."""

    def __init__(self) -> None:
        self.migrations: dict[str, MigrationRecord] = {}
        self.vms: dict[str, VM] = {}
        self.placements: dict[str, Placement] = {}
        self.phases: dict[str, list[str]] = {}  # every phase written, in order, per migration
        self.events: list[Event] = []  # audit events written with a phase, in order
        self.commits = 0

    def add_vm(self, vm: VM, host: str, at: dt.datetime) -> None:
        self.vms[vm.id] = vm
        self.placements[vm.id] = Placement(vm.id, host, vm.generation, at)

    def add_migration(self, record: MigrationRecord) -> MigrationRecord:
        self.migrations[record.id] = record
        self.phases[record.id] = [record.phase]
        return record

    def _record(self, migration_id: str) -> MigrationRecord:
        try:
            return self.migrations[migration_id]
        except KeyError:
            raise errors.NotFound(f"migration {migration_id!r} not found") from None

    async def get_migration(self, migration_id: str) -> MigrationRecord:
        return self._record(migration_id)

    async def list_migrations(
        self, *, vm_id: str | None = None, active_only: bool = False, limit: int = 200
    ) -> list[MigrationRecord]:
        found = [
            r
            for r in self.migrations.values()
            if (vm_id is None or r.vm_id == vm_id) and (not active_only or r.outcome is None)
        ]
        return sorted(found, key=lambda r: r.requested_at, reverse=True)[:limit]

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
        record = self._record(migration_id)
        if record.outcome is not None:
            raise errors.Conflict(f"migration {migration_id} is finished")
        if expected_phase is not None and record.phase != expected_phase:
            raise errors.Conflict(f"migration {migration_id} is in {record.phase}, not {expected_phase}")
        if phase == COMMITTED and record.phase != COMMITTED:
            raise errors.Conflict("only the commit commits")
        changes: dict[str, Any] = {"phase": phase, "updated_at": at, "data": {**record.data, **(data or {})}}
        if outcome is not None:
            changes |= {"outcome": outcome, "finished_at": at}
        if error is not None:
            changes["error"] = error
        if bytes_transferred is not None:
            changes["bytes_transferred"] = bytes_transferred
        if downtime_ms is not None:
            changes["downtime_ms"] = downtime_ms
        self.migrations[migration_id] = dataclasses.replace(record, **changes)
        self.phases[migration_id].append(phase)
        if event is not None:
            self.events.append(event)
        return self.migrations[migration_id]

    async def commit_migration(
        self, migration_id: str, at: dt.datetime, *, data: dict[str, Any] | None = None
    ) -> tuple[MigrationRecord, VM, Placement]:
        record = self._record(migration_id)
        vm, placement = self.vms[record.vm_id], self.placements[record.vm_id]
        if record.outcome is not None or record.phase != SWITCHED_OVER:
            raise errors.Conflict(f"migration {migration_id} is in {record.phase}: it cannot commit")
        if vm.generation != record.generation or placement.host != record.source:
            raise errors.Conflict(f"VM {vm.id} moved on since migration {migration_id} began")
        vm = dataclasses.replace(vm, generation=vm.generation + 1)
        placement = Placement(vm.id, record.destination, vm.generation, at)
        self.vms[vm.id], self.placements[vm.id] = vm, placement
        committed = dataclasses.replace(record, phase=COMMITTED, updated_at=at, data={**record.data, **(data or {})})
        self.migrations[migration_id] = committed
        self.phases[migration_id].append(COMMITTED)
        self.commits += 1
        return committed, vm, placement

    async def get_vm(self, name_or_id: str) -> VM:
        for vm in self.vms.values():
            if name_or_id in {vm.id, vm.name}:
                return vm
        raise errors.NotFound(f"VM {name_or_id!r} not found")


@dataclass
class Call:
    host: str
    target: str
    request: Message


class FakeAgents:
    """Agents that answer every migration step as a healthy host would; a test scripts failures and holds.

    ``fail(kind, error, times)`` makes the next ``times`` requests of that type raise ``error``; ``hold(kind)``
    makes requests of that type wait until the returned event is set; ``answer(kind, response)`` replaces the default
    response. ``calls`` records every request in order."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self._failures: dict[type[Message], list[errors.FerrymanError]] = {}
        self._holds: dict[type[Message], asyncio.Event] = {}
        self._answers: dict[type[Message], Message] = {}

    def fail(self, kind: type[Message], error: errors.FerrymanError, times: int = 1) -> None:
        self._failures.setdefault(kind, []).extend([error] * times)

    def hold(self, kind: type[Message]) -> asyncio.Event:
        self._holds[kind] = asyncio.Event()
        return self._holds[kind]

    def answer(self, kind: type[Message], response: Message) -> None:
        self._answers[kind] = response

    def steps(self) -> list[tuple[str, str]]:
        """(host, request type) of every call, in order."""
        return [(c.host, type(c.request).__name__) for c in self.calls]

    async def call(self, host: str, target: str, request: AgentCall[R], *, limit_s: float = 120) -> R:
        body = request.body()  # through JSON and back, as the agent would read it
        if body is not None:
            request = type(request).model_validate(json.loads(json.dumps(body)))
        self.calls.append(Call(host, target, request))
        hold = self._holds.get(type(request))
        if hold is not None:
            await hold.wait()
        failures = self._failures.get(type(request))
        if failures:
            raise failures.pop(0)
        response = self._answers.get(type(request)) or _healthy(request)
        return request.response_type().model_validate(json.loads(response.model_dump_json()))


def _healthy(request: Message) -> Message:
    """What a healthy agent answers."""
    receipt = Receipt(
        path="/var/lib/ferryman/vms/x/disk0.qcow2",
        bytes=1 << 20,
        mode="zero",
        duration_s=0.01,
        verified_samples=4,
        sample_hash="0" * 64,
        started_at="2026-11-23T12:00:00+00:00",
        finished_at="2026-11-23T12:00:01+00:00",
    )
    answers: dict[type[Message], Message] = {
        w.TakeSnapshot: w.Snapshotted(
            snapshots="disk0-pre.qcow2",
            pruned=0,
            disk_paths="/var/lib/ferryman/vms/x/disk0.qcow2",
            dirty_kib_per_s=256,
            record_interval_ms=1000,
            resident_mib=0,
        ),
        w.Prepare: w.Prepared(address="127.0.0.3", migration_port=40001, nbd_port=40002),
        w.RunHooks: w.HooksRun(vetoed=False, summary="0 hook(s) passed", results=[]),
        w.StartMirror: w.Mirrored(mirrored_bytes=64 << 20),
        w.StartTransfer: w.TransferStarted(status="active"),
        w.ReadProgress: w.Progress(
            status="completed",
            transferred_bytes=128 << 20,
            remaining_bytes=0,
            total_bytes=128 << 20,
            rate_bytes_per_s=200e6,
            dirty_pages_rate=0,
            mirror_offset=64 << 20,
            mirror_length=64 << 20,
        ),
        w.SwitchOver: w.SwitchedOver(transferred_bytes=128 << 20, downtime_ms=120, total_ms=900),
        w.CheckDestination: w.DestinationCheck(ok=True, detail="incoming migration completed, guest paused"),
        w.Activate: w.Activated(generation=0, pid=4242, last_seq=10),
        w.Validate: w.Validation(ok=True, running=True, detail="running=True, vcpus advancing"),
        w.Scrub: w.Scrubbed(receipts=[receipt], at="2026-11-23T12:00:02+00:00"),
        w.Close: w.Closed(closed=True),
        w.ResumeSource: w.SourceResumed(run_state="running"),
    }
    return answers.get(type(request), Empty())


class FakeCredentials:
    """Signatures that are plain strings, and a disk key per copy for encrypted VMs."""

    def __init__(self) -> None:
        self.keys: dict[tuple[str, str, int], bytes] = {}
        self.destroyed: list[tuple[str, str, int]] = []

    async def ticket(self, record: MigrationRecord) -> str:
        return f"ticket:{record.id}:{record.source}->{record.destination}:g{record.generation}"

    async def lease(self, vm_id: str, host: str, generation: int) -> str:
        return f"lease:{vm_id}:{host}:g{generation}"

    async def crl(self) -> str:
        return "-----BEGIN X509 CRL-----\n-----END X509 CRL-----\n"

    async def disk_key(self, vm: VM, host: str, generation: int) -> bytes | None:
        return self.keys.setdefault((vm.id, host, generation), bytes(32)) if vm.encrypted else None

    async def destination_key(self, vm: VM, record: MigrationRecord, *, make: bool) -> bytes | None:
        copy = (vm.id, record.destination, record.generation + 1)
        if not vm.encrypted:
            return None
        if not make and copy not in self.keys:
            raise errors.NotFound(f"no key for {copy}")
        return self.keys.setdefault(copy, bytes([1]) * 32)

    async def destroy_keys(self, vm: VM, reason: str, *, host: str, generation: int) -> list[str]:
        copy = (vm.id, host, generation)
        if not vm.encrypted or copy not in self.keys:
            return []
        del self.keys[copy]
        self.destroyed.append(copy)
        return [f"{host}:g{generation}"]


@dataclass
class FakeInventory:
    committed_vms: list[str] = field(default_factory=list)
    receipts: list[tuple[str, str, Receipt]] = field(default_factory=list)

    async def committed(self, vm: VM) -> None:
        self.committed_vms.append(vm.id)

    async def store_receipts(self, host: str, receipts: Sequence[Receipt], migration_id: str) -> list[dict[str, Any]]:
        self.receipts += [(host, migration_id, r) for r in receipts]
        return [r.model_dump(include={"path", "bytes"}) for r in receipts]


@dataclass
class FakeImages:
    """Registry images by VM image name; ``revoked`` names fail as the registry would; ``sent`` records which host
    was given which image, in order."""

    refs: dict[str, ImageRef] = field(default_factory=dict)
    revoked: set[str] = field(default_factory=set)
    sent: list[tuple[str, str]] = field(default_factory=list)

    async def ref(self, vm: VM) -> ImageRef | None:
        if vm.image in self.revoked:
            raise errors.Forbidden(f"image {vm.image} was revoked")
        return self.refs.get(vm.image)

    async def ensure_on(self, host: str, ref: ImageRef) -> None:
        self.sent.append((host, ref.name))


@dataclass(frozen=True)
class AuditEvent:
    kind: str
    message: str
    principal: str
    severity: Severity
    data: dict[str, Any]


class FakeAudit:
    def __init__(self) -> None:
        self.events: list[AuditEvent] = []

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
    ) -> AuditEvent:
        event = AuditEvent(kind, message, principal, severity, {"vm": vm, "host": host, **data})
        self.events.append(event)
        return event

    def kinds(self) -> list[str]:
        return [e.kind for e in self.events]


class FakeRunnerClock:
    """Time that moves only when the runner sleeps (each sleep is recorded, then yields to the loop once)."""

    def __init__(self, clock: FakeClock | None = None) -> None:
        self.clock = clock or FakeClock()
        self.elapsed = 0.0
        self.sleeps: list[float] = []

    def now(self) -> dt.datetime:
        return self.clock.now()

    def monotonic(self) -> float:
        return self.elapsed

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.elapsed += seconds
        self.clock.advance(seconds)
        await asyncio.sleep(0)
