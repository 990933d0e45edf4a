"""One NIC's anti-spoofing rules: validation of a :class:`NicSpec` and the nftables file that protects its tap.

Each NIC gets a table of its own in the ``netdev`` family, ``fm_nic_<id>``, with an ``ingress`` chain (``from_vm``:
what the guest sends) and an ``egress`` chain (``to_vm``: what the guest receives) hooked on its tap ``fmt-<id>``
at priority -500, both with policy drop. The netdev family is used rather than the bridge family because the bridge
learns from frames to 01:80:c2:00:00:0X before its prerouting hook runs, so a bridge-family table cannot stop a
guest from poisoning the bridge's forwarding database; a netdev ingress hook runs before the bridge sees the frame.

What a NIC may send (normal mode): frames from its own MAC only; ARP only with its own MAC and IPv4 as sender (and
RFC 5227 probes with sender 0.0.0.0); IPv4 from its own address only, never a DHCP server reply (UDP source port
67); IPv6 from its own address or its EUI-64 link-local address (plus the unspecified address for DAD and MLD),
never a DHCPv6 server reply (547), a router advertisement or a redirect, and neighbour advertisements only for its
own addresses; RARP from its own MAC (QEMU's ``announce-self``). What it may receive: ARP and IPv4 from inside its
network's prefix, IPv6 from inside its IPv6 prefix or link-local, neighbours' DHCP discovers, RARP. Everything else
is dropped and counted in a named counter (:data:`COUNTERS`), so that a drop says which rule it broke.

Isolated mode (incident response) keeps only what a forensic workstation inside the network needs: ARP for the
NIC's own IPv4 both ways, TCP to the forensic port on the NIC's own IPv4 (the VM is the server) and the replies from
it, and RARP from its own MAC. Spoofing attempts still count where they do in normal mode (``from_vm_mac``,
``from_vm_arp``, ``from_vm_ip4``); everything dropped only because of the isolation counts in ``isolated_drop``, in
both directions (``to_vm_drop``, ``from_vm_other`` and the IPv6 counters stay at zero there).

The file starts with ``add table`` + ``delete table`` so that ``nft -f`` of it is one transaction that creates or
fully replaces the table (which also resets its counters). nft canonicalises what it lists, so the hash that proves
what a host runs is taken from the read-back listing (:mod:`ferryman.agent.network`), never from this text;
:func:`source_digest` only identifies the source.

This module is pure: no I/O, no subprocess; it imports only the standard library and :mod:`ferryman.core`.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re

from ferryman.core.errors import InvalidInput
from ferryman.core.models import NAME_RE, NicSpec

__all__ = [
    "COUNTERS",
    "MAX_VNI",
    "RULES_FORMAT",
    "bridge_name",
    "check_nic",
    "check_nic_id",
    "check_peer",
    "check_vni",
    "link_local",
    "render",
    "source_digest",
    "table_name",
    "tap_name",
    "vxlan_name",
]

RULES_FORMAT = 1
"""Version of the rendering: bumps whenever :func:`render` changes its output for the same NIC."""

MAX_VNI = 0xFFFFFF

COUNTERS = (
    "from_vm_mac",
    "from_vm_arp",
    "from_vm_ip4",
    "from_vm_ip6",
    "from_vm_dhcp",
    "from_vm_nd",
    "from_vm_other",
    "to_vm_drop",
    "isolated_drop",
)
"""The named counters every NIC table declares, in both modes."""

_NIC_ID = re.compile(r"[a-z0-9]{1,11}")
_MAC = re.compile(r"[0-9a-f]{2}(?::[0-9a-f]{2}){5}")
_PRIORITY = -500  # before anything else a host might hook on the tap
_BROADCAST = ipaddress.IPv4Address("255.255.255.255")


def check_nic_id(nic_id: str) -> str:
    """``nic_id`` if it is 1-11 of ``[a-z0-9]`` (it becomes part of interface and table names), else InvalidInput."""
    if not isinstance(nic_id, str) or not _NIC_ID.fullmatch(nic_id):
        raise InvalidInput(f"bad NIC id {nic_id!r}: 1 to 11 lowercase letters and digits")
    return nic_id


def check_vni(vni: int) -> int:
    """``vni`` if it is a VXLAN network identifier (1 to 16777215), else InvalidInput."""
    if not _is_int(vni) or not 1 <= vni <= MAX_VNI:
        raise InvalidInput(f"bad VNI {vni!r}: 1 to {MAX_VNI}")
    return vni


def check_peer(address: str) -> str:
    """``address`` if it is a host's underlay IPv4 address in canonical dotted form, else InvalidInput."""
    try:
        parsed = ipaddress.IPv4Address(address)
    except (ipaddress.AddressValueError, TypeError, ValueError) as err:
        raise InvalidInput(f"bad underlay address {address!r}: not an IPv4 address") from err
    if str(parsed) != address or parsed.is_unspecified or parsed.is_multicast or parsed == _BROADCAST:
        raise InvalidInput(f"bad underlay address {address!r}: a unicast IPv4 address in dotted form")
    return address


