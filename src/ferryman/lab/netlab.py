"""The lab's network topology: one network namespace per lab host, joined by an underlay for VXLAN.

Each lab host stands for a machine of its own, so it gets a namespace of its own (``fm<port>-<host>``) in which its
agent plumbs the VMs' taps, bridges, VXLAN devices and nftables tables. An underlay namespace (``fm<port>-ul``) holds
one bridge; each host namespace has a veth ``ul0`` whose peer is a port of that bridge and which carries the host's
underlay address (``192.0.2.<n>/24``, TEST-NET-1, which exists only inside these namespaces)::

    fm<port>-ul:      fmul (bridge) ── ulp1 ── ulp2 ── …
                                        │       │
    fm<port>-host-a:                   ul0 192.0.2.1/24, MTU 1550
    fm<port>-host-b:                           ul0 192.0.2.2/24, MTU 1550

The underlay's MTU is 1550 so that VXLAN (50 bytes of headers) leaves tenants a full 1500. IPv6 is disabled in every
namespace before any device is created in it, so that no bridge a host creates later gets a link-local address a
tenant could reach. Nothing is ever created in the root namespace: each veth pair is created across namespaces.
The names derive from the lab's API port, so two labs on different ports coexist.

:func:`create` is idempotent (a second call finds everything in place and changes nothing); :func:`destroy` deletes
the namespaces, and with them every device and nftables table in them. Call it only once the lab's QEMUs have exited:
a tap a QEMU holds keeps its namespace alive, nameless, until the QEMU exits. This module needs root and ``ip``
(iproute2) and ``sysctl`` (procps); :func:`unavailable` says why it cannot run. It starts no VM and no daemon.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ferryman.core.errors import PermanentError

NETNS_DIR = Path("/run/netns")
UNDERLAY_PREFIX = "192.0.2."
UNDERLAY_PREFIX_LEN = 24
UNDERLAY_MTU = 1550
UNDERLAY_BRIDGE = "fmul"
UNDERLAY_DEVICE = "ul0"  # the host side of its underlay veth, in every host namespace
MAX_HOSTS = 250
_COMMAND_TIMEOUT = 15.0
_NO_IPV6 = ("net.ipv6.conf.default.disable_ipv6=1", "net.ipv6.conf.all.disable_ipv6=1")


class NetLabError(PermanentError):
    """The lab's network namespaces or underlay could not be created or removed."""


@dataclass(frozen=True)
class HostNet:
    """One lab host's place in the topology: its namespace, its underlay address (no prefix length) and the name of
    its veth's peer in the underlay namespace."""

    name: str
    netns: str
    underlay_ip: str
    underlay_port: str


@dataclass(frozen=True)
class LabNetwork:
    """The names and addresses of one lab's topology; :func:`plan` derives them, nothing is created."""

    prefix: str  # every namespace of the lab starts with it
    underlay_netns: str
    hosts: tuple[HostNet, ...]

    def host(self, name: str) -> HostNet | None:
        return next((host for host in self.hosts if host.name == name), None)

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, value: Any) -> LabNetwork:
        """The topology :meth:`as_json` recorded (NetLabError if it is not one)."""
        try:
            hosts = tuple(HostNet(**host) for host in value["hosts"])
            return cls(prefix=str(value["prefix"]), underlay_netns=str(value["underlay_netns"]), hosts=hosts)
        except (TypeError, KeyError) as err:
            raise NetLabError(f"not a recorded lab network: {err!r}") from None


def plan(port: int, hosts: Sequence[str]) -> LabNetwork:
    """The topology of the lab whose API listens on ``port``, for ``hosts`` in order (the n-th gets 192.0.2.<n>)."""
    if not 1 <= port <= 65535:
        raise NetLabError(f"bad lab port {port}")
    if len(hosts) > MAX_HOSTS or len(set(hosts)) != len(hosts):
        raise NetLabError(f"the lab's underlay takes up to {MAX_HOSTS} distinct hosts, not {list(hosts)}")
    prefix = f"fm{port}-"
    for name in hosts:
        if not name or "/" in name or name.startswith(".") or len(prefix + name) > 64:
            raise NetLabError(f"bad lab host name {name!r} for a namespace")
    return LabNetwork(
        prefix=prefix,
        underlay_netns=f"{prefix}ul",
        hosts=tuple(
            HostNet(name, f"{prefix}{name}", f"{UNDERLAY_PREFIX}{n}", f"ulp{n}") for n, name in enumerate(hosts, 1)
        ),
    )


