"""Builds the lab guest as a bootable raw disk image, the way a cloud image boots: firmware, MBR, bootloader, kernel.

The image holds the same kernel and initramfs as :func:`ferryman.lab.guest.ensure_guest`, laid out on an MBR disk::

    sector 0            MBR: syslinux boot code, partition table, 0x55AA
    partition 1         FAT16 (type 0x0e, bootable): ldlinux.sys, ldlinux.c32, syslinux.cfg, vmlinuz, initrd.img
    partition 2         the records area (type 0xda, "non-FS data"), all zeros: the guest's numbered records

SeaBIOS runs the MBR code, which chains to syslinux in partition 1, which loads the kernel with a command line that
carries nothing specific to one VM: every VM boots the same image (usually through a qcow2 overlay), and its own
parameters reach the guest through SMBIOS (see ``guest_init.sh``). The guest and the host-side reader
(:mod:`ferryman.lab.records`) both find the records through the first partition of type 0xda
(:func:`records_region`), so record N stays sector N of that region.

Everything is built in an ordinary file by unprivileged tools (``mkfs.fat --offset``, ``syslinux --offset``,
mtools); the partition table is written here. This module never needs root, loop devices or mounts, and never
starts a VM.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ferryman.lab.guest import GuestBuildError, default_cache_dir, ensure_guest, init_script, locked

SECTOR = 512
MIB = 1024 * 1024
RECORDS_PARTITION_TYPE = 0xDA  # "non-FS data": no OS mounts or probes it as a filesystem
BOOT_PARTITION_TYPE = 0x0E  # FAT16 with LBA addressing
# The guest command line without the per-VM ``ferryman.*`` words, which come from SMBIOS instead.
DISK_CMDLINE = "console=ttyS0 quiet panic=-1 i8042.noaux i8042.nokbd i8042.nopnp no_timer_check"
MBR_CODE = Path("/usr/lib/syslinux/mbr/mbr.bin")

_BUILDER_VERSION = "1"
_COMMAND_TIMEOUT = 60.0
_FIRST_PARTITION_SECTOR = 2048  # 1 MiB alignment, as partitioning tools do
_MBR_TABLE_OFFSET = 446
_MBR_CODE_BYTES = 440
_MBR_ENTRY = struct.Struct("<B3sB3sII")
_MBR_SIGNATURE = b"\x55\xaa"
_DISK_SIGNATURE = 0xFE77A001
_VOLUME_ID = "fe77a001"
_BOOT_MIB_RANGE = (16, 1024)  # FAT16 with mkfs.fat's cluster sizes holds this range
# Debian package providing each tool the build runs.
_PACKAGES = {"mkfs.fat": "dosfstools", "mcopy": "mtools", "syslinux": "syslinux"}
# mtools refuses images whose FAT geometry does not match a physical floppy or disk unless told not to check.
_MTOOLS_ENV = {"MTOOLS_SKIP_CHECK": "1"}


@dataclass(frozen=True)
class DiskLayout:
    """A built boot disk: its raw image and where in it the records area lies."""

    path: Path
    size_bytes: int
    records_offset_bytes: int
    records_bytes: int


def records_region(first_sector: bytes) -> tuple[int, int] | None:
    """``(offset_bytes, length_bytes)`` of the first MBR partition of type 0xda, or None.

    None for anything that is not an MBR with such a partition, including the bare records disk of a guest booted by
    direct kernel boot, whose sector 0 is the records header.
    """
    if len(first_sector) < SECTOR or first_sector[510:512] != _MBR_SIGNATURE:
        return None
    for index in range(4):
        _status, _chs_first, kind, _chs_last, start, sectors = _MBR_ENTRY.unpack_from(
            first_sector, _MBR_TABLE_OFFSET + index * _MBR_ENTRY.size
        )
        if kind == RECORDS_PARTITION_TYPE and start > 0 and sectors > 0:
            return start * SECTOR, sectors * SECTOR
    return None


def ensure_guest_disk(cache_dir: Path | None = None) -> DiskLayout:
    """The lab guest as a boot disk, built into ``<cache>/guest-disk/<key>/disk.raw`` unless already there.

    The key covers the init script, the kernel and initramfs of :func:`ensure_guest` and this builder's version, so
    a changed guest yields a new disk next to the old one.
    """
    cache = cache_dir or default_cache_dir()
    guest = ensure_guest(cache)
    digest = hashlib.sha256()
    for part in (_BUILDER_VERSION.encode(), init_script(), guest.kernel.read_bytes(), guest.initrd.read_bytes()):
        digest.update(hashlib.sha256(part).digest())
    digest.update(DISK_CMDLINE.encode())
    root = cache / "guest-disk"
    out = root / digest.hexdigest()[:16] / "disk.raw"
    if out.exists():
        return read_layout(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with locked(root / ".lock"):
        if out.exists():
            return read_layout(out)
        return build_boot_disk(guest.kernel, guest.initrd, out, cmdline=DISK_CMDLINE)


def read_layout(path: Path) -> DiskLayout:
    """The layout of a boot disk already built, read from its partition table."""
    try:
        with path.open("rb") as fh:
            region = records_region(fh.read(SECTOR))
        size = path.stat().st_size
    except OSError as err:
        raise GuestBuildError(f"cannot read boot disk {path}: {err}") from err
    if region is None:
        raise GuestBuildError(f"{path} has no records partition (MBR type 0xda)")
    return DiskLayout(path=path, size_bytes=size, records_offset_bytes=region[0], records_bytes=region[1])


def build_boot_disk(
    kernel: Path, initrd: Path, out: Path, *, cmdline: str, records_mib: int = 16, boot_mib: int = 64
) -> DiskLayout:
    """Write a raw MBR disk to ``out`` that boots ``kernel`` with ``initrd`` and ``cmdline`` through syslinux.

    ``out`` appears complete or not at all: the image is built in a temporary file next to it and renamed.
    """
    _check_inputs(kernel, initrd, cmdline, records_mib, boot_mib)
    tools = {name: _tool(name) for name in _PACKAGES}
    mbr_code = _mbr_code()
    boot_start = _FIRST_PARTITION_SECTOR
    boot_sectors = boot_mib * MIB // SECTOR
    records_start = boot_start + boot_sectors
    records_sectors = records_mib * MIB // SECTOR
    size = (records_start + records_sectors) * SECTOR
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    tmp = Path(name)
    try:
        os.ftruncate(fd, size)
        os.close(fd)
        fd = -1
        _make_boot_partition(tools, tmp, boot_start, boot_sectors, kernel, initrd, cmdline)
        partitions = [
            (True, BOOT_PARTITION_TYPE, boot_start, boot_sectors),
            (False, RECORDS_PARTITION_TYPE, records_start, records_sectors),
        ]
        table = mbr_sector(mbr_code, partitions)
        with tmp.open("r+b") as fh:
            fh.write(table)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.chmod(0o444)  # a shared base image: VMs write to their own overlays, never to it
        tmp.replace(out)
    except OSError as err:
        raise GuestBuildError(f"cannot write boot disk {out}: {err}") from err
    finally:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
    return DiskLayout(
        path=out, size_bytes=size, records_offset_bytes=records_start * SECTOR, records_bytes=records_sectors * SECTOR
    )


def mbr_sector(code: bytes, partitions: list[tuple[bool, int, int, int]]) -> bytes:
    """An MBR: boot ``code``, the disk signature and up to four ``(bootable, type, first_sector, sectors)`` entries."""
    if len(code) > _MBR_CODE_BYTES or len(partitions) > 4:
        raise GuestBuildError(f"an MBR holds {_MBR_CODE_BYTES} bytes of code and 4 partitions")
    sector = bytearray(code.ljust(_MBR_CODE_BYTES, b"\0"))
    sector += struct.pack("<IH", _DISK_SIGNATURE, 0)
    for bootable, kind, start, sectors in partitions:
        sector += _MBR_ENTRY.pack(0x80 if bootable else 0, _chs(start), kind, _chs(start + sectors - 1), start, sectors)
    sector = sector.ljust(510, b"\0") + _MBR_SIGNATURE
    return bytes(sector)


def syslinux_config(cmdline: str) -> str:
    """One entry, booted at once: no prompt and no menu wait."""
    return (
        "DEFAULT ferryman\nPROMPT 0\nTIMEOUT 0\n"
        f"LABEL ferryman\n    LINUX /vmlinuz\n    INITRD /initrd.img\n    APPEND {cmdline}\n"
    )


def _chs(lba: int) -> bytes:
    """CHS bytes of an MBR entry in the usual 255-head, 63-sector geometry; past cylinder 1023 only LBA counts."""
    cylinder, rest = divmod(lba, 255 * 63)
    head, sector = divmod(rest, 63)
    if cylinder > 1023:
        cylinder, head, sector = 1023, 254, 62
    return bytes((head, (sector + 1) | ((cylinder >> 2) & 0xC0), cylinder & 0xFF))


def _check_inputs(kernel: Path, initrd: Path, cmdline: str, records_mib: int, boot_mib: int) -> None:
    low, high = _BOOT_MIB_RANGE
    if not low <= boot_mib <= high:
        raise GuestBuildError(f"boot partition of {boot_mib} MiB: must be {low}..{high} MiB")
    if records_mib < 1:
        raise GuestBuildError(f"records area of {records_mib} MiB: must be at least 1 MiB")
    if "\n" in cmdline or "\r" in cmdline:
        raise GuestBuildError("the kernel command line must be a single line")
    try:
        payload = kernel.stat().st_size + initrd.stat().st_size
    except OSError as err:
        raise GuestBuildError(f"cannot read the kernel or initramfs: {err}") from err
    # syslinux itself and FAT overhead take about 1 MiB
    if payload + 2 * MIB > boot_mib * MIB:
        raise GuestBuildError(f"kernel and initramfs ({payload} bytes) do not fit a {boot_mib} MiB boot partition")


def _tool(name: str) -> str:
    # mkfs.fat lives in /usr/sbin, which an unprivileged user's PATH often lacks
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    path = shutil.which(name, path=search)
    if path is None:
        raise GuestBuildError(f"{name} not found; install the Debian package {_PACKAGES[name]}")
    return path


def _mbr_code() -> bytes:
    try:
        code = MBR_CODE.read_bytes()
    except OSError as err:
        raise GuestBuildError(f"cannot read {MBR_CODE}: {err}; install the Debian package syslinux-common") from err
    if len(code) > _MBR_CODE_BYTES:
        raise GuestBuildError(f"{MBR_CODE} is {len(code)} bytes, more than an MBR's {_MBR_CODE_BYTES}")
    return code


def _make_boot_partition(
    tools: dict[str, str], image: Path, start: int, sectors: int, kernel: Path, initrd: Path, cmdline: str
) -> None:
    """FAT16 at sector ``start`` of ``image``, with syslinux installed in it and the kernel, initramfs and config."""
    offset = start * SECTOR
    # -h: the boot sector records where its partition starts; --mbr=n: no fake partition table in the boot sector
    mkfs = [tools["mkfs.fat"], "-F", "16", "-n", "FERRYMAN", "-i", _VOLUME_ID, "-h", str(start), "--mbr=n"]
    _run([*mkfs, f"--offset={start}", str(image), str(sectors * SECTOR // 1024)])
    _run([tools["syslinux"], "--offset", str(offset), "--install", str(image)])
    with tempfile.TemporaryDirectory(prefix="ferryman-boot-") as staging:
        config = Path(staging) / "syslinux.cfg"
        config.write_text(syslinux_config(cmdline))
        target = f"{image}@@{offset}"
        _run([tools["mcopy"], "-o", "-i", target, str(config), "::/syslinux.cfg"])
        _run([tools["mcopy"], "-o", "-i", target, str(kernel), "::/vmlinuz"])
        _run([tools["mcopy"], "-o", "-i", target, str(initrd), "::/initrd.img"])


def _run(argv: list[str]) -> str:
    env = {**os.environ, **_MTOOLS_ENV}
    try:
        done = subprocess.run(
            argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=_COMMAND_TIMEOUT, env=env
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise GuestBuildError(f"{Path(argv[0]).name} failed: {err}") from err
    if done.returncode != 0:
        raise GuestBuildError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout
