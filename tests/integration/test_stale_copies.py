"""When the controller asks an agent to remove a stale copy: only with the copy of record seen running at its
generation, never after a stuck migration, with shared disks kept, and with an alarm after bounded failures."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

import pytest

from ferryman.cmdb.journal import MigrationRecord
from ferryman.cmdb.sql import open_repository
from ferryman.controller.fleet import Fleet
from ferryman.controller.reconcile import Discrepancy, Reconciler
from ferryman.controller.stale import MAX_ATTEMPTS, StaleCopies
from ferryman.core import errors
from ferryman.core.models import VM, Host, HostState, RunState, Site, VMRuntime
from ferryman.pki.ca import CertificateAuthority
from ferryman.testing.clock import FakeClock
from ferryman.wire.vms import StaleCopyRemoved


class RecordingAgents:
    """Records removal requests; fails them while ``fail`` is set."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, bool]] = []
        self.fail: errors.FerrymanError | None = None

    async def remove_stale_copy(self, host: Host, vm_id: str, successor: str, keep_disks: bool) -> StaleCopyRemoved:
        self.calls.append((host.name, vm_id, keep_disks))
        if self.fail is not None:
            raise self.fail
        return StaleCopyRemoved(removed=True)


def make_host(name: str) -> Host:
    return Host(name, "127.0.0.1", 1, "s", "z", "10.0.0.0/24", "kvm", "qemu", "7.2.0", 3, state=HostState.ENROLLED)


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Fleet, RecordingAgents, StaleCopies, VM]:
    clock = FakeClock()
    repo = open_repository(f"sqlite:///{tmp_path / 'cmdb.sqlite'}", clock=clock)
    agents = RecordingAgents()
    fleet = Fleet(
        repo,
        agents,
        CertificateAuthority.load_or_create(tmp_path / "ca", clock),
        clock,  # type: ignore[arg-type]
        Reconciler(repo, clock, 30),
    )
    repo.add_site(Site("s", 3))
    for name in ("h1", "h2"):
        repo.add_host(make_host(name))
    repo.ensure_tenant("acme")
    vm = VM(id="vm-1", name="web", tenant="acme", memory_mb=128, vcpus=1, disk_bytes=1 << 26, image="i", canary="c")
    repo.add_vm(vm, "h1", clock.now())
    vm, _ = repo.move_vm("vm-1", "h2", clock.now())  # generation 2 on h2; h1 keeps a stale generation-1 copy
    return fleet, agents, StaleCopies(fleet), vm


def report_running(fleet: Fleet, host: str, generation: int) -> None:
    fleet.reconciler.accept(host, [VMRuntime("vm-1", "web", RunState.RUNNING, 10, generation=generation)])


EARLIER = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC)
LATER = EARLIER + dt.timedelta(hours=1)


def migration(outcome: str, shared: bool = False, at: dt.datetime = EARLIER) -> MigrationRecord:
    t = at
    return MigrationRecord(
        id=f"m-{outcome}",
        vm_id="vm-1",
        source="h1",
        destination="h2",
        shared_storage=shared,
        phase=outcome,
        principal="p",
        generation=1,
        requested_at=t,
        updated_at=t,
        finished_at=t,
        outcome=outcome,
    )


async def test_removal_waits_for_the_copy_of_record_to_be_seen_running(setup):
    """No fresh report of the copy of record running at its generation: the stale copy is left alone."""
    fleet, agents, stale, _ = setup
    await stale.remove("vm-1", "h1")
    report_running(fleet, "h2", generation=1)  # an old generation there proves nothing
    await stale.remove("vm-1", "h1")
    assert agents.calls == []
    report_running(fleet, "h2", generation=2)
    await stale.remove("vm-1", "h1")
    assert agents.calls == [("h1", "vm-1", False)]
    assert [e.kind for e in fleet.repo.list_events(kind_prefix="vm.stale")] == ["vm.stale_copy_removed"]


async def test_never_after_a_stuck_migration_and_shared_disks_are_kept(setup):
    """A stuck latest migration leaves the source alone; a shared-storage migration from the host keeps its disks."""
    fleet, agents, stale, _ = setup
    report_running(fleet, "h2", generation=2)
    fleet.repo.add_migration(migration("stuck", shared=True))
    await stale.remove("vm-1", "h1")
    assert agents.calls == []
    fleet.repo.add_migration(migration("done", at=LATER))
    await stale.remove("vm-1", "h1")
    assert agents.calls == [("h1", "vm-1", True)]  # the earlier shared migration from h1 still counts


async def test_failing_removal_stops_after_bounded_attempts_with_an_alarm(setup):
    """Each failure is an event; after MAX_ATTEMPTS an alarm, and the removal is not scheduled again."""
    fleet, agents, stale, _ = setup
    report_running(fleet, "h2", generation=2)
    agents.fail = errors.Forbidden("refused")
    for _ in range(MAX_ATTEMPTS):
        await stale.remove("vm-1", "h1")
    kinds = [e.kind for e in fleet.repo.list_events()]
    assert kinds.count("vm.stale_copy_remove_failed") == MAX_ATTEMPTS - 1
    assert "alarm.stale_copy_not_removed" in kinds
    stale.schedule([Discrepancy("vm.stale_copy", "vm-1", "h1", "stale")])
    await asyncio.sleep(0.05)
    assert len(agents.calls) == MAX_ATTEMPTS
