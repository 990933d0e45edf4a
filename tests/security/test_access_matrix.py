"""Who may call what: every API route, for every role, on its own and on another tenant, against a hand-written table.

The controller is the real one (``build``: SQLite CMDB, CA, Cedar), driven over HTTP in-process without agents; the
seeded fleet has two tenants, acme (whose principals ask) and globex, with a VM, a network and an incident each. A
request counts as denied when the controller audits an ``authz.denied`` entry for it; the table says which roles may
call each route (a tenant's role on its own tenant's resources; on another tenant's it must get the very 404 a
missing resource gets). Requests carry bodies the authoriser can read but the route then rejects, so allowed calls
change as little as possible; the few that act anyway come last, in a world of their own per role.
"""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.routing import APIRoute

from ferryman.controller.access import RULES

from .conftest import ROLES, World

F, H, S, A, TA, TV, AS = ROLES
STAFF_READ = frozenset({F, H, S, A})
EVERYONE = frozenset({F, H, S, A, TA, TV})  # every role but the alert source, which only posts alerts


def roles(*names: str) -> frozenset[str]:
    return frozenset(names)


# The expected table: route → roles allowed. A tenant role listed here is allowed on its own tenant's resources only.
EXPECTED: dict[tuple[str, str], frozenset[str]] = {
    ("GET", "/api/v1/sites"): STAFF_READ,
    ("POST", "/api/v1/sites"): roles(F, H),
    ("GET", "/api/v1/hosts"): STAFF_READ,
    ("POST", "/api/v1/hosts"): roles(F, H),
    ("GET", "/api/v1/hosts/{name}"): STAFF_READ,
    ("PATCH", "/api/v1/hosts/{name}"): roles(F, H),
    ("POST", "/api/v1/hosts/{name}/enrol-token"): roles(F, H),
    ("POST", "/api/v1/hosts/{name}/revoke"): roles(F, H, S),
    ("GET", "/api/v1/hosts/{name}/neighbours"): STAFF_READ,
    ("GET", "/api/v1/hosts/{name}/history"): STAFF_READ,
    ("POST", "/api/v1/hosts/{name}/drain"): roles(F, H),
    ("POST", "/api/v1/hosts/{name}/compromise"): roles(F, S),
    ("GET", "/api/v1/vms"): EVERYONE,
    ("POST", "/api/v1/vms"): roles(F, TA),
    ("GET", "/api/v1/vms/{name}"): EVERYONE,
    ("DELETE", "/api/v1/vms/{name}"): roles(F, TA),
    ("GET", "/api/v1/vms/{name}/history"): EVERYONE,
    ("GET", "/api/v1/vms/{name}/nics"): EVERYONE,
    ("GET", "/api/v1/vms/{name}/keys"): roles(F, S, A, TA, TV),
    ("POST", "/api/v1/vms/{name}/keys/destroy"): roles(F, S),
    ("POST", "/api/v1/vms/{name}/{action}"): roles(F, TA),
    ("POST", "/api/v1/vms/{name}/migrate"): roles(F, H),
    ("GET", "/api/v1/vms/{name}/snapshots"): roles(F, TA),
    ("POST", "/api/v1/vms/{name}/restore"): roles(F, TA),
    ("POST", "/api/v1/vms/{name}/isolate"): roles(F, S),
    ("POST", "/api/v1/vms/{name}/unisolate"): roles(F, S),
    ("POST", "/api/v1/vms/{name}/baseline"): roles(F, S),
    ("POST", "/api/v1/vms/{name}/remediated"): roles(F, S),
    ("GET", "/api/v1/events"): EVERYONE,
    ("GET", "/api/v1/alarms"): STAFF_READ,
    ("GET", "/api/v1/migrations"): STAFF_READ,
    ("GET", "/api/v1/migrations/{migration_id}"): STAFF_READ,
    ("POST", "/api/v1/migrations/{migration_id}/cancel"): roles(F, H),
    ("GET", "/api/v1/blobs/{digest}"): EVERYONE,
    ("PUT", "/api/v1/blobs/{digest}"): roles(F, S),
    ("GET", "/api/v1/images"): EVERYONE,
    ("POST", "/api/v1/images"): roles(F, S),
    ("GET", "/api/v1/images/{name}"): EVERYONE,
    ("POST", "/api/v1/images/{name}/verify"): EVERYONE,
    ("POST", "/api/v1/images/{name}/revoke"): roles(F, S),
    ("POST", "/api/v1/images/{name}/push"): roles(F, H),
    ("GET", "/api/v1/image-keys"): EVERYONE,
    ("POST", "/api/v1/image-keys"): roles(F, S),
    ("DELETE", "/api/v1/image-keys/{name}"): roles(F, S),
    ("GET", "/api/v1/networks"): EVERYONE,
    ("POST", "/api/v1/networks"): roles(F, TA),
    ("GET", "/api/v1/networks/{name}"): EVERYONE,
    ("POST", "/api/v1/alerts/{source}"): roles(F, S, AS),
    ("GET", "/api/v1/incidents"): roles(F, S, A),
    ("POST", "/api/v1/incidents"): roles(F, S),
    ("GET", "/api/v1/incidents/{incident_id}"): roles(F, S, A),
    ("POST", "/api/v1/incidents/{incident_id}/close"): roles(F, S),
    ("POST", "/api/v1/incidents/{incident_id}/capture"): roles(F, S),
    ("GET", "/api/v1/incidents/{incident_id}/evidence"): roles(F, S, A),
    ("GET", "/api/v1/incidents/{incident_id}/evidence/{capture}/{artefact}"): roles(F, S),
    ("GET", "/api/v1/incidents/{incident_id}/impact"): roles(F, S, A),
    ("GET", "/api/v1/incidents/{incident_id}/playbook"): roles(F, S, A),
    ("GET", "/api/v1/playbook"): roles(F, S, A),
    ("PUT", "/api/v1/playbook"): roles(F, S),
    ("GET", "/api/v1/capacity/quarantine"): STAFF_READ,
    ("POST", "/api/v1/policies/validate"): STAFF_READ,
    ("POST", "/api/v1/policies/preview"): STAFF_READ,
    ("POST", "/api/v1/policies/apply"): roles(F, S),
    ("POST", "/api/v1/policies/clear"): roles(F, S),
    ("GET", "/api/v1/policies"): STAFF_READ,
    ("GET", "/api/v1/policies/versions"): STAFF_READ,
    ("GET", "/api/v1/policies/{name}"): STAFF_READ,
    ("POST", "/api/v1/place"): STAFF_READ,
    ("GET", "/api/v1/compliance/violations"): STAFF_READ,
    ("POST", "/api/v1/compliance/check"): roles(F, S),
    ("GET", "/api/v1/compliance/plan"): STAFF_READ,
    ("POST", "/api/v1/compliance/plan/execute"): roles(F, S),
    ("GET", "/api/v1/compliance/report"): roles(F, S, A, TA, TV),
    ("GET", "/api/v1/audit/verify"): roles(F, S, A),
    ("GET", "/api/v1/audit/export"): roles(F, S, A),
    ("POST", "/api/v1/audit/checkpoints"): roles(F),
    ("GET", "/api/v1/principals"): roles(F, S, A),
    ("POST", "/api/v1/principals"): roles(F),
    ("GET", "/api/v1/principals/{name}"): roles(F, S, A),
    ("POST", "/api/v1/principals/{name}/disable"): roles(F),
    ("POST", "/api/v1/principals/{name}/tokens"): roles(F),
    ("GET", "/api/v1/roles"): roles(F, S, A),
    ("GET", "/api/v1/roles/{name}"): roles(F, S, A),
    ("GET", "/api/v1/access-policies"): roles(F, S, A),
    ("PUT", "/api/v1/access-policies/{name}"): roles(F),
    ("DELETE", "/api/v1/access-policies/{name}"): roles(F),
    ("GET", "/api/v1/approvals"): roles(F, S, A),
    ("POST", "/api/v1/approvals/{approval_id}/approve"): roles(F, S),
    ("POST", "/api/v1/approvals/{approval_id}/deny"): roles(F, S),
}

