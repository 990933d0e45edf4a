"""Migrations as the controller offers them: admission, drains, cancels, and the adapters the runner talks through.

A request passes the checks of the fleet (running VM, reachable destination with room), the placement policies
and the anti-thrashing governor; refusals are journal rows and audit events with the principal who asked. An admitted
migration is handed to :class:`ferryman.migration.runner.MigrationRunner`, which drives the protocol through the ports
of :mod:`ferryman.migration.ports`; this module supplies their adapters over the CMDB, the CA, the disk keys and
the mTLS agent client. On controller start :meth:`MigrationService.recover` lets the runner resume every unfinished
migration from the journal.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import random
import uuid
from collections.abc import Sequence
from typing import Any

from ferryman.cmdb.journal import MigrationRecord
from ferryman.cmdb.repository import Repository
from ferryman.controller import failpoints
from ferryman.controller.agent_client import HttpAgentClient
from ferryman.controller.fleet import Change, Fleet
from ferryman.controller.keys import Copy
from ferryman.controller.offload import blocking
from ferryman.controller.settings import PlainScrubMode
from ferryman.controller.spent import point_of_no_return
from ferryman.core import errors
from ferryman.core.clock import Clock
from ferryman.core.models import VM, Event, Host, HostState, ImageRef, NicSpec, Placement, Severity, VMState
from ferryman.migration import machine as m
from ferryman.migration.runner import MigrationRunner, RunnerSettings
from ferryman.migration.states import Phase
from ferryman.pki.tickets import issue_lease, issue_ticket
from ferryman.scheduler.governor import Active, Attempt, Governor, GovernorSettings, MigrationRequest
from ferryman.wire.base import AgentCall, R
from ferryman.wire.network import NicState
from ferryman.wire.vms import Receipt

ACTIVE_STATES = {VMState.RUNNING}


class MigrationService:
    def __init__(
        self,
        fleet: Fleet,
        agents: HttpAgentClient,
        settings: GovernorSettings | None = None,
        scrub_mode: PlainScrubMode = "zero",  # for plain VMs; an encrypted VM's copies are always crypto-erased
    ) -> None:
        self.fleet = fleet
        self.repo = fleet.repo
        self.governor = Governor(settings or GovernorSettings(), random.Random().random)
        self.runner = MigrationRunner(
            journal=ThreadedJournal(fleet.repo),
            agents=HostAgents(fleet.repo, agents),
            credentials=FleetCredentials(fleet),
            inventory=FleetInventory(fleet),
            audit=ThreadedAudit(fleet),
            clock=LoopClock(fleet.clock),
            governor=self.governor,
            settings=RunnerSettings(scrub_mode=scrub_mode),
            pause=failpoints.maybe_pause,
            images=FleetImages(fleet),
            networks=FleetNetworks(fleet),
        )

    @property
    def progress(self) -> dict[str, dict[str, Any]]:
        """The RAM stream's latest progress of each running migration (for the CLI's progress display)."""
        return self.runner.progress

    # -- requests --------------------------------------------------------------------------------------------------

    def _history(self) -> tuple[list[Active], list[Attempt]]:
        active, history = [], []
        for r in self.repo.list_migrations(limit=1000):
            if r.outcome is None:
                active.append(Active(r.vm_id, r.source, r.destination, r.principal, r.requested_at))
                continue
            disrupted = bool(r.data.get("machine", {}).get("disrupted"))
            outcome = {"done": "done", "refused": "refused", "stuck": "disrupted"}.get(
                r.outcome, "disrupted" if disrupted else "rolled_back"
            )
            end = r.finished_at or r.updated_at
            history.append(Attempt(r.vm_id, r.source, r.destination, r.principal, r.requested_at, outcome, end))  # type: ignore[arg-type]
        return active, history

    def _check_request(self, vm: VM, to: str, *, force: bool = False) -> tuple[Host, Host]:
        if vm.state not in ACTIVE_STATES:
            raise errors.Conflict(f"{vm.name} is {vm.state.value}: only a running VM can be live-migrated")
        placement = self.repo.current_placement(vm.id)
        if placement is None:
            raise errors.Conflict(f"{vm.name} has no placement")
        source, destination = self.repo.get_host(placement.host), self.repo.get_host(to)
        if source.name == destination.name:
            raise errors.InvalidInput(f"{vm.name} already runs on {to}")
        if destination.state is not HostState.ENROLLED or not self.fleet.reconciler.is_fresh(destination.name):
            raise errors.Conflict(f"destination {to} is not enrolled and reporting")
        if destination.role != "compute" and not force:  # a quarantine host keeps its room for incidents
            raise errors.Conflict(f"{to} has role {destination.role}: it takes no normal placements (--force, audited)")
        if not destination.underlay and self.repo.nics_of(vm.id):
            raise errors.Conflict(f"{to} has no overlay endpoint (underlay): {vm.name}'s NICs cannot follow it there")
        usage = {u.host.name: u for u in self.fleet.host_usage()}[to]
        if usage.host.memory_mb - usage.memory_used_mb < vm.memory_mb:
            raise errors.CapacityError(f"host {to} is full: {usage.host.memory_mb - usage.memory_used_mb} MiB free")
        return source, destination

    async def request(
        self,
        vm_name: str,
        to: str,
        *,
        shared_storage: bool,
        principal: str,
        bandwidth_mib_s: int | None = None,
        force: bool = False,
        role: str = "admin",
        automatic: bool = False,
    ) -> MigrationRecord:
        """Admit a migration (policies, then the governor) and start it; ``automatic``: a remediation plan's move,
        which a VM's policies may forbid (``auto_balance: false``). An operator's drain is not automatic."""
        record, state = await blocking(
            self._admit,
            vm_name,
            to,
            shared_storage=shared_storage,
            principal=principal,
            bandwidth_mib_s=bandwidth_mib_s,
            force=force,
            role=role,
            automatic=automatic,
        )
        point_of_no_return()  # the migration is recorded: a --force approval stays used
        self.runner.start(record.id, state, m.Start())
        return record

    def _admit(
        self,
        vm_name: str,
        to: str,
        *,
        shared_storage: bool,
        principal: str,
        bandwidth_mib_s: int | None,
        force: bool,
        role: str,
        automatic: bool,
    ) -> tuple[MigrationRecord, m.MigrationState]:
        """The admission, in a worker thread: one request at a time is judged against the fleet, the policies and
        the governor and recorded, like creations choosing hosts (:attr:`Fleet.placing`), so two requests racing
        for one host or one slot are judged one after the other."""
        # a VM whose image may not be used now (revoked, untrusted, altered) stays put; checked before the placement
        # lock, since it hashes the image's files
        self.fleet.image_ref(self.fleet.get_vm(vm_name)[0])
        with self.fleet.placing:
            vm, _ = self.fleet.get_vm(vm_name)
            source, destination = self._check_request(vm, to, force=force)
            if self.fleet.admission is not None:
                self.fleet.admission.admit_migration(
                    vm, destination.name, force=force, role=role, principal=principal, automatic=automatic
                )
            now = self.fleet.clock.now()
            active, history = self._history()
            ask = MigrationRequest(vm.id, source.name, destination.name, principal)
            decision = self.governor.decide(ask, now=now, active=active, history=history)
            mid = str(uuid.uuid4())
            state = m.initial(mid, vm.id, source.name, destination.name, shared_storage)
            record = MigrationRecord(
                id=mid,
                vm_id=vm.id,
                source=source.name,
                destination=destination.name,
                shared_storage=shared_storage,
                phase=Phase.REQUESTED.value,
                principal=principal,
                generation=vm.generation,
                requested_at=now,
                updated_at=now,
                data={"machine": state.to_record(), "bandwidth_mib_s": bandwidth_mib_s},
            )
            if not decision.allowed:
                refused = dataclasses.replace(
                    record,
                    phase=Phase.REFUSED.value,
                    outcome="refused",
                    finished_at=now,
                    error="; ".join(decision.reasons),
                )
                self.repo.add_migration(refused)
                for alert in decision.alerts:
                    self.fleet.audit("security.thrashing", alert.message, principal, vm=vm.id, severity=Severity.ALARM)
                self.fleet.audit(
                    "migration.refused",
                    f"{vm.name} → {to} refused: {refused.error}",
                    principal,
                    vm=vm.id,
                    host=source.name,
                    severity=Severity.WARNING,
                    migration=mid,
                )
                retry = f" (retry in {decision.retry_after_s:.0f}s)" if decision.retry_after_s else ""
                raise errors.Conflict(f"migration refused: {refused.error}{retry}")
            record = self.repo.add_migration(record)
            self.fleet.audit(
                "migration.requested",
                f"{vm.name} {source.name} → {destination.name}",
                principal,
                vm=vm.id,
                host=source.name,
                migration=mid,
                shared_storage=shared_storage,
            )
            return record, state

    async def wait_finished(self, mid: str, limit_s: float = 1800.0) -> None:
        """Wait (bounded) until the runner of ``mid`` has stopped."""
        await self.runner.wait(mid, limit_s)

    async def cancel(self, mid: str, principal: str) -> MigrationRecord:
        record = await blocking(self._record_cancel, mid, principal)
        self.runner.cancel(mid)
        return record

    def _record_cancel(self, mid: str, principal: str) -> MigrationRecord:
        record = self.repo.request_cancel(mid, self.fleet.clock.now())
        self.fleet.audit(
            "migration.cancel_requested", f"cancel of migration {mid}", principal, vm=record.vm_id, migration=mid
        )
        return record

    async def drain(self, host: str, principal: str) -> tuple[list[MigrationRecord], list[str]]:
        """Move every running VM off ``host``: each to the reachable host with the most free memory, within the
        governor's limits; what cannot start now is reported, not retried in a loop."""
        admitted, refused = await blocking(self._plan_drain, host, principal)
        for record, state in admitted:
            self.runner.start(record.id, state, m.Start())
        return [record for record, _ in admitted], refused

    def _plan_drain(
        self, host: str, principal: str
    ) -> tuple[list[tuple[MigrationRecord, m.MigrationState]], list[str]]:
        """Admit a migration for each running VM of ``host`` (in a worker thread)."""
        self.repo.get_host(host)
        started: list[tuple[MigrationRecord, m.MigrationState]] = []
        refused: list[str] = []
        planned: dict[str, str] = {}  # VM id -> destination of the migrations this drain started
        for placement in self.repo.placements_on(host):
            vm = self.repo.get_vm(placement.vm_id)
            if vm.state is not VMState.RUNNING:
                refused.append(f"{vm.name}: {vm.state.value}, not running")
                continue
            targets = [
                u.host.name
                for u in sorted(
                    (
                        u
                        for u in self.fleet.host_usage()
                        if u.host.name != host
                        and u.reachable
                        and u.host.role == "compute"
                        and u.host.memory_mb - u.memory_used_mb >= vm.memory_mb
                    ),
                    key=lambda u: (u.memory_used_mb - u.host.memory_mb, u.host.name),
                )
            ]
            if not targets:
                refused.append(f"{vm.name}: no other host has {vm.memory_mb} MiB free")
                continue
            admission = self.fleet.admission
            target = admission.migration_target(vm, targets, planned) if admission else targets[0]
            if target is None:
                refused.append(f"{vm.name}: no other host is allowed by its placement policies")
                continue
            try:
                started.append(
                    self._admit(
                        vm.name,
                        target,
                        shared_storage=False,
                        principal=principal,
                        bandwidth_mib_s=None,
                        force=False,
                        role="admin",
                        automatic=False,
                    )
                )
                planned[vm.id] = target
            except errors.FerrymanError as err:
                refused.append(f"{vm.name}: {err}")
        self.fleet.audit(
            "host.drain", f"drain of {host}: {len(started)} started, {len(refused)} not", principal, host=host
        )
        return started, refused

    async def recover(self) -> None:
        """At start: every unfinished migration continues under a Recover event (roll back or roll forward)."""
        await self.runner.recover()

    async def close(self) -> None:
        await self.runner.close()


