"""A host's DHCP answers against a real DHCP client: busybox ``udhcpc`` in a guest namespace, behind the NIC's real
nftables rules, asks the host's :class:`~ferryman.agent.network.dhcp.DhcpResponder`.

The NIC's "tap" is one end of a veth pair in a host namespace (its name is the tap's, so the NIC's rules hook on it);
the other end is the guest's ``eth0`` in a namespace of its own, with the NIC's MAC. Everything is named after this
process and deleted afterwards.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ferryman.agent.network import HostNetwork
from ferryman.core.models import NicSpec
from ferryman.network.rules import tap_name

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and nftables need root"),
    pytest.mark.skipif(
        any(shutil.which(tool) is None for tool in ("ip", "nft", "nsenter", "busybox")),
        reason="ip, nft, nsenter and busybox are needed (apt-get install iproute2 nftables busybox-static)",
    ),
]

NIC = NicSpec("dh1", "acme-prod", 100, "52:54:00:00:07:01", "10.50.1.7", "10.50.1.0/24", hostname="web-7")
_RUNS = itertools.count()
SCRIPT = (
    '#!/bin/sh\necho "$1 ip=$ip subnet=$subnet serverid=$serverid lease=$lease router=$router hostname=$hostname"'
    ' >> "$0.log"\n'
)


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=10).stdout


@dataclass
class Pair:
    host_ns: str
    guest_ns: str
    network: HostNetwork
    script: Path

    def udhcpc(self, *extra: str) -> tuple[int, list[str]]:
        """Run the client until it has a lease or gave up (3 discovers, 1 s apart); its exit code and events."""
        log = Path(f"{self.script}.log")
        log.unlink(missing_ok=True)
        client = ["busybox", "udhcpc", "-i", "eth0", "-f", "-q", "-n", "-t", "3", "-T", "1", "-A", "1"]
        proc = subprocess.run(
            ["ip", "netns", "exec", self.guest_ns, *client, "-s", str(self.script), *extra],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        return proc.returncode, log.read_text().splitlines() if log.exists() else []

    def set_guest_mac(self, mac: str) -> None:
        sh("ip", "-n", self.guest_ns, "link", "set", "eth0", "address", mac)


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    tag = f"fmdh-{os.getpid()}-{next(_RUNS)}"
    host_ns, guest_ns = f"{tag}-h", f"{tag}-g"
    created: list[str] = []
    network: HostNetwork | None = None
    try:
        for ns in (host_ns, guest_ns):
            sh("ip", "netns", "add", ns)
            created.append(ns)
        tap = tap_name(NIC.id)
        sh("ip", "-n", host_ns, "link", "add", tap, "type", "veth", "peer", "name", "eth0", "netns", guest_ns)
        sh("ip", "-n", guest_ns, "link", "set", "eth0", "address", NIC.mac, "up")
        sh("ip", "-n", host_ns, "link", "set", tap, "up")
        network = HostNetwork(host_ns, None)
        network.install_rules(NIC)
        script = tmp_path / "dhcp.sh"
        script.write_text(SCRIPT)
        script.chmod(0o755)
        yield Pair(host_ns, guest_ns, network, script)
    finally:
        if network is not None:
            network.dhcp.close()
        for ns in reversed(created):
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True, timeout=10)


def test_a_guest_gets_its_nics_address_and_nothing_else(pair: Pair) -> None:
    pair.network.dhcp.serve(NIC)
    code, events = pair.udhcpc()
    assert code == 0, events
    bound = "bound ip=10.50.1.7 subnet=255.255.255.0 serverid=10.50.1.1 lease=4294967295 router= hostname=web-7"
    assert events[-1] == bound, events
    # a guest that asks for another address is offered its own, and bound to it
    code, events = pair.udhcpc("-r", "10.50.1.99")
    assert code == 0 and events[-1].startswith("bound ip=10.50.1.7 "), events
    assert pair.network.dhcp.serving() == {NIC.id: 4}  # two offers, two acks


def test_a_guest_with_another_mac_gets_no_lease(pair: Pair) -> None:
    pair.network.dhcp.serve(NIC)
    pair.set_guest_mac("52:54:00:00:07:99")
    code, events = pair.udhcpc()
    assert code != 0 and not any(e.startswith("bound") for e in events), events
    assert pair.network.dhcp.serving() == {NIC.id: 0}
    pair.set_guest_mac(NIC.mac)
    assert pair.udhcpc()[0] == 0  # the same responder answers the NIC's own MAC


def test_no_answer_once_the_nic_is_no_longer_served(pair: Pair) -> None:
    pair.network.dhcp.serve(NIC)
    pair.network.dhcp.stop(NIC.id)
    code, events = pair.udhcpc()
    assert code != 0 and not any(e.startswith("bound") for e in events), events
    assert pair.network.dhcp.serving() == {}


def test_a_spec_update_changes_the_answer_and_a_new_tap_gets_a_new_socket(pair: Pair) -> None:
    pair.network.dhcp.serve(NIC)
    moved = NicSpec(NIC.id, NIC.network, NIC.vni, NIC.mac, "10.50.1.8", NIC.cidr)
    pair.network.dhcp.update(moved)
    assert pair.udhcpc()[1][-1].startswith("bound ip=10.50.1.8 ")
    # the tap goes (its QEMU quit) and a new one of the same name comes (the VM boots again)
    tap = tap_name(NIC.id)
    sh("ip", "-n", pair.host_ns, "link", "del", tap)
    time.sleep(0.2)
    sh("ip", "-n", pair.host_ns, "link", "add", tap, "type", "veth", "peer", "name", "eth0", "netns", pair.guest_ns)
    sh("ip", "-n", pair.guest_ns, "link", "set", "eth0", "address", NIC.mac, "up")
    sh("ip", "-n", pair.host_ns, "link", "set", tap, "up")
    assert pair.udhcpc()[0] != 0  # the old socket heard the old tap only
    pair.network.dhcp.serve(NIC)
    assert pair.udhcpc()[1][-1].startswith("bound ip=10.50.1.7 ")