# Routes whose resource belongs to a tenant, and the path or query parameter (or body field) naming it.
TENANT_SCOPED = {
    key
    for key in EXPECTED
    if any(p in key[1] for p in ("/vms/{name}", "/networks/{name}", "/incidents/{incident_id}"))
    or key in {("POST", "/api/v1/vms"), ("POST", "/api/v1/networks"), ("GET", "/api/v1/compliance/report")}
}
# Allowed calls of these act (they would change what later requests see): they run last, in that order.
ACTING_LAST = [
    ("POST", "/api/v1/vms/{name}/{action}"),
    ("POST", "/api/v1/vms/{name}/restore"),
    ("POST", "/api/v1/vms/{name}/isolate"),
    ("POST", "/api/v1/vms/{name}/unisolate"),
    ("POST", "/api/v1/incidents/{incident_id}/capture"),
    ("DELETE", "/api/v1/vms/{name}"),
]


def _request(world: World, key: tuple[str, str], own: bool) -> tuple[str, str, dict[str, Any] | None]:
    """A concrete request for the route: its resource in the asking tenant (own) or the other one."""
    method, path = key
    tenant = "acme" if own else "globex"
    values = {
        "{name}": {"vms": f"{tenant}-web" if own else "globex-db", "networks": f"{tenant}-net"},
        "{incident_id}": world.ids[tenant],
    }
    concrete = path
    if "/vms/{name}" in path:
        concrete = concrete.replace("{name}", values["{name}"]["vms"])
    elif "/networks/{name}" in path:
        concrete = concrete.replace("{name}", values["{name}"]["networks"])
    concrete = (
        concrete.replace("{incident_id}", values["{incident_id}"])
        .replace("{name}", "nothing-here")
        .replace("{action}", "pause")
        .replace("{migration_id}", "0" * 36)
        .replace("{approval_id}", "999999")
        .replace("{digest}", "sha256:" + "0" * 64)
        .replace("{capture}", "c1")
        .replace("{artefact}", "memory")
        .replace("{source}", "generic")
    )
    body: dict[str, Any] | None = None
    if method in ("POST", "PUT", "PATCH"):
        body = {"tenant": tenant} if key in TENANT_SCOPED and "{" not in path else {"unexpected": True}
    if key == ("GET", "/api/v1/compliance/report"):
        concrete += f"?tenant={tenant}"
    return method, concrete, body


