"""HostNetwork against the real kernel: two host namespaces joined by an underlay, VXLAN segments, taps and nftables.

Each test builds its own lab-like topology (an underlay namespace with a bridge, two host namespaces with a veth
``ul0`` at MTU 1550 and 192.0.2.1 / 192.0.2.2), named after this process so that parallel runs cannot collide, and
deletes it afterwards. No QEMU: the test holds each tap's fd itself and plays the guest, writing raw Ethernet frames
into a tap (what a guest sends) and reading frames out of another (what a guest receives). Taps are opened without a
virtio-net header unless a test says otherwise. Nothing here touches the root namespace's interfaces or ruleset.

To show that a frame was dropped without sleeping, a legitimate frame follows it on the same path: once that one has
arrived, the dropped one would have arrived before it.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import itertools
import os
import secrets
import select
import shutil
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from ferryman.agent.network import CanonicalHashes, HostNetwork
from ferryman.core.errors import InvalidInput, NetworkError
from ferryman.core.models import NicSpec
from ferryman.network import rules

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces, taps and nftables need root"),
    pytest.mark.skipif(
        any(shutil.which(tool) is None for tool in ("ip", "bridge", "nft", "nsenter", "sysctl")),
        reason="ip, bridge, nft, nsenter and sysctl are needed (apt-get install iproute2 nftables util-linux procps)",
    ),
    pytest.mark.skipif(not os.path.exists("/dev/net/tun"), reason="/dev/net/tun is missing"),
]

HOST_A, HOST_B = "192.0.2.1", "192.0.2.2"
PEERS = (HOST_A, HOST_B)  # every host of the network; each host skips its own address
BROADCAST = "ff:ff:ff:ff:ff:ff"
CIDR = "10.50.1.0/24"
FORENSIC_PORT = 2222

NIC_A = NicSpec("pa", "acme-prod", 100, "52:54:00:00:01:01", "10.50.1.10", CIDR, peers=PEERS, forensic_port=2222)
NIC_B = NicSpec("pb", "acme-prod", 100, "52:54:00:00:01:02", "10.50.1.11", CIDR, peers=PEERS)
NIC_C = NicSpec("pc", "other", 200, "52:54:00:00:02:03", "10.50.1.12", CIDR, peers=PEERS)  # another tenant
NIC_D = NicSpec("pd", "other", 200, "52:54:00:00:02:04", "10.50.1.13", CIDR, peers=PEERS)

_RUNS = itertools.count()


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=10).stdout


def nft(ns: str, *args: str) -> str:
    """nft by hand in a host namespace: what an intruder (or an operator) would do."""
    return sh("nsenter", f"--net=/run/netns/{ns}", "nft", *args)


# --- the topology ------------------------------------------------------------------------------------------------


@dataclass
class Topology:
    underlay: str
    ns_a: str
    ns_b: str
    a: HostNetwork
    b: HostNetwork
    fds: list[int] = field(default_factory=list)

    def port(self, host: HostNetwork, nic: NicSpec, *, vnet_hdr: bool = False, rules_too: bool = True) -> Port:
        """A stand-in guest on ``nic``: its tap opened on ``host`` (and its rules installed)."""
        fd = host.open_tap(nic, vnet_hdr=vnet_hdr)
        self.fds.append(fd)
        if rules_too:
            host.install_rules(nic)
        return Port(fd, nic, header=10 if vnet_hdr else 0)

    def close(self, port: Port) -> None:
        self.fds.remove(port.fd)
        os.close(port.fd)


@pytest.fixture
def topo() -> Iterator[Topology]:
    """Two host namespaces on one underlay bridge; every tap closed, then every namespace deleted, afterwards."""
    tag = f"fmtest-{os.getpid()}-{next(_RUNS)}"
    underlay, ns_a, ns_b = f"{tag}-ul", f"{tag}-a", f"{tag}-b"
    created: list[str] = []
    topology: Topology | None = None
    try:
        for ns in (underlay, ns_a, ns_b):
            sh("ip", "netns", "add", ns)
            created.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("nsenter", f"--net=/run/netns/{underlay}", "sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1")
        sh("ip", "-n", underlay, "link", "add", "fmul", "type", "bridge")
        sh("ip", "-n", underlay, "link", "set", "fmul", "up")
        for ns, side, address in ((ns_a, "a", HOST_A), (ns_b, "b", HOST_B)):
            sh("ip", "-n", underlay, "link", "add", f"fmul-{side}", "type", "veth", "peer", "name", "ul0", "netns", ns)
            sh("ip", "-n", underlay, "link", "set", f"fmul-{side}", "master", "fmul", "mtu", "1550", "up")
            sh("ip", "-n", ns, "link", "set", "ul0", "mtu", "1550", "up")
            sh("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", "ul0")
        topology = Topology(underlay, ns_a, ns_b, HostNetwork(ns_a, HOST_A), HostNetwork(ns_b, HOST_B))
        yield topology
    finally:
        for fd in topology.fds if topology else []:
            os.close(fd)  # before the namespaces: a held tap keeps its namespace alive after `ip netns del`
        for ns in reversed(created):
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True, timeout=10)


# --- frames ------------------------------------------------------------------------------------------------------


def _mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def _ip(text: str) -> bytes:
    return bytes(int(part) for part in text.split("."))


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ethernet(dst: str, src: str, ethertype: int, payload: bytes, marker: bytes = b"") -> bytes:
    """A frame padded to 60 bytes; ``marker`` rides in the padding (or after the payload) to recognise it."""
    frame = _mac(dst) + _mac(src) + struct.pack("!H", ethertype) + payload + marker
    return frame.ljust(60, b"\0")


def ipv4(src: str, dst: str, proto: int, payload: bytes) -> bytes:
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 1, 0, 64, proto, 0, _ip(src), _ip(dst))
    return header[:10] + struct.pack("!H", _checksum(header)) + header[12:] + payload


def udp(src: str, dst: str, sport: int, dport: int, data: bytes) -> bytes:
    return ipv4(src, dst, 17, struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data)


def tcp(src: str, dst: str, sport: int, dport: int, flags: int, data: bytes) -> bytes:
    segment = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, flags, 65535, 0, 0) + data
    pseudo = _ip(src) + _ip(dst) + struct.pack("!BBH", 0, 6, len(segment))
    checksum = _checksum(pseudo + segment)
    return ipv4(src, dst, 6, segment[:16] + struct.pack("!H", checksum) + segment[18:])


def icmp_echo(src: str, dst: str, data: bytes) -> bytes:
    message = struct.pack("!BBHHH", 8, 0, 0, 1, 1) + data
    return ipv4(src, dst, 1, message[:2] + struct.pack("!H", _checksum(message)) + message[4:])


def arp(op: int, sender_mac: str, sender_ip: str, target_mac: str, target_ip: str) -> bytes:
    addresses = _mac(sender_mac) + _ip(sender_ip) + _mac(target_mac) + _ip(target_ip)
    return struct.pack("!HHBBH", 1, 0x0800, 6, 4, op) + addresses


def marker() -> bytes:
    return b"FM" + secrets.token_hex(7).encode()  # 16 bytes: fits the padding of an ARP frame


@dataclass
class Port:
    """One tap fd as its guest sees it."""

    fd: int
    nic: NicSpec
    header: int = 0  # virtio-net header bytes before each frame (10 with IFF_VNET_HDR)

    def send(self, frame: bytes) -> None:
        os.write(self.fd, bytes(self.header) + frame)

    def frames(self, seconds: float) -> list[bytes]:
        """Every frame that arrives within ``seconds``."""
        found: list[bytes] = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if select.select([self.fd], [], [], left)[0]:
                found.append(os.read(self.fd, 65536)[self.header :])
        return found

    def until(self, mark: bytes, timeout: float = 5.0) -> list[bytes]:
        """Every frame up to and including the first that carries ``mark``; AssertionError if none comes."""
        found: list[bytes] = []
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if select.select([self.fd], [], [], left)[0]:
                found.append(os.read(self.fd, 65536)[self.header :])
                if mark in found[-1]:
                    return found
        raise AssertionError(f"no frame with {mark!r} reached {self.nic.id} within {timeout} s (got {len(found)})")

    def udp_to(self, dst: Port, mark: bytes, *, dst_mac: str | None = None) -> bytes:
        """A legitimate UDP frame from this NIC to ``dst``'s NIC."""
        payload = udp(self.nic.ipv4, dst.nic.ipv4, 40000, 40001, mark)
        return ethernet(dst_mac or dst.nic.mac, self.nic.mac, 0x0800, payload)


