"""Tenant networks and NICs on SQLite and PostgreSQL: segment allocation, addresses allocated in the transaction
that writes the NIC (never twice, the gateway never, an explicit address only if free), another tenant's network
is not found, released addresses are free again while the rows stay, and isolation bumps the rule revision."""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress

import pytest

from ferryman.cmdb.networks import NicRequest
from ferryman.cmdb.sql import SqlRepository
from ferryman.controller.networks import NetworkService
from ferryman.core.errors import CapacityError, Conflict, InvalidInput, NetworkError, NotFound
from ferryman.core.models import VM, Network
from ferryman.wire.network import NicState

T0 = dt.datetime(2026, 12, 6, 10, tzinfo=dt.UTC)


def vm(name: str, tenant: str = "acme") -> VM:
    return VM(
        id=f"id-{name}", name=name, tenant=tenant, memory_mb=256, vcpus=1, disk_bytes=1 << 26, image="x", canary="c"
    )


def net(name: str = "acme-prod", tenant: str = "acme", cidr: str = "10.50.1.0/24", **changes: object) -> Network:
    return dataclasses.replace(Network(name=name, tenant=tenant, cidr=cidr, vni=0), **changes)  # type: ignore[arg-type]


@pytest.fixture
def nets(fleet: SqlRepository) -> SqlRepository:
    fleet.add_network(net(cidr6="fd00:50:1::/64"))
    fleet.add_network(net("globex-lan", "globex"))
    for name in ("web", "db"):
        fleet.add_vm(vm(name), "h1", T0)
    fleet.add_vm(vm("spy", "globex"), "h2", T0)
    return fleet


def test_segments_are_allocated_and_unique(nets: SqlRepository) -> None:
    first, second = nets.get_network("acme-prod"), nets.get_network("globex-lan")
    assert {first.vni, second.vni} == {1000, 1001}
    assert nets.add_network(net("vlan-net", vni=101, vlan=101)).vni == 101
    with pytest.raises(Conflict, match="segment 101"):
        nets.add_network(net("other", vni=101))
    with pytest.raises(Conflict, match="tenant 'acme' has a network named 'acme-prod' already"):
        nets.add_network(net())
    assert [n.name for n in nets.list_networks("acme")] == ["acme-prod", "vlan-net"]


def test_addresses_skip_the_gateway_and_never_repeat(nets: SqlRepository) -> None:
    (web,) = nets.add_nics("id-web", [NicRequest("acme-prod")])
    (db,) = nets.add_nics("id-db", [NicRequest("acme-prod")])
    assert (web.ipv4, db.ipv4) == ("10.50.1.2", "10.50.1.3")  # .1 is the gateway's
    assert web.ipv6 == "fd00:50:1::2"  # the same host number in the IPv6 prefix
    assert web.mac != db.mac and web.mac.startswith("52:54:00:")
    assert len(web.id) <= 11 and web.revision == 1 and web.rules_hash is None
    assert [n.id for n in nets.nics_on(nets.get_network("acme-prod"))] == [web.id, db.id]


def test_an_explicit_address_must_be_free_and_inside(nets: SqlRepository) -> None:
    nets.add_nics("id-web", [NicRequest("acme-prod", "10.50.1.10")])
    with pytest.raises(Conflict, match="in use"):
        nets.add_nics("id-db", [NicRequest("acme-prod", "10.50.1.10")])
    with pytest.raises(Conflict, match="gateway"):
        nets.add_nics("id-db", [NicRequest("acme-prod", "10.50.1.1")])
    with pytest.raises(InvalidInput, match="not a host address"):
        nets.add_nics("id-db", [NicRequest("acme-prod", "10.50.2.10")])
    assert nets.nics_of("id-db") == []  # a refused request writes nothing


def test_another_tenants_network_is_not_found(nets: SqlRepository) -> None:
    with pytest.raises(NotFound, match="not found for tenant acme"):
        nets.add_nics("id-web", [NicRequest("globex-lan")])
    # the same addresses in two tenants' networks are fine: they are different segments
    (spy,) = nets.add_nics("id-spy", [NicRequest("globex-lan", "10.50.1.2")])
    (web,) = nets.add_nics("id-web", [NicRequest("acme-prod")])
    assert spy.ipv4 == web.ipv4 == "10.50.1.2"