def tap_name(nic_id: str) -> str:
    """The NIC's tap on every host, e.g. ``fmt-web1``."""
    return "fmt-" + check_nic_id(nic_id)


def table_name(nic_id: str) -> str:
    """The NIC's nftables table (family netdev) on every host, e.g. ``fm_nic_web1``."""
    return "fm_nic_" + check_nic_id(nic_id)


def bridge_name(vni: int) -> str:
    """The segment's bridge on every host that spans it, e.g. ``fmbr100``."""
    return f"fmbr{check_vni(vni)}"


def vxlan_name(vni: int) -> str:
    """The segment's VXLAN device on every host that spans it, e.g. ``fmvx100``."""
    return f"fmvx{check_vni(vni)}"


def check_nic(nic: NicSpec) -> NicSpec:
    """``nic`` unchanged if every field can be rendered safely; InvalidInput naming the first bad field otherwise."""
    check_nic_id(nic.id)
    where = f"NIC {nic.id}"
    check_vni(nic.vni)
    _check_mac(nic.mac, where)
    _check_ipv4(nic.ipv4, nic.cidr, where)
    _check_ipv6(nic.ipv6, nic.cidr6, where)
    if not _is_int(nic.forensic_port) or not 1 <= nic.forensic_port <= 65535:
        raise InvalidInput(f"{where}: bad forensic port {nic.forensic_port!r}: 1 to 65535")
    if not _is_int(nic.revision) or nic.revision < 1:
        raise InvalidInput(f"{where}: bad rule revision {nic.revision!r}: 1 or more")
    if not isinstance(nic.isolated, bool):
        raise InvalidInput(f"{where}: isolated must be true or false, not {nic.isolated!r}")
    if not isinstance(nic.peers, tuple):
        raise InvalidInput(f"{where}: peers must be a tuple of IPv4 addresses")
    for peer in nic.peers:
        check_peer(peer)
    if nic.hostname is not None and (not isinstance(nic.hostname, str) or not NAME_RE.match(nic.hostname)):
        raise InvalidInput(f"{where}: bad hostname {nic.hostname!r}: a DNS label")
    return nic


def link_local(mac: str) -> str:
    """The EUI-64 link-local IPv6 address a guest kernel derives from ``mac`` (universal/local bit flipped)."""
    _check_mac(mac, "link-local address")
    octets = bytearray(int(part, 16) for part in mac.split(":"))
    octets[0] ^= 0x02
    interface_id = bytes(octets[:3]) + b"\xff\xfe" + bytes(octets[3:])
    return str(ipaddress.IPv6Address(b"\xfe\x80" + bytes(6) + interface_id))


def render(nic: NicSpec) -> str:
    """The complete file for ``nft -f`` that creates or replaces the NIC's table (InvalidInput for a bad NIC)."""
    check_nic(nic)
    table = table_name(nic.id)
    head = [
        f"# ferryman anti-spoofing for NIC {nic.id}; generated, do not edit",
        f"add table netdev {table}",
        f"delete table netdev {table}",
        f"table netdev {table} {{",
        f'\tcomment "ferryman nic={nic.id} revision={nic.revision} format={RULES_FORMAT}"',
        *(f"\tcounter {name} {{ }}" for name in COUNTERS),
    ]
    body = _isolated_body(nic) if nic.isolated else _normal_body(nic)
    return "\n".join([*head, *body, "}", ""])


def source_digest(nic: NicSpec) -> str:
    """``sha256:<hex>`` of :func:`render`'s text: identifies the source, not what a host runs."""
    return "sha256:" + hashlib.sha256(render(nic).encode()).hexdigest()


