"""Pre-migration snapshots of a VM's disks, as an operator sees and uses them: list them and restore one.

The source agent takes a snapshot of every disk before each migration (its agent keeps the newest per disk). After a
successful migration the source's snapshots are scrubbed with the rest of the losing side; after a rollback or a
stuck migration they stay on the host that holds the copy of record, and ``restore`` puts the VM back to that point:
the agent stops it, swaps each disk for its snapshot (the replaced disks are scrubbed) and boots it under a lease.

The CMDB is read and written in the thread pool, the agents are awaited on the event loop, and so is the reconciler
told about the change (its state belongs to the loop).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.concurrency import run_in_threadpool

from ferryman.controller.fleet import Fleet
from ferryman.controller.rollback import mark_for_remediation
from ferryman.controller.spent import point_of_no_return
from ferryman.core import errors
from ferryman.core.models import VM, Host, Severity, VMAction, VMState, next_vm_state
from ferryman.wire.vms import Restored, SnapshotInfo

Guard = Callable[[VM, str, str], list[str]]

# the VM runs after a restore: the lifecycle action that gets it there from each state
RESTORABLE = {
    VMState.RUNNING: VMAction.START,
    VMState.PAUSED: VMAction.RESUME,
    VMState.STOPPED: VMAction.START,
    VMState.ERROR: VMAction.START,
}


def _placed(fleet: Fleet, name: str) -> tuple[VM, Host]:
    vm, placement = fleet.get_vm(name)
    if placement is None:
        raise errors.Conflict(f"{vm.name} has no placement")
    return vm, fleet.repo.get_host(placement.host)


def _restorable(fleet: Fleet, name: str, tag: str | None, principal: str) -> tuple[VM, Host]:
    """The VM and its host once the request is known to be allowed, and audited."""
    vm, host = _placed(fleet, name)
    if fleet.repo.list_migrations(vm_id=vm.id, active_only=True):
        raise errors.Conflict(f"{vm.name} is migrating; restore it once the migration has ended")
    if vm.state not in RESTORABLE:
        raise errors.Conflict(f"{vm.name} is {vm.state.value}; it cannot be restored")
    fleet.audit(
        "vm.restore_requested",
        f"restore {vm.name} on {host.name} from {tag or 'its newest snapshot'}",
        principal,
        vm=vm.id,
        host=host.name,
    )
    return vm, host


def _record_restore(fleet: Fleet, vm: VM, host: str, out: Restored) -> tuple[VM, list[dict[str, Any]]]:
    """Keep the receipts of the replaced disks; the VM runs again."""
    receipts = fleet.store_scrub_receipts(host, out.receipts)
    if vm.state is not VMState.RUNNING:
        vm = fleet.repo.set_vm_state(vm.id, next_vm_state(vm.state, RESTORABLE[vm.state]))
    return vm, receipts


async def list_snapshots(fleet: Fleet, name: str) -> list[dict[str, Any]]:
    vm, host = await run_in_threadpool(_placed, fleet, name)
    found = await fleet.agents.snapshots(host, vm.id)
    return [{**s.model_dump(), "host": host.name} for s in found]


def _chosen(found: list[SnapshotInfo], tag: str | None, vm: VM) -> SnapshotInfo:
    """The snapshot ``tag`` names (default: the newest)."""
    candidates = [s for s in found if tag is None or s.tag == tag]
    if not candidates:
        raise errors.NotFound(f"{vm.name} has no snapshot {tag}" if tag else f"{vm.name} has no snapshot")
    return max(candidates, key=lambda s: s.taken_at)


async def restore(
    fleet: Fleet, name: str, tag: str | None, principal: str, guard: Guard | None = None
) -> dict[str, Any]:
    """Restore ``name`` from its snapshot ``tag`` (default: the newest) on its host; the VM runs afterwards.

    ``guard`` sees the VM and the snapshot chosen before anything changes: it raises to refuse, or returns why the
    restore goes below the VM's security baseline (approved), and the VM is then marked for remediation."""
    vm, host = await run_in_threadpool(_restorable, fleet, name, tag, principal)
    below: list[str] = []
    fleet.reconciler.note_change(vm.id)
    try:
        # a VM booted from an image boots from it again (its disk may be an overlay on it): it must still be usable
        image = await run_in_threadpool(fleet.image_ref, vm)
        if guard is not None:
            chosen = _chosen(await fleet.agents.snapshots(host, vm.id), tag, vm)
            tag = chosen.tag
            below = await run_in_threadpool(guard, vm, chosen.tag, chosen.taken_at)
        if image is not None and fleet.images is not None:
            await fleet.images.ensure_on(host, image)
        point_of_no_return()
        out = await fleet.agents.restore(host, vm.id, fleet.lease(vm, host.name), tag, fleet.disk_key(vm, host.name))
    except errors.FerrymanError as err:
        await run_in_threadpool(
            fleet.audit,
            "vm.restore_failed",
            f"restore of {vm.name} on {host.name} failed: {err}",
            principal,
            vm=vm.id,
            host=host.name,
            severity=Severity.WARNING,
        )
        raise
    vm, receipts = await run_in_threadpool(_record_restore, fleet, vm, host.name, out)
    fleet.reconciler.note_change(vm.id)
    if below:
        await run_in_threadpool(mark_for_remediation, fleet, vm, out.tag, below, principal)
    await run_in_threadpool(
        fleet.audit,
        "vm.restored",
        f"{vm.name} restored on {host.name} from snapshot {out.tag} taken {out.taken_at}",
        principal,
        vm=vm.id,
        host=host.name,
        severity=Severity.WARNING,
        tag=out.tag,
        receipts=receipts,
    )
    return {"vm": vm.name, "host": host.name, "tag": out.tag, "taken_at": out.taken_at, "state": vm.state.value}
