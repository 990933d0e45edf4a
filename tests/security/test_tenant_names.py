"""VM names are a tenant's own: a name another tenant uses is no answer to anything a tenant asks.

A fleet-wide unique name was an existence oracle: a refused create told acme that globex had a VM of that name. Now
each tenant has its own names; a tenant's principal resolves a name in its tenant, a fleet-wide principal gets an
ambiguity naming every tenant's VM of that name, and an id is always one VM.
"""

from __future__ import annotations

from typing import Any

from ferryman.core.models import VM, VMState

from .conftest import World

ADMIN, TENANT, VIEWER = "fleet-admin", "tenant-admin", "tenant-viewer"


def _same_name_in_both(world: World) -> None:
    now = world.fleet.clock.now()
    for tenant in ("acme", "globex"):
        vm = VM(f"id-{tenant}-w", "web", tenant, 128, 1, 1 << 30, "lab", f"c-{tenant}", state=VMState.RUNNING)
        world.fleet.repo.add_vm(vm, "h1", now)
        world.fleet.audit("vm.note", f"web of {tenant} did something", "system", vm=vm.id, host="h1")


def _get(world: World, path: str, role: str, **params: Any) -> Any:
    return world.client.get(path, params=params, headers=world.headers(role))


def test_a_tenant_may_use_a_name_another_tenant_uses(world: World) -> None:
    """The create is refused for what it is (no host can run it here), not for globex's name: nothing says that
    globex has a VM of this name."""
    body = {"name": "globex-db", "tenant": "acme", "memory": "128M", "disk": "1G", "image": "lab"}
    out = world.client.post("/api/v1/vms", json=body, headers=world.headers(TENANT))
    assert out.status_code != 409 and "globex" not in out.text, out.text
    ours = body | {"name": "acme-web"}
    taken = world.client.post("/api/v1/vms", json=ours, headers=world.headers(TENANT))
    assert taken.status_code == 409 and "acme-web" in taken.json()["detail"], taken.text


def test_a_name_resolves_in_the_callers_tenant(world: World) -> None:
    _same_name_in_both(world)
    for role in (TENANT, VIEWER):
        shown = _get(world, "/api/v1/vms/web", role)
        assert shown.status_code == 200 and shown.json()["id"] == "id-acme-w", shown.text
        nics = _get(world, "/api/v1/vms/web/nics", role)
        assert nics.status_code == 200, nics.text
        history = _get(world, "/api/v1/vms/web/history", role)
        assert history.status_code == 200 and {p["vm_id"] for p in history.json()} == {"id-acme-w"}
        events = _get(world, "/api/v1/events", role, vm="web")
        assert events.status_code == 200 and {e["vm"] for e in events.json()} == {"id-acme-w"}, events.text
        assert "globex" not in shown.text + history.text + events.text


def test_a_fleet_wide_principal_is_told_the_name_is_ambiguous(world: World) -> None:
    _same_name_in_both(world)
    out = _get(world, "/api/v1/vms/web", ADMIN)
    assert out.status_code == 400, out.text
    detail = out.json()["detail"]
    assert "acme (id-acme-w)" in detail and "globex (id-globex-w)" in detail and "tenant/name or by id" in detail
    events = _get(world, "/api/v1/events", ADMIN, vm="web")
    assert events.status_code == 400, events.text
    by_id = _get(world, "/api/v1/vms/id-globex-w", ADMIN)
    assert by_id.status_code == 200 and by_id.json()["tenant"] == "globex", by_id.text


