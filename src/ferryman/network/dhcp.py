"""DHCP for a NIC, answered from the CMDB: a guest that asks gets the address IPAM gave its NIC, and nothing else.

Why it exists: an operator's image (a Debian or Ubuntu cloud image, say) configures its network by DHCP; the address
Ferryman allocated must reach it without a DHCP server on the tenant segment (which a guest could impersonate or
starve, and which would need an address of the host on the segment). Each host answers its own NICs' requests on
their taps, from the :class:`~ferryman.core.models.NicSpec` it already holds, as Neutron's and OVN's native DHCP do.

What a reply says: the NIC's IPv4 address (``yiaddr``), the prefix's netmask, the VM's name as its hostname, the
prefix's first address as server identifier (IPAM keeps it for the network, no guest ever has it), and an infinite
lease (the address is the NIC's for its life: nothing to renew, nothing to expire while the host that answered is
gone). No router and no DNS: a tenant network has neither until an operator adds one.

Which requests are answered: a DISCOVER gets an OFFER; a REQUEST for the NIC's own address (option 50 or ``ciaddr``)
addressed to us or to no server gets an ACK; a REQUEST for any other address gets a NAK, so a guest that remembers an
old address (a VM re-addressed, an image from another cloud) starts over. A REQUEST addressed to another server, a
RELEASE, a DECLINE, an INFORM and anything malformed get nothing. A request whose client hardware address or frame
source is not the NIC's MAC is ignored: a guest cannot obtain a reply for another address by forging either.

The reply frame goes to the NIC's MAC (unicast Ethernet) with IPv4 destination 255.255.255.255, which a client
without an address yet accepts; its source is the server identifier, inside the prefix, so the NIC's own egress rules
(:mod:`ferryman.network.rules`) let it through.

This module is pure: bytes in, bytes out; the sockets are :mod:`ferryman.agent.network.dhcp`'s.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from dataclasses import dataclass

from ferryman.core.models import NicSpec

__all__ = [
    "CLIENT_PORT",
    "INFINITE_LEASE",
    "SERVER_MAC",
    "SERVER_PORT",
    "DhcpRequest",
    "MessageType",
    "answer",
    "parse_request",
    "server_address",
]

SERVER_PORT, CLIENT_PORT = 67, 68
INFINITE_LEASE = 0xFFFFFFFF
SERVER_MAC = bytes.fromhex("0a666d000001")  # locally administered, never a NIC's (IPAM gives 52:54:00:...)
_MAGIC = b"\x63\x82\x53\x63"
_BOOTP = struct.Struct("!BBBBIHH4s4s4s4s16s64s128s")  # op .. file: 236 bytes, then the magic cookie and options
_ETHERTYPE_IPV4 = 0x0800
_MIN_BOOTP = 300  # BOOTP's minimum message: some clients drop shorter replies
_TTL = 64


class MessageType(enum.IntEnum):
    DISCOVER = 1
    OFFER = 2
    REQUEST = 3
    DECLINE = 4
    ACK = 5
    NAK = 6
    RELEASE = 7
    INFORM = 8


@dataclass(frozen=True)
class DhcpRequest:
    """What a client asked, as far as the answer depends on it."""

    kind: MessageType
    xid: int
    flags: int
    chaddr: bytes  # the client's hardware address (6 bytes)
    frame_source: bytes  # the Ethernet source of the frame
    ciaddr: str
    requested: str | None  # option 50
    server_id: str | None  # option 54


def _mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def server_address(nic: NicSpec) -> str:
    """The server identifier of ``nic``'s network: its prefix's first address (kept by IPAM, never a NIC's)."""
    return str(ipaddress.IPv4Network(nic.cidr).network_address + 1)


def _options(data: bytes) -> dict[int, bytes] | None:
    """Options by code (the first of each wins); None if they run past the end."""
    found: dict[int, bytes] = {}
    i = 0
    while i < len(data):
        code = data[i]
        if code == 255:
            return found
        if code == 0:
            i += 1
            continue
        if i + 1 >= len(data) or i + 2 + data[i + 1] > len(data):
            return None
        found.setdefault(code, data[i + 2 : i + 2 + data[i + 1]])
        i += 2 + data[i + 1]
    return found


def _address(value: bytes | None) -> str | None:
    return str(ipaddress.IPv4Address(value)) if value is not None and len(value) == 4 else None


def parse_request(frame: bytes) -> DhcpRequest | None:
    """The DHCP request in an Ethernet frame (IPv4, UDP to port 67, BOOTREQUEST over Ethernet), or None."""
    if len(frame) < 14 + 20 + 8 + _BOOTP.size + 4 or struct.unpack_from("!H", frame, 12)[0] != _ETHERTYPE_IPV4:
        return None
    ihl = (frame[14] & 0x0F) * 4
    version = frame[14] >> 4
    total = struct.unpack_from("!H", frame, 16)[0]
    fragment = struct.unpack_from("!H", frame, 20)[0] & 0x3FFF  # more-fragments bit or an offset
    if version != 4 or ihl < 20 or frame[23] != 17 or fragment or total > len(frame) - 14:
        return None
    udp = 14 + ihl
    if len(frame) < udp + 8 + _BOOTP.size + 4 or struct.unpack_from("!H", frame, udp + 2)[0] != SERVER_PORT:
        return None
    end = 14 + total
    bootp = frame[udp + 8 : end]
    if len(bootp) < _BOOTP.size + 4 or bootp[_BOOTP.size : _BOOTP.size + 4] != _MAGIC:
        return None
    op, htype, hlen, _hops, xid, _secs, flags, ciaddr, _yi, _si, _gi, chaddr, _sname, _file = _BOOTP.unpack_from(bootp)
    if op != 1 or htype != 1 or hlen != 6:
        return None
    options = _options(bootp[_BOOTP.size + 4 :])
    if options is None or len(options.get(53, b"")) != 1:
        return None
    try:
        kind = MessageType(options[53][0])
    except ValueError:
        return None
    return DhcpRequest(
        kind=kind,
        xid=xid,
        flags=flags,
        chaddr=chaddr[:6],
        frame_source=frame[6:12],
        ciaddr=str(ipaddress.IPv4Address(ciaddr)),
        requested=_address(options.get(50)),
        server_id=_address(options.get(54)),
    )


def _decide(request: DhcpRequest, nic: NicSpec, server: str) -> MessageType | None:
    if request.chaddr != _mac(nic.mac) or request.frame_source != _mac(nic.mac):
        return None
    if request.kind is MessageType.DISCOVER:
        return MessageType.OFFER
    if request.kind is not MessageType.REQUEST:
        return None
    if request.server_id is not None and request.server_id != server:
        return None  # the client chose another server's offer: not ours to answer
    wanted = request.requested or (request.ciaddr if request.ciaddr != "0.0.0.0" else None)
    return MessageType.ACK if wanted == nic.ipv4 else MessageType.NAK


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _option(code: int, value: bytes) -> bytes:
    return bytes((code, len(value))) + value


def answer(request: DhcpRequest, nic: NicSpec) -> tuple[MessageType, bytes] | None:
    """The reply to ``request`` from the NIC's host, as an Ethernet frame to send on its tap; None for no reply."""
    server = server_address(nic)
    kind = _decide(request, nic, server)
    if kind is None:
        return None
    network = ipaddress.IPv4Network(nic.cidr)
    server_ip = ipaddress.IPv4Address(server).packed
    options = _option(53, bytes((kind,))) + _option(54, server_ip)
    yiaddr = bytes(4)
    if kind is not MessageType.NAK:
        yiaddr = ipaddress.IPv4Address(nic.ipv4).packed
        options += _option(51, struct.pack("!I", INFINITE_LEASE)) + _option(1, network.netmask.packed)
        if nic.hostname:
            options += _option(12, nic.hostname.encode("ascii"))
    options += b"\xff"
    bootp = _BOOTP.pack(
        2, 1, 6, 0, request.xid, 0, request.flags, bytes(4), yiaddr, bytes(4), bytes(4), request.chaddr, b"", b""
    )
    bootp += _MAGIC + options
    bootp += bytes(max(0, _MIN_BOOTP - len(bootp)))
    destination = b"\xff\xff\xff\xff"
    udp_length = 8 + len(bootp)
    pseudo = server_ip + destination + struct.pack("!BBH", 0, 17, udp_length)
    udp = struct.pack("!HHHH", SERVER_PORT, CLIENT_PORT, udp_length, 0) + bootp
    udp_sum = _checksum(pseudo + udp) or 0xFFFF
    udp = udp[:6] + struct.pack("!H", udp_sum) + udp[8:]
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0x4000, _TTL, 17, 0, server_ip, destination)
    header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
    ethernet = request.chaddr + SERVER_MAC + struct.pack("!H", _ETHERTYPE_IPV4)
    return kind, ethernet + header + udp
