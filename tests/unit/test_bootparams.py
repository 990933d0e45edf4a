"""The SMBIOS serial that carries a VM's boot parameters and its NICs' addresses to a guest booted through firmware."""

from __future__ import annotations

import dataclasses

import pytest

from ferryman.core.bootparams import SMBIOS_SERIAL_MAX, nic_words, smbios_serial
from ferryman.core.errors import InvalidInput
from ferryman.core.models import DiskSpec, NicSpec, VMSpec

VM_ID = "5f1e6c1e-8d0a-4a57-9a55-0f1c2b3d4e5f"
SPEC = VMSpec(
    vm_id=VM_ID,
    name="web-1",
    vcpus=1,
    memory_mb=256,
    disks=(DiskSpec(64 << 20),),
    canary="canary-1",
    dirty_kib_per_s=512,
    record_interval_ms=250,
    resident_mib=32,
)
BASE = f"ferryman:vm={VM_ID};canary=canary-1;dirty_kib=512;interval_ms=250;resident_mib=32"


def nic(index: int = 0, **overrides: object) -> NicSpec:
    values: dict[str, object] = {
        "id": f"nic{index}",
        "network": "acme-prod",
        "vni": 100,
        "mac": f"52:54:00:00:01:{index:02x}",
        "ipv4": f"10.50.{index}.20",
        "cidr": f"10.50.{index}.0/24",
    }
    values.update(overrides)
    return NicSpec(**values)  # type: ignore[arg-type]


def test_a_vm_without_nics_keeps_its_serial_unchanged() -> None:
    """The existing words, in their order, and nothing else."""
    assert smbios_serial(SPEC) == BASE


def test_each_nic_adds_its_address_and_prefix_length_by_index() -> None:
    """NIC i adds ip<i> and plen<i>, and ip6_<i>, plen6_<i> only when it has IPv6; the prefix comes from the cidr."""
    nics = (
        nic(0, ipv6="fd00:50:1:0:0:0:0:20", cidr6="fd00:50:1::/64"),
        nic(1, ipv4="192.168.7.9", cidr="192.168.0.0/16"),
    )
    serial = smbios_serial(dataclasses.replace(SPEC, nics=nics))
    assert serial == (BASE + ";ip0=10.50.0.20;plen0=24;ip6_0=fd00:50:1::20;plen6_0=64;ip1=192.168.7.9;plen1=16")
    assert list(nic_words(3, nic(3))) == [("ip3", "10.50.3.20"), ("plen3", "24")]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"ipv4": "10.50.0.300"}, "bad address of NIC nic0"),
        ({"ipv4": "10.50.0.2;vm=evil"}, "bad address"),
        ({"ipv4": "fd00::1"}, "bad address"),
        ({"cidr": "10.50.0.0/33"}, "bad address"),
        ({"ipv4": "10.51.0.20"}, "not in its network 10.50.0.0/24"),
        ({"ipv6": "fd00:50:1::20"}, "bad address"),  # no cidr6
        ({"ipv6": "fe80::1%eth0", "cidr6": "fe80::/64"}, "bad ip6_0"),  # a scope is no token
        ({"ipv6": "fd00:51::1", "cidr6": "fd00:50::/64"}, "not in its network"),
    ],
)
def test_an_address_the_serial_cannot_carry_is_refused(overrides: dict[str, object], message: str) -> None:
    """Malformed addresses, separators, wrong families and addresses outside their prefix never reach the guest."""
    with pytest.raises(InvalidInput, match=message):
        smbios_serial(dataclasses.replace(SPEC, nics=(nic(0, **overrides),)))


def test_a_serial_longer_than_the_guest_reads_is_refused() -> None:
    """The guest reads at most SMBIOS_SERIAL_MAX characters, so a longer serial is an error, not a silent cut."""
    v6 = {"ipv6": "fd00:50:1:0:1234:5678:9abc:def0", "cidr6": "fd00:50:1::/64"}
    fits = tuple(nic(i, **v6) for i in range(16))
    assert len(smbios_serial(dataclasses.replace(SPEC, nics=fits))) <= SMBIOS_SERIAL_MAX
    too_many = tuple(nic(i % 100, **v6) for i in range(60))
    with pytest.raises(InvalidInput, match="SMBIOS serial"):
        smbios_serial(dataclasses.replace(SPEC, nics=too_many))
