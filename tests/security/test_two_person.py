"""The two-person rule as someone would try to get around it: approving one's own request, presenting another
principal's approval, reusing a used one, presenting one for another request, an expired or denied one; and the
operators' own Cedar policies (a bad one refused with Cedar's error, a good one in force at once)."""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

import sqlalchemy as sa

from ferryman.cmdb.schema import approvals
from ferryman.core.errors import StorageError
from ferryman.core.models import VMState

from .conftest import World

ADMIN, OFFICER, AUDITOR, TENANT = "fleet-admin", "security-officer", "auditor", "tenant-admin"


def _asked(response: Any) -> int:
    assert response.status_code == 403, response.text
    body = response.json()
    assert body["error"] == "ApprovalRequired", body
    match = re.search(r"approval (\d+) requested", body["detail"])
    assert match is not None, body
    return int(match.group(1))


def _export(world: World, role: str, approval: int | None = None, incident: str | None = None) -> Any:
    incident = incident or world.ids["acme"]
    url = f"/api/v1/incidents/{incident}/evidence/c1/memory"
    return world.client.get(url, headers=world.headers(role, approval))


def test_an_evidence_export_waits_for_a_second_different_principal(world: World) -> None:
    approval = _asked(_export(world, ADMIN))
    # the requester cannot approve its own request, and an auditor may not approve at all
    own = world.client.post(f"/api/v1/approvals/{approval}/approve", headers=world.headers(ADMIN))
    assert own.status_code == 403 and "different principal" in own.json()["detail"]
    assert world.client.post(f"/api/v1/approvals/{approval}/approve", headers=world.headers(AUDITOR)).status_code == 403
    # still pending: presenting it does not help
    assert "still waits" in _export(world, ADMIN, approval).json()["detail"]
    decided = world.client.post(f"/api/v1/approvals/{approval}/approve", headers=world.headers(OFFICER))
    assert decided.status_code == 200 and decided.json()["state"] == "approved"
    assert decided.json()["decided_by"] == "securityofficer"
    # approving twice is a conflict, not a second approval
    assert world.client.post(f"/api/v1/approvals/{approval}/approve", headers=world.headers(OFFICER)).status_code == 409
    # the requester gets through (to the evidence store, which holds no capture c1), twice: an export has artefacts
    for _ in range(2):
        passed = _export(world, ADMIN, approval)
        assert passed.status_code == 404 and passed.json()["error"] == "NotFound", passed.text
    # nobody else can use it, not even its approver, nor for another incident
    stolen = _export(world, OFFICER, approval)
    assert stolen.status_code == 403 and "another principal" in stolen.json()["detail"]
    other = _export(world, ADMIN, approval, incident=world.ids["globex"])
    assert other.status_code == 403 and "another request" in other.json()["detail"]
    kinds = [e.kind for e in world.fleet.repo.list_events(kind_prefix="approval.", limit=100)]
    assert {"approval.requested", "approval.approved", "approval.used", "approval.refused"} <= set(kinds)


def test_a_single_use_approval_is_used_once_and_a_denied_one_never(world: World) -> None:
    url = "/api/v1/vms/acme-web/keys/destroy"
    body = {"reason": "tenant left"}
    approval = _asked(world.client.post(url, json=body, headers=world.headers(OFFICER)))
    assert world.client.post(f"/api/v1/approvals/{approval}/approve", headers=world.headers(ADMIN)).status_code == 200
    failed = world.client.post(url, json=body, headers=world.headers(OFFICER, approval))
    assert failed.status_code == 409 and "stop it" in failed.json()["detail"]  # through the rule; the VM is running
    # what was approved did not happen: the approval is given back, audited, and serves the repeated request
    assert world.fleet.repo.get_approval(approval).state == "approved"
    returned = world.fleet.repo.list_events(kind_prefix="approval.returned", limit=10)
    assert [e.data.get("approval") for e in returned] == [approval] and "stop it" in returned[0].message
    world.fleet.repo.set_vm_state("id-acme-web", VMState.STOPPED)
    used = world.client.post(url, json=body, headers=world.headers(OFFICER, approval))
    assert used.status_code == 200, used.text
    assert world.fleet.repo.get_approval(approval).state == "used"
    again = world.client.post(url, json=body, headers=world.headers(OFFICER, approval))
    assert again.status_code == 403 and "used already" in again.json()["detail"]
    denied = _asked(world.client.post(url, json=body, headers=world.headers(OFFICER)))
    assert world.client.post(f"/api/v1/approvals/{denied}/deny", headers=world.headers(ADMIN)).status_code == 200
    refused = world.client.post(url, json=body, headers=world.headers(OFFICER, denied))
    assert refused.status_code == 403 and "was denied by admin" in refused.json()["detail"]


