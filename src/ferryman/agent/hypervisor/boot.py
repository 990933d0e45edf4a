"""How this host boots a guest: the boot image it is handed, and the QEMU options of the machine that boots it.

A VM booted from a registry image (its spec names an :class:`~ferryman.core.models.ImageRef`) starts through its
firmware and the bootloader on its disk, or directly into the image's kernel (:class:`ImageBoot`); its boot
parameters reach it in its SMBIOS serial number. For a VM without an image the host uses the boot image whoever
deployed it (an operator, or the lab) handed it through its settings (:class:`BootImage`): a kernel, an initrd and a
kernel command line. The command line is a template
in which the agent replaces each VM's boot parameters (:data:`BOOT_PARAMETERS`: ``${vm_id}``, ``${canary}``,
``${dirty_kib_per_s}``, ...) with values from the VM's spec. It passes them through without knowing what the guest
does with them; it only refuses a value the command line cannot carry.

:func:`machine_args` turns an image into the QEMU options of the guest machine, the same for every boot, migration
peer and accelerator probe; :func:`qemu_argv` into the whole command line of one VM. This module starts nothing.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ferryman.agent.storage.images import luks_passphrase
from ferryman.core.bootparams import DEFAULT_CMDLINE, check_template, render, smbios_serial
from ferryman.core.errors import InvalidInput
from ferryman.core.models import VMSpec

MACHINE = "q35"
OVMF = (Path("/usr/share/ovmf/OVMF.fd"), Path("/usr/share/OVMF/OVMF.fd"))


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
        check_template(self.cmdline)
        if self.ready_marker is not None and not self.ready_marker.strip():
            raise InvalidInput("the guest's ready marker must not be empty")

    def render_cmdline(self, spec: VMSpec) -> str:
        """The kernel command line of the VM ``spec`` describes (InvalidInput: a value it cannot carry)."""
        return render(self.cmdline, spec)

    def kernel_boot(self, spec: VMSpec) -> KernelBoot:
        return KernelBoot(self.kernel, self.initrd, self.render_cmdline(spec))


@dataclass(frozen=True)
class KernelBoot:
    """A direct kernel boot: QEMU's ``-kernel``, ``-initrd`` and ``-append``."""

    kernel: Path
    initrd: Path
    cmdline: str


@dataclass(frozen=True)
class ImageBoot:
    """How a VM booted from a registry image starts: through its firmware and the bootloader on its disk
    (``kernel`` None), or directly into the image's kernel; ``serial`` carries the VM's boot parameters (SMBIOS)."""

    firmware: str = "bios"
    kernel: KernelBoot | None = None
    serial: str | None = None
    agent_socket: str | None = None  # the guest agent's virtio-serial port, as a UNIX socket QEMU listens on


def image_boot(spec: VMSpec, kernel: Path | None, initrd: Path | None) -> ImageBoot:
    """The boot of ``spec``'s image, from the verified paths of its kernel and initrd (direct-kernel images)."""
    image = spec.image
    if image is None:
        raise InvalidInput(f"VM {spec.name} does not boot from an image")
    direct = None
    if image.boot == "kernel":
        if kernel is None or initrd is None:
            raise InvalidInput(f"image {image.name} boots a kernel, but its kernel and initrd are not here")
        direct = KernelBoot(kernel, initrd, render(image.cmdline or DEFAULT_CMDLINE, spec))
    elif image.boot != "firmware":
        raise InvalidInput(f"image {image.name}: unknown boot {image.boot!r}")
    return ImageBoot(image.firmware, direct, smbios_serial(spec))


