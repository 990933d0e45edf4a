"""A VM's boot parameters: the values of its spec a guest may be told at boot (its id, name, canary and workload),
and the kernel command-line templates that name them as ``${...}``.

Hosts render them into a direct-kernel boot's command line, or into the SMBIOS serial number of a guest booted
through its firmware (as cloud images read their seed); the controller checks an image's template at import. Every
value is one token of letters, digits and ``._:@+-``, so it can never break out of a command line or a QEMU option.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping

from ferryman.core.errors import InvalidInput
from ferryman.core.models import VMSpec

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
    """The SMBIOS system serial number that carries ``spec``'s parameters to a guest booted through firmware."""
    values = boot_parameters(spec)
    return "ferryman:" + ";".join(f"{word}={values[field]}" for word, field in _SERIAL_WORDS.items())
