"""Removal of stale copies: a VM's QEMU and files left on a host after the VM moved on (a source that could not be
retired, a host that was down during its migration and came back).

Reconciliation confirms a copy stale (an older generation than the CMDB's, seen in two reports); this module then asks
that host's agent to kill and scrub it, proving with a lease of the copy of record that the VM lives elsewhere at a
later generation. The agent refuses without that proof, so a bug here cannot destroy a copy of record. It acts only
once a fresh report shows the copy of record running at its generation, never after a stuck migration (the source may
be the only good copy), keeps the disks of a host a shared-storage migration ever left, and gives up after
:data:`MAX_ATTEMPTS` failures with an alarm. Every removal is audited with its scrub receipts. It never touches a VM
whose migration is in flight (reconciliation excuses those).
"""

from __future__ import annotations

import asyncio

import structlog

from ferryman.controller.fleet import Fleet
from ferryman.controller.reconcile import Discrepancy
from ferryman.core import errors
from ferryman.core.models import VM, RunState, Severity

log = structlog.get_logger(__name__)

MAX_ATTEMPTS = 3  # removals of one stale copy that may fail before an operator is asked to step in


class StaleCopies:
    """Turns confirmed ``vm.stale_copy`` discrepancies into scrubbed removals, one task per (VM, host) at a time."""

    def __init__(self, fleet: Fleet) -> None:
        self._fleet = fleet
        self._tasks: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._failures: dict[tuple[str, str], int] = {}

    def schedule(self, confirmed: list[Discrepancy]) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # a pass run outside the service (tools, tests): removal waits for the next pass
            return
        for d in confirmed:
            if d.kind != "vm.stale_copy" or d.vm_id is None or d.host is None:
                continue
            key = (d.vm_id, d.host)
            if key in self._tasks or self._failures.get(key, 0) >= MAX_ATTEMPTS:
                continue
            task = loop.create_task(self._remove_once(key))
            self._tasks[key] = task

    async def _remove_once(self, key: tuple[str, str]) -> None:
        try:
            await self.remove(*key)
        finally:
            self._tasks.pop(key, None)

    def _copy_of_record_runs(self, vm: VM, host: str) -> bool:
        """A fresh report of ``host`` shows the VM running there at its current generation."""
        reconciler = self._fleet.reconciler
        report = reconciler.last_report(host)
        if report is None or not reconciler.is_fresh(host):
            return False
        return any(
            rt.vm_id == vm.id and rt.run_state is RunState.RUNNING and rt.generation == vm.generation
            for rt in report.vms
        )

    async def remove(self, vm_id: str, host_name: str) -> None:
        fleet, repo = self._fleet, self._fleet.repo
        vm = repo.get_vm(vm_id)
        placement = repo.current_placement(vm_id)
        if placement is None or placement.host == host_name:
            return  # not stale (any more): nothing proves that another host runs the VM
        history = repo.list_migrations(vm_id=vm_id)
        if history and history[0].outcome == "stuck":
            return  # an operator finishes a stuck migration: its source may be the only good copy
        if not self._copy_of_record_runs(vm, placement.host):
            return  # the stale copy may be the only one that runs: wait until the copy of record is seen running
        # shared storage: the copy of record may run on images in this host's directory, whatever became of the
        # migration that moved it (another host's QEMU is invisible from here)
        keep_disks = any(r.shared_storage and r.source == host_name for r in history)
        # an encrypted VM's stale copy is crypto-erased first: its keys go, whatever the host answers
        fleet.destroy_keys(vm, f"stale copy on {host_name}", host=host_name)
        try:
            out = await fleet.agents.remove_stale_copy(
                repo.get_host(host_name), vm_id, fleet.lease(vm, placement.host), keep_disks
            )
        except errors.FerrymanError as err:
            key = (vm_id, host_name)
            self._failures[key] = self._failures.get(key, 0) + 1
            last = self._failures[key] >= MAX_ATTEMPTS
            fleet.audit(
                "alarm.stale_copy_not_removed" if last else "vm.stale_copy_remove_failed",
                f"stale copy of {vm.name} on {host_name} could not be removed"
                + (f" ({MAX_ATTEMPTS} attempts; an operator must remove it)" if last else "")
                + f": {err}",
                "system",
                vm=vm_id,
                host=host_name,
                severity=Severity.ALARM if last else Severity.WARNING,
            )
            return
        self._failures.pop((vm_id, host_name), None)
        if not out.removed:
            return
        receipts = fleet.store_scrub_receipts(host_name, out.receipts)
        fleet.reconciler.note_change(vm_id)
        fleet.audit(
            "vm.stale_copy_removed",
            f"stale copy of {vm.name} on {host_name} killed and scrubbed ({len(out.receipts)} artefact(s))",
            "system",
            vm=vm_id,
            host=host_name,
            severity=Severity.WARNING,
            kept=out.kept,
            receipts=receipts,
        )

    async def close(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
