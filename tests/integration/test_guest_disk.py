"""The lab guest as a bootable disk image: its MBR layout, its FAT boot partition, and a real SeaBIOS boot (TCG)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ferryman.lab import disk_image
from ferryman.lab.disk_image import (
    DISK_CMDLINE,
    SECTOR,
    DiskLayout,
    build_boot_disk,
    ensure_guest_disk,
    mbr_sector,
    records_region,
)
from ferryman.lab.guest import GuestBuildError, GuestImage
from ferryman.lab.records import missing_seqs, read_acks, read_last_seq, read_records

pytestmark = pytest.mark.qemu

QEMU = "qemu-system-x86_64"
BOOT_TIMEOUT = 120.0
ACK_TIMEOUT = 60.0
MIB = 1024 * 1024
SMBIOS_PARAMS = "ferryman:vm=t1;canary=CANARY123;dirty_kib=64;interval_ms=200;resident_mib=0"
MTOOLS_ENV = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}


# -- helpers -------------------------------------------------------------------------------------------------------


def hand_built_mbr(*entries: tuple[int, int, int]) -> bytes:
    """An MBR sector with ``(type, first_sector, sectors)`` entries at byte 446 and the 0x55AA signature."""
    sector = bytearray(SECTOR)
    for index, (kind, start, count) in enumerate(entries):
        struct.pack_into("<B3xB3xII", sector, 446 + 16 * index, 0, kind, start, count)
    sector[510:512] = b"\x55\xaa"
    return bytes(sector)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(MIB):
            digest.update(chunk)
    return digest.hexdigest()


def fat_files(layout: DiskLayout, offset: int) -> set[str]:
    """Names in the FAT root directory at ``offset`` bytes into the image, hidden and system files included."""
    out = subprocess.run(
        ["mdir", "-a", "-b", "-i", f"{layout.path}@@{offset}", "::/"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        env=MTOOLS_ENV,
    ).stdout
    return {line.strip().removeprefix("::/") for line in out.splitlines() if line.strip()}


def wait_for_text(log: Path, text: str, qemu: subprocess.Popen[bytes], within: float) -> float:
    """Seconds until ``text`` appears in the serial log; fails early if QEMU exits."""
    started = time.monotonic()
    while time.monotonic() - started < within:
        if log.exists() and text in log.read_text(errors="replace"):
            return time.monotonic() - started
        if qemu.poll() is not None:
            break
        time.sleep(0.25)
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else "(no serial log)"
    pytest.fail(f"{text!r} not on the serial console within {within}s (QEMU exit {qemu.poll()}):\n{tail}")


def wait_for_acks(log: Path, count: int, qemu: subprocess.Popen[bytes], within: float) -> list[int]:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline and qemu.poll() is None:
        acks = read_acks(log)
        if len(acks) >= count:
            return acks
        time.sleep(0.25)
    pytest.fail(f"fewer than {count} FMACK lines within {within}s: {read_acks(log)}")


def overlay_writes(overlay: Path) -> list[tuple[int, int]]:
    """``(offset, length)`` of every range the overlay itself holds data for (not its backing file)."""
    out = subprocess.run(
        ["qemu-img", "map", "--output=json", "-U", str(overlay)], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    return [(m["start"], m["length"]) for m in json.loads(out) if m["depth"] == 0 and m["data"]]


# -- fixtures ------------------------------------------------------------------------------------------------------


@pytest.fixture
def qemus() -> Iterator[list[subprocess.Popen[bytes]]]:
    """QEMU processes a test starts, each killed by pid at teardown."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)


# -- no QEMU needed ------------------------------------------------------------------------------------------------


def test_records_region_finds_the_first_non_fs_data_partition() -> None:
    """records_region returns the first 0xda entry with a start and a length, and None for anything else."""
    table = hand_built_mbr((0x0E, 2048, 4096), (0xDA, 0, 0), (0xDA, 8192, 64), (0xDA, 9000, 8))
    assert records_region(table) == (8192 * SECTOR, 64 * SECTOR)
    assert records_region(hand_built_mbr((0x0C, 2048, 4096))) is None
    built = mbr_sector(b"\xeb\xfe", [(True, 0x0E, 2048, 4096), (False, 0xDA, 8192, 64)])
    assert len(built) == SECTOR and built[:2] == b"\xeb\xfe" and built[446] == 0x80
    assert records_region(built) == (8192 * SECTOR, 64 * SECTOR)
    assert records_region(table[:510] + b"\0\0") is None
    assert records_region(table[:100]) is None
    assert records_region(b"FMHDR last=3 vm=v\n".ljust(SECTOR, b"\0")) is None
    assert records_region(bytes(SECTOR)) is None
    assert records_region(b"\xff" * SECTOR) is None


def test_records_are_read_relative_to_the_records_partition(tmp_path: Path) -> None:
    """With an MBR naming a 0xda partition, record N is sector N of the partition, and reads stay inside it."""
    disk = tmp_path / "disk.raw"
    start, sectors = 8, 6
    image = bytearray(mbr_sector(b"", [(True, 0x0E, 1, 7), (False, 0xDA, start, sectors)]))
    image += b"FMREC seq=1 vm=decoy canary=x up=1.0\n".ljust(SECTOR, b"\0")  # outside the partition
    image = image.ljust(start * SECTOR, b"\0")
    image += b"FMHDR last=40 vm=v\n".ljust(SECTOR, b"\0")
    for seq in range(1, sectors):
        image += f"FMREC seq={seq} vm=v canary=c up={seq}.0\n".encode().ljust(SECTOR, b"\0")
    disk.write_bytes(bytes(image))
    found = read_records(disk)
    assert [(r.seq, r.vm) for r in found] == [(n, "v") for n in range(1, sectors)]
    assert read_last_seq(disk) == 40


