"""Virtual networks on a running lab, with real guests on real taps in each host's namespace, over VXLAN.

Two VMs of one tenant network on different hosts ping each other; a VM of another tenant, in the same IPv4 subnet
but on its own segment, reaches neither. A guest that forges its source address, its MAC or ARP replies gets
nothing through and each forgery is counted by the rule that dropped it. Isolation cuts a VM off and gives it back.
A rule deleted by hand, or a table Ferryman did not make, is an alarm within seconds. A migration keeps the ping
going (the loss is measured and printed): the destination's rules were verified at its preparation, before the
VM could run there, and the source's are gone after it retired.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from ferryman.lab import processes
from ferryman.testing.guest_exec import ExecResult, guest_exec_sync
from ferryman.testing.labhandle import one_line_error
from ferryman.testing.wait import wait_for

pytestmark = [pytest.mark.lab, pytest.mark.qemu]

LAB_PORT = 18443  # tests/conftest.py


def netns(host: str) -> str:
    return f"fm{LAB_PORT}-{host}"


def links(host: str) -> str:
    proc = subprocess.run(["ip", "-n", netns(host), "-br", "link"], capture_output=True, text=True, timeout=30)
    return proc.stdout


def nft(host: str, *args: str, check: bool = True) -> str:
    proc = subprocess.run(
        ["ip", "netns", "exec", netns(host), "nft", *args], capture_output=True, text=True, timeout=30, check=False
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"nft {' '.join(args)} in {netns(host)}: {proc.stderr}")
    return proc.stdout


class Guest:
    """One lab VM with a NIC, driven through its guest agent on whichever host it runs."""

    def __init__(self, lab: Any, name: str) -> None:
        self.lab, self.name = lab, name

    def show(self) -> dict[str, Any]:
        return self.lab.cli_json("vm", "show", self.name)

    @property
    def ip(self) -> str:
        return str(self.show()["nics"][0]["ipv4"])

    def socket(self) -> Path:
        vm = self.show()
        return Path(self.lab.lab.host_dir(vm["host"])) / "vms" / vm["id"] / "qga.sock"

    def run(self, *argv: str, timeout: float = 30) -> ExecResult:
        return guest_exec_sync(self.socket(), list(argv), timeout=timeout)

    def sh(self, script: str, timeout: float = 30) -> ExecResult:
        return self.run("/bin/sh", "-c", script, timeout=timeout)

    def pings(self, ip: str, count: int = 3) -> bool:
        return self.run("ping", "-c", str(count), "-W", "1", "-w", str(count + 2), ip, timeout=count + 15).ok

    def counters(self) -> dict[str, int]:
        nics = self.lab.cli_json("vm", "nics", self.name, "--live")
        return dict(nics[0]["live"]["counters"])


def create(lab: Any, name: str, tenant: str, network: str, host: str, ip: str) -> Guest:
    lab.cli_json(
        "vm",
        "create",
        name,
        "--tenant",
        tenant,
        "--memory",
        "128",
        "--host",
        host,
        "--dirty-kib",
        "16",
        "--network",
        network,
        "--ip",
        ip,
    )
    guest = Guest(lab, name)
    # the guest agent starts late in the boot; the guest configures its address from its SMBIOS serial before that
    wait_for(lambda: _answers(guest), 120, f"{name}'s guest agent")
    return guest


def _answers(guest: Guest) -> bool:
    try:
        return guest.run("true", timeout=5).ok
    except Exception:
        return False


@pytest.fixture(scope="module")
def guests(lab: Any) -> Any:
    lab.cli_json("network", "create", "acme-prod", "--tenant", "acme", "--cidr", "10.50.1.0/24")
    lab.cli_json("network", "create", "globex-lan", "--tenant", "globex", "--cidr", "10.50.1.0/24")
    made = []
    try:
        for name, tenant, network, host, ip in [
            ("net-a", "acme", "acme-prod", "host-a", "10.50.1.10"),
            ("net-b", "acme", "acme-prod", "host-b", "10.50.1.11"),
            ("spy", "globex", "globex-lan", "host-b", "10.50.1.12"),
        ]:
            made.append(name)
            create(lab, name, tenant, network, host, ip)
        yield {name: Guest(lab, name) for name in made}
    finally:
        for name in made:
            lab.cli("vm", "delete", name, check=False)


def test_nics_are_shown_with_verified_rules(lab: Any, guests: dict[str, Guest]) -> None:
    vm = guests["net-a"].show()
    (nic,) = vm["nics"]
    assert nic["network"] == "acme-prod" and nic["ipv4"] == "10.50.1.10" and nic["mac"].startswith("52:54:00:")
    assert (
        nic["rules_host"] == "host-a" and nic["rules_hash"].startswith("sha256:") and nic["tap"] == f"fmt-{nic['id']}"
    )
    # the table on the host reads back as the CMDB recorded it
    live = lab.cli_json("vm", "nics", "net-a", "--live")[0]["live"]
    assert live["hash"] == nic["rules_hash"] and live["tap_present"]
    net = lab.cli_json("network", "show", "acme-prod")
    assert net["hosts"] == ["host-a", "host-b"] and sorted(n["vm"] for n in net["nics"]) == ["net-a", "net-b"]
    # the guest has the address the CMDB gave it
    assert "10.50.1.10/24" in guests["net-a"].run("ip", "addr", "show", "eth0").text
    text = lab.cli("vm", "show", "net-a").stdout
    assert "acme-prod" in text and nic["mac"] in text


def test_one_network_spans_hosts_and_tenants_are_apart(guests: dict[str, Guest]) -> None:
    a, b, spy = guests["net-a"], guests["net-b"], guests["spy"]
    assert a.pings("10.50.1.11") and b.pings("10.50.1.10")
    # same subnet, other tenant: another segment, no path, whichever host
    assert not spy.pings("10.50.1.11", 2)
    assert not spy.pings("10.50.1.10", 2)
    assert not a.pings("10.50.1.12", 2)


def test_forged_source_address_is_dropped_and_counted(guests: dict[str, Guest]) -> None:
    a, b = guests["net-a"], guests["net-b"]
    before = a.counters()["from_vm_ip4"]
    a.sh("ip addr add 10.50.1.99/24 dev eth0")
    try:
        assert not a.run("ping", "-c", "3", "-W", "1", "-I", "10.50.1.99", "10.50.1.11", timeout=20).ok
    finally:
        a.sh("ip addr del 10.50.1.99/24 dev eth0")
    assert a.counters()["from_vm_ip4"] >= before + 3
    # nothing of it reached the peer: it never learned the forged address
    assert "10.50.1.99" not in b.run("ip", "neigh").text
    assert a.pings("10.50.1.11")


def test_forged_mac_is_dropped_and_counted(guests: dict[str, Guest]) -> None:
    a = guests["net-a"]
    mac = a.show()["nics"][0]["mac"]
    before = a.counters()["from_vm_mac"]
    a.sh("ip link set dev eth0 address 52:54:00:66:66:66")
    try:
        assert not a.pings("10.50.1.11", 3)
    finally:
        a.sh(f"ip link set dev eth0 address {mac}")
    assert a.counters()["from_vm_mac"] >= before + 3
    assert a.pings("10.50.1.11")


def test_forged_arp_for_a_neighbours_address_is_dropped_and_counted(guests: dict[str, Guest]) -> None:
    a, b = guests["net-a"], guests["net-b"]
    mac_a = a.show()["nics"][0]["mac"]
    before = a.counters()["from_vm_arp"]
    # claim net-b's address: gratuitous ARP and unsolicited replies (arping must own the address it sends as)
    a.sh("ip addr add 10.50.1.11/32 dev eth0")
    try:
        a.sh("arping -U -c 2 -I eth0 -s 10.50.1.11 10.50.1.11; arping -A -c 2 -I eth0 -s 10.50.1.11 10.50.1.11", 30)
    finally:
        a.sh("ip addr del 10.50.1.11/32 dev eth0")
    assert a.counters()["from_vm_arp"] >= before + 4
    # no one was told that net-b's address lives at net-a's MAC
    spied = guests["spy"].run("ip", "neigh").text + b.run("ip", "neigh").text
    assert not re.search(rf"10\.50\.1\.11 .*{mac_a}", spied)


def test_isolate_and_unisolate(lab: Any, guests: dict[str, Guest]) -> None:
    a, b = guests["net-a"], guests["net-b"]
    out = lab.cli_json("vm", "isolate", "net-a")
    assert out["isolated"] and out["nics"][0]["revision"] >= 2 and out["nics"][0]["rules_hash"]
    assert not b.pings("10.50.1.10", 2) and not a.pings("10.50.1.11", 2)
    assert a.counters()["isolated_drop"] > 0
    out = lab.cli_json("vm", "unisolate", "net-a")
    assert not out["isolated"]
    assert b.pings("10.50.1.10")
    kinds = [e["kind"] for e in lab.cli_json("events", "--vm", "net-a")]
    assert {"vm.isolate_requested", "vm.isolated", "vm.unisolate_requested", "vm.unisolated"} <= set(kinds)


def open_alarms(lab: Any, kind: str) -> list[dict[str, Any]]:
    return [a for a in lab.cli_json("alarms") if a["kind"] == kind]


def test_a_rule_deleted_or_a_table_added_by_hand_is_an_alarm(lab: Any, guests: dict[str, Guest]) -> None:
    nic = guests["net-b"].show()["nics"][0]
    table = f"fm_nic_{nic['id']}"
    listing = nft("host-b", "-a", "list", "chain", "netdev", table, "from_vm")
    handle = re.findall(r"# handle (\d+)", listing)[-1]  # the chain's last rule (the first handle is the chain's)
    nft("host-b", "delete", "rule", "netdev", table, "from_vm", "handle", handle)
    alarm = wait_for(lambda: open_alarms(lab, "network.drift"), 30, "a drift alarm")
    assert "net-b" in alarm[0]["message"]
    # Ferryman puts the rules back by installing a new revision (isolation and back), and the alarm resolves
    lab.cli_json("vm", "isolate", "net-b")
    lab.cli_json("vm", "unisolate", "net-b")
    wait_for(lambda: not open_alarms(lab, "network.drift"), 30, "the drift alarm to resolve")

    nft("host-a", "add", "table", "inet", "rogue")
    try:
        alarm = wait_for(lambda: open_alarms(lab, "network.foreign_table"), 30, "a foreign-table alarm")
        assert "inet rogue" in alarm[0]["message"] and alarm[0]["host"] == "host-a"
    finally:
        nft("host-a", "delete", "table", "inet", "rogue")
    wait_for(lambda: not open_alarms(lab, "network.foreign_table"), 30, "the foreign-table alarm to resolve")


def lost(output: str, interval_ms: int) -> tuple[int, int, list[tuple[int, int]]]:
    """(sent, received, runs of missing sequence numbers) of a busybox ping's output."""
    seqs = sorted({int(s) for s in re.findall(r"seq=(\d+)", output)})
    sent_match = re.search(r"(\d+) packets transmitted", output)
    sent = int(sent_match.group(1)) if sent_match else (seqs[-1] + 1 if seqs else 0)
    missing = sorted(set(range(sent)) - set(seqs))
    runs: list[tuple[int, int]] = []
    for seq in missing:
        if runs and runs[-1][1] == seq - 1:
            runs[-1] = (runs[-1][0], seq)
        else:
            runs.append((seq, seq))
    return sent, len(seqs), runs


