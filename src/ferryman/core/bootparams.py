"""A VM's boot parameters: the values of its spec a guest may be told at boot (its id, name, canary and workload),
and the kernel command-line templates that name them as ``${...}``.

Hosts render them into a direct-kernel boot's command line, or into the SMBIOS serial number of a guest booted
through its firmware (as cloud images read their seed); the controller checks an image's template at import. Every
value is one token of letters, digits and ``._:@+-``, so it can never break out of a command line or a QEMU option.

The SMBIOS serial also carries each NIC's static addresses (``ip<i>``, ``plen<i>``, ``ip6_<i>``, ``plen6_<i>`` for
the NIC at index ``i`` of the spec, which the guest sees as ``eth<i>``); the kernel command line does not.
"""

from __future__ import annotations

import ipaddress
import re
import string
from collections.abc import Iterator, Mapping

from ferryman.core.errors import InvalidInput
from ferryman.core.models import NicSpec, VMSpec

DEFAULT_CMDLINE = "console=ttyS0"  # the serial console is the VM's console.log
BOOT_PARAMETERS = ("vm_id", "name", "canary", "dirty_kib_per_s", "record_interval_ms", "resident_mib")
_TOKEN_RE = re.compile(r"^[A-Za-z0-9._:@+-]{1,128}$")
# SMBIOS serial words, as the guest reads them: ferryman:vm=...;canary=...;...
_SERIAL_WORDS = {
    "vm": "vm_id",
    "canary": "canary",
    "dirty_kib": "dirty_kib_per_s",
    "interval_ms": "record_interval_ms",
    "resident_mib": "resident_mib",
}
# The longest serial a guest reads whole: Linux shows /sys/class/dmi/id/product_serial through one page (4096 bytes
# with the newline and the NUL). Tested with QEMU 7.2, SeaBIOS and the lab guest: 4094 characters arrive whole, 4095
# and 8000 are accepted by QEMU but cut to 4094 in the guest. A VM's own words take at most ~250, a NIC's ~80.
SMBIOS_SERIAL_MAX = 4094


def check_template(cmdline: str) -> str:
    """``cmdline`` if it is a valid template naming only :data:`BOOT_PARAMETERS` (InvalidInput otherwise)."""
    template = string.Template(cmdline)
    unknown = sorted(set(template.get_identifiers()) - set(BOOT_PARAMETERS))
    if not template.is_valid() or unknown:
        raise InvalidInput(
            f"bad kernel command line template {cmdline!r}: it may name ${{...}} of {', '.join(BOOT_PARAMETERS)}"
            + (f", not {', '.join(unknown)}" if unknown else "")
        )
    if "\n" in cmdline or len(cmdline) > 2048:
        raise InvalidInput("a kernel command line is one line of at most 2048 characters")
    return cmdline


def boot_parameters(spec: VMSpec) -> Mapping[str, str]:
    """The values a template may name, checked: each is one token of letters, digits and ``._:@+-``, and the
    workload numbers are non-negative (the record interval positive)."""
    if spec.dirty_kib_per_s < 0 or spec.record_interval_ms < 1 or spec.resident_mib < 0:
        raise InvalidInput(
            f"bad guest workload: dirty_kib={spec.dirty_kib_per_s} interval_ms={spec.record_interval_ms}"
            f" resident_mib={spec.resident_mib}"
        )
    values = {name: str(getattr(spec, name)) for name in BOOT_PARAMETERS}
    for name, value in values.items():
        if not _TOKEN_RE.match(value):
            raise InvalidInput(f"bad {name.replace('_', ' ')} {value!r}: use 1-128 of letters, digits and ._:@+-")
    return values


def render(cmdline: str, spec: VMSpec) -> str:
    """The template ``cmdline`` with ``spec``'s values."""
    return string.Template(check_template(cmdline)).substitute(boot_parameters(spec))


def smbios_serial(spec: VMSpec) -> str:
    """The SMBIOS system serial number that carries ``spec``'s parameters to a guest booted through firmware: its
    boot parameters, then the addresses of each NIC (InvalidInput: a value it cannot carry, or too long a serial)."""
    values = boot_parameters(spec)
    words = [f"{word}={values[field]}" for word, field in _SERIAL_WORDS.items()]
    for index, nic in enumerate(spec.nics):
        words += [f"{word}={value}" for word, value in nic_words(index, nic)]
    serial = "ferryman:" + ";".join(words)
    if len(serial) > SMBIOS_SERIAL_MAX:
        raise InvalidInput(
            f"VM {spec.name}'s boot parameters take {len(serial)} characters in its SMBIOS serial number,"
            f" more than the {SMBIOS_SERIAL_MAX} a guest reads (too many NICs?)"
        )
    return serial


def nic_words(index: int, nic: NicSpec) -> Iterator[tuple[str, str]]:
    """The serial words of the NIC at ``index``: ``ip<i>`` and ``plen<i>`` (its IPv4 address and the prefix length of
    its network), and ``ip6_<i>``, ``plen6_<i>`` if it has an IPv6 address. Each address must lie in its prefix."""
    yield from _address_words(str(index), nic, nic.ipv4, nic.cidr, ipaddress.IPv4Address, ipaddress.IPv4Network)
    if nic.ipv6 is not None or nic.cidr6 is not None:
        yield from _address_words(f"6_{index}", nic, nic.ipv6, nic.cidr6, ipaddress.IPv6Address, ipaddress.IPv6Network)


def _address_words(
    suffix: str,
    nic: NicSpec,
    address: str | None,
    cidr: str | None,
    address_type: type[ipaddress.IPv4Address | ipaddress.IPv6Address],
    network_type: type[ipaddress.IPv4Network | ipaddress.IPv6Network],
) -> Iterator[tuple[str, str]]:
    try:
        parsed = address_type(address or "")
        network = network_type(cidr or "", strict=False)
    except ValueError as err:
        raise InvalidInput(f"bad address of NIC {nic.id}: {err}") from None
    if parsed not in network:
        raise InvalidInput(f"NIC {nic.id}: address {parsed} is not in its network {network}")
    for word, value in ((f"ip{suffix}", str(parsed)), (f"plen{suffix}", str(network.prefixlen))):
        if not _TOKEN_RE.match(value):
            raise InvalidInput(f"bad {word} of NIC {nic.id}: {value!r}")
        yield word, value
