"""Access control against the tricks of someone looking for a way around it: a force that is not a boolean, a token
minted to approve one's own request, an approval reused for a new VM of the same name, an incident named with a
sign, request bodies and ids built to crash the checker, a policy that locks every admin out, a flood of denials."""

from __future__ import annotations

import re
from typing import Any

import pytest

from ferryman.controller import access
from ferryman.core.models import VM, VMState

from .conftest import World

ADMIN, OFFICER, TENANT, VIEWER = "fleet-admin", "security-officer", "tenant-admin", "tenant-viewer"


def _approval_id(response: Any) -> int:
    assert response.status_code == 403 and response.json()["error"] == "ApprovalRequired", response.text
    return int(re.search(r"approval (\d+) requested", response.json()["detail"]).group(1))


def test_a_force_that_is_not_a_boolean_is_still_a_force(world: World) -> None:
    for spelled in ("true", 1, "on"):
        body = {"to": "nope", "force": spelled}
        asked = world.client.post("/api/v1/vms/acme-web/migrate", json=body, headers=world.headers(ADMIN))
        approval = _approval_id(asked)
        world.client.post(f"/api/v1/approvals/{approval}/approve", headers=world.headers(OFFICER))
        refused = world.client.post("/api/v1/vms/acme-web/migrate", json=body, headers=world.headers(ADMIN, approval))
        assert refused.status_code == 400 and "force" in refused.json()["detail"], refused.text


def test_asking_twice_is_one_request(world: World) -> None:
    body = {"reason": "gone"}
    first = _approval_id(
        world.client.post("/api/v1/vms/acme-web/keys/destroy", json=body, headers=world.headers(OFFICER))
    )
    again = _approval_id(
        world.client.post("/api/v1/vms/acme-web/keys/destroy", json=body, headers=world.headers(OFFICER))
    )
    assert first == again and len(world.fleet.repo.list_approvals(state="pending")) == 1


def test_a_token_minted_after_the_request_cannot_approve_it(world: World) -> None:
    """The requester, an admin, resets the officer's token (or creates a new officer) to approve its own request."""
    body = {"reason": "tenant left"}
    approval = _approval_id(
        world.client.post("/api/v1/vms/acme-web/keys/destroy", json=body, headers=world.headers(ADMIN))
    )
    stolen = world.client.post("/api/v1/principals/securityofficer/tokens", headers=world.headers(ADMIN)).json()
    fresh = world.client.post(
        "/api/v1/principals", json={"name": "puppet", "role": OFFICER}, headers=world.headers(ADMIN)
    ).json()
    for token in (stolen["token"], fresh["token"]):
        refused = world.client.post(
            f"/api/v1/approvals/{approval}/approve", headers={"Authorization": f"Bearer {token}"}
        )
        assert refused.status_code == 403 and "older than" in refused.json()["detail"], refused.text
    assert world.fleet.repo.get_approval(approval).state == "pending"


def test_an_approval_is_for_the_vm_not_for_its_name(world: World) -> None:
    repo = world.fleet.repo
    body = {"reason": "crypto-shred"}
    approval = _approval_id(
        world.client.post("/api/v1/vms/acme-web/keys/destroy", json=body, headers=world.headers(OFFICER))
    )
    assert world.client.post(f"/api/v1/approvals/{approval}/approve", headers=world.headers(ADMIN)).status_code == 200
    now = world.fleet.clock.now()
    repo.delete_vm("id-acme-web", now)
    repo.add_vm(VM("id-acme-web-2", "acme-web", "acme", 128, 1, 1 << 30, "lab", "c2", state=VMState.STOPPED), "h1", now)
    reused = world.client.post("/api/v1/vms/acme-web/keys/destroy", json=body, headers=world.headers(OFFICER, approval))
    assert reused.status_code == 403 and "another request" in reused.json()["detail"]


def test_an_incident_spelled_otherwise_is_the_same_incident(world: World) -> None:
    """An operator's forbid on globex's incidents holds however the incident id is written."""
    policy = (
        'forbid (principal, action, resource is Incident) when { resource has tenant && resource.tenant == "globex" };'
    )
    put = world.client.put("/api/v1/access-policies/no-globex", json={"text": policy}, headers=world.headers(ADMIN))
    assert put.status_code == 200
    number = world.ids["globex"]
    for spelled in (number, f"%2B{number}", f"{number}.0", f"0{number}"):
        response = world.client.get(f"/api/v1/incidents/{spelled}", headers=world.headers(OFFICER))
        assert response.status_code in (403, 400, 422), (spelled, response.text)
    assert world.client.get(f"/api/v1/incidents/{world.ids['acme']}", headers=world.headers(OFFICER)).status_code == 200


