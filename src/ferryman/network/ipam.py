"""Address management for tenant networks: checked prefixes, the next free IPv4 address, its IPv6 twin, and MACs.

Pure: the CMDB calls these inside the transaction that also writes the NIC, so two VMs never get one address.
"""

from __future__ import annotations

import ipaddress
import secrets
from collections.abc import Collection

from ferryman.core.errors import CapacityError, Conflict, InvalidInput

MAC_PREFIX = "52:54:00"  # QEMU's locally administered range
MIN_PREFIX4, MAX_PREFIX4 = 16, 29  # at least the gateway, one NIC and the broadcast address
MIN_PREFIX6 = 48


def check_cidr(cidr: str) -> ipaddress.IPv4Network:
    """The IPv4 prefix ``cidr`` (``10.50.1.0/24``), strict: no host bits, /16 to /29."""
    try:
        net = ipaddress.IPv4Network(cidr, strict=True)
    except ValueError as err:
        raise InvalidInput(f"bad IPv4 prefix {cidr!r}: {err}") from None
    if not MIN_PREFIX4 <= net.prefixlen <= MAX_PREFIX4:
        raise InvalidInput(f"bad IPv4 prefix {cidr!r}: use a /{MIN_PREFIX4} to /{MAX_PREFIX4}")
    return net


def check_cidr6(cidr6: str) -> ipaddress.IPv6Network:
    """The IPv6 prefix ``cidr6``, strict, /48 to /64 (the IPv4 host number is mapped into it)."""
    try:
        net = ipaddress.IPv6Network(cidr6, strict=True)
    except ValueError as err:
        raise InvalidInput(f"bad IPv6 prefix {cidr6!r}: {err}") from None
    if not MIN_PREFIX6 <= net.prefixlen <= 64 or net.is_link_local or net.is_multicast:
        raise InvalidInput(f"bad IPv6 prefix {cidr6!r}: use a unicast /{MIN_PREFIX6} to /64, not link-local")
    return net


def gateway(cidr: str) -> str:
    """The address kept out of the pool for a router: the prefix's first host address."""
    return str(check_cidr(cidr).network_address + 1)


def pick_ipv4(cidr: str, used: Collection[str], requested: str | None = None) -> str:
    """``requested`` if it is a free host address of ``cidr`` (Conflict if taken), else the lowest free one after
    the gateway (CapacityError if the prefix is full)."""
    net = check_cidr(cidr)
    taken = {ipaddress.IPv4Address(a) for a in used} | {net.network_address + 1}
    if requested is not None:
        try:
            address = ipaddress.IPv4Address(requested)
        except ValueError as err:
            raise InvalidInput(f"bad IPv4 address {requested!r}: {err}") from None
        if address not in net or address in (net.network_address, net.broadcast_address):
            raise InvalidInput(f"address {requested} is not a host address of {cidr}")
        if address in taken:
            what = "the gateway address" if address == net.network_address + 1 else "in use"
            raise Conflict(f"address {requested} of {cidr} is {what}")
        return str(address)
    for address in net.hosts():
        if address not in taken:
            return str(address)
    raise CapacityError(f"network {cidr} has no free address left")


def ipv6_twin(cidr: str, cidr6: str, ipv4: str) -> str:
    """The IPv6 address of ``cidr6`` with the same host number as ``ipv4`` has in ``cidr``."""
    net4, net6 = check_cidr(cidr), check_cidr6(cidr6)
    host = int(ipaddress.IPv4Address(ipv4)) - int(net4.network_address)
    return str(net6.network_address + host)


def new_mac(used: Collection[str], *, attempts: int = 64) -> str:
    """A random MAC of :data:`MAC_PREFIX` not in ``used`` (bounded tries; Conflict when the space is crowded)."""
    for _ in range(attempts):
        mac = MAC_PREFIX + "".join(f":{b:02x}" for b in secrets.token_bytes(3))
        if mac not in used:
            return mac
    raise Conflict(f"no free MAC address found in {attempts} tries")


def new_nic_id() -> str:
    """A NIC id: ``n`` and 10 hex digits, so that ``fmt-<id>`` fits an interface name (15 characters)."""
    return "n" + secrets.token_hex(5)