def test_an_approval_stays_used_once_the_approved_action_began(world: World, monkeypatch: Any) -> None:
    """The keys' destruction itself fails half-way: what was approved may have happened, so the approval is not
    given back (the failure is still the caller's answer, and nothing is returned twice)."""
    url = "/api/v1/vms/acme-web/keys/destroy"
    body = {"reason": "tenant left"}
    world.fleet.repo.set_vm_state("id-acme-web", VMState.STOPPED)
    approval = _asked(world.client.post(url, json=body, headers=world.headers(OFFICER)))
    assert world.client.post(f"/api/v1/approvals/{approval}/approve", headers=world.headers(ADMIN)).status_code == 200
    assert world.fleet.keys is not None

    def half_done(vm_id: str, reason: str) -> list[str]:
        raise StorageError("the key store's disk failed after the first key")

    monkeypatch.setattr(world.fleet.keys, "destroy", half_done)
    failed = world.client.post(url, json=body, headers=world.headers(OFFICER, approval))
    assert failed.status_code >= 400 and "key store" in failed.json()["detail"], failed.text
    assert world.fleet.repo.get_approval(approval).state == "used"
    assert world.fleet.repo.list_events(kind_prefix="approval.returned") == []
    again = world.client.post(url, json=body, headers=world.headers(OFFICER, approval))
    assert again.status_code == 403 and "used already" in again.json()["detail"]


def test_an_approval_expires_and_binds_exactly_what_was_asked(world: World) -> None:
    force = {"name": "forced-1", "tenant": "acme", "memory": "128", "force": True}
    approval = _asked(world.client.post("/api/v1/vms", json=force, headers=world.headers(ADMIN)))
    assert world.client.post(f"/api/v1/approvals/{approval}/approve", headers=world.headers(OFFICER)).status_code == 200
    bigger = {**force, "memory": "4096"}
    changed = world.client.post("/api/v1/vms", json=bigger, headers=world.headers(ADMIN, approval))
    assert changed.status_code == 403 and "another request" in changed.json()["detail"]
    with world.fleet.repo.engine.begin() as conn:  # an hour later
        past = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
        conn.execute(sa.update(approvals).where(approvals.c.id == approval).values(expires_at=past))
    expired = world.client.post("/api/v1/vms", json=force, headers=world.headers(ADMIN, approval))
    assert expired.status_code == 403 and "expired" in expired.json()["detail"]
    # a tenant's admin may not force at all: no approval is even asked for
    tenant = world.client.post("/api/v1/vms", json=force, headers=world.headers(TENANT))
    assert tenant.status_code == 403 and tenant.json()["error"] == "Forbidden"
    # nor choose the host (and with it its neighbours)
    chosen = {"name": "near-1", "tenant": "acme", "memory": "128", "host": "h1"}
    placed = world.client.post("/api/v1/vms", json=chosen, headers=world.headers(TENANT))
    assert placed.status_code == 403 and "cannot choose the host" in placed.json()["detail"]
    bogus = world.client.post("/api/v1/vms", json=force, headers=world.headers(ADMIN, "abc"))
    assert bogus.status_code == 400


def test_disabling_the_last_fleet_admin_needs_a_second_person(world: World) -> None:
    asked = world.client.post("/api/v1/principals/admin/disable", headers=world.headers(ADMIN))
    approval = _asked(asked)
    assert "last fleet-admin" in asked.json()["detail"]
    assert world.client.post(f"/api/v1/approvals/{approval}/approve", headers=world.headers(OFFICER)).status_code == 200
    done = world.client.post("/api/v1/principals/admin/disable", headers=world.headers(ADMIN, approval))
    assert done.status_code == 200 and done.json()["active"] is False
    assert world.client.get("/api/v1/vms", headers=world.headers(ADMIN)).status_code == 401


def test_operators_policies_are_validated_and_in_force_at_once(world: World) -> None:
    admin = world.headers(ADMIN)
    bad = world.client.put(
        "/api/v1/access-policies/broken",
        json={"text": "permit(principal, action, resource) when { principal.x };"},
        headers=admin,
    )
    assert bad.status_code == 400 and "attribute `x`" in bad.json()["detail"]
    garbage = world.client.put("/api/v1/access-policies/garbage", json={"text": "permit(principal"}, headers=admin)
    assert garbage.status_code == 400 and "does not parse" in garbage.json()["detail"]
    assert world.client.get("/api/v1/access-policies", headers=admin).json() == []
    # acme's admin may delete VMs; a forbid of the operators' takes that away at once, and its removal gives it back
    no_delete = 'forbid (principal in Role::"tenant-admin", action == Action::"vm:delete", resource);'
    put = world.client.put("/api/v1/access-policies/no-tenant-delete", json={"text": no_delete}, headers=admin)
    assert put.status_code == 200
    refused = world.client.delete("/api/v1/vms/acme-web", headers=world.headers(TENANT))
    assert refused.status_code == 403 and "custom:no-tenant-delete" in _last_denial(world)
    assert world.client.delete("/api/v1/access-policies/no-tenant-delete", headers=admin).status_code == 200
    shown = world.client.get("/api/v1/roles/tenant-admin", headers=admin).json()
    assert 'principal in Role::"tenant-admin"' in shown["cedar"]


def _last_denial(world: World) -> str:
    return world.fleet.repo.list_events(kind_prefix="authz.denied", limit=1)[0].message
