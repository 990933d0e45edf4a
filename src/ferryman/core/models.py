"""Domain models: frozen dataclasses shared by the controller, the CMDB and the agent.

They carry no behaviour that does I/O. The VM lifecycle is an enum plus an explicit transition table
(:data:`VM_TRANSITIONS`); :func:`next_vm_state` is the only way to compute a new state.
"""

from __future__ import annotations

import datetime as dt
import enum
import re
from dataclasses import dataclass, field
from typing import Any

from ferryman.core.errors import Conflict, InvalidInput

NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def check_name(kind: str, name: str) -> str:
    """Return ``name`` if it is a valid DNS-label-like name, else raise :class:`InvalidInput`."""
    if not NAME_RE.match(name):
        raise InvalidInput(
            f"bad {kind} name {name!r}: use 1-63 lowercase letters, digits and '-', starting and ending alphanumeric"
        )
    return name


@dataclass(frozen=True)
class Site:
    """A physical location with a security level (higher is stronger)."""

    name: str
    security_level: int
    description: str = ""


class HostState(enum.StrEnum):
    PENDING = "pending"  # registered, waiting for enrolment
    ENROLLED = "enrolled"  # holds a certificate


@dataclass(frozen=True)
class Host:
    """A hypervisor host and the labels placement policies read (see DESIGN.md, CMDB)."""

    name: str
    address: str
    agent_port: int
    site: str
    zone: str
    subnet: str
    virt_type: str
    hypervisor: str
    hypervisor_version: str
    patch_level: int
    role: str = "compute"
    underlay: str = ""  # the host's address on the overlay's underlay network (VXLAN endpoint); "" if it has none
    memory_mb: int = 2048
    state: HostState = HostState.PENDING
    created_at: dt.datetime | None = None

    @property
    def agent_url(self) -> str:
        return f"https://{self.address}:{self.agent_port}"


@dataclass(frozen=True)
class Tenant:
    name: str


class VMState(enum.StrEnum):
    CREATING = "creating"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"
    ERROR = "error"
    DELETED = "deleted"


class VMAction(enum.StrEnum):
    CREATED = "created"  # the agent booted it
    FAILED = "failed"
    START = "start"
    STOP = "stop"
    PAUSE = "pause"
    RESUME = "resume"
    DELETE = "delete"


VM_TRANSITIONS: dict[tuple[VMState, VMAction], VMState] = {
    (VMState.CREATING, VMAction.CREATED): VMState.RUNNING,
    (VMState.CREATING, VMAction.FAILED): VMState.ERROR,
    (VMState.CREATING, VMAction.DELETE): VMState.DELETED,
    (VMState.RUNNING, VMAction.PAUSE): VMState.PAUSED,
    (VMState.RUNNING, VMAction.STOP): VMState.STOPPED,
    (VMState.RUNNING, VMAction.DELETE): VMState.DELETED,
    (VMState.RUNNING, VMAction.FAILED): VMState.ERROR,
    (VMState.PAUSED, VMAction.RESUME): VMState.RUNNING,
    (VMState.PAUSED, VMAction.STOP): VMState.STOPPED,
    (VMState.PAUSED, VMAction.DELETE): VMState.DELETED,
    (VMState.PAUSED, VMAction.FAILED): VMState.ERROR,
    (VMState.STOPPED, VMAction.START): VMState.RUNNING,
    (VMState.STOPPED, VMAction.DELETE): VMState.DELETED,
    (VMState.STOPPED, VMAction.FAILED): VMState.ERROR,
    (VMState.ERROR, VMAction.START): VMState.RUNNING,
    (VMState.ERROR, VMAction.STOP): VMState.STOPPED,
    (VMState.ERROR, VMAction.DELETE): VMState.DELETED,
}


def next_vm_state(state: VMState, action: VMAction) -> VMState:
    """Return the state after ``action``, or raise :class:`Conflict` naming what is allowed."""
    try:
        return VM_TRANSITIONS[(state, action)]
    except KeyError:
        allowed = sorted(a.value for (s, a) in VM_TRANSITIONS if s is state)
        raise Conflict(
            f"cannot {action.value} a VM that is {state.value}"
            + (f" (allowed: {', '.join(allowed)})" if allowed else "")
        ) from None


@dataclass(frozen=True)
class VM:
    """A virtual machine as the CMDB knows it. ``generation`` fences stale copies (DESIGN.md invariant 3)."""

    id: str
    name: str
    tenant: str
    memory_mb: int
    vcpus: int
    disk_bytes: int
    image: str
    canary: str
    profile: dict[str, str] = field(default_factory=dict)
    generation: int = 1
    state: VMState = VMState.CREATING
    created_at: dt.datetime | None = None
    encrypted: bool = False  # disks are LUKS-encrypted qcow2 under per-copy keys the controller holds
    image_copy: bool = False  # booted from a registry image: its first disk is a full copy, not an overlay on it


@dataclass(frozen=True)
class Network:
    """A tenant's virtual network: one overlay segment (VNI) and an IPv4 prefix (optionally an IPv6 one)."""

    name: str
    tenant: str
    cidr: str
    vni: int
    vlan: int | None = None  # as the operator asked; the lab's overlay carries it as the VNI
    cidr6: str | None = None
    forensic_port: int = 22  # the one port an isolated NIC keeps open
    created_at: dt.datetime | None = None


@dataclass(frozen=True)
class Nic:
    """A VM's NIC as the CMDB knows it, with where its rules were last installed and their read-back hash."""

    id: str
    vm_id: str
    network: str
    index: int
    mac: str
    ipv4: str
    ipv6: str | None = None
    isolated: bool = False
    revision: int = 1
    host: str | None = None  # the host whose rules were last verified
    rules_hash: str | None = None  # sha256 of the rules read back there (nft -s list table)
    applied_at: dt.datetime | None = None