# --- rendering -------------------------------------------------------------------------------------------------

_ARP_ETH_IP = "arp htype 1 arp ptype ip arp hlen 6 arp plen 4"  # Ethernet/IPv4 ARP only: no other layout parses


def _hook(nic: NicSpec, hook: str) -> str:
    return f'\t\ttype filter hook {hook} device "{tap_name(nic.id)}" priority {_PRIORITY}; policy drop;'


def _own_ip6(nic: NicSpec) -> list[ipaddress.IPv6Address]:
    own = {ipaddress.IPv6Address(link_local(nic.mac))}
    if nic.ipv6 is not None:
        own.add(ipaddress.IPv6Address(nic.ipv6))
    return sorted(own)


def _normal_body(nic: NicSpec) -> list[str]:
    mac, ip4, cidr = nic.mac, nic.ipv4, nic.cidr
    own6 = _own_ip6(nic)
    from_inside6 = ", ".join(["::", *([nic.cidr6] if nic.cidr6 else []), "fe80::/10"])
    return [
        f"\tset own_ip6 {{ type ipv6_addr; elements = {{ {', '.join(str(a) for a in own6)} }}; }}",
        "\t# the same addresses as 128-bit integers, to match an ND target (nft 1.0.6 has no icmpv6 taddr)",
        f"\tset own_ip6_raw {{ typeof @th,64,128; elements = {{ {', '.join(hex(int(a)) for a in own6)} }}; }}",
        "\tchain from_vm {",
        _hook(nic, "ingress"),
        f"\t\tether saddr != {mac} counter name from_vm_mac drop",
        "\t\tether type arp jump from_vm_arp",
        "\t\tether type ip jump from_vm_ip4",
        "\t\tether type ip6 jump from_vm_ip6",
        "\t\tether type 0x8035 accept",  # RARP: QEMU's announce-self; the source MAC is checked above
        "\t\tcounter name from_vm_other drop",
        "\t}",
        "\tchain from_vm_arp {",
        f"\t\t{_ARP_ETH_IP} arp saddr ether {mac} arp saddr ip {ip4} accept",
        f"\t\t{_ARP_ETH_IP} arp operation request arp saddr ether {mac} arp saddr ip 0.0.0.0 accept",
        "\t\tcounter name from_vm_arp drop",
        "\t}",
        "\tchain from_vm_ip4 {",
        "\t\tudp sport 67 counter name from_vm_dhcp drop",  # first: a rogue DHCP server counts as such
        f"\t\tip saddr {ip4} accept",
        "\t\tcounter name from_vm_ip4 drop",
        "\t}",
        "\tchain from_vm_ip6 {",
        "\t\tudp sport 547 counter name from_vm_dhcp drop",
        "\t\ticmpv6 type { nd-router-advert, nd-redirect } counter name from_vm_nd drop",
        "\t\tip6 saddr :: icmpv6 type nd-neighbor-solicit @th,64,128 @own_ip6_raw accept",  # DAD for its own
        "\t\tip6 saddr :: icmpv6 type mld2-listener-report accept",
        "\t\tip6 saddr != @own_ip6 counter name from_vm_ip6 drop",
        "\t\ticmpv6 type nd-neighbor-advert @th,64,128 != @own_ip6_raw counter name from_vm_nd drop",
        "\t\taccept",
        "\t}",
        "\tchain to_vm {",
        _hook(nic, "egress"),
        f"\t\tether type arp arp saddr ip {{ 0.0.0.0, {cidr} }} accept",
        f"\t\tether type ip ip saddr {cidr} accept",
        # neighbours' DHCP discovers: lets a rogue server inside a guest be seen (and dropped) rather than starved
        "\t\tether type ip ip saddr 0.0.0.0 ip daddr 255.255.255.255 udp sport 68 udp dport 67 accept",
        f"\t\tether type ip6 ip6 saddr {{ {from_inside6} }} accept",
        "\t\tether type 0x8035 accept",
        "\t\tcounter name to_vm_drop drop",
        "\t}",
    ]


