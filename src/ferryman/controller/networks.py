"""Tenant networks and the NICs of VMs: creation with address management, the NIC specs a host plumbs, the check
of the rules a host read back, isolation, and drift of a host's live rules from the CMDB.

A NIC's rules are rendered by its host from the NIC's spec (:mod:`ferryman.network.rules`, the same pure code on
every host); the host installs them before QEMU runs and reads them back. The first host to verify a NIC's revision
records the hash it read; every later host (a migration's destination, a restart) must read back the same hash, or
the step fails: a destination whose rules differ never receives the VM. Reconciliation compares every host's live
tables with these hashes and raises an alarm on a difference, a missing table or a table Ferryman did not make.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import structlog

from ferryman.cmdb.networks import NicRequest
from ferryman.cmdb.repository import Repository
from ferryman.core import errors
from ferryman.core.models import VM, Host, HostState, Network, Nic, NicSpec, Severity, VMState, check_name
from ferryman.network import ipam
from ferryman.wire.network import NetworkReport, NicState

log = structlog.get_logger(__name__)

MAX_NICS = 4
AuditFn = Callable[..., object]  # the fleet's audit(kind, message, principal, *, vm=, host=, severity=, **data)
NowFn = Callable[[], dt.datetime]


@dataclass(frozen=True)
class Member:
    nic: Nic
    vm_name: str
    host: str | None  # where the VM is placed now


@dataclass(frozen=True)
class NetworkView:
    network: Network
    members: list[Member]
    hosts: list[str]  # the hosts the network spans now (where its members run)


@dataclass(frozen=True)
class NetworkFinding:
    """One difference between a host's live NIC tables and the CMDB (reconciliation turns it into an alarm)."""

    kind: str  # network.drift | network.foreign_table | network.stale_rules
    vm_id: str | None
    host: str
    message: str