def counters(host: HostNetwork, nic: NicSpec) -> dict[str, int]:
    state = host.rules_state(nic.id)
    assert state is not None
    return state.counters


def moved(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {name: after[name] - before.get(name, 0) for name in after if after[name] != before.get(name, 0)}


def assert_blocked(src: Port, dst: Port, forged: Callable[[bytes], bytes]) -> None:
    """A frame ``forged(mark)`` sent from ``src`` never reaches ``dst``: a legitimate frame sent after it does."""
    bad, good = marker(), marker()
    src.send(forged(bad))
    src.send(src.udp_to(dst, good))
    seen = dst.until(good)
    assert not any(bad in frame for frame in seen), "a dropped frame reached the other NIC"


# --- tests -------------------------------------------------------------------------------------------------------


def test_legit_frames_cross_hosts_over_vxlan(topo: Topology):
    """IPv4 and ARP from a NIC's own addresses reach a NIC of its network on the other host, and count nothing."""
    a, b = topo.port(topo.a, NIC_A), topo.port(topo.b, NIC_B)
    before = counters(topo.a, NIC_A)
    mark = marker()
    a.send(a.udp_to(b, mark, dst_mac=BROADCAST))
    assert any(mark in frame for frame in b.until(mark))
    mark = marker()
    a.send(ethernet(BROADCAST, NIC_A.mac, 0x0806, arp(1, NIC_A.mac, NIC_A.ipv4, "00:00:00:00:00:00", NIC_B.ipv4), mark))
    b.until(mark)
    mark = marker()
    b.send(ethernet(NIC_A.mac, NIC_B.mac, 0x0806, arp(2, NIC_B.mac, NIC_B.ipv4, NIC_A.mac, NIC_A.ipv4), mark))
    a.until(mark)
    mark = marker()
    a.send(ethernet(BROADCAST, NIC_A.mac, 0x8035, arp(3, NIC_A.mac, "0.0.0.0", NIC_A.mac, "0.0.0.0"), mark))  # RARP
    b.until(mark)
    assert moved(before, counters(topo.a, NIC_A)) == {}


def test_spoofed_frames_are_dropped_counted_and_never_arrive(topo: Topology):
    """Forged source IPv4, MAC or ARP sender, a DHCP server reply and a VLAN tag each hit their own counter."""
    a, b = topo.port(topo.a, NIC_A), topo.port(topo.b, NIC_B)
    a_ip, b_ip, b_mac = NIC_A.ipv4, NIC_B.ipv4, NIC_B.mac
    cases: list[tuple[str, Callable[[bytes], bytes]]] = [
        ("from_vm_ip4", lambda m: ethernet(b_mac, NIC_A.mac, 0x0800, udp("10.50.1.99", b_ip, 1, 2, m))),
        ("from_vm_mac", lambda m: ethernet(b_mac, "52:54:00:00:01:99", 0x0800, udp(a_ip, b_ip, 1, 2, m))),
        ("from_vm_mac", lambda m: ethernet("01:80:c2:00:00:0e", b_mac, 0x88CC, b"", m)),  # LLDP with B's MAC
        # an ARP reply claiming B's address for A's MAC
        ("from_vm_arp", lambda m: ethernet(b_mac, NIC_A.mac, 0x0806, arp(2, NIC_A.mac, b_ip, b_mac, b_ip), m)),
        ("from_vm_dhcp", lambda m: ethernet(BROADCAST, NIC_A.mac, 0x0800, udp(a_ip, "255.255.255.255", 67, 68, m))),
        ("from_vm_other", lambda m: ethernet(BROADCAST, NIC_A.mac, 0x8100, struct.pack("!HH", 5, 0x0800), m)),
    ]
    for counter, forged in cases:
        before = counters(topo.a, NIC_A)
        assert_blocked(a, b, forged)
        assert moved(before, counters(topo.a, NIC_A)) == {counter: 1}, counter
    fdb = sh("bridge", "-n", topo.ns_a, "fdb", "show", "br", rules.bridge_name(100))
    assert NIC_B.mac not in fdb  # the LLDP-addressed frame did not poison host a's bridge


CIDR6 = "fd00:50:1::/64"
NIC_A6 = dataclasses.replace(NIC_A, ipv6="fd00:50:1::10", cidr6=CIDR6)
NIC_B6 = dataclasses.replace(NIC_B, ipv6="fd00:50:1::11", cidr6=CIDR6)


def ipv6(src: str, dst: str, next_header: int, payload: bytes) -> bytes:
    addresses = ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address(dst).packed
    return struct.pack("!IHBB", 6 << 28, len(payload), next_header, 255) + addresses + payload


def icmp6(kind: int, body: bytes) -> bytes:
    return struct.pack("!BBH", kind, 0, 0) + body  # nft reads no checksum; the receiving tap neither


def test_ipv6_from_its_own_addresses_only(topo: Topology):
    """IPv6 from the NIC's address and its EUI-64 link-local crosses hosts and counts nothing; a forged source, a
    router advertisement, a neighbour advertisement for another NIC's address and a DHCPv6 server reply are dropped,
    each counted by name, and never arrive."""
    a, b = topo.port(topo.a, NIC_A6), topo.port(topo.b, NIC_B6)
    own, local, theirs = NIC_A6.ipv6 or "", rules.link_local(NIC_A6.mac), NIC_B6.ipv6 or ""
    before = counters(topo.a, NIC_A6)
    for src in (own, local):
        mark = marker()
        a.send(
            ethernet(NIC_B6.mac, NIC_A6.mac, 0x86DD, ipv6(src, theirs, 17, struct.pack("!HHHH", 1, 2, 24, 0) + mark))
        )
        assert any(mark in frame for frame in b.until(mark)), src
    assert moved(before, counters(topo.a, NIC_A6)) == {}
    advert_for_b = icmp6(136, struct.pack("!I", 0x20000000) + ipaddress.IPv6Address(theirs).packed)
    cases: list[tuple[str, Callable[[bytes], bytes]]] = [
        ("from_vm_ip6", lambda m: ipv6("fd00:50:1::99", theirs, 17, struct.pack("!HHHH", 1, 2, 24, 0) + m)),
        ("from_vm_nd", lambda m: ipv6(local, "ff02::1", 58, icmp6(134, bytes(12)) + m)),  # router advertisement
        ("from_vm_nd", lambda m: ipv6(own, "ff02::1", 58, advert_for_b + m)),
        ("from_vm_dhcp", lambda m: ipv6(local, "ff02::1:2", 17, struct.pack("!HHHH", 547, 546, 24, 0) + m)),
    ]
    for counter, forged in cases:
        before = counters(topo.a, NIC_A6)
        assert_blocked(a, b, lambda m, forged=forged: ethernet("33:33:00:00:00:01", NIC_A6.mac, 0x86DD, forged(m)))
        assert moved(before, counters(topo.a, NIC_A6)) == {counter: 1}, counter


def test_traffic_from_outside_the_network_does_not_reach_the_vm(topo: Topology):
    """A frame whose IPv4 source is outside the NIC's prefix is dropped on its way in (to_vm_drop)."""
    a = topo.port(topo.a, NIC_A)
    outsider = dataclasses.replace(NIC_B, cidr="10.99.0.0/24", ipv4="10.99.0.2")  # B's own rules allow its address
    b = topo.port(topo.b, outsider)
    before = counters(topo.a, NIC_A)
    mark = marker()
    b.send(ethernet(NIC_A.mac, NIC_B.mac, 0x0800, udp(outsider.ipv4, NIC_A.ipv4, 1, 2, mark)))
    assert not any(mark in frame for frame in a.frames(0.5))
    assert moved(before, counters(topo.a, NIC_A)) == {"to_vm_drop": 1}


def test_another_vni_never_sees_the_frames(topo: Topology):
    """A tenant on another VNI with the same subnet receives nothing of VNI 100, on either host, and vice versa."""
    a, b = topo.port(topo.a, NIC_A), topo.port(topo.b, NIC_B)
    c, d = topo.port(topo.b, NIC_C), topo.port(topo.a, NIC_D)
    mark = marker()
    a.send(a.udp_to(b, mark, dst_mac=BROADCAST))
    b.until(mark)
    mark_c = marker()
    c.send(c.udp_to(d, mark_c, dst_mac=BROADCAST))
    d.until(mark_c)  # VNI 200 works across hosts too
    mark_last = marker()
    a.send(a.udp_to(b, mark_last, dst_mac=BROADCAST))
    assert not any(mark_c in frame for frame in b.until(mark_last))
    leaked = c.frames(0.3) + d.frames(0.1)
    assert not any(mark in frame or mark_last in frame for frame in leaked)


def test_isolated_nic_keeps_only_arp_and_the_forensic_port(topo: Topology):
    """Isolation: ICMP is dropped both ways (isolated_drop); ARP for its IP and TCP to the forensic port pass."""
    a, b = topo.port(topo.a, NIC_A), topo.port(topo.b, NIC_B)
    isolated = dataclasses.replace(NIC_A, isolated=True, revision=2)
    topo.a.install_rules(isolated)
    before = counters(topo.a, NIC_A)
    ping, syn = marker(), marker()
    b.send(ethernet(NIC_A.mac, NIC_B.mac, 0x0800, icmp_echo(NIC_B.ipv4, NIC_A.ipv4, ping)))
    b.send(ethernet(NIC_A.mac, NIC_B.mac, 0x0800, tcp(NIC_B.ipv4, NIC_A.ipv4, 50000, FORENSIC_PORT, 0x02, syn)))
    assert not any(ping in frame for frame in a.until(syn))
    who_has = marker()
    who_has_a = arp(1, NIC_B.mac, NIC_B.ipv4, "00:00:00:00:00:00", NIC_A.ipv4)
    b.send(ethernet(BROADCAST, NIC_B.mac, 0x0806, who_has_a, who_has))
    a.until(who_has)
    ping, synack, reply = marker(), marker(), marker()
    a.send(ethernet(NIC_B.mac, NIC_A.mac, 0x0800, icmp_echo(NIC_A.ipv4, NIC_B.ipv4, ping)))
    a.send(ethernet(NIC_B.mac, NIC_A.mac, 0x0800, udp(NIC_A.ipv4, NIC_B.ipv4, 40000, 40001, ping)))
    a.send(ethernet(NIC_B.mac, NIC_A.mac, 0x0806, arp(2, NIC_A.mac, NIC_A.ipv4, NIC_B.mac, NIC_B.ipv4), reply))
    a.send(ethernet(NIC_B.mac, NIC_A.mac, 0x0800, tcp(NIC_A.ipv4, NIC_B.ipv4, FORENSIC_PORT, 50000, 0x12, synack)))
    seen = b.until(synack)
    assert any(reply in frame for frame in seen)
    assert not any(ping in frame for frame in seen)
    assert moved(before, counters(topo.a, NIC_A)) == {"isolated_drop": 3}


def test_same_nic_gets_the_same_verified_hash_on_both_hosts(topo: Topology):
    """A migration's source and destination hold byte-identical listings; a new revision lists differently."""
    on_a = topo.a.open_tap(NIC_A)
    topo.fds.append(on_a)
    on_b = topo.port(topo.b, NIC_A, vnet_hdr=True, rules_too=False)  # the destination's tap, as QEMU would get it
    state_a, state_b = topo.a.install_rules(NIC_A), topo.b.install_rules(NIC_A)
    assert state_a.hash == state_b.hash
    assert state_a.table == "fm_nic_pa" and state_a.tap_present and state_b.tap_present
    assert set(state_a.counters) == set(rules.COUNTERS)
    assert topo.a.install_rules(NIC_A).hash == state_a.hash  # a replace lists the same
    assert topo.a.install_rules(dataclasses.replace(NIC_A, revision=2)).hash != state_a.hash
    b = topo.port(topo.b, NIC_B)
    mark = marker()
    b.send(ethernet(BROADCAST, NIC_B.mac, 0x0800, udp(NIC_B.ipv4, NIC_A.ipv4, 1, 2, mark)))
    assert any(mark in frame for frame in on_b.until(mark))  # a tap with a virtio-net header works as well


def test_a_rule_deleted_by_hand_changes_the_hash(topo: Topology):
    """Drift: deleting one rule by its handle changes the read-back hash; reinstalling restores it."""
    topo.port(topo.a, NIC_A, rules_too=False)
    installed = topo.a.install_rules(NIC_A)
    listing = nft(topo.ns_a, "-a", "list", "chain", "netdev", "fm_nic_pa", "from_vm")
    handle = next(line.rsplit("# handle ", 1)[1] for line in listing.splitlines() if "from_vm_mac" in line)
    nft(topo.ns_a, "delete", "rule", "netdev", "fm_nic_pa", "from_vm", "handle", handle)
    drifted = topo.a.rules_state(NIC_A.id)
    assert drifted is not None and drifted.hash != installed.hash
    report_nic = topo.a.report().nic(NIC_A.id)
    assert report_nic is not None and report_nic.hash == drifted.hash
    assert topo.a.install_rules(NIC_A).hash == installed.hash


def test_report_names_foreign_tables(topo: Topology):
    """Any table that is not a NIC table (another family, another name, a bad id) is reported as foreign."""
    port = topo.port(topo.a, NIC_A)
    nft(topo.ns_a, "add", "table", "inet", "intruder")
    nft(topo.ns_a, "add", "table", "ip", "fm_nic_pa")
    nft(topo.ns_a, "add", "table", "netdev", "fm_nic_NotOurs")
    report = topo.a.report()
    assert report.netns == topo.ns_a
    assert report.foreign_tables == ["inet intruder", "ip fm_nic_pa", "netdev fm_nic_NotOurs"]
    assert [state.nic_id for state in report.nics] == ["pa"]
    assert report.nics[0].tap_present
    topo.close(port)  # the tap goes with its fd; on this kernel the table stays, with no tap under it
    state = topo.a.rules_state(NIC_A.id)
    assert state is not None and not state.tap_present


def test_remove_rules_is_idempotent(topo: Topology):
    """Removing a NIC's table twice is fine; afterwards there is no state and no NIC in the report."""
    topo.port(topo.a, NIC_A)
    topo.a.remove_rules(NIC_A.id)
    topo.a.remove_rules(NIC_A.id)
    assert topo.a.rules_state(NIC_A.id) is None
    assert topo.a.report().nics == []


def test_ensure_segment_twice_adds_each_peer_once(topo: Topology):
    """The segment is built once: one flood entry per peer, never one for the host itself, no IPv6 on devices."""
    topo.a.ensure_segment(100, PEERS)
    topo.a.ensure_segment(100, PEERS)
    topo.a.ensure_segment(100, (*PEERS, "192.0.2.9"))
    fdb = sh("bridge", "-n", topo.ns_a, "fdb", "show", "dev", "fmvx100").splitlines()
    flood = sorted(line.split(" dst ")[1].split()[0] for line in fdb if line.startswith("00:00:00:00:00:00"))
    assert flood == ["192.0.2.2", "192.0.2.9"]
    assert "master fmbr100" in sh("ip", "-n", topo.ns_a, "link", "show", "dev", "fmvx100")
    knobs = sh("nsenter", f"--net=/run/netns/{topo.ns_a}", "sysctl", "-n", *(
        f"net.ipv6.conf.{dev}.disable_ipv6" for dev in ("all", "default", "fmbr100", "fmvx100")
    ))  # fmt: skip
    assert knobs.split() == ["1", "1", "1", "1"]


def test_segments_follow_the_controllers_peers_and_go_when_unused(topo: Topology):
    """A host that joins is flooded to, one that left is not any more; the segment a tap uses stays (and carries
    traffic), one no tap uses is removed with its VXLAN device."""
    a = topo.port(topo.a, NIC_A)
    b = topo.port(topo.b, NIC_B)
    topo.a.ensure_segment(200, PEERS)  # a segment no NIC of this host uses
    assert {s.vni: s.taps for s in topo.a.segments()} == {NIC_A.vni: [f"fmt-{NIC_A.id}"], 200: []}
    changes = topo.a.sync_segments([*PEERS, "192.0.2.9", HOST_A])
    assert "segment 200 removed (no NIC uses it)" in changes
    assert f"segment {NIC_A.vni}: peer 192.0.2.9 added" in changes
    assert "fmbr200" not in sh("ip", "-n", topo.ns_a, "link", "show") and "fmvx200" not in sh(
        "ip", "-n", topo.ns_a, "link", "show"
    )
    [segment] = topo.a.segments()
    assert segment.peers == [HOST_B, "192.0.2.9"]  # never the host itself
    assert topo.a.sync_segments([*PEERS, "192.0.2.9"]) == []  # nothing to do twice
    mark = marker()
    a.send(a.udp_to(b, mark))
    b.until(mark)
    # host B leaves the overlay: A floods to it no more, and its frames stop arriving there
    assert topo.a.sync_segments(["192.0.2.9"]) == [f"segment {NIC_A.vni}: peer {HOST_B} removed"]
    lost = marker()
    broadcast = ethernet(
        "ff:ff:ff:ff:ff:ff", NIC_A.mac, 0x0806, arp(1, NIC_A.mac, NIC_A.ipv4, "00:00:00:00:00:00", NIC_B.ipv4) + lost
    )
    a.send(broadcast)
    assert not any(lost in frame for frame in b.frames(1.0))


def test_a_second_tap_for_the_same_nic_is_refused(topo: Topology):
    """Opening a NIC's tap while another fd holds it fails instead of sharing it; the first tap keeps working."""
    a = topo.port(topo.a, NIC_A)
    b = topo.port(topo.b, NIC_B)
    with pytest.raises(NetworkError, match="already exists"):
        topo.a.open_tap(NIC_A)
    mark = marker()
    a.send(a.udp_to(b, mark))
    b.until(mark)


@pytest.mark.parametrize(
    ("netns", "underlay_ip", "underlay_dev"),
    [("bad/name", HOST_A, "ul0"), ("ns", "192.0.2.300", "ul0"), ("ns", HOST_A, "ul0;reboot"), ("ns", HOST_A, "x" * 16)],
)
def test_bad_host_settings_are_refused(netns: str, underlay_ip: str, underlay_dev: str):
    """A namespace, underlay address or device that could not be passed safely to a command is refused up front."""
    with pytest.raises(InvalidInput):
        HostNetwork(netns, underlay_ip, underlay_dev)


def test_canonical_hashes_are_cached_by_text(topo: Topology):
    """The throw-away namespace is used once per distinct rule file; the cache stays within its bound."""
    cache = CanonicalHashes(size=1)
    host = HostNetwork(topo.ns_a, HOST_A, canonical=cache)
    topo.port(host, NIC_A, rules_too=False)
    first = host.install_rules(NIC_A).hash
    assert len(cache) == 1
    assert cache.hash_for(rules.render(NIC_A), "netdev", "fm_nic_pa", ("fmt-pa",)) == first
    host.install_rules(dataclasses.replace(NIC_A, revision=2))
    assert len(cache) == 1


def test_a_missing_namespace_is_a_network_error():
    """A host namespace that does not exist is named in the error, before any command runs."""
    host = HostNetwork(f"fmtest-{os.getpid()}-missing", HOST_A)
    with pytest.raises(NetworkError, match="does not exist"):
        host.install_rules(NIC_A)
    with pytest.raises(NetworkError, match="does not exist"):
        host.ensure_segment(100, PEERS)
