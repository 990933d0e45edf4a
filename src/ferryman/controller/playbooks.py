"""Playbooks: what happens to a new incident by its severity (:mod:`ferryman.incidents.playbooks`), run step by step.

A run is planned when its incident opens (the steps of the playbook version in force, for the incident's severity)
and persisted; before each step its number is persisted as the next to do, after it the next one, so a controller
killed in the middle resumes the step it was in (every step is safe to run again: a capture takes another capture,
an isolation or a pause that holds already changes nothing, a quarantine of a VM on its quarantine host is done).
One run per incident, one step at a time; a step is tried :data:`ATTEMPTS` times with a growing pause, then the run
fails with an alarm. Every step is in the incident's timeline with its time and the principal ``playbook``.

Quarantine moves the VM through the secure migration path to a host whose role is the playbook's
``quarantine_role``; such hosts take no normal placements, and :func:`quarantine_capacity` reports whether the reserve
of simultaneous quarantines the playbook asks for still fits.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

import structlog

from ferryman.cmdb.incidents import IncidentRecord, PlaybookRun
from ferryman.controller.incidents import IncidentService
from ferryman.controller.migrations import MigrationService
from ferryman.controller.network_routes import isolate_vm
from ferryman.controller.networks import NetworkService
from ferryman.controller.offload import blocking
from ferryman.core import errors
from ferryman.core.models import HostState, Severity, VMAction, VMState
from ferryman.incidents.alerts import IncidentSeverity
from ferryman.incidents.playbooks import DEFAULT_PLAYBOOK, Playbook, Step, StepKind, parse_playbook

log = structlog.get_logger(__name__)

PRINCIPAL = "playbook"
ATTEMPTS = 3
RETRY_PAUSE_S = 2.0
MIGRATION_WITHIN_S = 1800.0


@dataclass(frozen=True)
class Capacity:
    role: str
    hosts: list[dict[str, Any]]  # name, memory, used, free
    reserve: int  # quarantines that must fit at once
    largest_vm_mb: int
    needed_mb: int
    headroom_mb: int  # free on the quarantine hosts minus what the reserve needs (negative: the reserve is broken)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class PlaybookRunner:
    def __init__(self, incidents: IncidentService, migrations: MigrationService, networks: NetworkService) -> None:
        self.incidents = incidents
        self.fleet = incidents.fleet
        self.repo = incidents.repo
        self.migrations = migrations
        self.networks = networks
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- the playbook in force ---------------------------------------------------------------------------------------

    def playbook(self) -> Playbook:
        current = self.repo.current_playbook()
        return DEFAULT_PLAYBOOK if current is None else parse_playbook(current.text, f"playbook v{current.version}")

    def apply(self, text: str, filename: str, principal: str) -> dict[str, Any]:
        """Check and store a new playbook version (the running runs keep the steps they planned)."""
        playbook = parse_playbook(text, filename)
        version = self.repo.add_playbook_version(playbook.digest, text, self.fleet.clock.now(), principal)
        self.fleet.audit(
            "playbook.applied", f"playbook {playbook.name} v{version.version} ({playbook.digest[:19]})", principal
        )
        return {"version": version.version, "digest": playbook.digest, "name": playbook.name}

    # -- runs --------------------------------------------------------------------------------------------------------

    def plan(self, incident: IncidentRecord) -> PlaybookRun:
        """Persist the run of a new incident (its existing run if it has one)."""
        playbook = self.playbook()
        steps = [_document(step) for step in playbook.steps_for(IncidentSeverity(incident.severity))]
        now = self.fleet.clock.now()
        run, new = self.repo.start_playbook_run(
            PlaybookRun(incident.id, playbook.digest, steps, 0, 0, "running", now, now)
        )
        if new:
            kinds = ", ".join(_kind(s) for s in steps)
            self.incidents.note(incident, PRINCIPAL, "playbook.planned", f"{playbook.name}: {kinds}", steps=steps)
        return run

    def notify(self, incident_id: int) -> None:
        """A new incident opened (from any thread): plan and start its run on the loop."""
        if self._loop is None:
            log.warning(
                "no event loop yet: the playbook of this incident starts at the next recovery", incident=incident_id
            )
            return
        self._loop.call_soon_threadsafe(lambda: self._spawn(self.trigger(incident_id)))

    def _spawn(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        task.add_done_callback(_log_failure)

    async def trigger(self, incident_id: int) -> None:
        """Plan the incident's run (persisted) and start it, unless it runs already."""
        incident = await blocking(self.repo.get_incident, incident_id)
        await blocking(self.plan, incident)
        self._start(incident_id)

    def _start(self, incident_id: int) -> None:
        task = self._tasks.get(incident_id)
        if task is not None and not task.done():
            return
        self._tasks[incident_id] = asyncio.create_task(self._run(incident_id), name=f"playbook-{incident_id}")

    async def recover(self) -> int:
        """Resume every run a previous controller left running (and, from now on, start new ones)."""
        self._loop = asyncio.get_running_loop()
        runs = await blocking(self.repo.running_playbook_runs)
        for run in runs:
            incident = await blocking(self.repo.get_incident, run.incident_id)
            await blocking(
                self.incidents.note, incident, PRINCIPAL, "playbook.resumed", f"resumed at step {run.next_step + 1}"
            )
            self._start(run.incident_id)
        return len(runs)

    async def close(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        for task in self._tasks.values():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _run(self, incident_id: int) -> None:
        while True:
            run = await blocking(self.repo.get_playbook_run, incident_id)
            if run is None or run.state != "running":
                return
            if run.next_step >= len(run.steps):
                await blocking(self._finish, run, "done", None)
                return
            step = run.steps[run.next_step]
            incident = await blocking(self.repo.get_incident, incident_id)
            attempt = run.attempts + 1
            now = self.fleet.clock.now()
            # persisted before the side effect: a restart resumes this step, counting this attempt
            await blocking(self.repo.update_playbook_run, incident_id, attempts=attempt, updated_at=now)
            try:
                summary = await self._step(incident, step)
            except errors.FerrymanError as err:
                await blocking(
                    self.incidents.note,
                    incident,
                    PRINCIPAL,
                    "playbook.step_failed",
                    f"{_kind(step)} (attempt {attempt} of {ATTEMPTS}): {err}",
                )
                if attempt >= ATTEMPTS:
                    await blocking(self._finish, run, "failed", f"{_kind(step)}: {err}")
                    return
                await asyncio.sleep(RETRY_PAUSE_S * attempt)
                continue
            await blocking(self.incidents.note, incident, PRINCIPAL, f"playbook.{_kind(step)}", summary)
            await blocking(
                self.repo.update_playbook_run,
                incident_id,
                next_step=run.next_step + 1,
                attempts=0,
                updated_at=self.fleet.clock.now(),
            )

    def _finish(self, run: PlaybookRun, state: str, error: str | None) -> None:
        self.repo.update_playbook_run(run.incident_id, state=state, error=error, updated_at=self.fleet.clock.now())
        incident = self.repo.get_incident(run.incident_id)
        if state == "done":
            self.incidents.note(incident, PRINCIPAL, "playbook.done", f"{len(run.steps)} step(s) done")
            return
        self.incidents.note(incident, PRINCIPAL, "playbook.failed", f"stopped: {error}")
        self.fleet.audit(
            "alarm.playbook_failed",
            f"incident {incident.id}: its playbook stopped: {error}",
            PRINCIPAL,
            vm=incident.vm_id,
            host=incident.host,
            severity=Severity.ALARM,
            incident=incident.id,
        )

    # -- steps -------------------------------------------------------------------------------------------------------

    async def _step(self, incident: IncidentRecord, step: dict[str, Any]) -> str:
        kind = StepKind(_kind(step))
        if kind is StepKind.RECORD:
            return "recorded"
        if kind is StepKind.IMPACT:
            report = await blocking(self.incidents.impact, incident.id, None, PRINCIPAL)
            return f"impact analysed ({len(report.get('co_residents', []))} co-residence(s))"
        if incident.vm_id is None:
            return f"{kind.value}: not applicable to a host incident"
        vm = await blocking(self.repo.get_vm, incident.vm_id)
        if vm.state is VMState.DELETED:
            return f"{kind.value}: {vm.name} is deleted"
        if kind is StepKind.CAPTURE:
            options = step.get("capture") or {}
            out = await self.incidents.capture(
                incident.id, PRINCIPAL, memory=bool(options.get("memory", True)), disks=bool(options.get("disks", True))
            )
            return f"captured {out['capture']}"
        if kind is StepKind.ISOLATE:
            if not await blocking(self.repo.nics_of, vm.id):
                return f"{vm.name} has no NICs: nothing to isolate"
            out = await isolate_vm(self.fleet, self.networks, vm.name, True, PRINCIPAL)
            return f"{vm.name} isolated on {out['host']}"
        if kind is StepKind.PAUSE:
            if vm.state is VMState.PAUSED:
                return f"{vm.name} is paused already"
            await self.fleet.vm_action(vm.name, VMAction.PAUSE, PRINCIPAL)
            return f"{vm.name} paused"
        return await self._quarantine(incident, vm.name)

    async def _quarantine(self, incident: IncidentRecord, vm_name: str) -> str:
        playbook = await blocking(self.playbook)
        vm, placement = await blocking(self.fleet.get_vm, vm_name)
        here = await blocking(self.repo.get_host, placement.host) if placement else None
        if here is not None and here.role == playbook.quarantine_role:
            return f"{vm_name} is on quarantine host {here.name}"
        capacity = await blocking(quarantine_capacity, self.incidents, playbook.quarantine_role, playbook.reserve)
        target = next((h for h in capacity.hosts if h["free_mb"] >= vm.memory_mb and h["reachable"]), None)
        if target is None:
            raise errors.CapacityError(
                f"no reachable {playbook.quarantine_role} host has {vm.memory_mb} MiB free for {vm_name}"
            )
        if capacity.headroom_mb - vm.memory_mb < 0:
            await blocking(
                self.incidents.note,
                incident,
                PRINCIPAL,
                "capacity",
                f"quarantining {vm_name} takes the reserve: {capacity.headroom_mb} MiB of headroom before it",
            )
        active = await blocking(self.repo.list_migrations, active_only=True)
        record = next((m for m in active if m.vm_id == vm.id), None)
        if record is None:  # through the secure migration path; against placement policies (a security override)
            record = await self.migrations.request(
                vm_name, target["name"], shared_storage=False, principal=PRINCIPAL, force=True, role="admin"
            )
        outcome = await self._outcome(record.id)
        if outcome != "done":
            raise errors.Conflict(f"the quarantine migration of {vm_name} ended {outcome}")
        return f"{vm_name} quarantined on {record.destination} (migration {record.id[:8]})"

    def reserve_without(self, host_name: str) -> str | None:
        """What taking ``host_name`` out (a drain) does to the quarantine reserve: a warning if it breaks it."""
        playbook = self.playbook()
        capacity = quarantine_capacity(self.incidents, playbook.quarantine_role, playbook.reserve)
        lost = next((h for h in capacity.hosts if h["name"] == host_name), None)
        if lost is None:
            return None
        left = capacity.headroom_mb - lost["free_mb"]
        if left >= 0:
            return None
        return (
            f"draining {host_name} breaks the quarantine reserve: {playbook.reserve} quarantine(s) of "
            f"{capacity.largest_vm_mb} MiB no longer fit on the other {playbook.quarantine_role} hosts "
            f"({left} MiB of headroom)"
        )

    async def _outcome(self, migration_id: str) -> str:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + MIGRATION_WITHIN_S
        while loop.time() < deadline:
            record = await blocking(self.repo.get_migration, migration_id)
            if record.outcome is not None:
                return record.outcome
            await asyncio.sleep(1.0)
        raise errors.TransientError(f"migration {migration_id[:8]} has not ended in {MIGRATION_WITHIN_S:.0f}s")


def _log_failure(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("playbook task failed", error=str(task.exception()))


def quarantine_capacity(incidents: IncidentService, role: str, reserve: int) -> Capacity:
    """Free memory on the quarantine hosts against ``reserve`` quarantines of the largest live VM."""
    fleet = incidents.fleet
    hosts: list[dict[str, Any]] = []
    for usage in fleet.host_usage():
        if usage.host.role != role or usage.host.state is not HostState.ENROLLED:
            continue
        hosts.append(
            {
                "name": usage.host.name,
                "memory_mb": usage.host.memory_mb,
                "used_mb": usage.memory_used_mb,
                "free_mb": usage.host.memory_mb - usage.memory_used_mb,
                "reachable": usage.reachable,
            }
        )
    hosts.sort(key=lambda h: (-h["free_mb"], h["name"]))
    live = [vm.memory_mb for vm in fleet.repo.list_vms() if vm.state is not VMState.DELETED]
    largest = max(live, default=0)
    needed = reserve * largest
    free = sum(h["free_mb"] for h in hosts)
    return Capacity(role, hosts, reserve, largest, needed, free - needed)


def _document(step: Step) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": step.kind.value}
    if step.capture is not None:
        out["capture"] = {"memory": step.capture.memory, "disks": step.capture.disks}
    return out


def _kind(step: dict[str, Any]) -> str:
    return str(step["kind"])


COMPROMISED_ROLE = "compromised"
EVACUATION_WITHIN_S = 1800.0


class HostCompromise:
    """``host compromise``: an incident for the host, every VM that ran there since T (the impact), the host taken
    out of placement, its VMs evacuated through the secure migration path, then its certificates revoked (only then:
    the evacuation needs the host's agent)."""

    def __init__(self, runner: PlaybookRunner) -> None:
        self.runner = runner
        self.incidents = runner.incidents
        self.fleet = runner.fleet
        self.repo = runner.repo

    async def start(self, host: str, since: Any, principal: str) -> dict[str, Any]:
        record, _ = await blocking(
            self.incidents.open,
            vm=None,
            host=host,
            severity="critical",
            summary=f"host {host} compromised (since {since:%Y-%m-%d %H:%M}Z)",
            principal=principal,
            playbook=False,
        )
        report = await blocking(self.incidents.impact, record.id, since, principal)
        residents = sorted({str(r["vm_name"]) for r in report.get("host_residents", [])})
        await blocking(
            self.incidents.note,
            record,
            principal,
            "compromise.impact",
            f"{len(residents)} VM(s) ran on {host} since {since:%Y-%m-%d %H:%M}Z: {', '.join(residents) or 'none'}",
            vms=residents,
        )
        await blocking(self.fleet.update_host, host, principal, role=COMPROMISED_ROLE)
        await blocking(self.incidents.note, record, principal, "compromise.quarantined", f"{host} takes no placements")
        started, refused = await self.runner.migrations.drain(host, principal)
        await blocking(
            self.incidents.note,
            record,
            principal,
            "compromise.evacuating",
            f"{len(started)} migration(s) started" + (f"; not started: {'; '.join(refused)}" if refused else ""),
            migrations=[m.id for m in started],
        )
        self.runner._spawn(self._finish(record.id, host, [m.id for m in started], principal))
        return {
            "incident": record.id,
            "host": host,
            "vms_since": residents,
            "migrations": [{"id": m.id, "vm": m.vm_id, "to": m.destination} for m in started],
            "not_started": refused,
        }

    async def _finish(self, incident_id: int, host: str, migrations: list[str], principal: str) -> None:
        record = await blocking(self.repo.get_incident, incident_id)
        outcomes = {}
        for mid in migrations:
            try:
                outcomes[mid[:8]] = await self.runner._outcome(mid)
            except errors.FerrymanError as err:
                outcomes[mid[:8]] = f"unknown ({err})"
        await blocking(
            self.incidents.note,
            record,
            principal,
            "compromise.evacuated",
            "migrations ended: " + (", ".join(f"{k} {v}" for k, v in outcomes.items()) or "none"),
        )
        revoked = await blocking(self.fleet.revoke_host, host, principal)
        await blocking(
            self.incidents.note,
            record,
            principal,
            "compromise.revoked",
            f"{len(revoked)} certificate(s) of {host} revoked: the controller refuses it from now on",
        )
