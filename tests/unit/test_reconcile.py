"""Reconciliation decisions: which differences between CMDB and host reports are discrepancies."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest

from ferryman.cmdb.sql import open_repository
from ferryman.controller.reconcile import HostReport, Reconciler, discrepancies
from ferryman.core.models import VM, Host, HostState, RunState, Site, VMRuntime, VMState
from ferryman.testing.clock import FakeClock

T0 = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC)


def vm(vm_id: str, state: VMState = VMState.RUNNING) -> VM:
    return VM(
        id=vm_id,
        name=f"n-{vm_id}",
        tenant="acme",
        memory_mb=128,
        vcpus=1,
        disk_bytes=1 << 26,
        image="i",
        canary="c",
        state=state,
    )


def rt(
    vm_id: str, run_state: RunState = RunState.RUNNING, managed: bool = True, generation: int | None = None
) -> VMRuntime:
    return VMRuntime(vm_id=vm_id, name=f"n-{vm_id}", run_state=run_state, pid=1, managed=managed, generation=generation)


def report(host: str, *runtimes: VMRuntime) -> HostReport:
    return HostReport(host, T0, tuple(runtimes))


def kinds(found) -> set[tuple[str, str | None, str | None]]:
    return {d.key for d in found}


def test_agreement_is_silent():
    """When every VM runs where the CMDB places it, in the expected state, nothing is reported."""
    vms = {"1": vm("1"), "2": vm("2", VMState.PAUSED)}
    placed = {"1": "host-a", "2": "host-b"}
    assert discrepancies(vms, placed, [report("host-a", rt("1")), report("host-b", rt("2", RunState.PAUSED))]) == []


def test_copy_on_another_host_is_unexpected_and_duplicate():
    """A second copy on a host the CMDB does not name is an unexpected copy and a duplicate; the CMDB is not changed."""
    vms = {"1": vm("1")}
    placed = {"1": "host-a"}
    found = discrepancies(vms, placed, [report("host-a", rt("1")), report("host-c", rt("1", managed=False))])
    assert kinds(found) == {("vm.unexpected_copy", "1", "host-c"), ("vm.duplicate", "1", None)}
    assert placed == {"1": "host-a"}


def test_older_generation_is_a_stale_copy():
    """A copy at an older generation than the CMDB's is a stale copy, wherever it runs."""
    vms = {"1": dataclasses.replace(vm("1"), generation=3)}
    found = discrepancies(
        vms,
        {"1": "host-b"},
        [report("host-a", rt("1", RunState.PAUSED, generation=2)), report("host-b", rt("1", generation=3))],
    )
    assert kinds(found) == {("vm.stale_copy", "1", "host-a"), ("vm.duplicate", "1", None)}


def test_unknown_qemu_is_reported():
    """A QEMU whose VM the CMDB does not know is a discrepancy."""
    assert kinds(discrepancies({}, {}, [report("host-a", rt("x"))])) == {("vm.unknown", "x", "host-a")}


def test_missing_vm_only_when_its_host_reported():
    """A running VM absent from its host's report is missing; a host that did not report says nothing."""
    vms = {"1": vm("1")}
    assert kinds(discrepancies(vms, {"1": "host-a"}, [report("host-a")])) == {("vm.missing", "1", "host-a")}
    assert discrepancies(vms, {"1": "host-a"}, [report("host-b")]) == []


def test_stopped_vm_absent_is_fine_but_running_stopped_vm_is_not():
    """A stopped VM may be absent; a VM the CMDB calls stopped but which runs is a state mismatch."""
    vms = {"1": vm("1", VMState.STOPPED)}
    assert discrepancies(vms, {"1": "host-a"}, [report("host-a")]) == []
    found = discrepancies(vms, {"1": "host-a"}, [report("host-a", rt("1"))])
    assert kinds(found) == {("vm.state_mismatch", "1", "host-a")}


def test_deleted_vm_still_running():
    """A deleted VM still running anywhere is a discrepancy."""
    vms = {"1": vm("1", VMState.DELETED)}
    assert kinds(discrepancies(vms, {}, [report("host-b", rt("1"))])) == {("vm.deleted_but_running", "1", "host-b")}


