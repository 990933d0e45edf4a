"""Reconciliation: compare what agents report with what the CMDB says, and raise alarms for the difference.

The CMDB is never "fixed" from a report: a VM running where the CMDB does not place it, two copies of one VM, a VM the
CMDB does not know, or a VM missing from its host is an alarm, recorded in the event log and kept open until the
discrepancy disappears. :func:`discrepancies` is pure; :class:`Reconciler` keeps the latest report of each host and
writes alarms.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import structlog

from ferryman.cmdb.repository import Repository
from ferryman.controller.networks import network_findings
from ferryman.core.clock import Clock
from ferryman.core.models import VM, Event, RunState, Severity, VMRuntime, VMState
from ferryman.wire.network import NetworkReport

log = structlog.get_logger(__name__)

# discrepancies that are security relevant are alarmed at first sight; the others only once two distinct reports of the
# host, both received after the VM's last lifecycle change, show them, so that a report racing a change (an inventory
# taken just before a VM was created or stopped) does not raise a false alarm
IMMEDIATE = frozenset(
    {
        "vm.unexpected_copy",
        "vm.stale_copy",
        "vm.duplicate",
        "vm.unknown",
        "vm.deleted_but_running",
        "host.unreachable",
        "network.foreign_table",
    }
)
CONFIRMING_REPORTS = 2

_EXPECTED_RUN_STATE = {VMState.RUNNING: RunState.RUNNING, VMState.PAUSED: RunState.PAUSED}


@dataclass(frozen=True)
class Discrepancy:
    kind: str
    vm_id: str | None
    host: str | None
    message: str

    @property
    def key(self) -> tuple[str, str | None, str | None]:
        return (self.kind, self.vm_id, self.host)


@dataclass(frozen=True)
class HostReport:
    host: str
    received_at: dt.datetime
    vms: tuple[VMRuntime, ...]
    seq: int = 0


def discrepancies(
    vms: Mapping[str, VM], placed_on: Mapping[str, str], reports: Iterable[HostReport]
) -> list[Discrepancy]:
    """Every difference between the CMDB (``vms`` by id, ``placed_on`` vm id → host) and fresh host reports."""
    found: list[Discrepancy] = []
    reports = list(reports)
    reporting_hosts = {r.host for r in reports}
    seen: dict[str, list[str]] = {}
    for report in reports:
        for rt in report.vms:
            if rt.run_state is RunState.SHUTDOWN:
                continue
            seen.setdefault(rt.vm_id, []).append(report.host)
            found.extend(_check_runtime(vms.get(rt.vm_id), placed_on.get(rt.vm_id), report.host, rt))
    for vm_id, hosts in seen.items():
        if len(hosts) > 1:
            name = vms[vm_id].name if vm_id in vms else vm_id
            found.append(
                Discrepancy(
                    "vm.duplicate", vm_id, None, f"{name} runs {len(hosts)} times: on {', '.join(sorted(hosts))}"
                )
            )
    for vm_id, host in placed_on.items():
        vm = vms.get(vm_id)
        if vm is None or host not in reporting_hosts or vm.state not in _EXPECTED_RUN_STATE:
            continue
        if host not in seen.get(vm_id, []):
            found.append(
                Discrepancy(
                    "vm.missing", vm_id, host, f"{vm.name} should be {vm.state.value} on {host} but is not running"
                )
            )
    return found


def _check_runtime(vm: VM | None, placed: str | None, host: str, rt: VMRuntime) -> list[Discrepancy]:
    if vm is None:
        return [
            Discrepancy("vm.unknown", rt.vm_id, host, f"QEMU {rt.name or rt.vm_id} on {host} is unknown to the CMDB")
        ]
    if vm.state is VMState.DELETED:
        return [Discrepancy("vm.deleted_but_running", vm.id, host, f"deleted VM {vm.name} still runs on {host}")]
    if rt.generation is not None and rt.generation < vm.generation:
        return [
            Discrepancy(
                "vm.stale_copy",
                vm.id,
                host,
                f"{vm.name} on {host} is a stale copy (generation {rt.generation}, current {vm.generation})",
            )
        ]
    if placed != host:
        where = f"placed on {placed}" if placed else "placed nowhere"
        return [Discrepancy("vm.unexpected_copy", vm.id, host, f"{vm.name} runs on {host} but the CMDB has it {where}")]
    found = []
    if not rt.managed:
        found.append(
            Discrepancy(
                "vm.unmanaged_process", vm.id, host, f"{vm.name} on {host} runs in a QEMU the agent did not start"
            )
        )
    expected = _EXPECTED_RUN_STATE.get(vm.state)
    if vm.state is not VMState.CREATING and expected is not rt.run_state:
        found.append(
            Discrepancy(
                "vm.state_mismatch",
                vm.id,
                host,
                f"{vm.name} is {rt.run_state.value} on {host} but the CMDB says {vm.state.value}",
            )
        )
    return found


# what a migration in flight legitimately shows on its two hosts: a paused destination, a source in postmigrate, both
# at once, and (between the commit and the retirement of the source) a source of the old generation
MIGRATION_EXPECTED = frozenset(
    {
        "vm.unexpected_copy",
        "vm.duplicate",
        "vm.stale_copy",
        "vm.state_mismatch",
        "vm.missing",
        "vm.unmanaged_process",
        "network.stale_rules",  # the destination's NIC rules exist before the commit moves the VM there
    }
)


def excuse_migrations(found: list[Discrepancy], migrating: Mapping[str, frozenset[str]]) -> list[Discrepancy]:
    """Drop the discrepancies an active migration explains; a copy on any third host is still an alarm."""
    kept = []
    for d in found:
        hosts = migrating.get(d.vm_id or "")
        if hosts is not None and d.kind in MIGRATION_EXPECTED and (d.host is None or d.host in hosts):
            continue
        kept.append(d)
    return kept


class Reconciler:
    """Holds the latest report of every host and turns discrepancies into alarms."""

    def __init__(self, repo: Repository, clock: Clock, stale_after_s: float) -> None:
        self._repo = repo
        self._clock = clock
        self._stale_after = dt.timedelta(seconds=stale_after_s)
        self._reports: dict[str, HostReport] = {}
        self._networks: dict[str, NetworkReport] = {}  # each host's latest NIC tables (hosts that plumb NICs)
        self._suspects: dict[tuple[str, str | None, str | None], set[int]] = {}
        self._changed: dict[str, dt.datetime] = {}
        self._seq = 0
        self._listeners: list[Callable[[list[Discrepancy]], None]] = []

    def subscribe(self, listener: Callable[[list[Discrepancy]], None]) -> None:
        """Call ``listener`` with the confirmed discrepancies after every pass (to act on them, e.g. stale copies)."""
        self._listeners.append(listener)

    def accept(self, host: str, vms: list[VMRuntime], network: NetworkReport | None = None) -> None:
        self._seq += 1
        self._reports[host] = HostReport(host, self._clock.now(), tuple(vms), self._seq)
        if network is not None:
            self._networks[host] = network
        else:
            self._networks.pop(host, None)

    def note_change(self, vm_id: str) -> None:
        """A lifecycle change of ``vm_id`` is under way: reports received before now say nothing about its state."""
        self._changed[vm_id] = self._clock.now()

    def _migrating(self) -> dict[str, frozenset[str]]:
        """VM id → the two hosts of its migration in flight (their copies are expected until it finishes)."""
        return {r.vm_id: frozenset({r.source, r.destination}) for r in self._repo.list_migrations(active_only=True)}

    def _confirmed(self, current: list[Discrepancy]) -> list[Discrepancy]:
        confirmed, suspects = [], {}
        for d in current:
            if d.kind in IMMEDIATE:
                confirmed.append(d)
                continue
            report = self._reports.get(d.host or "")
            changed = self._changed.get(d.vm_id or "")
            if report is None or (changed is not None and report.received_at <= changed):
                continue
            seen = self._suspects.get(d.key, set()) | {report.seq}
            suspects[d.key] = seen
            if len(seen) >= CONFIRMING_REPORTS:
                confirmed.append(d)
        self._suspects = suspects
        return confirmed

    def last_report(self, host: str) -> HostReport | None:
        return self._reports.get(host)

    def is_fresh(self, host: str) -> bool:
        report = self._reports.get(host)
        return report is not None and self._clock.now() - report.received_at <= self._stale_after

    def run(self) -> list[Discrepancy]:
        """One pass: compute discrepancies, open alarms (recording an event for each new one), resolve the rest."""
        now = self._clock.now()
        vms = {vm.id: vm for vm in self._repo.list_vms(include_deleted=True)}
        placed_on = {}
        for vm in vms.values():
            if vm.state is not VMState.DELETED:
                placement = self._repo.current_placement(vm.id)
                if placement is not None:
                    placed_on[vm.id] = placement.host
        fresh = [r for r in self._reports.values() if now - r.received_at <= self._stale_after]
        found = discrepancies(vms, placed_on, fresh)
        networks = {r.host: self._networks[r.host] for r in fresh if r.host in self._networks}
        if networks:
            nics = self._repo.all_live_nics()
            found += [
                Discrepancy(f.kind, f.vm_id, f.host, f.message)
                for f in network_findings(nics, vms, placed_on, networks)
            ]
        current = excuse_migrations(found, self._migrating())
        current += [
            Discrepancy("host.unreachable", None, r.host, f"{r.host} has not reported since {r.received_at:%H:%M:%S}")
            for r in self._reports.values()
            if now - r.received_at > self._stale_after
        ]
        confirmed = self._confirmed(current)
        for d in confirmed:
            alarm = self._repo.open_alarm(d.kind, d.vm_id, d.host, d.message, now)
            if alarm is not None:
                log.warning("alarm raised", kind=d.kind, vm=d.vm_id, host=d.host, message=d.message)
                self._repo.record_event(
                    Event(
                        kind=f"alarm.{d.kind}",
                        message=d.message,
                        time=now,
                        severity=Severity.ALARM,
                        vm=d.vm_id,
                        host=d.host,
                    )
                )
        keep = [d.key for d in current]
        for alarm in self._repo.resolve_alarms(keep, now):
            self._repo.record_event(
                Event(
                    kind=f"alarm.resolved.{alarm.kind}",
                    message=f"resolved: {alarm.message}",
                    time=now,
                    vm=alarm.vm_id,
                    host=alarm.host,
                )
            )
        for listener in self._listeners:
            listener(confirmed)
        return confirmed
