"""The lab's network topology, for real: a namespace per host on an underlay bridge, and nothing in the root namespace.

Needs root and iproute2. Every namespace is named after a port no other test uses, and is deleted in teardown.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from ferryman.lab import netlab

pytestmark = pytest.mark.skipif(netlab.unavailable() is not None, reason=f"lab networks: {netlab.unavailable()}")

# a port of this test run only: two runs (or a lab) on this machine never share namespace names
PORT = 40000 + os.getpid() % 20000


def ip_json(*args: str) -> list[dict[str, Any]]:
    out = subprocess.run(["ip", "-j", *args], capture_output=True, text=True, check=True, timeout=15).stdout
    parsed: list[dict[str, Any]] = json.loads(out or "[]")
    return parsed


def links(netns: str | None = None) -> dict[str, dict[str, Any]]:
    return {link["ifname"]: link for link in ip_json(*(["-n", netns] if netns else []), "-d", "link", "show")}


def in_ns(netns: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", netns, *argv], capture_output=True, text=True, timeout=30)


def ping(netns: str, address: str) -> bool:
    return in_ns(netns, "busybox", "ping", "-c1", "-W2", address).returncode == 0


@pytest.fixture
def plans() -> Iterator[list[netlab.LabNetwork]]:
    """Topologies a test plans; each is destroyed at teardown, whatever the test left."""
    made: list[netlab.LabNetwork] = []
    yield made
    for net in made:
        netlab.destroy(net)
    assert not any(netlab.existing(net.prefix) for net in made)


def make(
    plans: list[netlab.LabNetwork], port: int = PORT, hosts: tuple[str, ...] = ("host-a", "host-b")
) -> netlab.LabNetwork:
    net = netlab.plan(port, hosts)
    plans.append(net)
    netlab.create(net)
    return net


def test_plan_names_and_addresses_derive_from_the_port_and_host_order() -> None:
    """fm<port>-ul and fm<port>-<host>, 192.0.2.<n> for the n-th host; a recorded plan reads back the same."""
    net = netlab.plan(8443, ["host-a", "host-b"])
    assert net.underlay_netns == "fm8443-ul" and net.prefix == "fm8443-"
    assert [(h.netns, h.underlay_ip) for h in net.hosts] == [
        ("fm8443-host-a", "192.0.2.1"),
        ("fm8443-host-b", "192.0.2.2"),
    ]
    assert netlab.LabNetwork.from_json(json.loads(json.dumps(net.as_json()))) == net
    assert net.host("host-b") == net.hosts[1] and net.host("host-z") is None
    with pytest.raises(netlab.NetLabError):
        netlab.plan(8443, ["host-a", "host-a"])
    with pytest.raises(netlab.NetLabError):
        netlab.plan(8443, ["../x"])


def test_hosts_reach_each_other_over_the_underlay_and_nothing_is_in_the_root_namespace(
    plans: list[netlab.LabNetwork],
) -> None:
    """Two host namespaces with ul0 (MTU 1550, 192.0.2.n/24) on the underlay bridge ping each other; IPv6 is off in
    every namespace; the root namespace gains no device."""
    root_before = set(links())
    net = make(plans)
    a, b = net.hosts
    assert netlab.existing(net.prefix) == sorted([net.underlay_netns, a.netns, b.netns])
    assert set(links()) == root_before
    underlay = links(net.underlay_netns)
    assert underlay[netlab.UNDERLAY_BRIDGE]["linkinfo"]["info_kind"] == "bridge"
    for host in net.hosts:
        port = underlay[host.underlay_port]
        assert port["master"] == netlab.UNDERLAY_BRIDGE and port["mtu"] == 1550 and "UP" in port["flags"]
        ul0 = links(host.netns)[netlab.UNDERLAY_DEVICE]
        assert ul0["mtu"] == 1550 and "UP" in ul0["flags"] and ul0["linkinfo"]["info_kind"] == "veth"
        assert set(links(host.netns)) == {"lo", "ul0"}
        addresses = [
            (info["family"], info["local"], info["prefixlen"])
            for entry in ip_json("-n", host.netns, "addr", "show", "dev", "ul0")
            for info in entry["addr_info"]
        ]
        assert addresses == [("inet", host.underlay_ip, 24)]
    assert ping(a.netns, b.underlay_ip) and ping(b.netns, a.underlay_ip)
    for netns in netlab.existing(net.prefix):
        assert in_ns(netns, "cat", "/proc/sys/net/ipv6/conf/all/disable_ipv6").stdout.strip() == "1"
        assert in_ns(netns, "cat", "/proc/sys/net/ipv6/conf/default/disable_ipv6").stdout.strip() == "1"
        assert ip_json("-n", netns, "-6", "addr", "show") == []  # not even ::1 or a link-local address


def test_create_is_idempotent_and_repairs_a_missing_host_link(plans: list[netlab.LabNetwork]) -> None:
    """A second create changes nothing (same devices, same ifindexes); a host whose ul0 vanished gets it back."""
    net = make(plans)
    a, b = net.hosts
    before = {ns: {n: link["ifindex"] for n, link in links(ns).items()} for ns in netlab.existing(net.prefix)}
    netlab.create(net)
    after = {ns: {n: link["ifindex"] for n, link in links(ns).items()} for ns in netlab.existing(net.prefix)}
    assert after == before
    subprocess.run(["ip", "-n", b.netns, "link", "del", "ul0"], check=True)
    assert not ping(a.netns, b.underlay_ip)
    netlab.create(net)
    # host-a's neighbour entry for host-b may still be failing from the ping above: the first ping can be lost
    assert any(ping(a.netns, b.underlay_ip) for _ in range(3))


def test_destroy_removes_every_namespace_of_the_lab_and_only_those(plans: list[netlab.LabNetwork]) -> None:
    """Two labs on different ports coexist; destroying one removes its namespaces (also one its plan no longer
    names) and leaves the other lab's, and the root namespace, as they were."""
    root_before = set(links())
    mine = make(plans, hosts=("host-a", "host-b", "host-c"))
    other = make(plans, port=PORT + 1)
    smaller = netlab.plan(PORT, ["host-a", "host-b"])  # the recorded plan lost host-c
    deleted = netlab.destroy(smaller)
    assert deleted == [*sorted(h.netns for h in mine.hosts), mine.underlay_netns]
    assert netlab.existing(mine.prefix) == []
    assert len(netlab.existing(other.prefix)) == 3
    assert ping(other.hosts[0].netns, other.hosts[1].underlay_ip)
    assert netlab.destroy(mine) == []  # nothing left: a no-op
    netlab.destroy(other)
    assert set(links()) == root_before
