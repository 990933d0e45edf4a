"""A host's side of VM networking: segments (bridge + VXLAN per network), taps, and each NIC's nftables table.

Per host namespace and network: a bridge ``fmbr<vni>`` with a VXLAN device ``fmvx<vni>`` (UDP 4789 on the underlay
device) as a port, and one all-zeros FDB entry per other host of the network (head-end replication of broadcast,
unknown-unicast and multicast frames); the host has no address on a tenant segment and no IPv6 on anything it creates,
so a guest cannot reach the host itself. Per NIC: a non-persistent tap ``fmt-<id>`` on that bridge, whose fd QEMU
gets (the tap vanishes with QEMU), and the table ``fm_nic_<id>`` of :mod:`ferryman.network.rules` on that tap.

The order that keeps a VM from ever running unprotected is the caller's: :meth:`HostNetwork.open_tap`, then
:meth:`HostNetwork.install_rules` (which verifies what the kernel holds against the canonical hash), then QEMU. On
older kernels (Debian 12's 6.1) a netdev chain cannot be created for a device that does not exist, so the tap must
exist first anyway. Retire: QEMU quits (the tap goes), then :meth:`HostNetwork.remove_rules`.

:meth:`HostNetwork.report` is what drift detection compares with the CMDB: every NIC table with its read-back hash
and counters, and every table Ferryman did not create (any of them is an alarm: a netdev chain below priority -500
could redirect a guest's frames before its rules run).

Everything blocks (subprocesses with timeouts, a short-lived thread for the tap); the agent calls it through
``asyncio.to_thread``. It imports nothing of the controller, the CMDB or the lab.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import structlog

from ferryman.agent.network import nftables
from ferryman.agent.network.dhcp import DhcpResponder
from ferryman.agent.network.netns import Namespace, check_ifname
from ferryman.agent.network.netns import open_tap as open_tap_in
from ferryman.core.errors import InvalidInput, NetworkError
from ferryman.core.models import NicSpec
from ferryman.network.rules import (
    bridge_name,
    check_nic,
    check_nic_id,
    check_peer,
    check_vni,
    render,
    table_name,
    tap_name,
    vxlan_name,
)

__all__ = ["VXLAN_PORT", "HostNetwork", "NetworkReport", "RulesState", "SegmentState"]

log = structlog.get_logger(__name__)

VXLAN_PORT = 4789
_FAMILY = "netdev"
_TABLE_PREFIX = "fm_nic_"
_ALL_ZEROS = "00:00:00:00:00:00"

_SHARED_CANONICAL = nftables.CanonicalHashes()


@dataclass(frozen=True)
class RulesState:
    """One NIC table as a host holds it: the hash of its read-back listing and its counters (packets)."""

    nic_id: str
    table: str
    hash: str  # sha256:<hex> of `nft -s list table netdev <table>`
    counters: dict[str, int] = field(default_factory=dict)
    tap_present: bool = False


@dataclass(frozen=True)
class SegmentState:
    """One segment as a host holds it: its VNI, the taps on its bridge, the peers its VXLAN device floods to."""

    vni: int
    taps: list[str]
    peers: list[str]


@dataclass(frozen=True)
class NetworkReport:
    """Every NIC table of a host namespace (by NIC id), and every other table there as ``"<family> <name>"``."""

    netns: str | None
    nics: list[RulesState] = field(default_factory=list)
    foreign_tables: list[str] = field(default_factory=list)

    def nic(self, nic_id: str) -> RulesState | None:
        """The state of one NIC's table, or None if the host has none."""
        return next((state for state in self.nics if state.nic_id == nic_id), None)