@dataclass(frozen=True)
class Placement:
    """The temporal fact "VM ran on host from valid_from until valid_to" (valid_to None: still there).

    A row's VM, host, generation and valid_from never change; valid_to is set exactly once, when the fact ends.
    """

    vm_id: str
    host: str
    generation: int
    valid_from: dt.datetime
    valid_to: dt.datetime | None = None


class Severity(enum.StrEnum):
    INFO = "info"
    WARNING = "warning"
    ALARM = "alarm"


@dataclass(frozen=True)
class Event:
    """One entry of the audit/event log."""

    kind: str
    message: str
    time: dt.datetime
    severity: Severity = Severity.INFO
    principal: str = "system"
    vm: str | None = None
    host: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    id: int | None = None


@dataclass(frozen=True)
class DiskSpec:
    size_bytes: int


GUEST_HEADROOM_MIB = 96
"""Guest RAM the lab guest needs besides its resident set: kernel, initramfs, the dirtied area, the random buffer."""


def max_resident_mib(memory_mb: int) -> int:
    """The largest resident set a lab guest of ``memory_mb`` holds safely: its tmpfs pages cannot be swapped, and
    besides the fixed headroom the kernel keeps 1/64 of RAM in page descriptors (a 1/32 margin here)."""
    return max(memory_mb - GUEST_HEADROOM_MIB - memory_mb // 32, 0)


def check_resident(resident_mib: int, memory_mb: int) -> None:
    """InvalidInput unless the guest can hold ``resident_mib`` of filled RAM within ``memory_mb``."""
    if resident_mib < 0 or (resident_mib and resident_mib > max_resident_mib(memory_mb)):
        raise InvalidInput(
            f"bad resident set {resident_mib} MiB for a {memory_mb} MiB VM: give 0 to {max_resident_mib(memory_mb)} MiB"
        )


@dataclass(frozen=True)
class ImageRef:
    """The registry image a VM boots from, as its host needs it: the digests (``sha256:<hex>``) and sizes of the
    files to fetch into its cache and check, how to boot them, and the publisher's signature with the key that must
    verify it (the controller sends only an image that is not revoked and whose publisher it trusts)."""

    name: str
    digest: str  # the disk: the VM's first disk is a copy-on-write overlay on it (or a full copy)
    size: int
    format: str  # raw | qcow2
    signature: str  # base64 of the Ed25519 signature over the artefacts' statement
    publisher_key: str  # PEM
    boot: str = "firmware"  # firmware: BIOS/UEFI and the bootloader on the disk | kernel: direct kernel boot
    firmware: str = "bios"
    kernel: str | None = None
    kernel_size: int | None = None
    initrd: str | None = None
    initrd_size: int | None = None
    cmdline: str | None = None  # a template over the VM's boot parameters, like the agent's own boot image's
    guest_agent: bool = False
    full_copy: bool = False  # the first disk is a full, independent copy of the image rather than an overlay


@dataclass(frozen=True)
class NicSpec:
    """One virtual NIC as its host needs it: the segment it joins, the addresses it may use, and how its
    anti-spoofing rules are to be rendered (:mod:`ferryman.network.rules`). The host opens the NIC's tap
    (``fmt-<id>``) in its network namespace, on the bridge of the network's segment, and installs the NIC's own
    nftables table (``fm_nic_<id>``) on it before QEMU runs."""

    id: str  # 1-11 of [a-z0-9]: the tap's and the table's names derive from it, the same on every host
    network: str
    vni: int  # the overlay segment (VXLAN network identifier)
    mac: str  # 52:54:00:xx:xx:xx, lowercase
    ipv4: str
    cidr: str  # the network's IPv4 prefix: traffic to the NIC comes only from inside it
    ipv6: str | None = None
    cidr6: str | None = None
    isolated: bool = False  # only the forensic port is open (incident response)
    forensic_port: int = 22
    revision: int = 1  # the NIC's rule revision: bumps on every change of what its rules allow
    peers: tuple[str, ...] = ()  # underlay addresses of the other hosts (VXLAN head-end replication)
    hostname: str | None = None  # the VM's name, offered to the guest by DHCP (option 12)


@dataclass(frozen=True)
class VMSpec:
    """What an agent needs to run a VM. The guest workload knobs travel on the kernel command line (and, for a VM
    booted from an image through its firmware, in its SMBIOS serial number)."""

    vm_id: str
    name: str
    vcpus: int
    memory_mb: int
    disks: tuple[DiskSpec, ...]
    canary: str
    generation: int = 1
    dirty_kib_per_s: int = 256
    record_interval_ms: int = 1000
    encrypted: bool = False  # the disks open only with the copy's key, which the controller gives per launch
    resident_mib: int = 0  # guest RAM the workload fills with non-zero data at boot (what a migration must carry)
    image: ImageRef | None = None  # None: the host's own boot image (direct kernel boot, empty disks)
    nics: tuple[NicSpec, ...] = ()  # virtio-net NICs, each on a tap of its network's segment


class RunState(enum.StrEnum):
    """What the hypervisor says about one QEMU process."""

    RUNNING = "running"
    PAUSED = "paused"
    SHUTDOWN = "shutdown"
    INMIGRATE = "inmigrate"
    POSTMIGRATE = "postmigrate"
    OTHER = "other"


@dataclass(frozen=True)
class VMRuntime:
    """One QEMU process as an agent sees it."""

    vm_id: str
    name: str
    run_state: RunState
    pid: int | None
    generation: int | None = None
    managed: bool = True  # False: found on the host but not started by this agent
