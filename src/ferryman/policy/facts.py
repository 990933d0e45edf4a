"""The facts placement policies read: what the controller knows of a host and of a VM, nothing more.

Why it exists: the policy engine must not know the CMDB (it is a pure layer), so the controller copies the labels
policies talk about into these frozen dataclasses and hands them over. Everything here is plain data; building it
does no I/O and reads no clock.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

_WHOLE = re.compile(r"-?[0-9]+")

SENSITIVITY_LEVELS: Mapping[str, int] = {"public": 0, "internal": 1, "confidential": 2, "secret": 3}
"""The security level implied by a VM's ``sensitivity`` profile label when it has no ``security_level`` label."""


@dataclass(frozen=True)
class HostFacts:
    """A hypervisor host as policies see it.

    ``schedulable`` False (the host is down or draining) means the host is never a placement target, but the VMs
    already on it are still checked; a host whose ``role`` is ``quarantine`` is treated the same way.
    """

    name: str
    site: str
    site_security_level: int
    zone: str
    subnet: str
    virt_type: str
    hypervisor: str
    hypervisor_version: str
    patch_level: int
    role: str = "compute"
    memory_mb: int = 2048
    schedulable: bool = True

    @property
    def placeable(self) -> bool:
        """Whether new VMs may land here at all (schedulable and not in quarantine)."""
        return self.schedulable and self.role != "quarantine"


@dataclass(frozen=True)
class VMFacts:
    """A VM as policies see it; ``host`` None: not placed yet (a VM being created).

    ``image`` is the name of the image the VM boots from; ``image_os`` and ``image_version`` are the baseline the
    image registry records for it, both None when the registry does not know the image (older VMs name images such as
    "lab" that were never imported) or the VM names none. ``image_revoked``: the registry revoked the image.
    """

    id: str
    name: str
    tenant: str
    profile: Mapping[str, str] = field(hash=False)
    memory_mb: int
    host: str | None = None
    image: str | None = None
    image_os: str | None = None
    image_version: str | None = None
    image_revoked: bool = False


def profile_security_level(profile: Mapping[str, str]) -> int:
    """The security level of a VM: its ``security_level`` label when it is a whole number, else the level of its
    ``sensitivity`` label (public 0, internal 1, confidential 2, secret 3), else 0."""
    raw = profile.get("security_level")
    if raw is not None:
        text = str(raw).strip()
        if _WHOLE.fullmatch(text):
            return int(text)
    sensitivity = profile.get("sensitivity")
    if sensitivity is not None:
        return SENSITIVITY_LEVELS.get(str(sensitivity).strip().lower(), 0)
    return 0