def test_a_fleet_wide_principal_names_one_tenants_vm_as_tenant_slash_name(world: World) -> None:
    """``ferryman vm show globex/web``: the CLI asks for ``web`` in tenant globex; a body or query field may say
    ``globex/web`` itself. A tenant that has no VM of that name is a 404, never another tenant's VM."""
    _same_name_in_both(world)
    shown = _get(world, "/api/v1/vms/web", ADMIN, tenant="globex")
    assert shown.status_code == 200 and shown.json()["id"] == "id-globex-w", shown.text
    history = _get(world, "/api/v1/vms/web/history", ADMIN, tenant="acme")
    assert history.status_code == 200 and {p["vm_id"] for p in history.json()} == {"id-acme-w"}, history.text
    events = _get(world, "/api/v1/events", ADMIN, vm="globex/web")
    assert events.status_code == 200 and {e["vm"] for e in events.json()} == {"id-globex-w"}, events.text
    for tenant, name in (("initech", "web"), ("acme", "globex-db")):
        missing = _get(world, f"/api/v1/vms/{name}", ADMIN, tenant=tenant)
        assert missing.status_code == 404 and missing.json()["detail"] == f"VM '{tenant}/{name}' not found"
    assert _get(world, "/api/v1/events", ADMIN, vm="acme/globex-db").status_code == 404
    stopped = world.client.post("/api/v1/vms/web/stop", params={"tenant": "nobody"}, headers=world.headers(ADMIN))
    assert stopped.status_code == 404, stopped.text
    assert {v.state for v in world.fleet.repo.list_vms() if v.name == "web"} == {VMState.RUNNING}


def test_a_tenant_naming_another_tenant_learns_nothing(world: World) -> None:
    """acme asking for globex's web, by path and tenant or as ``globex/web``, gets the answer a VM that does not
    exist gets, word for word; the attempt on a VM that exists is an audited denial."""
    _same_name_in_both(world)
    denied_before = len(world.fleet.repo.list_events(kind_prefix="authz.denied"))
    for role in (TENANT, VIEWER):
        there = _get(world, "/api/v1/vms/web", role, tenant="globex")
        absent = _get(world, "/api/v1/vms/nothere", role, tenant="globex")
        assert (there.status_code, absent.status_code) == (404, 404), there.text
        assert there.json()["detail"].replace("web", "X") == absent.json()["detail"].replace("nothere", "X")
        assert "id-globex" not in there.text
        for vm in ("globex/web", "globex/nothere"):
            out = _get(world, "/api/v1/events", role, vm=vm)
            assert out.status_code == 404 and out.json()["detail"] == f"VM {vm!r} not found", out.text
        own = _get(world, "/api/v1/vms/web", role, tenant="acme")
        assert own.status_code == 200 and own.json()["id"] == "id-acme-w", own.text
    denials = world.fleet.repo.list_events(kind_prefix="authz.denied")
    # per role: the path and the events of globex/web (denied on globex's VM), the events of globex/nothere
    assert len(denials) - denied_before == 6
    assert {d.data.get("tenant") for d in denials[:6]} == {"globex", None}


def test_another_tenants_vm_by_id_is_not_found_and_audited(world: World) -> None:
    _same_name_in_both(world)
    denied_before = len(world.fleet.repo.list_events(kind_prefix="authz.denied"))
    out = _get(world, "/api/v1/vms/id-globex-w", TENANT)
    assert out.status_code == 404 and out.json()["detail"] == "VM 'id-globex-w' not found", out.text
    denials = world.fleet.repo.list_events(kind_prefix="authz.denied")
    assert len(denials) == denied_before + 1 and denials[0].data["tenant"] == "globex"


def test_the_route_acts_on_the_vm_that_was_authorised(world: World) -> None:
    """The access check resolves the name once and hands the route the VM's id: a VM that takes the name between
    the check and the route's own lookup is not the one acted on."""
    _same_name_in_both(world)
    out = world.client.post("/api/v1/vms/web/stop", headers=world.headers(TENANT))
    # no agent runs here: the stop reaches acme's VM's host and fails there, globex's VM is untouched
    assert out.status_code >= 400 and "globex" not in out.text, out.text
    requested = world.fleet.repo.list_events(kind_prefix="vm.stop_requested")
    assert [e.vm for e in requested] == ["id-acme-w"], requested


