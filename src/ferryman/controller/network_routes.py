"""REST routes of virtual networks (``/api/v1/networks``) and of a VM's NICs: their rules as its host reads them
back, and isolation (every NIC of the VM cut off but for its network's forensic port).

Isolation is persisted before its side effect: the NICs' new rule revision is written (and audited as requested)
before the host installs it; the host reads the rules back and the controller checks and records their hash. A VM in
the middle of a migration is not isolated (its rules are being set up on another host): retry when it ends.
"""

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field

from ferryman.controller import schemas as s
from ferryman.controller.fleet import Fleet
from ferryman.controller.networks import NetworkService, NetworkView
from ferryman.controller.offload import blocking
from ferryman.core import errors
from ferryman.core.models import VM, Host, Network, Severity
from ferryman.network.rules import RULES_FORMAT


class NetworkIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    tenant: str
    cidr: str = Field(description="IPv4 prefix, e.g. 10.50.1.0/24")
    cidr6: str | None = Field(default=None, description="optional IPv6 prefix, /48 to /64")
    vlan: int | None = Field(default=None, description="segment id the operator asks for (carried as the VNI)")
    forensic_port: int = 22


def network_out(network: Network, members: int | None = None, *, tenant_view: bool = False) -> dict[str, Any]:
    """A network as the API shows it. A tenant's principal does not see its segment id: the fleet allocates them in
    sequence, so one would count every tenant's networks."""
    out: dict[str, Any] = {
        "name": network.name,
        "tenant": network.tenant,
        "cidr": network.cidr,
        "cidr6": network.cidr6,
        "vni": network.vni,
        "vlan": network.vlan,
        "forensic_port": network.forensic_port,
        "rules_format": RULES_FORMAT,
        "created_at": network.created_at.isoformat() if network.created_at else None,
    }
    if members is not None:
        out["members"] = members
    if tenant_view:
        del out["vni"], out["vlan"]
    return out


def view_out(view: NetworkView, *, tenant_view: bool = False) -> dict[str, Any]:
    return network_out(view.network, len(view.members), tenant_view=tenant_view) | {
        "hosts": view.hosts,
        "nics": [s.NicOut.of(m.nic).model_dump(mode="json") | {"vm": m.vm_name, "host": m.host} for m in view.members],
    }


def network_routes(app: FastAPI, fleet: Fleet, networks: NetworkService, Person: Any) -> None:
    @app.post("/api/v1/networks", status_code=201)
    def create_network(body: NetworkIn, who: Person) -> dict[str, Any]:
        if who.tenant is not None and body.vlan is not None:  # segment ids are the fleet's, shared by every tenant
            problem = "a tenant's principal cannot choose the segment (--vlan): the fleet allocates it"
            fleet.audit(
                "authz.denied",
                f"{who.id} ({who.role}): {problem}",
                who.name,
                severity=Severity.WARNING,
                action="network:write",
            )
            raise errors.Forbidden(problem)
        network = networks.create(
            body.name,
            body.tenant,
            body.cidr,
            who.name,
            cidr6=body.cidr6,
            vlan=body.vlan,
            forensic_port=body.forensic_port,
        )
        return network_out(network, 0, tenant_view=who.tenant is not None)

    @app.get("/api/v1/networks")
    def list_networks(who: Person, tenant: str | None = None) -> list[dict[str, Any]]:
        if who.tenant is not None:  # a tenant's principal sees its tenant's networks only
            if tenant not in (None, who.tenant):
                return []
            tenant = who.tenant
        mine = who.tenant is not None
        return [network_out(n, len(fleet.repo.nics_on(n)), tenant_view=mine) for n in fleet.repo.list_networks(tenant)]

    @app.get("/api/v1/networks/{name}")
    def show_network(name: str, who: Person, tenant: str | None = None) -> dict[str, Any]:
        """A network name is its tenant's own: the tenant asked for (whose network the access check decided on), or
        the caller's own."""
        return view_out(networks.view(name, tenant or who.tenant), tenant_view=who.tenant is not None)

    @app.get("/api/v1/vms/{name}/nics")
    async def vm_nics(name: str, _: Person, live: bool = False) -> list[dict[str, Any]]:
        """The VM's NICs as the CMDB knows them; ``live``: with the rules its host reads back now (hash and the
        packets each named counter dropped)."""
        vm, host = await blocking(_placed, fleet, name)
        nics = await blocking(fleet.repo.nics_of, vm.id)
        out = [s.NicOut.of(n).model_dump(mode="json") for n in nics]
        if live and nics and host is not None:
            states = {st.nic_id: st for st in await fleet.agents.nic_states(host, vm.id)}
            for item in out:
                state = states.get(item["id"])
                item["live"] = None if state is None else state.model_dump(mode="json") | {"host": host.name}
        return out

    @app.post("/api/v1/vms/{name}/isolate")
    async def isolate(name: str, who: Person) -> dict[str, Any]:
        return await isolate_vm(fleet, networks, name, True, who.name)

    @app.post("/api/v1/vms/{name}/unisolate")
    async def unisolate(name: str, who: Person) -> dict[str, Any]:
        return await isolate_vm(fleet, networks, name, False, who.name)


def _placed(fleet: Fleet, name: str) -> tuple[VM, Host | None]:
    vm, placement = fleet.get_vm(name)
    return vm, fleet.repo.get_host(placement.host) if placement is not None else None


async def isolate_vm(
    fleet: Fleet, networks: NetworkService, name: str, isolated: bool, principal: str
) -> dict[str, Any]:
    """Isolate (or give back the network of) every NIC of the VM ``name`` on its host; persisted and audited before
    the host installs the new rules, checked after."""
    verb = "isolate" if isolated else "unisolate"
    vm, host = await blocking(_placed, fleet, name)
    if host is None:
        raise errors.Conflict(f"{vm.name} has no placement")
    active = await blocking(fleet.repo.list_migrations, active_only=True)
    if any(r.vm_id == vm.id for r in active):
        raise errors.Conflict(f"{vm.name} is being migrated; {verb} it when the migration has ended")
    await blocking(
        fleet.audit, f"vm.{verb}_requested", f"{verb} {vm.name} on {host.name}", principal, vm=vm.id, host=host.name
    )
    nics = await blocking(networks.set_isolated, vm, isolated)  # persisted before any host acts on it
    specs = await blocking(networks.specs, vm.id, host.name)
    states = await fleet.agents.update_nics(host, vm.id, specs)
    summary = "rules installed at its next boot"
    if states:
        summary = await blocking(networks.check_applied, vm.id, host.name, states, record_host=True)
    await blocking(
        fleet.audit,
        f"vm.{'isolated' if isolated else 'unisolated'}",
        f"{vm.name} on {host.name}: "
        + (f"only port {specs[0].forensic_port} open" if isolated else "network access restored")
        + f" ({summary})",
        principal,
        vm=vm.id,
        host=host.name,
        severity=Severity.WARNING if isolated else Severity.INFO,
        nics=[n.id for n in nics],
    )
    refreshed = await blocking(fleet.repo.nics_of, vm.id)
    return {
        "vm": vm.name,
        "host": host.name,
        "isolated": isolated,
        "nics": [s.NicOut.of(n).model_dump(mode="json") for n in refreshed],
    }
