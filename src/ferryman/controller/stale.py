"""Removal of stale copies: a VM's QEMU and files left on a host after the VM moved on (a source that could not be
retired, a host that was down during its migration and came back).

Reconciliation confirms a copy stale (an older generation than the CMDB's, seen in two reports); this module then asks
that host's agent to kill and scrub it, proving with a lease of the copy of record that the VM lives elsewhere at a
later generation. The agent refuses without that proof, so a bug here cannot destroy a copy of record. Every removal
is audited with its scrub receipts. It never touches a VM whose migration is in flight (reconciliation excuses those).
"""

from __future__ import annotations

import asyncio

import structlog

from ferryman.controller.fleet import Fleet
from ferryman.controller.reconcile import Discrepancy
from ferryman.core import errors
from ferryman.core.models import Severity

log = structlog.get_logger(__name__)


class StaleCopies:
    """Turns confirmed ``vm.stale_copy`` discrepancies into scrubbed removals, one task per (VM, host) at a time."""

    def __init__(self, fleet: Fleet) -> None:
        self._fleet = fleet
        self._tasks: dict[tuple[str, str], asyncio.Task[None]] = {}

    def schedule(self, confirmed: list[Discrepancy]) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # a pass run outside the service (tools, tests): removal waits for the next pass
            return
        for d in confirmed:
            if d.kind != "vm.stale_copy" or d.vm_id is None or d.host is None:
                continue
            key = (d.vm_id, d.host)
            if key in self._tasks:
                continue
            task = loop.create_task(self._remove_once(key))
            self._tasks[key] = task

    async def _remove_once(self, key: tuple[str, str]) -> None:
        try:
            await self.remove(*key)
        finally:
            self._tasks.pop(key, None)

    async def remove(self, vm_id: str, host_name: str) -> None:
        fleet, repo = self._fleet, self._fleet.repo
        vm = repo.get_vm(vm_id)
        placement = repo.current_placement(vm_id)
        if placement is None or placement.host == host_name:
            return  # not stale (any more): nothing proves that another host runs the VM
        keep_disks = any(
            r.shared_storage and r.source == host_name and r.outcome == "done"
            for r in repo.list_migrations(vm_id=vm_id)
        )
        try:
            out = await fleet.agents.remove_stale_copy(
                repo.get_host(host_name), vm_id, fleet.lease(vm, placement.host), keep_disks
            )
        except errors.FerrymanError as err:
            fleet.audit(
                "vm.stale_copy_remove_failed",
                f"stale copy of {vm.name} on {host_name} could not be removed: {err}",
                "system",
                vm=vm_id,
                host=host_name,
                severity=Severity.WARNING,
            )
            return
        if not out.get("removed"):
            return
        receipts = fleet.store_scrub_receipts(host_name, out["receipts"])
        fleet.reconciler.note_change(vm_id)
        fleet.audit(
            "vm.stale_copy_removed",
            f"stale copy of {vm.name} on {host_name} killed and scrubbed ({len(out['receipts'])} artefact(s))",
            "system",
            vm=vm_id,
            host=host_name,
            severity=Severity.WARNING,
            kept=out.get("kept", []),
            receipts=receipts,
        )

    async def close(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