def test_an_alert_naming_a_name_two_tenants_use_opens_nothing(world: World) -> None:
    """A sensor that names ``web`` is not guessed at: the alert is unmatched, no tenant's VM gets an incident."""
    _same_name_in_both(world)
    before = len(world.fleet.repo.list_incidents())
    body = {"severity": "high", "rule": "test", "vm": "web"}
    out = world.client.post("/api/v1/alerts/generic", json=body, headers=world.headers("alert-source"))
    assert out.status_code == 202 and out.json()["unmatched"] == 1 and out.json()["opened"] == [], out.text
    assert len(world.fleet.repo.list_incidents()) == before
    one = world.client.post(
        "/api/v1/alerts/generic", json=body | {"vm": "id-globex-w"}, headers=world.headers("alert-source")
    )
    assert one.status_code == 202 and len(one.json()["opened"]) == 1, one.text


def test_network_names_are_a_tenants_own_too(world: World) -> None:
    body = {"name": "globex-net", "tenant": "acme", "cidr": "10.9.0.0/24"}
    made = world.client.post("/api/v1/networks", json=body, headers=world.headers(TENANT))
    assert made.status_code == 201 and made.json()["tenant"] == "acme", made.text
    again = world.client.post("/api/v1/networks", json=body, headers=world.headers(TENANT))
    assert again.status_code == 409 and "globex" not in again.text.replace("globex-net", ""), again.text
    for role in (TENANT, VIEWER):
        mine = _get(world, "/api/v1/networks/globex-net", role)
        assert mine.status_code == 200 and mine.json()["tenant"] == "acme", mine.text
        # asking for globex's by name: the answer a network that does not exist gets
        theirs = _get(world, "/api/v1/networks/globex-net", role, tenant="globex")
        absent = _get(world, "/api/v1/networks/nothere", role, tenant="globex")
        assert (theirs.status_code, absent.status_code) == (404, 404), theirs.text
        assert theirs.json()["detail"].replace("globex-net", "X") == absent.json()["detail"].replace("nothere", "X")
    ambiguous = _get(world, "/api/v1/networks/globex-net", ADMIN)
    assert ambiguous.status_code == 400 and "--tenant" in ambiguous.json()["detail"], ambiguous.text
    theirs = _get(world, "/api/v1/networks/globex-net", ADMIN, tenant="globex")
    assert theirs.status_code == 200 and theirs.json()["tenant"] == "globex", theirs.text


def test_a_tenant_cannot_choose_a_segment_id(world: World) -> None:
    """Segment ids are shared by every tenant: a tenant that could pick one would learn which ones others use."""
    body = {"name": "lan", "tenant": "acme", "cidr": "10.9.0.0/24", "vlan": 101}
    out = world.client.post("/api/v1/networks", json=body, headers=world.headers(TENANT))
    assert out.status_code == 403 and "--vlan" in out.json()["detail"], out.text
    denials = world.fleet.repo.list_events(kind_prefix="authz.denied")
    assert denials and "--vlan" in denials[0].message
    assert world.client.post("/api/v1/networks", json=body, headers=world.headers(ADMIN)).status_code == 201


def test_an_operators_policy_names_one_tenants_vm(world: World) -> None:
    """Cedar knows a VM as tenant/name: a forbid on acme's web leaves globex's web alone."""
    _same_name_in_both(world)
    policy = 'forbid (principal, action == Action::"vm:read", resource == Vm::"acme/web");'
    put = world.client.put("/api/v1/access-policies/not-acme-web", json={"text": policy}, headers=world.headers(ADMIN))
    assert put.status_code == 200, put.text
    refused = _get(world, "/api/v1/vms/id-acme-w", ADMIN)
    assert refused.status_code == 403 and "Vm::acme/web" in refused.json()["detail"], refused.text
    assert _get(world, "/api/v1/vms/id-globex-w", ADMIN).status_code == 200
    assert _get(world, "/api/v1/vms/web", TENANT).status_code == 403  # its own VM: it knows it exists