def _denials(world: World) -> int:
    return len(world.fleet.repo.list_events(kind_prefix="authz.denied", limit=5000))


def _call(world: World, role: str, key: tuple[str, str], own: bool) -> tuple[bool, Any]:
    method, url, body = _request(world, key, own)
    before = _denials(world)
    headers = {"Authorization": f"Bearer {world.tokens[role]}"}
    if body is None:
        response = world.client.request(method, url, headers=headers)
    else:
        response = world.client.request(method, url, headers=headers, json=body)
    assert response.status_code < 500 or response.status_code in (502, 503, 507), (role, key, response.text)
    assert "Traceback" not in response.text
    return _denials(world) == before, response


def test_the_table_covers_every_route_and_every_route_has_a_rule(world: World) -> None:
    """A route without a row here, or without an access rule, fails: new routes are classified on purpose."""
    routes = {
        (method, r.path)
        for r in world.client.app.routes
        if isinstance(r, APIRoute) and r.path.startswith("/api/v1/") and r.path != "/api/v1/enrol"
        for method in r.methods
    }
    assert routes == set(EXPECTED)
    assert set(RULES) == set(EXPECTED)


@pytest.mark.parametrize("role", ROLES)
def test_every_route_for_every_role_own_and_other_tenant(world: World, role: str) -> None:
    tenant_role = role in (TA, TV)
    order = [k for k in EXPECTED if k not in ACTING_LAST] + ACTING_LAST
    wrong = []
    for key in order:
        for own in (False, True) if key in TENANT_SCOPED else (True,):
            allowed, response = _call(world, role, key, own)
            expected = role in EXPECTED[key] and (own or not tenant_role)
            if allowed != expected:
                wrong.append(f"{key} own={own}: {'allowed' if allowed else 'denied'} ({response.status_code})")
            if tenant_role and not own:
                assert response.status_code == 404, (key, response.text)
            if not allowed and not (tenant_role and not own):
                assert response.status_code in (403, 404), (key, response.text)
    assert not wrong, "\n".join(wrong)