def _isolated_body(nic: NicSpec) -> list[str]:
    mac, ip4, cidr, port = nic.mac, nic.ipv4, nic.cidr, nic.forensic_port
    return [
        "\tchain from_vm {",
        _hook(nic, "ingress"),
        f"\t\tether saddr != {mac} counter name from_vm_mac drop",
        "\t\tether type arp jump from_vm_arp",
        "\t\tether type ip jump from_vm_ip4",
        "\t\tether type 0x8035 accept",
        "\t\tcounter name isolated_drop drop",
        "\t}",
        "\tchain from_vm_arp {",
        f"\t\t{_ARP_ETH_IP} arp saddr ether {mac} arp saddr ip {ip4} accept",
        "\t\tcounter name from_vm_arp drop",
        "\t}",
        "\tchain from_vm_ip4 {",
        f"\t\tip saddr != {ip4} counter name from_vm_ip4 drop",
        f"\t\tip daddr {cidr} tcp sport {port} accept",
        "\t\tcounter name isolated_drop drop",
        "\t}",
        "\tchain to_vm {",
        _hook(nic, "egress"),
        f"\t\tether type arp {_ARP_ETH_IP} arp saddr ip {{ 0.0.0.0, {cidr} }} arp daddr ip {ip4} accept",
        f"\t\tether type ip ip saddr {cidr} ip daddr {ip4} tcp dport {port} accept",
        "\t\tcounter name isolated_drop drop",
        "\t}",
    ]


# --- validation --------------------------------------------------------------------------------------------------


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_mac(mac: str, where: str) -> None:
    if not isinstance(mac, str) or not _MAC.fullmatch(mac):
        raise InvalidInput(f"{where}: bad MAC {mac!r}: six lowercase hex pairs separated by colons")
    if int(mac[:2], 16) & 0x01:
        raise InvalidInput(f"{where}: bad MAC {mac}: a multicast address, not a NIC's")
    if mac == "00:00:00:00:00:00":
        raise InvalidInput(f"{where}: bad MAC {mac}: the zero address")


def _check_ipv4(ipv4: str, cidr: str, where: str) -> None:
    try:
        network = ipaddress.IPv4Network(cidr)
    except (ValueError, TypeError) as err:
        raise InvalidInput(f"{where}: bad IPv4 prefix {cidr!r}: {err}") from err
    try:
        address = ipaddress.IPv4Address(ipv4)
    except (ValueError, TypeError) as err:
        raise InvalidInput(f"{where}: bad IPv4 address {ipv4!r}") from err
    if str(network) != cidr or str(address) != ipv4:
        raise InvalidInput(f"{where}: write {ipv4!r} in {cidr!r} in canonical form ({address} in {network})")
    if address not in network:
        raise InvalidInput(f"{where}: IPv4 address {ipv4} is not inside its network {cidr}")
    if network.prefixlen < 31 and address in (network.network_address, network.broadcast_address):
        raise InvalidInput(f"{where}: IPv4 address {ipv4} is the network or broadcast address of {cidr}")
    if address.is_unspecified or address.is_multicast or address == _BROADCAST or address.is_loopback:
        raise InvalidInput(f"{where}: IPv4 address {ipv4} cannot be a NIC's")


def _check_ipv6(ipv6: str | None, cidr6: str | None, where: str) -> None:
    if ipv6 is None and cidr6 is None:
        return
    if ipv6 is None or cidr6 is None:
        raise InvalidInput(f"{where}: give an IPv6 address and its prefix together (ipv6={ipv6!r}, cidr6={cidr6!r})")
    try:
        network = ipaddress.IPv6Network(cidr6)
    except (ValueError, TypeError) as err:
        raise InvalidInput(f"{where}: bad IPv6 prefix {cidr6!r}: {err}") from err
    try:
        address = ipaddress.IPv6Address(ipv6)
    except (ValueError, TypeError) as err:
        raise InvalidInput(f"{where}: bad IPv6 address {ipv6!r}") from err
    if str(network) != cidr6 or str(address) != ipv6:
        raise InvalidInput(f"{where}: write {ipv6!r} in {cidr6!r} in canonical form ({address} in {network})")
    if network.is_link_local or network.is_multicast or network.is_unspecified or network.is_loopback:
        raise InvalidInput(f"{where}: IPv6 prefix {cidr6} cannot be a network's (link-local, multicast, loopback)")
    if address not in network:
        raise InvalidInput(f"{where}: IPv6 address {ipv6} is not inside its network {cidr6}")
    if network.prefixlen < 127 and address == network.network_address:
        raise InvalidInput(f"{where}: IPv6 address {ipv6} is the subnet-router anycast address of {cidr6}")
