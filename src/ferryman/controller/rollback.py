"""The rollback guard, a VM's security baseline, and its disk keys destroyed by hand.

A snapshot brings back what was true when it was taken: patched vulnerabilities, locked accounts, revoked keys. So a
restore from a snapshot taken before the VM's current security baseline is refused unless a security officer
approves it (two-person rule, :mod:`ferryman.controller.access`). The baseline moves when

- an operator records that the guest was patched or its credentials rotated (``ferryman vm baseline``),
- the VM was remediated after an earlier restore below its baseline,
- the VM's disk keys were destroyed by hand, or
- the image the VM boots from was revoked.

After an approved restore the VM is marked for remediation (a ``vm.remediation_needed`` entry of the audit log; the
compliance violations list it) until an operator marks it remediated (``vm.remediated``), itself a new baseline.
"""

import datetime as dt
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, Field

from ferryman.controller.access import AccessControl, Principal
from ferryman.controller.fleet import Fleet
from ferryman.controller.spent import point_of_no_return
from ferryman.core import errors
from ferryman.core.models import VM, Event, Severity, VMState

BASELINE_KINDS = ("vm.baseline", "vm.remediated", "key.destroyed_by_hand")
REMEDIATION = "vm.remediation_needed"
MAX_BASELINE_EVENTS = 1000
MAX_MARKS = 5000


class BaselineIn(BaseModel):
    reason: str = Field(min_length=1, max_length=1000)


def _at(value: str | dt.datetime) -> dt.datetime:
    at = value if isinstance(value, dt.datetime) else dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    return at if at.tzinfo is not None else at.replace(tzinfo=dt.UTC)


def below_baseline(fleet: Fleet, vm: VM, taken_at: str | dt.datetime) -> list[str]:
    """Why a snapshot of ``vm`` taken at ``taken_at`` is below its current security baseline (empty: it is not)."""
    since = _at(taken_at)
    reasons = []
    for kind in BASELINE_KINDS:
        for event in fleet.repo.list_events(since=since, kind_prefix=kind, vm_id=vm.id, limit=MAX_BASELINE_EVENTS):
            if event.kind == kind:
                reasons.append(f"{kind} at {event.time:%Y-%m-%d %H:%M:%S}Z: {event.message}")
    if fleet.images is not None and vm.image:
        try:
            image = fleet.repo.get_image(vm.image)
        except errors.NotFound:
            image = None
        if image is not None and image.revoked_at is not None and image.revoked_at > since:
            reasons.append(f"its image {image.name} was revoked at {image.revoked_at:%Y-%m-%d %H:%M:%S}Z")
    return sorted(reasons)


def guard(fleet: Fleet, access: AccessControl, who: Principal) -> Callable[[VM, str, str], list[str]]:
    """The check a restore runs once it knows the snapshot: returns the reasons it is below the baseline after a
    security officer approved it, raises ApprovalRequired (naming a new request) before."""

    def check(vm: VM, tag: str, taken_at: str) -> list[str]:
        reasons = below_baseline(fleet, vm, taken_at)
        if reasons:
            access.require_approval(
                who,
                "vm:restore",
                f"Vm::{vm.id}",  # the VM itself: a later VM of the same name is another request
                {"tag": tag},
                f"restoring {vm.name} from snapshot {tag} taken {taken_at}, before its security baseline "
                f"({'; '.join(reasons)})",
                approver_role="security-officer",
            )
        return reasons

    return check


def mark_for_remediation(fleet: Fleet, vm: VM, tag: str, reasons: list[str], principal: str) -> None:
    message = f"{vm.name} was restored below its security baseline from {tag}: {'; '.join(reasons)}"
    fleet.audit(REMEDIATION, message, principal, vm=vm.id, severity=Severity.ALARM, reasons=reasons)


def awaiting_remediation(fleet: Fleet) -> dict[str, Event]:
    """VM id → the mark of each VM restored below its baseline and not remediated since."""
    marks = fleet.repo.list_events(kind_prefix=REMEDIATION, limit=MAX_MARKS)
    if not marks:
        return {}
    done = fleet.repo.list_events(kind_prefix="vm.remediated", since=min(m.time for m in marks), limit=MAX_MARKS)
    last_done: dict[str, dt.datetime] = {}
    for event in done:
        if event.kind == "vm.remediated" and event.vm is not None:
            last_done[event.vm] = max(event.time, last_done.get(event.vm, event.time))
    due: dict[str, Event] = {}
    for mark in marks:  # newest first
        if mark.kind != REMEDIATION or mark.vm is None or mark.vm in due:
            continue
        if mark.vm not in last_done or last_done[mark.vm] < mark.time:
            due[mark.vm] = mark
    return due


def rollback_routes(app: FastAPI, fleet: Fleet, access: AccessControl, Person: Any) -> None:
    @app.post("/api/v1/vms/{name}/baseline")
    def record_baseline(name: str, body: BaselineIn, who: Person) -> dict[str, Any]:
        vm = fleet.repo.get_vm(name)
        fleet.audit("vm.baseline", f"{vm.name}: new security baseline: {body.reason}", who.name, vm=vm.id)
        return {"vm": vm.name, "baseline": fleet.clock.now(), "reason": body.reason}

    @app.post("/api/v1/vms/{name}/remediated")
    def remediated(name: str, body: BaselineIn, who: Person) -> dict[str, Any]:
        vm = fleet.repo.get_vm(name)
        if vm.id not in awaiting_remediation(fleet):
            raise errors.Conflict(f"{vm.name} is not marked for remediation")
        fleet.audit("vm.remediated", f"{vm.name} remediated: {body.reason}", who.name, vm=vm.id)
        return {"vm": vm.name, "remediated": True, "reason": body.reason}

    @app.post("/api/v1/vms/{name}/keys/destroy")
    def destroy_keys(name: str, body: BaselineIn, who: Person) -> dict[str, Any]:
        vm = fleet.repo.get_vm(name)
        if vm.state not in (VMState.STOPPED, VMState.DELETED):
            raise errors.Conflict(f"{vm.name} is {vm.state.value}: stop it before destroying its disk keys")
        if fleet.keys is None:
            raise errors.Conflict("this controller keeps no disk keys")
        point_of_no_return()
        gone = fleet.keys.destroy(vm.id, f"by hand: {body.reason}")
        fleet.audit(
            "key.destroyed_by_hand",
            f"{len(gone)} disk key(s) of {vm.name} destroyed by hand: {body.reason}",
            who.name,
            vm=vm.id,
            severity=Severity.ALARM,
            keys=gone,
        )
        return {"vm": vm.name, "destroyed": gone}