def test_network_names_are_unique_per_tenant(nets: SqlRepository) -> None:
    """globex may name a network as acme did: its own segment, its own addresses (the same ones), its own members;
    a name several tenants use resolves in a tenant, never fleet-wide."""
    theirs = nets.add_network(net("acme-prod", "globex"))
    ours = nets.get_network("acme-prod", tenant="acme")
    assert theirs.vni != ours.vni and theirs.tenant == "globex"
    with pytest.raises(InvalidInput, match="several tenants"):
        nets.get_network("acme-prod")
    with pytest.raises(NotFound):
        nets.get_network("acme-prod", tenant="initech")
    (web,) = nets.add_nics("id-web", [NicRequest("acme-prod")])
    (spy,) = nets.add_nics("id-spy", [NicRequest("acme-prod")])
    assert web.ipv4 == spy.ipv4 == "10.50.1.2"
    assert [n.id for n in nets.nics_on(ours)] == [web.id]
    assert [n.id for n in nets.nics_on(theirs)] == [spy.id]


def test_a_full_network_says_so(nets: SqlRepository) -> None:
    nets.add_network(net("tiny", cidr="10.9.9.0/29"))  # hosts .1-.6, .1 the gateway
    for i in range(5):
        nets.add_vm(vm(f"t{i}"), "h1", T0)
        nets.add_nics(f"id-t{i}", [NicRequest("tiny")])
    assert {n.ipv4 for n in nets.nics_on(nets.get_network("tiny"))} == {f"10.9.9.{i}" for i in range(2, 7)}
    nets.add_vm(vm("t5"), "h1", T0)
    with pytest.raises(CapacityError, match="no free address"):
        nets.add_nics("id-t5", [NicRequest("tiny")])


def test_released_addresses_are_free_again_and_history_stays(nets: SqlRepository) -> None:
    (web,) = nets.add_nics("id-web", [NicRequest("acme-prod")])
    released = nets.release_nics("id-web", T0)
    assert [n.id for n in released] == [web.id]
    assert nets.nics_of("id-web") == [] and nets.release_nics("id-web", T0) == []
    (db,) = nets.add_nics("id-db", [NicRequest("acme-prod", web.ipv4)])
    assert db.ipv4 == web.ipv4


def test_two_nics_of_one_vm_and_isolation_revisions(nets: SqlRepository) -> None:
    first, second = nets.add_nics("id-web", [NicRequest("acme-prod"), NicRequest("acme-prod")])
    assert (first.index, second.index) == (0, 1) and first.ipv4 != second.ipv4
    recorded = nets.update_nic(first.id, rules_hash="sha256:" + "a" * 64, host="h1", applied_at=T0)
    assert recorded.host == "h1" and recorded.revision == 1
    isolated = nets.update_nic(first.id, isolated=True)
    # what the rules allow changed: a new revision whose hash no host has read back yet
    assert isolated.isolated and isolated.revision == 2 and isolated.rules_hash is None and isolated.host is None
    assert nets.update_nic(first.id, isolated=True).revision == 2  # no change, no new revision
    with pytest.raises(InvalidInput, match="cannot be changed"):
        nets.update_nic(first.id, mac="52:54:00:00:00:01")


def test_allocation_is_consistent_with_ipaddress(nets: SqlRepository) -> None:
    nics = []
    for i in range(20):
        nets.add_vm(vm(f"m{i}"), "h1", T0)
        nics += nets.add_nics(f"id-m{i}", [NicRequest("acme-prod")])
    addresses = [ipaddress.IPv4Address(n.ipv4) for n in nics]
    assert len(set(addresses)) == 20 and all(a in ipaddress.IPv4Network("10.50.1.0/24") for a in addresses)
    assert len({n.mac for n in nics}) == 20


def test_rules_read_back_elsewhere_must_match_the_first_verified_hash(nets: SqlRepository) -> None:
    audited: list[tuple[str, str]] = []
    service = NetworkService(nets, lambda kind, message, *a, **k: audited.append((kind, message)), lambda: T0)
    (nic,) = nets.add_nics("id-web", [NicRequest("acme-prod")])
    first = NicState(nic_id=nic.id, table=f"fm_nic_{nic.id}", hash="sha256:" + "a" * 64)
    service.check_applied("id-web", "h2", [first], record_host=False)  # a destination: hash recorded, host not
    assert nets.nics_of("id-web")[0].rules_hash == first.hash and nets.nics_of("id-web")[0].host is None
    service.check_applied("id-web", "h1", [first], record_host=True)
    assert nets.nics_of("id-web")[0].host == "h1"
    other = first.model_copy(update={"hash": "sha256:" + "b" * 64})
    with pytest.raises(NetworkError, match="read back as"):
        service.check_applied("id-web", "h3", [other], record_host=True)
    with pytest.raises(NetworkError, match="holds no rules"):
        service.check_applied("id-web", "h3", [], record_host=True)
    assert [kind for kind, _ in audited] == ["network.rules_mismatch", "network.rules_mismatch"]
    assert nets.nics_of("id-web")[0].host == "h1"  # a refused host is never recorded as where the rules apply
    specs = service.specs("id-web", "h1")
    assert specs[0].ipv4 == nic.ipv4 and specs[0].cidr == "10.50.1.0/24" and specs[0].peers == ()  # no underlays