def test_a_tenant_learns_nothing_of_another_tenant(world: World) -> None:
    """No listing, report, event or error answers a tenant's principal with another tenant's names or ids."""
    secrets_of_globex = ("globex-db", "id-globex-db", "globex-net", "globex")
    for role in (TA, TV):
        for key in EXPECTED:
            if key[0] != "GET":
                continue
            for own in (False, True) if key in TENANT_SCOPED else (True,):
                _, response = _call(world, role, key, own)
                text = response.text
                if not own:  # it named globex's resource itself: the answer is the missing-resource one
                    text = text.replace("globex-db", "").replace("globex-net", "").replace("globex", "")
                leaked = [s for s in secrets_of_globex if s in text]
                assert not leaked, (role, key, own, leaked, text[:300])
    headers = {"Authorization": f"Bearer {world.tokens[TA]}"}
    image = world.client.get("/api/v1/images/lab", headers=headers).json()
    assert image["vm_names"] == ["acme-web"] and image["vms"] == 1  # the image's other users are not acme's to know
    assert [i["vms"] for i in world.client.get("/api/v1/images", headers=headers).json()] == [1]
    other = world.client.get("/api/v1/vms/globex-db", headers=headers).json()["detail"]
    missing = world.client.get("/api/v1/vms/no-such-vm", headers=headers).json()["detail"]
    assert other.replace("globex-db", "X") == missing.replace("no-such-vm", "X")
    events = world.client.get("/api/v1/events", headers=headers).json()
    assert events and {e["vm"] for e in events} == {"id-acme-web"}
    # the audit log's entry numbers are fleet-wide: the gaps between acme's would count everyone else's events
    assert {e["id"] for e in events} == {None} and {e["principal"] for e in events} == {""}
    # segment ids are allocated in sequence across the fleet: one would count every tenant's networks
    made = world.client.post(
        "/api/v1/networks", json={"name": "lan", "tenant": "acme", "cidr": "10.9.0.0/24"}, headers=headers
    )
    shown = [made.json(), *world.client.get("/api/v1/networks", headers=headers).json()]
    shown.append(world.client.get("/api/v1/networks/lan", headers=headers).json())
    assert made.status_code == 201 and len(shown) == 4 and not any("vni" in n or "vlan" in n for n in shown), shown
    admin = world.client.get("/api/v1/networks/lan", params={"tenant": "acme"}, headers=world.headers(F))
    assert isinstance(admin.json()["vni"], int), admin.text


def test_a_disabled_principal_or_a_revoked_token_authenticates_no_more(world: World) -> None:
    admin = {"Authorization": f"Bearer {world.tokens[F]}"}
    viewer = {"Authorization": f"Bearer {world.tokens[TV]}"}
    assert world.client.get("/api/v1/vms", headers=viewer).status_code == 200
    rotated = world.client.post("/api/v1/principals/tenantviewer/tokens", headers=admin)
    assert rotated.status_code == 201
    assert world.client.get("/api/v1/vms", headers=viewer).status_code == 401  # the old token is revoked
    fresh = {"Authorization": f"Bearer {rotated.json()['token']}"}
    assert world.client.get("/api/v1/vms", headers=fresh).status_code == 200
    assert world.client.post("/api/v1/principals/tenantviewer/disable", headers=admin).status_code == 200
    refused = world.client.get("/api/v1/vms", headers=fresh)
    assert refused.status_code == 401 and refused.json()["detail"] == "invalid API token"
    forged = {"Authorization": "Bearer fm_0000000000000000_" + "A" * 43}
    assert world.client.get("/api/v1/vms", headers=forged).status_code == 401
