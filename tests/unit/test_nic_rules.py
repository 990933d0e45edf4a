"""The pure side of a NIC's anti-spoofing rules: what a NicSpec may say, and what the rendered nftables file says."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import pytest

from ferryman.core.errors import InvalidInput
from ferryman.core.models import NicSpec
from ferryman.network import rules

NIC = NicSpec(
    id="web1",
    network="acme-prod",
    vni=100,
    mac="52:54:00:00:01:01",
    ipv4="10.50.1.10",
    cidr="10.50.1.0/24",
    ipv6="fd00:50:1::10",
    cidr6="fd00:50:1::/64",
    forensic_port=2222,
    peers=("192.0.2.2", "192.0.2.3"),
)
V4_ONLY = dataclasses.replace(NIC, ipv6=None, cidr6=None)


def nic(**changes: Any) -> NicSpec:
    return dataclasses.replace(NIC, **changes)


def chain(text: str, name: str) -> str:
    """The body of one chain of a rendered file."""
    found = re.search(r"\tchain " + name + r" \{\n(.*?)\n\t\}", text, re.S)
    assert found, f"no chain {name}"
    return found.group(1)


def test_names_derive_from_id_and_vni_and_fit_ifnamsiz():
    """The tap, table, bridge and VXLAN names are fixed functions of the NIC id and VNI, at most 15 characters."""
    assert rules.tap_name("abcdefghijk") == "fmt-abcdefghijk"
    assert rules.table_name("web1") == "fm_nic_web1"
    assert rules.bridge_name(16777215) == "fmbr16777215"
    assert rules.vxlan_name(1) == "fmvx1"
    longest = (rules.tap_name("a" * 11), rules.bridge_name(16777215), rules.vxlan_name(16777215))
    assert max(len(name) for name in longest) <= 15


@pytest.mark.parametrize("bad", ["", "a" * 12, "Web1", "web-1", "web_1", "w b", "ü"])
def test_name_functions_refuse_bad_ids(bad: str):
    """An id that cannot be part of an interface or table name is refused before any name is built."""
    with pytest.raises(InvalidInput):
        rules.tap_name(bad)
    with pytest.raises(InvalidInput):
        rules.table_name(bad)


@pytest.mark.parametrize("vni", [0, -1, 16777216, True])
def test_bad_vni_is_refused(vni: int):
    """A VNI outside 1..16777215 (or a bool posing as one) names no segment."""
    with pytest.raises(InvalidInput, match="VNI"):
        rules.bridge_name(vni)
    with pytest.raises(InvalidInput, match="VNI"):
        rules.check_nic(nic(vni=vni))


def test_a_good_nic_passes_unchanged():
    """check_nic returns the very NicSpec it was given (IPv4-only too)."""
    assert rules.check_nic(NIC) is NIC
    assert rules.check_nic(V4_ONLY) is V4_ONLY
    assert rules.check_nic(nic(cidr="10.0.0.0/31", ipv4="10.0.0.0")).ipv4 == "10.0.0.0"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"id": "Web1"}, "NIC id"),
        ({"mac": "52:54:00:00:01:0G"}, "MAC"),
        ({"mac": "52:54:00:00:01:AB"}, "MAC"),  # not the lowercase canonical form
        ({"mac": "52-54-00-00-01-01"}, "MAC"),
        ({"mac": "53:54:00:00:01:01"}, "multicast"),
        ({"mac": "ff:ff:ff:ff:ff:ff"}, "multicast"),
        ({"mac": "00:00:00:00:00:00"}, "zero"),
        ({"ipv4": "10.50.2.10"}, "not inside"),
        ({"ipv4": "10.50.1.0"}, "network or broadcast"),
        ({"ipv4": "10.50.1.255"}, "network or broadcast"),
        ({"ipv4": "10.50.1.300"}, "IPv4 address"),
        ({"ipv4": "010.50.1.10"}, "IPv4 address"),
        ({"cidr": "10.50.1.1/24"}, "prefix"),
        ({"cidr": "10.50.1.0/33"}, "prefix"),
        ({"ipv6": "fd00:50:2::10"}, "not inside"),
        ({"ipv6": "fd00:50:1::"}, "anycast"),
        ({"ipv6": "FD00:50:1::10"}, "canonical"),
        ({"ipv6": None}, "together"),
        ({"cidr6": None}, "together"),
        ({"cidr6": "fe80::/64", "ipv6": "fe80::10"}, "link-local"),
        ({"cidr6": "fd00:50:1::1/64"}, "prefix"),
        ({"forensic_port": 0}, "forensic port"),
        ({"forensic_port": 65536}, "forensic port"),
        ({"vni": 16777216}, "VNI"),
        ({"peers": ("192.0.2.300",)}, "underlay"),
        ({"peers": ("fd00::1",)}, "underlay"),
        ({"peers": ("224.0.0.1",)}, "underlay"),
        ({"peers": ("192.0.2.2 ",)}, "underlay"),
        ({"revision": 0}, "revision"),
        ({"isolated": "yes"}, "isolated"),
    ],
)
def test_check_nic_refuses_each_bad_field(changes: dict[str, Any], message: str):
    """Every field that reaches a command line or a rule is checked, and the refusal names it."""
    with pytest.raises(InvalidInput, match=message):
        rules.check_nic(nic(**changes))
    with pytest.raises(InvalidInput):
        rules.render(nic(**changes))


def test_link_local_is_the_eui64_address_of_the_mac():
    """The universal/local bit is flipped and ff:fe inserted, as a guest kernel derives it."""
    assert rules.link_local("52:54:00:00:01:01") == "fe80::5054:ff:fe00:101"
    assert rules.link_local("00:16:3e:aa:bb:cc") == "fe80::216:3eff:feaa:bbcc"
    with pytest.raises(InvalidInput):
        rules.link_local("52:54:00:00:01")


def test_render_is_an_atomic_replace_of_the_nic_table():
    """The file creates or replaces exactly its own netdev table, with the identifying comment."""
    text = rules.render(NIC)
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    assert lines[:3] == [
        "add table netdev fm_nic_web1",
        "delete table netdev fm_nic_web1",
        "table netdev fm_nic_web1 {",
    ]
    assert f'comment "ferryman nic=web1 revision=1 format={rules.RULES_FORMAT}"' in text
    assert re.findall(r"^table ", text, re.M) == ["table "]


def test_render_declares_every_counter_and_hooks_the_tap_both_ways():
    """All named counters exist; ingress and egress base chains on fmt-<id> at -500 drop by default."""
    text = rules.render(NIC)
    for name in rules.COUNTERS:
        assert f"\tcounter {name} {{ }}" in text
    assert 'type filter hook ingress device "fmt-web1" priority -500; policy drop;' in chain(text, "from_vm")
    assert 'type filter hook egress device "fmt-web1" priority -500; policy drop;' in chain(text, "to_vm")


def test_render_allows_only_the_nics_own_addresses_out():
    """Own MAC, own IPv4 in ARP and IP, own IPv6 and link-local; DHCP servers, RA and redirects are dropped."""
    text = rules.render(NIC)
    from_vm = chain(text, "from_vm")
    assert "ether saddr != 52:54:00:00:01:01 counter name from_vm_mac drop" in from_vm
    assert "ether type 0x8035 accept" in from_vm  # QEMU's announce-self
    assert from_vm.rstrip().endswith("counter name from_vm_other drop")
    arp = chain(text, "from_vm_arp")
    assert "arp saddr ether 52:54:00:00:01:01 arp saddr ip 10.50.1.10 accept" in arp
    assert "arp operation request arp saddr ether 52:54:00:00:01:01 arp saddr ip 0.0.0.0 accept" in arp
    ip4 = chain(text, "from_vm_ip4")
    assert ip4.index("udp sport 67 counter name from_vm_dhcp drop") < ip4.index("ip saddr 10.50.1.10 accept")
    ip6 = chain(text, "from_vm_ip6")
    assert "udp sport 547 counter name from_vm_dhcp drop" in ip6
    assert "icmpv6 type { nd-router-advert, nd-redirect } counter name from_vm_nd drop" in ip6
    assert "elements = { fd00:50:1::10, fe80::5054:ff:fe00:101 }" in text
    assert "0xfd000050000100000000000000000010, 0xfe80000000000000505400fffe000101" in text


def test_render_lets_in_only_traffic_from_inside_the_network():
    """to_vm accepts the network's prefixes, link-local, DHCP discovers and RARP, and counts the rest."""
    to_vm = chain(rules.render(NIC), "to_vm")
    assert "arp saddr ip { 0.0.0.0, 10.50.1.0/24 } accept" in to_vm
    assert "ether type ip ip saddr 10.50.1.0/24 accept" in to_vm
    assert "udp sport 68 udp dport 67 accept" in to_vm
    assert "ip6 saddr { ::, fd00:50:1::/64, fe80::/10 } accept" in to_vm
    assert "ether type 0x8035 accept" in to_vm
    assert to_vm.rstrip().endswith("counter name to_vm_drop drop")