def test_the_network_follows_a_live_migration(lab: Any, guests: dict[str, Guest]) -> None:
    a, b = guests["net-a"], guests["net-b"]
    nic = a.show()["nics"][0]
    table = f"fm_nic_{nic['id']}"
    assert table in nft("host-a", "list", "tables") and table not in nft("host-c", "list", "tables")
    # 20 pings a second from the VM that stays, across the whole migration: in the guest's background (its agent
    # serves one command at a time), bounded by ping's own deadline, stopped by SIGINT two seconds after the
    # migration (ping then prints its summary); output to the guest's tmpfs
    assert b.sh("ping -i 0.05 -w 120 10.50.1.10 </dev/null >/tmp/ping.log 2>&1 &").ok
    proc = lab.cli("vm", "migrate", "net-a", "--to", "host-c", "--json", timeout=600)
    result = json.loads(proc.stdout)
    time.sleep(2)
    b.sh("kill -INT $(pidof ping)")

    def summary() -> str | None:
        log = b.run("cat", "/tmp/ping.log").text
        return log if "transmitted" in log else None

    output = wait_for(summary, 10, "ping's summary")
    assert result["outcome"] == "done", result
    sent, received, runs = lost(output, 50)
    worst = max((end - start + 1 for start, end in runs), default=0)
    print(f"\nping across the migration: {sent} sent, {received} received, longest gap {worst * 50} ms, gaps {runs}")
    assert received > 0 and sent - received < sent // 2
    if runs and runs[-1][1] == sent - 1 and runs[-1][1] - runs[-1][0] < 2:
        runs = runs[:-1]  # the last request or two were still in flight when SIGINT ended ping
    assert runs == [] or runs[-1][1] < sent - 20  # the replies came back, and kept coming, after the switch-over
    # the destination's rules were installed and read back at its preparation, before the VM could run there
    record = lab.cli_json("migration", "show", result["id"])
    verified = f"{nic['id']}={nic['rules_hash'][:19]}"  # the prepare step's fact: the hash read back there
    assert re.search(rf'"nic_rules": "[^"]*{re.escape(verified)}', json.dumps(record)), record
    moved = a.show()["nics"][0]
    assert moved["rules_host"] == "host-c" and moved["rules_hash"] == nic["rules_hash"]
    assert table in nft("host-c", "list", "tables")
    assert table not in nft("host-a", "list", "tables")  # the retired source's rules are gone
    assert a.pings("10.50.1.11") and b.pings("10.50.1.10")
    # host-a holds no NIC of the network any more: its segment goes within a report or two
    bridge = f"fmbr{lab.cli_json('network', 'show', 'acme-prod')['vni']}"
    wait_for(lambda: bridge not in links("host-a"), 30, f"{bridge} to leave host-a")
    assert bridge in links("host-c") and bridge in links("host-b")