class ThreadedJournal:
    """The runner's :class:`~ferryman.migration.ports.Journal` port: the CMDB, each transaction in a worker thread."""

    def __init__(self, repo: Repository) -> None:
        self._repo = repo

    async def get_migration(self, migration_id: str) -> MigrationRecord:
        return await blocking(self._repo.get_migration, migration_id)

    async def list_migrations(
        self, *, vm_id: str | None = None, active_only: bool = False, limit: int = 200
    ) -> list[MigrationRecord]:
        return await blocking(self._repo.list_migrations, vm_id=vm_id, active_only=active_only, limit=limit)

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
        return await blocking(
            self._repo.advance_migration,
            migration_id,
            phase,
            at,
            expected_phase=expected_phase,
            outcome=outcome,
            error=error,
            bytes_transferred=bytes_transferred,
            downtime_ms=downtime_ms,
            data=data,
            step_data=step_data,
            event=event,
        )

    async def commit_migration(
        self, migration_id: str, at: dt.datetime, *, data: dict[str, Any] | None = None
    ) -> tuple[MigrationRecord, VM, Placement]:
        return await blocking(self._repo.commit_migration, migration_id, at, data=data)

    async def get_vm(self, name_or_id: str) -> VM:
        return await blocking(self._repo.get_vm, name_or_id)