def test_render_without_ipv6_keeps_only_the_link_local_address():
    """Without an IPv6 prefix, only the link-local address (ND) is the NIC's and only link-local comes in."""
    text = rules.render(V4_ONLY)
    assert "elements = { fe80::5054:ff:fe00:101 }" in text
    assert "fd00" not in text
    assert "ip6 saddr { ::, fe80::/10 } accept" in chain(text, "to_vm")


def test_isolated_mode_keeps_arp_and_the_forensic_port_only():
    """Isolation: own-IP ARP both ways, TCP to/from the forensic port on the NIC's IPv4, RARP out; rest dropped."""
    text = rules.render(nic(isolated=True))
    assert text != rules.render(NIC)
    from_vm, to_vm = chain(text, "from_vm"), chain(text, "to_vm")
    assert "ether type ip6" not in from_vm
    assert "ether type 0x8035 accept" in from_vm
    assert from_vm.rstrip().endswith("counter name isolated_drop drop")
    ip4 = chain(text, "from_vm_ip4")
    assert "ip saddr != 10.50.1.10 counter name from_vm_ip4 drop" in ip4
    assert "ip daddr 10.50.1.0/24 tcp sport 2222 accept" in ip4
    assert "arp saddr ether 52:54:00:00:01:01 arp saddr ip 10.50.1.10 accept" in chain(text, "from_vm_arp")
    assert "ip saddr 10.50.1.0/24 ip daddr 10.50.1.10 tcp dport 2222 accept" in to_vm
    assert "arp daddr ip 10.50.1.10 accept" in to_vm
    assert "ip6" not in to_vm and "0x8035" not in to_vm
    assert to_vm.rstrip().endswith("counter name isolated_drop drop")
    for name in rules.COUNTERS:  # the same counters exist in both modes
        assert f"\tcounter {name} {{ }}" in text


def test_source_digest_is_stable_and_follows_what_the_rules_say():
    """The digest is sha256 of the text: equal for equal NICs, different for another revision, isolation, port."""
    digest = rules.source_digest(NIC)
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest)
    assert digest == rules.source_digest(dataclasses.replace(NIC))
    assert rules.source_digest(nic(peers=())) == digest  # peers shape the segment, not the rules
    others = {
        rules.source_digest(nic(revision=2)),
        rules.source_digest(nic(isolated=True)),
        rules.source_digest(nic(isolated=True, forensic_port=22)),
        rules.source_digest(V4_ONLY),
        rules.source_digest(nic(id="web2")),
    }
    assert digest not in others
    assert len(others) == 5
