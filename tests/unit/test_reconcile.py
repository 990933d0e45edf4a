"""Reconciliation decisions: which differences between CMDB and host reports are discrepancies."""

from __future__ import annotations

import datetime as dt

from ferryman.controller.reconcile import HostReport, discrepancies
from ferryman.core.models import VM, RunState, VMRuntime, VMState

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


def rt(vm_id: str, run_state: RunState = RunState.RUNNING, managed: bool = True) -> VMRuntime:
    return VMRuntime(vm_id=vm_id, name=f"n-{vm_id}", run_state=run_state, pid=1, managed=managed)


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