class ThreadedAudit:
    """The runner's :class:`~ferryman.migration.ports.Audit` port: the fleet's audit trail, written in a worker
    thread."""

    def __init__(self, fleet: Fleet) -> None:
        self._fleet = fleet

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
    ) -> object:
        return await blocking(self._fleet.audit, kind, message, principal, vm=vm, host=host, severity=severity, **data)


class HostAgents:
    """The runner's :class:`~ferryman.migration.ports.Agents` port: host names to the mTLS agent client.

    A host's row (address, port) is read from the CMDB at most once per ``fresh_s`` per host: a migration calls its
    two hosts a dozen times in a few seconds, and a re-enrolled host's new address is seen within ``fresh_s``."""

    def __init__(self, repo: Repository, client: HttpAgentClient, *, fresh_s: float = 5.0) -> None:
        self._repo = repo
        self._client = client
        self._fresh_s = fresh_s
        self._hosts: dict[str, tuple[float, Host]] = {}

    async def call(self, host: str, target: str, request: AgentCall[R], *, limit_s: float = 120) -> R:
        return await self._client.call(await self._host(host), target, request, limit_s=limit_s)

    async def _host(self, name: str) -> Host:
        now = asyncio.get_running_loop().time()
        cached = self._hosts.get(name)
        if cached is not None and now - cached[0] < self._fresh_s:
            return cached[1]
        host = await blocking(self._repo.get_host, name)
        self._hosts[name] = (now, host)
        return host