class NetworkService:
    """Networks and NICs over the CMDB; ``audit`` records each decision (the fleet's audit)."""

    def __init__(self, repo: Repository, audit: AuditFn, now: NowFn) -> None:
        self.repo = repo
        self._audit = audit
        self._now = now

    # -- networks ------------------------------------------------------------------------------------------------

    def create(
        self,
        name: str,
        tenant: str,
        cidr: str,
        principal: str,
        *,
        cidr6: str | None = None,
        vlan: int | None = None,
        forensic_port: int = 22,
    ) -> Network:
        check_name("network", name)
        check_name("tenant", tenant)
        ipam.check_cidr(cidr)
        if cidr6 is not None:
            ipam.check_cidr6(cidr6)
        if vlan is not None and not 1 <= vlan <= 4094:
            raise errors.InvalidInput(f"bad VLAN id {vlan}: use 1-4094")
        if not 1 <= forensic_port <= 65535:
            raise errors.InvalidInput(f"bad forensic port {forensic_port}: use 1-65535")
        self.repo.ensure_tenant(tenant)
        network = self.repo.add_network(
            Network(
                name=name,
                tenant=tenant,
                cidr=cidr,
                vni=vlan or 0,  # the overlay carries an operator's VLAN id as its segment id
                vlan=vlan,
                cidr6=cidr6,
                forensic_port=forensic_port,
                created_at=self._now(),
            )
        )
        self._audit(
            "network.created",
            f"network {name} for {tenant}: {cidr}{' ' + cidr6 if cidr6 else ''}, segment {network.vni}",
            principal,
            network=name,
            tenant=tenant,
            vni=network.vni,
        )
        return network

    def view(self, name: str, tenant: str | None = None) -> NetworkView:
        network = self.repo.get_network(name, tenant=tenant)
        members = []
        for nic in self.repo.nics_on(network):
            vm = self.repo.get_vm(nic.vm_id)
            placement = self.repo.current_placement(vm.id)
            members.append(Member(nic, vm.name, placement.host if placement else None))
        return NetworkView(network, members, sorted({m.host for m in members if m.host}))

    # -- NICs of VMs ---------------------------------------------------------------------------------------------

    def allocate(self, vm: VM, requests: Sequence[NicRequest]) -> list[Nic]:
        """Give the new VM its NICs (MAC and addresses); audited."""
        if len(requests) > MAX_NICS:
            raise errors.InvalidInput(f"a VM has at most {MAX_NICS} NICs")
        nics = self.repo.add_nics(vm.id, list(requests))
        for nic in nics:
            self._audit(
                "nic.allocated",
                f"{vm.name} nic{nic.index} on {nic.network}: {nic.mac} {nic.ipv4}{' ' + nic.ipv6 if nic.ipv6 else ''}",
                "system",
                vm=vm.id,
                network=nic.network,
                mac=nic.mac,
                ipv4=nic.ipv4,
            )
        return nics

    def specs(self, vm_id: str, host: str) -> tuple[NicSpec, ...]:
        """What ``host`` needs to plumb the VM's NICs: segment, addresses, rule revision, and its peers on the
        overlay (every other enrolled host with an underlay address)."""
        nics = self.repo.nics_of(vm_id)
        if not nics:
            return ()
        peers = underlay_peers(self.repo.list_hosts(), host, revoked_hosts(self.repo))
        vm = self.repo.get_vm(vm_id)  # a NIC's network is of its VM's tenant; its name is the guest's hostname
        networks = {name: self.repo.get_network(name, tenant=vm.tenant) for name in {n.network for n in nics}}
        return tuple(nic_spec(nic, networks[nic.network], peers, vm.name) for nic in nics)

    def check_applied(self, vm_id: str, host: str, applied: Sequence[NicState], *, record_host: bool) -> str:
        """Compare the rules ``host`` read back for the VM's NICs with the CMDB: a NIC without rules there, or with
        rules whose hash differs from the one first verified for its revision, is a NetworkError (audited as an
        alarm). The first verification of a revision records its hash. ``record_host``: the host is now where the
        VM's rules apply (a creation, a restart, a committed migration), not only a destination being prepared."""
        by_id = {state.nic_id: state for state in applied}
        summary = []
        for nic in self.repo.nics_of(vm_id):
            state = by_id.get(nic.id)
            if state is None:
                raise self._mismatch(vm_id, host, f"{host} holds no rules for NIC {nic.id}")
            if nic.rules_hash is not None and state.hash != nic.rules_hash:
                raise self._mismatch(
                    vm_id, host, f"rules of NIC {nic.id} on {host} read back as {state.hash}, expected {nic.rules_hash}"
                )
            changes: dict[str, object] = {}
            if nic.rules_hash is None:
                changes["rules_hash"] = state.hash
            if record_host:
                changes |= {"host": host, "applied_at": self._now()}
            if changes:
                self.repo.update_nic(nic.id, **changes)
            summary.append(f"{nic.id}={state.hash[:19]}")
        return " ".join(summary)

    def _mismatch(self, vm_id: str, host: str, message: str) -> errors.NetworkError:
        self._audit("network.rules_mismatch", message, "system", vm=vm_id, host=host, severity=Severity.ALARM)
        return errors.NetworkError(message)

    def moved(self, vm_id: str, host: str) -> None:
        """A migration committed: the VM's rules apply on ``host`` now (verified there before the commit)."""
        for nic in self.repo.nics_of(vm_id):
            if nic.rules_hash is not None:
                self.repo.update_nic(nic.id, host=host, applied_at=self._now())

    def release(self, vm_id: str) -> None:
        released = self.repo.release_nics(vm_id, self._now())
        if released:
            self._audit(
                "nic.released",
                f"addresses {', '.join(n.ipv4 for n in released)} free again",
                "system",
                vm=vm_id,
                nics=[n.id for n in released],
            )

    def set_isolated(self, vm: VM, isolated: bool) -> list[Nic]:
        """Record the new isolation of every NIC of ``vm`` (a new rule revision each); the caller installs them."""
        nics = self.repo.nics_of(vm.id)
        if not nics:
            raise errors.Conflict(f"{vm.name} has no NICs to isolate")
        return [self.repo.update_nic(nic.id, isolated=isolated) for nic in nics]