def test_missing_tools_name_their_debian_package(
    guest: GuestImage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without mtools on the PATH the build fails before writing anything, naming the package to install."""
    monkeypatch.setenv("PATH", "/nonexistent")
    out = tmp_path / "disk.raw"
    with pytest.raises(GuestBuildError, match="install the Debian package mtools"):
        build_boot_disk(guest.kernel, guest.initrd, out, cmdline=DISK_CMDLINE)
    assert list(tmp_path.iterdir()) == []


# -- the image -----------------------------------------------------------------------------------------------------


def test_boot_disk_has_an_mbr_a_syslinux_fat_and_a_zeroed_records_partition(layout: DiskLayout) -> None:
    """Partition 1 is a bootable FAT with syslinux, its config, kernel and initrd; partition 2 is 16 MiB of zeros."""
    data = layout.path.read_bytes()
    assert len(data) == layout.size_bytes
    assert data[510:512] == b"\x55\xaa"
    assert data[:440] == disk_image.MBR_CODE.read_bytes().ljust(440, b"\0")
    table = json.loads(
        subprocess.run(
            ["sfdisk", "--json", str(layout.path)], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    )["partitiontable"]
    boot, records = table["partitions"]
    assert table["label"] == "dos" and boot["bootable"] and boot["type"] in ("c", "e") and records["type"] == "da"
    assert (records["start"] * SECTOR, records["size"] * SECTOR) == (layout.records_offset_bytes, layout.records_bytes)
    assert layout.records_bytes == 16 * MIB and layout.records_offset_bytes + layout.records_bytes == layout.size_bytes
    assert data[layout.records_offset_bytes :] == bytes(layout.records_bytes)
    files = fat_files(layout, boot["start"] * SECTOR)
    assert {"ldlinux.sys", "ldlinux.c32", "syslinux.cfg", "vmlinuz", "initrd.img"} <= files
    config = subprocess.run(
        ["mtype", "-i", f"{layout.path}@@{boot['start'] * SECTOR}", "::/syslinux.cfg"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        env=MTOOLS_ENV,
    ).stdout
    assert "LINUX /vmlinuz" in config and "INITRD /initrd.img" in config
    assert f"APPEND {DISK_CMDLINE}\n" in config and "ferryman." not in config


def test_guest_disk_is_reused_once_built(layout: DiskLayout) -> None:
    """A second ensure_guest_disk for the same guest returns the same image at once, without rebuilding it."""
    cache = layout.path.parent.parent.parent
    mtime = layout.path.stat().st_mtime_ns
    started = time.monotonic()
    assert ensure_guest_disk(cache) == layout
    assert time.monotonic() - started < 2.0
    assert layout.path.stat().st_mtime_ns == mtime


# -- booting it ----------------------------------------------------------------------------------------------------


def test_disk_boots_through_seabios_and_writes_records_to_its_partition(
    layout: DiskLayout, tmp_path: Path, qemus: list[subprocess.Popen[bytes]]
) -> None:
    """Booted from a qcow2 overlay with its parameters in SMBIOS, the guest acks records that land, gap-free and
    carrying its id and canary, in the overlay's records partition; the base image is untouched."""
    base_digest = sha256(layout.path)
    overlay = tmp_path / "overlay.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(layout.path), str(overlay)],
        check=True,
        timeout=30,
    )
    log = tmp_path / "serial.log"
    argv = [
        QEMU,
        "-machine",
        "q35,accel=tcg",
        "-m",
        "256",
        "-smp",
        "1",
        "-nodefaults",
        "-display",
        "none",
        "-serial",
        f"file:{log}",
        "-drive",
        f"if=none,id=d0,file={overlay},format=qcow2",
        "-device",
        "virtio-blk-pci,drive=d0",
        "-smbios",
        f"type=1,serial={SMBIOS_PARAMS}",
    ]
    with (tmp_path / "qemu.out").open("wb") as out:
        qemus.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT))
    qemu = qemus[0]
    boot_s = wait_for_text(log, "FERRYMAN-GUEST-READY vm=t1", qemu, BOOT_TIMEOUT)
    print(f"guest disk booted to READY in {boot_s:.1f}s under TCG")
    wait_for_acks(log, 3, qemu, ACK_TIMEOUT)
    qemu.send_signal(signal.SIGKILL)
    qemu.wait(timeout=30)

    acks = read_acks(log)
    found = read_records(overlay)
    assert found and {(r.vm, r.canary) for r in found} == {("t1", "CANARY123")}
    assert missing_seqs(found, acks) == []
    assert read_last_seq(overlay) >= max(acks)
    assert "FERRYMAN-GUEST-ERROR" not in log.read_text(errors="replace")
    # the guest wrote only inside its records partition: the MBR and the boot partition come from the base
    region = (layout.records_offset_bytes, layout.records_offset_bytes + layout.records_bytes)
    assert all(region[0] <= start and start + length <= region[1] for start, length in overlay_writes(overlay))
    assert sha256(layout.path) == base_digest