def test_shutdown_processes_are_ignored():
    """A QEMU that has shut down is not a running copy."""
    vms = {"1": vm("1")}
    found = discrepancies(
        vms, {"1": "host-a"}, [report("host-a", rt("1")), report("host-b", rt("1", RunState.SHUTDOWN))]
    )
    assert found == []


# ---- the Reconciler over a real (SQLite) CMDB -----------------------------------------------------------------------

VM_ID = "6f1c1d7e-0000-4000-8000-000000000001"


@pytest.fixture
def world(tmp_path):
    clock = FakeClock(T0)
    repo = open_repository(f"sqlite:///{tmp_path / 'cmdb.sqlite'}")
    repo.add_site(Site("dc", 3))
    for name in ("host-a", "host-b"):
        repo.add_host(
            Host(
                name=name,
                address="127.0.0.9",
                agent_port=1,
                site="dc",
                zone="z",
                subnet="s",
                virt_type="tcg",
                hypervisor="qemu",
                hypervisor_version="7.2.0",
                patch_level=1,
                state=HostState.ENROLLED,
                created_at=T0,
            )
        )
    repo.ensure_tenant("acme")
    repo.add_vm(vm(VM_ID, VMState.RUNNING), "host-a", T0)
    return repo, clock, Reconciler(repo, clock, stale_after_s=30)


def test_missing_vm_needs_two_reports_after_its_last_change(world):
    """A VM missing from one report is only a suspect; a second report of its host confirms the alarm."""
    repo, clock, rec = world
    rec.note_change(VM_ID)
    clock.advance(1)
    rec.accept("host-a", [])
    assert rec.run() == []
    assert rec.run() == []  # another pass over the same report confirms nothing
    clock.advance(2)
    rec.accept("host-a", [])
    assert [d.kind for d in rec.run()] == ["vm.missing"]
    assert [a.kind for a in repo.list_alarms()] == ["vm.missing"]
    clock.advance(2)
    rec.accept("host-a", [rt(VM_ID)])
    rec.run()
    assert repo.list_alarms() == []
    kinds_logged = [e.kind for e in repo.list_events(kind_prefix="alarm.")]
    assert kinds_logged == ["alarm.resolved.vm.missing", "alarm.vm.missing"]


def test_reports_received_before_a_change_do_not_count(world):
    """Reports that predate a VM's lifecycle change never confirm a discrepancy about it."""
    _, clock, rec = world
    rec.accept("host-a", [])
    clock.advance(1)
    rec.accept("host-a", [])
    clock.advance(1)
    rec.note_change(VM_ID)
    assert rec.run() == []


def test_unexpected_copy_is_alarmed_at_once(world):
    """A copy on a host the CMDB does not name raises an alarm on the first report, recorded as an event."""
    repo, _clock, rec = world
    rec.accept("host-a", [rt(VM_ID)])
    rec.accept("host-b", [rt(VM_ID, managed=False)])
    found = {d.kind for d in rec.run()}
    assert found == {"vm.unexpected_copy", "vm.duplicate"}
    events = repo.list_events(kind_prefix="alarm.vm.unexpected_copy")
    assert len(events) == 1 and events[0].host == "host-b"
    rec.run()  # still there: no second event
    assert len(repo.list_events(kind_prefix="alarm.vm.unexpected_copy")) == 1
    assert repo.current_placement(VM_ID).host == "host-a"


def test_silent_host_is_an_alarm(world):
    """A host whose last report is older than the staleness limit raises host.unreachable."""
    _repo, clock, rec = world
    rec.accept("host-b", [])
    clock.advance(31)
    assert [d.kind for d in rec.run()] == ["host.unreachable"]


def test_active_migration_excuses_its_two_hosts_only():
    """During a migration the copies on its source and destination are expected; one on a third host is not."""
    from ferryman.controller.reconcile import excuse_migrations

    vms = {"1": vm("1")}
    found = discrepancies(
        vms,
        {"1": "host-a"},
        [
            report("host-a", rt("1", RunState.POSTMIGRATE)),
            report("host-b", rt("1", RunState.PAUSED)),
            report("host-c", rt("1")),
        ],
    )
    kept = excuse_migrations(found, {"1": frozenset({"host-a", "host-b"})})
    assert kinds(kept) == {("vm.unexpected_copy", "1", "host-c")}