def underlay_peers(hosts: Sequence[Host], host: str, revoked: Iterable[str] = ()) -> tuple[str, ...]:
    """The overlay peers of ``host``: the underlay address of every other enrolled host that has one, but for the
    ``revoked`` hosts (no live certificate any more): a pending or revoked host is nobody's peer, its segments
    receive no tenant frames."""
    out = set(revoked)
    return tuple(
        sorted(
            h.underlay
            for h in hosts
            if h.name != host and h.underlay and h.state is HostState.ENROLLED and h.name not in out
        )
    )


def revoked_hosts(repo: Repository) -> set[str]:
    """Enrolled hosts none of whose certificates is live any more (revoked, e.g. a compromised host)."""
    live = repo.hosts_with_live_certificates()
    return {h.name for h in repo.list_hosts() if h.state is HostState.ENROLLED and h.name not in live}


def nic_spec(nic: Nic, network: Network, peers: tuple[str, ...], hostname: str | None = None) -> NicSpec:
    return NicSpec(
        id=nic.id,
        network=network.name,
        vni=network.vni,
        mac=nic.mac,
        ipv4=nic.ipv4,
        cidr=network.cidr,
        ipv6=nic.ipv6,
        cidr6=network.cidr6 if nic.ipv6 else None,
        isolated=nic.isolated,
        forensic_port=network.forensic_port,
        revision=nic.revision,
        peers=peers,
        hostname=hostname,
    )


def network_findings(
    nics: Iterable[Nic],
    vms: Mapping[str, VM],
    placed_on: Mapping[str, str],
    reports: Mapping[str, NetworkReport],
) -> list[NetworkFinding]:
    """Every difference between the hosts' live NIC tables (``reports`` by host) and the CMDB: a live VM's NIC whose
    table on its host is missing or reads back differently (drift), a table of a NIC that does not belong on that
    host (stale rules), and any table Ferryman did not make (foreign)."""
    found: list[NetworkFinding] = []
    expected: dict[str, dict[str, Nic]] = {}
    nics = list(nics)
    owner = {nic.id: nic.vm_id for nic in nics}
    for nic in nics:
        vm = vms.get(nic.vm_id)
        host = placed_on.get(nic.vm_id)
        if vm is None or host is None or vm.state in (VMState.DELETED, VMState.CREATING):
            continue
        expected.setdefault(host, {})[nic.id] = nic
    for host, report in reports.items():
        live = {state.nic_id: state for state in report.nics}
        for nic_id, nic in expected.get(host, {}).items():
            state = live.get(nic_id)
            name = vms[nic.vm_id].name
            if state is None:
                found.append(
                    NetworkFinding("network.drift", nic.vm_id, host, f"{name}: rules of NIC {nic_id} missing on {host}")
                )
            elif nic.rules_hash is not None and state.hash != nic.rules_hash:
                found.append(
                    NetworkFinding(
                        "network.drift",
                        nic.vm_id,
                        host,
                        f"{name}: rules of NIC {nic_id} on {host} changed behind Ferryman's back"
                        f" (read {state.hash[:19]}, expected {nic.rules_hash[:19]})",
                    )
                )
        for nic_id in sorted(set(live) - set(expected.get(host, {}))):
            found.append(
                NetworkFinding(
                    "network.stale_rules",
                    owner.get(nic_id),
                    host,
                    f"{host} holds rules of NIC {nic_id} that belong elsewhere",
                )
            )
        for table in report.foreign_tables:
            found.append(
                NetworkFinding(
                    "network.foreign_table", None, host, f"{host} has an nftables table Ferryman did not make: {table}"
                )
            )
    return found


__all__ = ["Member", "NetworkFinding", "NetworkService", "NetworkView", "network_findings", "nic_spec"]