DHCP_SCRIPT = '#!/bin/sh\necho "$1 ip=$ip subnet=$subnet serverid=$serverid lease=$lease $hostname" >> /tmp/dhcp.log\n'


def test_every_guest_gets_its_address_by_dhcp_from_its_host(lab: Any, guests: dict[str, Guest]) -> None:
    """What a cloud image does at boot: busybox udhcpc in each guest (its script only records the lease, the
    address stays as it is). Each host answers its own NICs with the CMDB's address: net-a's from host-c, where the
    migration above took it; the other tenant's guest on the same prefix gets its own address, not acme's."""
    for name, ip in (("net-a", "10.50.1.10"), ("net-b", "10.50.1.11"), ("spy", "10.50.1.12")):
        lease = f"bound ip={ip} subnet=255.255.255.0 serverid=10.50.1.1 lease=4294967295 {name}"  # name: hostname
        assert dhcp_lease(guests[name]) == lease
    # an agent killed and started again finds its VMs running and answers their NICs again
    state = lab.state
    os.kill(state.agents["host-b"], signal.SIGKILL)
    assert processes.stop(state.agents["host-b"], str(lab.dir), timeout_s=2)
    lab.lab.start_agent(state, "host-b")
    lab.lab.wait_host_up("host-b")
    assert dhcp_lease(guests["net-b"]).startswith("bound ip=10.50.1.11 ")