class HostNetwork:
    """The VM networking of one host namespace (``netns=None``: the agent's own).

    A named namespace must exist in ``/run/netns`` with ``underlay_dev`` in it, configured with ``underlay_ip``.
    Without ``underlay_ip`` segments are local to the host (a bridge, no VXLAN).
    """

    def __init__(
        self,
        netns: str | None,
        underlay_ip: str | None,
        underlay_dev: str = "ul0",
        *,
        canonical: nftables.CanonicalHashes | None = None,
    ) -> None:
        self._ns = Namespace(netns)
        self.underlay_ip = None if underlay_ip is None else check_peer(underlay_ip)
        self.underlay_dev = check_ifname(underlay_dev)
        self._canonical = canonical if canonical is not None else _SHARED_CANONICAL
        # two NICs of one network opened at once must not both create it, and a segment is not removed as unused
        # between its creation and its first tap (re-entrant: open_tap holds it around ensure_segment)
        self._segment_lock = threading.RLock()
        self.dhcp = DhcpResponder(self._ns)  # answers the NICs' DHCP requests on their taps

    @property
    def netns(self) -> str | None:
        return self._ns.name

    # --- segments and taps ----------------------------------------------------------------------------------------

    def ensure_segment(self, vni: int, peers: Iterable[str] = ()) -> None:
        """Make sure the segment of ``vni`` exists here, up, and floods to every host in ``peers``. Idempotent;
        peers are only added (a host that left the network keeps its entry until the segment is rebuilt)."""
        check_vni(vni)
        wanted = list(dict.fromkeys(check_peer(peer) for peer in peers if peer != self.underlay_ip))
        self._ns.check_exists()
        bridge, vxlan = bridge_name(vni), vxlan_name(vni)
        with self._segment_lock:
            if self._ns.name is not None:
                # before any device exists: devices created later inherit "default" (never in the agent's own
                # namespace, where that would switch off the host's IPv6)
                self._sysctl_off("all", "default")
            links = self._links()
            if bridge not in links:
                # no multicast snooping: with it the bridge itself joins 224.0.0.106 and sends IGMP reports into
                # the tenant segment; the host must say nothing there (VXLAN floods multicast anyway)
                self._ip(
                    "link", "add", bridge, "type", "bridge", "mcast_snooping", "0", what=f"creating bridge {bridge}"
                )
            elif self._check_kind(links[bridge], "bridge").get("mcast_snooping") != 0:
                self._ip(
                    "link", "set", "dev", bridge, "type", "bridge", "mcast_snooping", "0", what=f"configuring {bridge}"
                )
            if self.underlay_ip is not None:
                if vxlan in links:
                    self._check_vxlan(links[vxlan], vni)
                else:
                    self._ip(
                        "link", "add", vxlan, "type", "vxlan", "id", str(vni), "local", self.underlay_ip,
                        "dev", self.underlay_dev, "dstport", str(VXLAN_PORT), what=f"creating VXLAN device {vxlan}",
                    )  # fmt: skip
            devices = [bridge, *([vxlan] if self.underlay_ip else [])]
            self._sysctl_off(*devices)  # before they are up: no link-local address ever appears
            if self.underlay_ip is not None:
                self._ip("link", "set", "dev", vxlan, "master", bridge, "up", what=f"adding {vxlan} to {bridge}")
            self._ip("link", "set", "dev", bridge, "up", what=f"bringing bridge {bridge} up")
            if self.underlay_ip is not None:
                self._add_flood_entries(vxlan, wanted)

    def open_tap(self, nic: NicSpec, *, vnet_hdr: bool = True) -> int:
        """The fd of the NIC's new tap, on its segment's bridge and up; the caller hands it to QEMU and closes its
        own copy. NetworkError if the tap already exists here (another process holds it)."""
        check_nic(nic)
        tap, bridge = tap_name(nic.id), bridge_name(nic.vni)
        with self._segment_lock:
            self.ensure_segment(nic.vni, nic.peers)
            fd = open_tap_in(self._ns, tap, vnet_hdr=vnet_hdr)
            try:
                self._ip("link", "set", "dev", tap, "master", bridge, "up", what=f"adding tap {tap} to {bridge}")
            except BaseException:
                os.close(fd)  # the tap is non-persistent: it vanishes with its only fd
                raise
        log.info("tap opened", nic=nic.id, tap=tap, bridge=bridge, netns=self.netns)
        return fd

    def segments(self) -> list[SegmentState]:
        """Every segment here: its VNI, the taps on its bridge and the peers its VXLAN floods to."""
        self._ns.check_exists()
        links = self._links()
        found = []
        for name, link in sorted(links.items()):
            vni = _vni_of(name)
            if vni is None or link.get("linkinfo", {}).get("info_kind") != "bridge":
                continue
            taps = sorted(n for n, other in links.items() if other.get("master") == name and n.startswith("fmt-"))
            vxlan = vxlan_name(vni)
            peers = sorted(self._flood_entries(vxlan)) if vxlan in links else []
            found.append(SegmentState(vni, taps, peers))
        return found

    def sync_segments(self, peers: Iterable[str]) -> list[str]:
        """Bring every segment here to what the controller says: flood to exactly ``peers`` (a host that left or
        was revoked receives no more tenant frames, a new one starts to), and remove a segment no tap uses any more
        (its bridge and VXLAN device). What changed, one line each."""
        wanted = sorted({check_peer(peer) for peer in peers if peer != self.underlay_ip})
        changes: list[str] = []
        with self._segment_lock:
            for segment in self.segments():
                bridge, vxlan = bridge_name(segment.vni), vxlan_name(segment.vni)
                if not segment.taps:
                    if segment.peers or vxlan in self._links():
                        self._ip("link", "del", "dev", vxlan, what=f"removing VXLAN device {vxlan}")
                    self._ip("link", "del", "dev", bridge, what=f"removing bridge {bridge}")
                    changes.append(f"segment {segment.vni} removed (no NIC uses it)")
                    continue
                if self.underlay_ip is None:
                    continue
                for peer in sorted(set(segment.peers) - set(wanted)):
                    self._ns.run(
                        self._ns.bridge("fdb", "del", _ALL_ZEROS, "dev", vxlan, "dst", peer),
                        f"removing peer {peer} from the flood list of {vxlan}",
                    )
                    changes.append(f"segment {segment.vni}: peer {peer} removed")
                missing = sorted(set(wanted) - set(segment.peers))
                self._add_flood_entries(vxlan, missing)
                changes += [f"segment {segment.vni}: peer {peer} added" for peer in missing]
        for change in changes:
            log.info("segment synced", change=change, netns=self.netns)
        return changes

    # --- rules ----------------------------------------------------------------------------------------------------

    def install_rules(self, nic: NicSpec) -> RulesState:
        """Load the NIC's table (create or replace, one transaction), read it back and verify its hash against the
        canonical one. On a mismatch the table stays as loaded (for inspection) and NetworkError is raised."""
        check_nic(nic)
        text = render(nic)
        table, tap = table_name(nic.id), tap_name(nic.id)
        expected = self._canonical.hash_for(text, _FAMILY, table, (tap,))  # refuses a bad file before the host
        self._ns.check_exists()
        nftables.load(self._ns, text, f"loading the rules of NIC {nic.id} (table {_FAMILY} {table})")
        state = self.rules_state(nic.id)
        if state is None:
            raise NetworkError(
                f"rules of NIC {nic.id}: table {table} is missing in {self._ns.where} right after loading"
            )
        if state.hash != expected:
            raise NetworkError(
                f"rules of NIC {nic.id} read back differently in {self._ns.where}: {state.hash}, expected "
                f"{expected} (the same file loaded into a throw-away namespace); table {table} left for inspection"
            )
        log.info("nic rules installed", nic=nic.id, revision=nic.revision, hash=state.hash, netns=self.netns)
        return state

    def remove_rules(self, nic_id: str) -> None:
        """Delete the NIC's table if it exists (no error if it does not)."""
        table = table_name(nic_id)
        self._ns.check_exists()
        nftables.delete_table(self._ns, _FAMILY, table)
        log.info("nic rules removed", nic=nic_id, netns=self.netns)

    def rules_state(self, nic_id: str) -> RulesState | None:
        """The NIC's table as this host holds it now, or None if there is none."""
        table = table_name(nic_id)
        self._ns.check_exists()
        text = nftables.listing(self._ns, _FAMILY, table)
        if text is None:
            return None
        counts = nftables.counters(self._ns, _FAMILY, table).get((_FAMILY, table), {})
        return RulesState(nic_id, table, nftables.listing_hash(text), counts, tap_name(nic_id) in self._links())

    def report(self) -> NetworkReport:
        """Every NIC table here with its state, and every table that is not a NIC table (drift detection)."""
        self._ns.check_exists()
        counts = nftables.counters(self._ns)
        links = self._links()
        nics: list[RulesState] = []
        foreign: list[str] = []
        for family, name in nftables.tables(self._ns):
            nic_id = _nic_id_of(family, name)
            if nic_id is None:
                foreign.append(f"{family} {name}")
                continue
            text = nftables.listing(self._ns, family, name)
            if text is None:
                continue  # deleted since the list was taken
            hash_ = nftables.listing_hash(text)
            nics.append(RulesState(nic_id, name, hash_, counts.get((family, name), {}), tap_name(nic_id) in links))
        return NetworkReport(self.netns, sorted(nics, key=lambda state: state.nic_id), sorted(foreign))

    # --- helpers --------------------------------------------------------------------------------------------------

    def _ip(self, *args: str, what: str) -> str:
        return self._ns.run(self._ns.ip(*args), what)

    def _links(self) -> dict[str, dict[str, Any]]:
        """Every interface here by name, with its details (``ip -d -j link show``)."""
        out = self._ip("-d", "-j", "link", "show", what="listing interfaces")
        try:
            items = json.loads(out or "[]")
        except ValueError as err:
            raise NetworkError(f"ip printed JSON that cannot be read in {self._ns.where}: {err}") from err
        return {str(item["ifname"]): item for item in items if isinstance(item, dict) and "ifname" in item}

    def _sysctl_off(self, *devices: str) -> None:
        keys = [f"net.ipv6.conf.{device}.disable_ipv6=1" for device in devices]
        # -e: a kernel without IPv6 has no such keys, and then there is nothing to disable
        self._ns.run(self._ns.enter("sysctl", "-q", "-e", "-w", *keys), f"disabling IPv6 on {', '.join(devices)}")

    def _check_kind(self, link: dict[str, Any], kind: str) -> dict[str, Any]:
        """The link's ``info_data`` if it is of ``kind``, else NetworkError."""
        info = link.get("linkinfo", {})
        found = info.get("info_kind")
        if found != kind:
            name, found_kind = link.get("ifname"), found or "plain"
            raise NetworkError(f"{name} exists in {self._ns.where} but is a {found_kind} device, not a {kind}")
        data = info.get("info_data", {})
        return data if isinstance(data, dict) else {}

    def _check_vxlan(self, link: dict[str, Any], vni: int) -> None:
        """NetworkError if an existing VXLAN device is not the one this host would create (a changed underlay)."""
        data = self._check_kind(link, "vxlan")
        have = (data.get("id"), data.get("local"), data.get("link"), data.get("port"))
        want = (vni, self.underlay_ip, self.underlay_dev, VXLAN_PORT)
        if have != want:
            raise NetworkError(
                f"{link.get('ifname')} exists in {self._ns.where} with (vni, local, dev, port) = {have}, "
                f"expected {want}: remove it or fix the host's underlay settings"
            )

    def _flood_entries(self, vxlan: str) -> set[str]:
        """The peers the VXLAN device floods to (its all-zeros FDB entries)."""
        out = self._ns.run(self._ns.bridge("-j", "fdb", "show", "dev", vxlan), f"listing the FDB of {vxlan}")
        try:
            entries = json.loads(out or "[]")
        except ValueError as err:
            raise NetworkError(f"bridge printed JSON that cannot be read in {self._ns.where}: {err}") from err
        return {str(e["dst"]) for e in entries if isinstance(e, dict) and e.get("mac") == _ALL_ZEROS and e.get("dst")}

    def _add_flood_entries(self, vxlan: str, peers: list[str]) -> None:
        present = self._flood_entries(vxlan)
        for peer in peers:
            if peer not in present:
                self._ns.run(
                    self._ns.bridge("fdb", "append", _ALL_ZEROS, "dev", vxlan, "dst", peer),
                    f"adding peer {peer} to the flood list of {vxlan}",
                )


def _vni_of(name: str) -> int | None:
    """The VNI of a segment's bridge name (``fmbr<vni>``), or None for any other interface."""
    digits = name.removeprefix("fmbr")
    if digits == name or not digits.isascii() or not digits.isdigit():
        return None
    try:
        return check_vni(int(digits))
    except InvalidInput:
        return None


def _nic_id_of(family: str, table: str) -> str | None:
    """The NIC id of a Ferryman NIC table, or None for any other table (a foreign one)."""
    if family != _FAMILY or not table.startswith(_TABLE_PREFIX):
        return None
    try:
        return check_nic_id(table.removeprefix(_TABLE_PREFIX))
    except InvalidInput:
        return None
