"""How this host boots a guest: the boot image it is handed, and the QEMU options of the machine that boots it.

The agent neither builds nor chooses guest images. Whoever deploys it (an operator, or the lab) hands it a
:class:`BootImage` through its settings: a kernel, an initrd and a kernel command line. The command line is a template
in which the agent replaces each VM's boot parameters (:data:`BOOT_PARAMETERS`: ``${vm_id}``, ``${canary}``,
``${dirty_kib_per_s}``, ...) with values from the VM's spec. It passes them through without knowing what the guest
does with them; it only refuses a value the command line cannot carry.

:func:`machine_args` turns an image into the QEMU options of the guest machine, the same for every boot, migration
peer and accelerator probe; :func:`qemu_argv` into the whole command line of one VM. This module starts nothing.
"""

from __future__ import annotations

import re
import resource
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ferryman.core.errors import InvalidInput
from ferryman.core.models import VMSpec

MACHINE = "q35"
DEFAULT_CMDLINE = "console=ttyS0"  # the serial console is the VM's console.log
# The spec fields a command-line template may name, e.g. ``hostname=${name}``.
BOOT_PARAMETERS = ("vm_id", "name", "canary", "dirty_kib_per_s", "record_interval_ms", "resident_mib")
_TOKEN_RE = re.compile(r"^[A-Za-z0-9._:@+-]{1,128}$")


@dataclass(frozen=True)
class BootImage:
    """How to boot a guest: ``kernel`` and ``initrd`` as QEMU's ``-kernel`` and ``-initrd``, ``cmdline`` (a
    :class:`string.Template` over :data:`BOOT_PARAMETERS`) rendered per VM as ``-append``. ``ready_marker``, if
    given, is what the guest prints on its serial console once it has booted: the accelerator probe waits for it."""

    kernel: Path
    initrd: Path
    cmdline: str = DEFAULT_CMDLINE
    ready_marker: str | None = None

    def __post_init__(self) -> None:
        template = string.Template(self.cmdline)
        unknown = sorted(set(template.get_identifiers()) - set(BOOT_PARAMETERS))
        if not template.is_valid() or unknown:
            raise InvalidInput(
                f"bad kernel command line template {self.cmdline!r}: it may name ${{...}} of"
                f" {', '.join(BOOT_PARAMETERS)}" + (f", not {', '.join(unknown)}" if unknown else "")
            )
        if self.ready_marker is not None and not self.ready_marker.strip():
            raise InvalidInput("the guest's ready marker must not be empty")

    def render_cmdline(self, spec: VMSpec) -> str:
        """The kernel command line of the VM ``spec`` describes (InvalidInput: a value it cannot carry)."""
        return string.Template(self.cmdline).substitute(boot_parameters(spec))


def boot_parameters(spec: VMSpec) -> Mapping[str, str]:
    """The values a command-line template may name, checked: each is one token of letters, digits and ``._:@+-``,
    and the workload numbers are non-negative (the record interval positive)."""
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


def machine_args(
    image: BootImage,
    accel: str,
    *,
    memory_mb: int,
    vcpus: int,
    cmdline: str,
    console: Path,
    disks: Sequence[Path],
    key_secret: str | None = None,
) -> list[str]:
    """The QEMU options that define the guest machine; identical for every boot, probe and migration peer.

    With ``key_secret`` the qcow2 images are LUKS-encrypted and open with that secret object (defined separately)."""
    args = ["-nodefaults", "-no-user-config", "-display", "none"]
    args += ["-machine", f"{MACHINE},accel={accel},dump-guest-core=off", "-m", str(memory_mb), "-smp", str(vcpus)]
    args += ["-chardev", f"file,id=serial0,path={qemu_opt(console)},append=on", "-serial", "chardev:serial0"]
    args += ["-kernel", str(image.kernel), "-initrd", str(image.initrd), "-append", cmdline]
    for index, disk in enumerate(disks):
        fmt = "qcow2" if disk.suffix == ".qcow2" else "raw"
        crypt = f",encrypt.format=luks,encrypt.key-secret={key_secret}" if key_secret and fmt == "qcow2" else ""
        args += [
            "-blockdev",
            f"driver={fmt},node-name=disk{index},file.driver=file,file.filename={qemu_opt(disk)}{crypt}",
        ]
        args += ["-device", f"virtio-blk-pci,drive=disk{index},id=virtio-disk{index}"]
    return args


def qemu_argv(
    image: BootImage,
    spec: VMSpec,
    *,
    qemu_binary: str,
    accel: str,
    console: Path,
    disks: Sequence[Path],
    qmp_socket: str,
    pidfile: Path,
    incoming: bool = False,
    key: tuple[str, int] | None = None,
) -> list[str]:
    """QEMU's command line for the VM ``spec`` describes, booted from ``image`` and run daemonized, with its QMP
    socket and pidfile. ``key``: the secret object id and the inherited descriptor of a pipe holding the LUKS
    passphrase, for an encrypted VM."""
    argv = [qemu_binary, "-name", f"{spec.name},debug-threads=on", "-uuid", spec.vm_id]
    argv += machine_args(
        image,
        accel,
        memory_mb=spec.memory_mb,
        vcpus=spec.vcpus,
        cmdline=image.render_cmdline(spec),
        console=console,
        disks=disks,
        key_secret=key[0] if key is not None else None,
    )
    if key is not None:
        # the passphrase is read from an inherited pipe: never on the command line, never in a file
        argv += ["-object", f"secret,id={key[0]},file=/proc/self/fd/{key[1]},format=raw"]
    if incoming:
        # Paused until an explicit cont; the migration source and its TLS settings are given later over QMP.
        argv += ["-incoming", "defer", "-S"]
    argv += ["-qmp", f"unix:{qmp_socket},server=on,wait=off"]
    argv += ["-pidfile", str(pidfile), "-daemonize"]
    return argv


def disable_core_dumps() -> None:
    """Runs in QEMU's process before exec: a core dump would hold guest memory, so none may be written (the
    process-level counterpart of ``dump-guest-core=off``)."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def qemu_opt(path: Path) -> str:
    """A path inside a QEMU option string, where ',' must be doubled."""
    return str(path).replace(",", ",,")