class FleetCredentials:
    """The runner's :class:`~ferryman.migration.ports.Credentials` port: the controller's CA and disk keys."""

    def __init__(self, fleet: Fleet) -> None:
        self._fleet = fleet

    async def ticket(self, record: MigrationRecord) -> str:
        return await blocking(self._ticket, record)

    def _ticket(self, record: MigrationRecord) -> str:
        _, token = issue_ticket(
            self._fleet.ca,
            migration_id=record.id,
            vm_id=record.vm_id,
            source=record.source,
            destination=record.destination,
            generation=record.generation,
            shared_storage=record.shared_storage,
        )
        return token

    async def lease(self, vm_id: str, host: str, generation: int) -> str:
        return (await blocking(issue_lease, self._fleet.ca, vm_id=vm_id, host=host, generation=generation))[1]

    async def crl(self) -> str:
        return await blocking(self._crl)

    def _crl(self) -> str:
        revoked = [(c.serial, c.revoked_at) for c in self._fleet.repo.list_certificates() if c.revoked_at is not None]
        return self._fleet.ca.issue_crl(revoked).decode()

    async def disk_key(self, vm: VM, host: str, generation: int) -> bytes | None:
        return await blocking(self._fleet.disk_key, vm, host, generation)

    async def destination_key(self, vm: VM, record: MigrationRecord, *, make: bool) -> bytes | None:
        return await blocking(self._destination_key, vm, record, make=make)

    def _destination_key(self, vm: VM, record: MigrationRecord, *, make: bool) -> bytes | None:
        """A key of its own for new images, or the source's for shared storage, where both copies open the same
        images; made and stored on first use (preparation), only read later (NotFound if it is gone)."""
        if not vm.encrypted:
            return None
        keys = self._fleet.keys
        if keys is None:
            raise errors.InvalidInput(f"{vm.name} is encrypted but this controller keeps no disk keys")
        target = Copy(vm.id, record.destination, record.generation + 1)
        if not make:
            return keys.get(target)
        if record.shared_storage:
            return keys.share(Copy(vm.id, record.source, record.generation), target)
        return keys.ensure(target)

    async def destroy_keys(self, vm: VM, reason: str, *, host: str, generation: int) -> list[str]:
        return await blocking(self._fleet.destroy_keys, vm, reason, host=host, generation=generation)