def dhcp_lease(guest: Guest) -> str:
    """The last event of a udhcpc run in ``guest`` (3 discovers, 1 s apart)."""
    script = f"printf '{DHCP_SCRIPT}' > /tmp/dhcp.sh && chmod +x /tmp/dhcp.sh && rm -f /tmp/dhcp.log"
    assert guest.sh(script).ok
    got = guest.run("udhcpc", "-i", "eth0", "-f", "-q", "-n", "-t", "3", "-T", "1", "-s", "/tmp/dhcp.sh")
    events = guest.run("cat", "/tmp/dhcp.log").text.splitlines()
    assert got.ok and events, (guest.name, got, events)
    return events[-1]


def test_network_cli_error_paths(lab: Any, guests: dict[str, Guest]) -> None:
    bad = [
        (["network", "create", "n1", "--tenant", "acme", "--cidr", "10.1.2.3/24"], "host bits"),
        (["network", "create", "n1", "--tenant", "acme", "--cidr", "10.0.0.0/8"], "/16 to /29"),
        (["network", "create", "n1", "--tenant", "acme", "--cidr", "10.2.0.0/24", "--vlan", "5000"], "1-4094"),
        (
            ["network", "create", "acme-prod", "--tenant", "acme", "--cidr", "10.3.0.0/24"],
            "has a network named 'acme-prod' already",
        ),
        (["network", "show", "nope"], "not found"),
        (["vm", "create", "x1", "--tenant", "acme", "--network", "nope"], "not found"),
        (["vm", "create", "x1", "--tenant", "acme", "--network", "globex-lan"], "not found for tenant acme"),
        (["vm", "create", "x1", "--tenant", "acme", "--network", "acme-prod", "--ip", "10.50.1.11"], "in use"),
        (["vm", "create", "x1", "--tenant", "acme", "--network", "acme-prod", "--ip", "10.9.9.9"], "not a host"),
        (["vm", "create", "x1", "--tenant", "acme", "--ip", "10.50.1.40"], "one --network per --ip"),
        (["vm", "isolate", "nope"], "not found"),
    ]
    for args, expected in bad:
        assert expected in one_line_error(lab.cli(*args, check=False)), args
    # a refused creation leaves nothing: no VM, no address taken
    assert "x1" not in [v["name"] for v in lab.cli_json("vm", "list")]
    assert len(lab.cli_json("network", "show", "acme-prod")["nics"]) == 2
    listed = {n["name"]: n for n in lab.cli_json("network", "list")}
    assert listed["acme-prod"]["members"] == 2 and listed["globex-lan"]["tenant"] == "globex"