@pytest.mark.parametrize("role", [ADMIN, VIEWER])
def test_odd_ids_and_bodies_get_answers_not_crashes(world: World, role: str) -> None:
    headers = world.headers(role)
    for url in (
        "/api/v1/incidents/%C2%B2",
        "/api/v1/incidents/99999999999999999999",
        "/api/v1/vms/%0D",
        "/api/v1/vms/%00x",
    ):
        response = world.client.get(url, headers=headers)
        assert 400 <= response.status_code < 500, (url, response.text)
    deep = world.client.post(
        "/api/v1/vms", content=b"[" * 200_000, headers={**headers, "content-type": "application/json"}
    )
    assert 400 <= deep.status_code < 500
    anonymous = world.client.post("/api/v1/vms", content=b"[" * 200_000, headers={"content-type": "text/plain"})
    assert anonymous.status_code == 401
    long = world.client.get("/api/v1/vms", headers={**headers, "X-Ferryman-Approval": "9" * 5000})
    assert long.status_code == 400


def test_a_policy_that_locks_every_admin_out_is_refused(world: World) -> None:
    lockout = world.client.put(
        "/api/v1/access-policies/lockout",
        json={"text": "forbid (principal, action, resource);"},
        headers=world.headers(ADMIN),
    )
    assert lockout.status_code == 400 and "no active fleet-admin" in lockout.json()["detail"]
    template = world.client.put(
        "/api/v1/access-policies/tpl",
        json={"text": "permit (principal == ?principal, action, resource);"},
        headers=world.headers(ADMIN),
    )
    assert template.status_code == 400 and "templates" in template.json()["detail"]
    assert world.client.get("/api/v1/access-policies", headers=world.headers(ADMIN)).json() == []


def test_two_admins_disabling_each_other_leave_one(world: World) -> None:
    """The last admin's disabling needs a second person even when the other admin left a moment before."""
    other = world.client.post(
        "/api/v1/principals", json={"name": "admin-2", "role": ADMIN}, headers=world.headers(ADMIN)
    ).json()["token"]
    repo = world.fleet.repo
    at = world.fleet.clock.now()
    repo.disable_principal("admin-2", at, "token:admin", keep_one_of=ADMIN)
    with pytest.raises(Exception, match="last active fleet-admin"):
        repo.disable_principal("admin", at, "token:admin-2", keep_one_of=ADMIN)
    assert repo.active_principals(ADMIN) == ["admin"]
    assert world.client.get("/api/v1/vms", headers={"Authorization": f"Bearer {other}"}).status_code == 401


def test_a_flood_of_denials_is_audited_once_a_minute_after_the_first(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(access, "DENIALS_AUDITED", 5)
    for _ in range(40):
        assert world.client.get("/api/v1/hosts", headers=world.headers(VIEWER)).status_code == 403
    denied = world.fleet.repo.list_events(kind_prefix="authz.denied", limit=100)
    assert len([e for e in denied if e.kind == "authz.denied"]) == 5
    # the next minute's first denial brings the summary of the suppressed ones
    times = access.time.monotonic
    monkeypatch.setattr(access.time, "monotonic", lambda: times() + 61.0)
    assert world.client.get("/api/v1/hosts", headers=world.headers(VIEWER)).status_code == 403
    summary = world.fleet.repo.list_events(kind_prefix="authz.denied_suppressed", limit=5)
    assert len(summary) == 1 and summary[0].data["count"] == 35


def test_an_approval_dies_with_its_approver(world: World) -> None:
    body = {"reason": "tenant left"}
    url = "/api/v1/vms/acme-web/keys/destroy"
    approval = _approval_id(world.client.post(url, json=body, headers=world.headers(ADMIN)))
    assert world.client.post(f"/api/v1/approvals/{approval}/approve", headers=world.headers(OFFICER)).status_code == 200
    assert (
        world.client.post("/api/v1/principals/securityofficer/disable", headers=world.headers(ADMIN)).status_code == 200
    )
    refused = world.client.post(url, json=body, headers=world.headers(ADMIN, approval))
    assert refused.status_code == 403 and "disabled since" in refused.json()["detail"]


def test_a_flood_of_denials_does_not_push_a_neighbours_incident_out_of_the_tenant_report(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ferryman.controller import reports
    from ferryman.core.models import Severity

    monkeypatch.setattr(reports, "MAX_INCIDENTS", 5)
    world.fleet.audit(
        "vm.crashed", "globex-db crashed", "system", vm="id-globex-db", host="h1", severity=Severity.ALARM
    )
    for _ in range(10):  # newer than the neighbour's incident, and more than a report reads at once
        assert world.client.get("/api/v1/hosts", headers=world.headers(VIEWER)).status_code == 403
    report = world.client.get("/api/v1/compliance/report?tenant=acme&since=-1d", headers=world.headers(VIEWER))
    assert report.status_code == 200, report.text
    assert [i["kind"] for i in report.json()["incidents"]] == ["vm.crashed"]
    assert "globex" not in report.text
