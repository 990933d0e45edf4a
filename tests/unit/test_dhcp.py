"""The DHCP codec: requests parsed from real frame layouts, answers that give the NIC's address and nothing else."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from ferryman.agent.network.dhcp import _BURST, _PER_SECOND, _Served
from ferryman.core.models import NicSpec
from ferryman.network.dhcp import (
    INFINITE_LEASE,
    SERVER_MAC,
    MessageType,
    answer,
    parse_request,
    server_address,
)

NIC = NicSpec("n1", "acme-prod", 1000, "52:54:00:12:34:56", "10.50.1.7", "10.50.1.0/24", hostname="web-1")
MAC = bytes.fromhex("525400123456")


def _checksum(data: bytes) -> int:
    data += b"\0" * (len(data) % 2)
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def request_frame(
    kind: int,
    *,
    chaddr: bytes = MAC,
    source: bytes = MAC,
    requested: str | None = None,
    server: str | None = None,
    ciaddr: str = "0.0.0.0",
    options: bytes | None = None,
    fragment: int = 0,
) -> bytes:
    """A request as a DHCP client puts it on the wire: Ethernet, IPv4 0.0.0.0 -> 255.255.255.255, UDP 68 -> 67."""
    if options is None:
        options = bytes((53, 1, kind))
        if requested:
            options += bytes((50, 4)) + ipaddress.IPv4Address(requested).packed
        if server:
            options += bytes((54, 4)) + ipaddress.IPv4Address(server).packed
        options += b"\xff"
    bootp = struct.pack(
        "!BBBBIHH4s4s4s4s16s64s128s",
        1,
        1,
        6,
        0,
        0xCAFE,
        0,
        0x8000,
        ipaddress.IPv4Address(ciaddr).packed,
        bytes(4),
        bytes(4),
        bytes(4),
        chaddr,
        b"",
        b"",
    )
    bootp += b"\x63\x82\x53\x63" + options
    udp = struct.pack("!HHHH", 68, 67, 8 + len(bootp), 0) + bootp
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, fragment, 64, 17, 0, bytes(4), b"\xff" * 4)
    return b"\xff" * 6 + source + b"\x08\x00" + ip + udp


def _reply(frame: bytes) -> dict[str, object]:
    """The fields of a reply frame a client reads, with its checksums verified."""
    assert frame[:6] == MAC and frame[6:12] == SERVER_MAC and frame[12:14] == b"\x08\x00"
    ip, udp = frame[14:34], frame[34:]
    assert _checksum(ip) == 0, "IPv4 header checksum"
    pseudo = ip[12:20] + struct.pack("!BBH", 0, 17, len(udp))
    assert _checksum(pseudo + udp) == 0, "UDP checksum"
    assert struct.unpack("!HH", udp[:4]) == (67, 68) and ip[16:20] == b"\xff" * 4
    bootp = udp[8:]
    assert bootp[0] == 2 and bootp[4:8] == struct.pack("!I", 0xCAFE) and bootp[28:34] == MAC
    options, i = {}, 240
    while bootp[i] != 255:
        options[bootp[i]] = bootp[i + 2 : i + 2 + bootp[i + 1]]
        i += 2 + bootp[i + 1]
    return {
        "yiaddr": str(ipaddress.IPv4Address(bootp[16:20])),
        "source": str(ipaddress.IPv4Address(ip[12:16])),
        "kind": options[53][0],
        "server": str(ipaddress.IPv4Address(options[54])),
        "mask": str(ipaddress.IPv4Address(options[1])) if 1 in options else None,
        "lease": struct.unpack("!I", options[51])[0] if 51 in options else None,
        "hostname": options[12].decode() if 12 in options else None,
        "length": len(bootp),
    }


def test_a_discover_is_offered_the_nics_address() -> None:
    kind, frame = answer(parse_request(request_frame(1)), NIC)  # type: ignore[arg-type,misc]
    assert kind is MessageType.OFFER
    got = _reply(frame)
    assert got["yiaddr"] == "10.50.1.7" and got["mask"] == "255.255.255.0" and got["lease"] == INFINITE_LEASE
    assert got["server"] == got["source"] == server_address(NIC) == "10.50.1.1"
    assert got["kind"] == 2 and got["length"] >= 300 and got["hostname"] == "web-1"


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"requested": "10.50.1.7", "server": "10.50.1.1"}, MessageType.ACK),
        ({"requested": "10.50.1.7"}, MessageType.ACK),  # INIT-REBOOT: no server named
        ({"ciaddr": "10.50.1.7"}, MessageType.ACK),  # renewing
        ({"requested": "10.50.1.99"}, MessageType.NAK),  # an address it is not given
        ({"requested": "10.50.1.7", "server": "10.50.1.254"}, None),  # another server's offer taken
    ],
)
def test_a_request_is_acked_only_for_the_nics_address(fields: dict[str, str], expected: MessageType | None) -> None:
    result = answer(parse_request(request_frame(3, **fields)), NIC)  # type: ignore[arg-type]
    assert (result[0] if result else None) is expected
    if result is not None:
        got = _reply(result[1])
        assert got["kind"] == expected
        assert got["yiaddr"] == ("10.50.1.7" if expected is MessageType.ACK else "0.0.0.0")


@pytest.mark.parametrize(
    "fields",
    [
        {"chaddr": bytes.fromhex("525400999999")},  # asks for another NIC's address
        {"source": bytes.fromhex("525400999999")},  # a frame another MAC sent
    ],
)
def test_a_forged_hardware_address_gets_nothing(fields: dict[str, bytes]) -> None:
    assert answer(parse_request(request_frame(1, **fields)), NIC) is None  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", [4, 7, 8])  # decline, release, inform
def test_other_messages_get_nothing(kind: int) -> None:
    assert answer(parse_request(request_frame(kind)), NIC) is None  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        request_frame(1)[:200],  # cut short
        request_frame(1, options=b"\x35\x05\x01"),  # an option running past the end
        request_frame(1, options=b"\xff"),  # no message type
        request_frame(1, options=b"\x35\x01\x63\xff"),  # an unknown message type
        request_frame(1, fragment=0x2000),  # a first fragment
        request_frame(1)[:12] + b"\x86\xdd" + request_frame(1)[14:],  # not IPv4
    ],
)
def test_malformed_frames_are_not_requests(frame: bytes) -> None:
    assert parse_request(frame) is None


def test_replies_are_rate_limited_per_nic() -> None:
    """A guest flooding requests gets a burst of answers, then as many as the rate refills, never more."""
    served = _Served(NIC, sock=None, refilled=100.0)  # type: ignore[arg-type]
    assert sum(served.allow(100.0) for _ in range(3 * _BURST)) == _BURST
    assert served.limited == 2 * _BURST
    assert sum(served.allow(101.0) for _ in range(3 * _BURST)) == int(_PER_SECOND)  # one second later
    other = _Served(NIC, sock=None, refilled=101.0)  # type: ignore[arg-type]
    assert other.allow(101.0)  # another NIC's bucket is its own
