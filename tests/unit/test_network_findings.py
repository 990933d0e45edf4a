"""Drift of the hosts' live NIC rules from the CMDB (pure): a running VM's NIC whose table is missing or reads back
with another hash on its host, a NIC table that belongs on another host, and any table Ferryman did not make."""

from __future__ import annotations

from ferryman.controller.networks import network_findings, nic_spec, underlay_peers
from ferryman.core.models import VM, Host, HostState, Network, Nic, VMState
from ferryman.wire.network import NetworkReport, NicState

H1 = "sha256:" + "1" * 64
H2 = "sha256:" + "2" * 64


def vm(name: str, state: VMState = VMState.RUNNING) -> VM:
    return VM(
        id=f"id-{name}",
        name=name,
        tenant="acme",
        memory_mb=256,
        vcpus=1,
        disk_bytes=1,
        image="x",
        canary="c",
        state=state,
    )


def nic(nic_id: str, vm_id: str, rules_hash: str | None = H1) -> Nic:
    return Nic(
        id=nic_id, vm_id=vm_id, network="n", index=0, mac="52:54:00:00:00:01", ipv4="10.0.0.2", rules_hash=rules_hash
    )


def state(nic_id: str, digest: str = H1) -> NicState:
    return NicState(nic_id=nic_id, table=f"fm_nic_{nic_id}", hash=digest)


VMS = {v.id: v for v in (vm("web"), vm("db"), vm("new", VMState.CREATING), vm("off", VMState.STOPPED))}


def kinds(found: list) -> list[tuple[str, str | None, str]]:
    return sorted(((f.kind, f.vm_id, f.host) for f in found), key=lambda k: (k[0], k[1] or "", k[2]))


def test_matching_tables_are_quiet() -> None:
    nics = [nic("na", "id-web"), nic("nb", "id-db")]
    reports = {"h1": NetworkReport(nics=[state("na")]), "h2": NetworkReport(nics=[state("nb")])}
    assert network_findings(nics, VMS, {"id-web": "h1", "id-db": "h2"}, reports) == []


def test_a_changed_or_missing_table_is_drift_on_the_vms_host() -> None:
    nics = [nic("na", "id-web"), nic("nb", "id-db"), nic("nc", "id-off")]
    reports = {"h1": NetworkReport(nics=[state("na", H2)]), "h2": NetworkReport(nics=[])}
    found = network_findings(nics, VMS, {"id-web": "h1", "id-db": "h2", "id-off": "h2"}, reports)
    # a stopped VM keeps its rules on its host (they are installed again at its next boot, and must stay)
    assert kinds(found) == [
        ("network.drift", "id-db", "h2"),
        ("network.drift", "id-off", "h2"),
        ("network.drift", "id-web", "h1"),
    ]
    assert "changed behind" in next(f.message for f in found if f.vm_id == "id-web")


def test_a_host_without_a_report_and_a_vm_being_created_say_nothing() -> None:
    nics = [nic("na", "id-web"), nic("nn", "id-new")]
    assert network_findings(nics, VMS, {"id-web": "h9", "id-new": "h1"}, {"h1": NetworkReport()}) == []


def test_an_unverified_revision_only_needs_its_table() -> None:
    nics = [nic("na", "id-web", rules_hash=None)]
    assert network_findings(nics, VMS, {"id-web": "h1"}, {"h1": NetworkReport(nics=[state("na", H2)])}) == []


def test_rules_of_a_nic_placed_elsewhere_are_stale_and_foreign_tables_are_named() -> None:
    nics = [nic("na", "id-web")]
    reports = {"h2": NetworkReport(nics=[state("na"), state("zz")], foreign_tables=["inet filter"])}
    found = network_findings(nics, VMS, {"id-web": "h1"}, reports)
    assert kinds(found) == [
        ("network.foreign_table", None, "h2"),
        ("network.stale_rules", None, "h2"),
        ("network.stale_rules", "id-web", "h2"),
    ]
    assert any("inet filter" in f.message for f in found)


def test_nic_spec_carries_the_network_and_peers() -> None:
    network = Network(name="n", tenant="acme", cidr="10.0.0.0/24", vni=1000, cidr6="fd00::/64", forensic_port=2222)
    spec = nic_spec(
        Nic("na", "id-web", "n", 0, "52:54:00:00:00:01", "10.0.0.2", "fd00::2", isolated=True, revision=3),
        network,
        ("192.0.2.2",),
    )
    assert (spec.vni, spec.cidr, spec.cidr6, spec.forensic_port, spec.revision) == (
        1000,
        "10.0.0.0/24",
        "fd00::/64",
        2222,
        3,
    )
    assert spec.isolated and spec.peers == ("192.0.2.2",)


def test_a_hosts_overlay_peers_are_the_other_enrolled_hosts_with_an_underlay() -> None:
    """What each report's answer tells a host to flood to: not itself, not a pending host, not one whose
    certificates are revoked, not a host without an underlay address."""

    def host(name: str, underlay: str, state: HostState = HostState.ENROLLED) -> Host:
        return Host(
            name, "127.0.0.1", 1, "s", "z", "10.0.0.0/24", "kvm", "qemu", "7.2", 1, underlay=underlay, state=state
        )

    hosts = [
        host("a", "192.0.2.1"),
        host("b", "192.0.2.3"),
        host("c", "192.0.2.2"),
        host("d", "192.0.2.4", HostState.PENDING),
        host("e", "192.0.2.5"),
        host("f", ""),
    ]
    assert underlay_peers(hosts, "a", revoked={"e"}) == ("192.0.2.2", "192.0.2.3")
    assert underlay_peers(hosts, "f", revoked={"e"}) == ("192.0.2.1", "192.0.2.2", "192.0.2.3")
    assert underlay_peers(hosts, "f") == ("192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.5")