def unavailable() -> str | None:
    """Why this machine cannot have the lab's network (None: it can)."""
    if os.geteuid() != 0:
        return "it needs root"
    missing = [tool for tool in ("ip", "sysctl") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not found (install iproute2, procps)"
    if not Path("/proc/self/ns/net").exists():
        return "this kernel has no network namespaces"
    return None


def create(net: LabNetwork) -> None:
    """Create whatever of ``net`` is missing; what exists is left as it is (its addresses and MTUs set again)."""
    ul = net.underlay_netns
    for netns in (ul, *(host.netns for host in net.hosts)):
        _namespace(netns)
    if not _link_exists(ul, UNDERLAY_BRIDGE):
        _ip("-n", ul, "link", "add", UNDERLAY_BRIDGE, "type", "bridge")
    _ip("-n", ul, "link", "set", UNDERLAY_BRIDGE, "up")
    for host in net.hosts:
        if not _link_exists(host.netns, UNDERLAY_DEVICE):
            if _link_exists(ul, host.underlay_port):  # half of a pair whose other half went with its namespace
                _ip("-n", ul, "link", "del", host.underlay_port)
            peer = ("peer", "name", UNDERLAY_DEVICE, "netns", host.netns)
            _ip("-n", ul, "link", "add", host.underlay_port, "type", "veth", *peer)
        _ip("-n", ul, "link", "set", host.underlay_port, "master", UNDERLAY_BRIDGE, "mtu", str(UNDERLAY_MTU), "up")
        _ip("-n", host.netns, "link", "set", UNDERLAY_DEVICE, "mtu", str(UNDERLAY_MTU), "up")
        address = f"{host.underlay_ip}/{UNDERLAY_PREFIX_LEN}"
        _ip("-n", host.netns, "addr", "replace", address, "dev", UNDERLAY_DEVICE)


def destroy(net: LabNetwork) -> list[str]:
    """Delete every namespace of the lab (those of ``net`` and any other under its prefix, e.g. of a lab that had
    more hosts); returns the names deleted. Missing ones are skipped."""
    names = {net.underlay_netns, *(host.netns for host in net.hosts), *existing(net.prefix)}
    deleted = []
    for netns in sorted(names, key=lambda n: (n == net.underlay_netns, n)):  # the hosts first, then the underlay
        if (NETNS_DIR / netns).exists():
            _ip("netns", "del", netns)
            deleted.append(netns)
    return deleted


def existing(prefix: str) -> list[str]:
    """The names of the namespaces that start with ``prefix``."""
    try:
        return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(prefix))
    except FileNotFoundError:
        return []


def pids_inside(netns: str) -> list[int]:
    """Processes whose network namespace is ``netns`` (``ip netns pids``); a lab being stopped should have none."""
    out = _ip("netns", "pids", netns) if (NETNS_DIR / netns).exists() else ""
    return [int(word) for word in out.split() if word.isdigit()]


def _namespace(netns: str) -> None:
    """The namespace, with IPv6 disabled before any device is created in it, and lo up."""
    if not (NETNS_DIR / netns).exists():
        _ip("netns", "add", netns)
    _run(["ip", "netns", "exec", netns, "sysctl", "-q", "-w", *_NO_IPV6])
    _ip("-n", netns, "link", "set", "lo", "up")


def _link_exists(netns: str, device: str) -> bool:
    done = _run(["ip", "-n", netns, "link", "show", "dev", device], check=False)
    return done.returncode == 0


def _ip(*args: str) -> str:
    return _run(["ip", *args]).stdout


def _run(argv: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=_COMMAND_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise NetLabError(f"{' '.join(argv)}: {err}") from err
    if check and done.returncode != 0:
        raise NetLabError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}")
    return done