class FleetInventory:
    """The runner's :class:`~ferryman.migration.ports.Inventory` port."""

    def __init__(self, fleet: Fleet) -> None:
        self._fleet = fleet

    async def committed(self, vm: VM) -> None:
        self._fleet.reconciler.note_change(vm.id)  # the reconciler lives on the loop
        await blocking(self._moved, vm)

    def _moved(self, vm: VM) -> None:
        placement = self._fleet.repo.current_placement(vm.id)
        if self._fleet.networks is not None and placement is not None:
            self._fleet.networks.moved(vm.id, placement.host)
        self._fleet.changed(Change(vm_id=vm.id))

    async def store_receipts(self, host: str, receipts: Sequence[Receipt], migration_id: str) -> list[dict[str, Any]]:
        return await blocking(self._fleet.store_scrub_receipts, host, receipts, migration_id)


class FleetImages:
    """The runner's :class:`~ferryman.migration.ports.Images` port: the fleet's image registry (none: every VM boots
    from its host's own boot image)."""

    def __init__(self, fleet: Fleet) -> None:
        self._fleet = fleet

    async def ref(self, vm: VM) -> ImageRef | None:
        return await blocking(self._fleet.image_ref, vm)

    async def ensure_on(self, host: str, ref: ImageRef) -> None:
        registry = self._fleet.images
        if registry is not None:
            await registry.ensure_on(await blocking(self._fleet.repo.get_host, host), ref)


class FleetNetworks:
    """The runner's :class:`~ferryman.migration.ports.Networks` port: the fleet's network service (none: no VM has
    NICs)."""

    def __init__(self, fleet: Fleet) -> None:
        self._fleet = fleet

    async def nics(self, vm: VM, host: str) -> tuple[NicSpec, ...]:
        networks = self._fleet.networks
        return await blocking(networks.specs, vm.id, host) if networks is not None else ()

    async def verified(self, vm: VM, host: str, applied: Sequence[NicState]) -> str:
        networks = self._fleet.networks
        if networks is None:
            return ""
        return await blocking(networks.check_applied, vm.id, host, applied, record_host=False)


class LoopClock:
    """The runner's :class:`~ferryman.migration.ports.Clock`: the fleet's wall clock, the event loop's time."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock

    def now(self) -> dt.datetime:
        return self._clock.now()

    def monotonic(self) -> float:
        return asyncio.get_running_loop().time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