def machine_args(
    accel: str,
    *,
    memory_mb: int,
    vcpus: int,
    console: Path,
    disks: Sequence[Path],
    boot: KernelBoot | ImageBoot,
    key_secret: str | None = None,
) -> list[str]:
    """The QEMU options that define the guest machine; identical for every boot, probe and migration peer.

    With ``key_secret`` the qcow2 images are LUKS-encrypted and open with that secret object (defined separately)."""
    args = ["-nodefaults", "-no-user-config", "-display", "none"]
    args += ["-machine", f"{MACHINE},accel={accel},dump-guest-core=off", "-m", str(memory_mb), "-smp", str(vcpus)]
    args += ["-chardev", f"file,id=serial0,path={qemu_opt(console)},append=on", "-serial", "chardev:serial0"]
    kernel = boot if isinstance(boot, KernelBoot) else boot.kernel
    if isinstance(boot, ImageBoot):
        args += firmware_args(boot.firmware)
        if boot.serial is not None:
            args += ["-smbios", f"type=1,serial={qemu_opt(boot.serial)}"]
        if boot.agent_socket is not None:
            args += ["-chardev", f"socket,id=qga0,path={qemu_opt(boot.agent_socket)},server=on,wait=off"]
            args += ["-device", "virtio-serial-pci,id=vserial0"]
            args += ["-device", "virtserialport,bus=vserial0.0,chardev=qga0,name=org.qemu.guest_agent.0"]
    if kernel is not None:
        args += ["-kernel", str(kernel.kernel), "-initrd", str(kernel.initrd), "-append", kernel.cmdline]
    for index, disk in enumerate(disks):
        fmt = "qcow2" if disk.suffix == ".qcow2" else "raw"
        crypt = f",encrypt.format=luks,encrypt.key-secret={key_secret}" if key_secret and fmt == "qcow2" else ""
        args += [
            "-blockdev",
            f"driver={fmt},node-name=disk{index},file.driver=file,file.filename={qemu_opt(disk)}{crypt}",
        ]
        boot_index = ",bootindex=0" if index == 0 and isinstance(boot, ImageBoot) and kernel is None else ""
        args += ["-device", f"virtio-blk-pci,drive=disk{index},id=virtio-disk{index}{boot_index}"]
    return args


def firmware_args(firmware: str) -> list[str]:
    """SeaBIOS is QEMU's default; UEFI needs OVMF installed on this host."""
    if firmware == "bios":
        return []
    if firmware == "uefi":
        for path in OVMF:
            if path.is_file():
                return ["-bios", str(path)]
        raise InvalidInput("this image boots through UEFI, but OVMF is not installed on this host (Debian: ovmf)")
    raise InvalidInput(f"unknown firmware {firmware!r}: bios or uefi")


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
    boot: ImageBoot | None = None,
    tap_fds: Sequence[int] = (),
) -> list[str]:
    """QEMU's command line for the VM ``spec`` describes, run daemonized, with its QMP socket and pidfile: booted
    from ``boot`` (its registry image) or else from the host's ``image``. ``key``: the secret object id and the
    inherited descriptor of a pipe holding the LUKS passphrase, for an encrypted VM. ``tap_fds``: one inherited tap
    descriptor per NIC of the spec, opened by the host on the NIC's segment (QEMU never creates a tap itself)."""
    argv = [qemu_binary, "-name", f"{spec.name},debug-threads=on", "-uuid", spec.vm_id]
    argv += machine_args(
        accel,
        memory_mb=spec.memory_mb,
        vcpus=spec.vcpus,
        console=console,
        disks=disks,
        boot=boot if boot is not None else image.kernel_boot(spec),
        key_secret=key[0] if key is not None else None,
    )
    if key is not None:
        # the passphrase is read from an inherited pipe: never on the command line, never in a file
        argv += ["-object", f"secret,id={key[0]},file=/proc/self/fd/{key[1]},format=raw"]
    if boot is None and spec.nics:  # the host's own kernel reads its NICs' addresses from the serial too
        argv += ["-smbios", f"type=1,serial={qemu_opt(smbios_serial(spec))}"]
    if len(tap_fds) != len(spec.nics):
        raise ValueError(f"VM {spec.vm_id} has {len(spec.nics)} NIC(s) but {len(tap_fds)} tap(s)")
    for index, (nic, fd) in enumerate(zip(spec.nics, tap_fds, strict=True)):
        argv += ["-netdev", f"tap,id=net{index},fd={fd}"]
        argv += ["-device", f"virtio-net-pci,netdev=net{index},mac={nic.mac},id=nic{index}"]
    if incoming:
        # Paused until an explicit cont; the migration source and its TLS settings are given later over QMP.
        argv += ["-incoming", "defer", "-S"]
    argv += ["-qmp", f"unix:{qmp_socket},server=on,wait=off"]
    argv += ["-pidfile", str(pidfile), "-daemonize"]
    return argv


def key_pipe(key: bytes) -> int:
    """The read end of a pipe holding the LUKS passphrase of ``key`` (the write end is closed: the reader sees EOF),
    for QEMU to inherit as the ``-object secret`` of :func:`qemu_argv`."""
    read_fd, write_fd = os.pipe()
    try:
        os.write(write_fd, luks_passphrase(key))
    except OSError:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)
    return read_fd


def disable_core_dumps() -> None:
    """Runs in QEMU's process before exec: a core dump would hold guest memory, so none may be written (the
    process-level counterpart of ``dump-guest-core=off``)."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def qemu_opt(path: Path | str) -> str:
    """A path inside a QEMU option string, where ',' must be doubled."""
    return str(path).replace(",", ",,")
