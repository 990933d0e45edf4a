"""Scrubbing against a real ext4 on a loop device: after a scrub, the raw device holds no trace of the canary.

Each test writes a per-test canary into files on a loop-mounted ext4, scrubs, unmounts, and scans the raw image.
The control test shows the scan does find a canary whose file was merely unlinked, so "not found" means something.
"""

from __future__ import annotations

import os
import secrets
import shutil
import struct
import subprocess
import time
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from ferryman.agent.storage import (
    KEY_OBJECT_ID,
    ScrubMode,
    create_encrypted_qcow2,
    is_encrypted_image,
    list_snapshots,
    open_args_for_encrypted,
    prune_and_scrub,
    restore_snapshot,
    run_qemu_tool,
    scrub_file,
    scrub_tree,
    snapshot_disk,
)
from ferryman.core.errors import Conflict, HypervisorError
from ferryman.testing.clock import FakeClock
from ferryman.testing.loopfs import loop_mount, scan_for

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="loop devices need root"),
    pytest.mark.skipif(shutil.which("losetup") is None, reason="losetup is not installed"),
]
needs_qemu_img = pytest.mark.skipif(
    shutil.which("qemu-img") is None or shutil.which("qemu-io") is None, reason="qemu-img/qemu-io not installed"
)

LUKS_MAGIC = b"LUKS\xba\xbe"
MIB = 1 << 20


@pytest.fixture
def canary() -> bytes:
    return b"FMCANARY" + secrets.token_hex(12).encode()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return tmp_path / "fs.img"


def mounted(image: Path) -> AbstractContextManager[Path]:
    return loop_mount(image, size_mib=128)


def _record_file(path: Path, canary: bytes, size: int) -> None:
    """A file of 512-byte records that each carry the canary, like the lab guest's disk."""
    records = []
    for seq in range(size // 512):
        record = b"FMREC seq=%d canary=%s\n" % (seq, canary)
        records.append(record.ljust(512, b"\0"))
    path.write_bytes(b"".join(records))


def _qcow2_with(path: Path, canary: bytes, raw_source: Path, size: int) -> None:
    """A qcow2 made by qemu-img whose guest data is canary records (the raw source lives outside the mount)."""
    _record_file(raw_source, canary, size)
    run_qemu_tool(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw_source), str(path)])
    raw_source.unlink()


def test_control_unlinked_file_is_found_by_the_scan(image: Path, canary: bytes):
    """A canary file that is only unlinked is still on the raw device: the scan is not blind."""
    with mounted(image) as fs:
        _record_file(fs / "disk0.img", canary, 2 * MIB)
        os.sync()
        (fs / "disk0.img").unlink()
    assert len(scan_for(image, canary)) >= 2 * MIB // 512


@pytest.mark.parametrize("mode", [ScrubMode.ZERO, ScrubMode.RANDOM])
def test_scrubbed_files_and_copies_leave_no_canary(image: Path, canary: bytes, mode: ScrubMode):
    """A disk image, its copy, a temp file and a log, all scrubbed, leave no canary anywhere on the device."""
    with mounted(image) as fs:
        vm_dir = fs / "vms" / "vm1"
        vm_dir.mkdir(parents=True)
        _record_file(vm_dir / "disk0.img", canary, 8 * MIB + 512)
        shutil.copyfile(vm_dir / "disk0.img", fs / "snapshot-disk0.img")
        (vm_dir / "console.log").write_bytes(b"boot ok\n" + canary + b"\n")
        (vm_dir / "migrate.tmp").write_bytes(canary * 10)
        os.sync()
        receipts = scrub_tree([vm_dir, fs / "snapshot-disk0.img"], mode)
        assert {r.path.name for r in receipts} == {"disk0.img", "snapshot-disk0.img", "console.log", "migrate.tmp"}
        assert all(r.mode is mode and r.verified_samples >= 1 for r in receipts)
        assert not vm_dir.exists()
    assert scan_for(image, canary) == []


@needs_qemu_img
def test_qcow2_disk_and_snapshots_scrubbed(tmp_path: Path, image: Path, canary: bytes):
    """A qcow2 disk holding the canary, two snapshots of it and the disk a restore replaced: none leaves a trace."""
    with mounted(image) as fs:
        disk, snaps = fs / "disk0.qcow2", fs / "snapshots"
        _qcow2_with(disk, canary, tmp_path / "source.raw", 4 * MIB)
        clock = FakeClock()
        first = snapshot_disk(disk, snaps, "pre-migration", clock=clock)
        clock.advance(60)
        second = snapshot_disk(disk, snaps, "pre-migration", clock=clock)
        assert [s.path for s in list_snapshots(snaps)] == [first, second]
        assert run_qemu_tool(["qemu-img", "compare", "-q", str(disk), str(second)]) == ""
        receipt = restore_snapshot(first, disk)
        assert receipt is not None and receipt.path.name.startswith(".disk0.qcow2.replaced")
        assert run_qemu_tool(["qemu-img", "compare", "-q", str(disk), str(first)]) == ""
        pruned = prune_and_scrub(snaps, keep=1, mode=ScrubMode.RANDOM)
        assert [r.path for r in pruned] == [first]
        receipts = scrub_tree([disk, snaps], ScrubMode.ZERO)
        assert {r.path for r in receipts} == {disk, second}
        assert sorted(p.name for p in fs.iterdir()) == ["lost+found"]
    assert scan_for(image, canary) == []


@needs_qemu_img
def test_restore_refuses_a_disk_in_use(tmp_path: Path, image: Path, canary: bytes):
    """Restoring over a disk that a QEMU process holds open is refused and leaves the disk as it was."""
    with mounted(image) as fs:
        disk = fs / "disk0.qcow2"
        _qcow2_with(disk, canary, tmp_path / "source.raw", MIB)
        snapshot = snapshot_disk(disk, fs / "snapshots", "s1")
        run_qemu_tool(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 64k", str(disk)])
        sock = tmp_path / "nbd.sock"
        holder = subprocess.Popen(["qemu-nbd", "--persistent", "-k", str(sock), "-f", "qcow2", str(disk)])
        try:
            deadline = time.monotonic() + 20
            while not sock.exists():
                assert holder.poll() is None and time.monotonic() < deadline, "qemu-nbd did not start"
                time.sleep(0.05)
            with pytest.raises(Conflict, match="in use"):
                restore_snapshot(snapshot, disk)
        finally:
            holder.terminate()
            holder.wait(timeout=20)
        with pytest.raises(HypervisorError):
            run_qemu_tool(["qemu-img", "compare", "-q", str(disk), str(snapshot)])
        scrub_tree([disk, fs / "snapshots"], ScrubMode.ZERO)
    assert scan_for(image, canary) == []


@needs_qemu_img
def test_crypto_erase_makes_an_encrypted_image_unopenable(tmp_path: Path, image: Path, canary: bytes):
    """Encrypted at rest the canary is never on the device; after crypto-erase even the old key opens nothing."""
    key = secrets.token_bytes(32)
    source, plain = tmp_path / "source.raw", tmp_path / "plain.raw"
    _record_file(source, canary, 2 * MIB)
    with mounted(image) as fs:
        disk = fs / "disk0.qcow2"
        create_encrypted_qcow2(disk, 16 * MIB, key, iter_time_ms=100)
        assert is_encrypted_image(disk)
        io = ["qemu-io", *open_args_for_encrypted(disk, KEY_OBJECT_ID)]
        run_qemu_tool([*io, "-c", f"write -s {source} 0 {2 * MIB}"], key=key)

        # With the key the data reads back; without it the image does not open.
        convert = ["qemu-img", "convert", *open_args_for_encrypted(disk, KEY_OBJECT_ID), "-O", "raw", str(plain)]
        run_qemu_tool(convert, key=key)
        assert canary in plain.read_bytes()
        with pytest.raises(HypervisorError):
            run_qemu_tool([*io, "-c", "read 0 512"])

        # A second name keeps the inode alive after the scrub, so the erased image can still be examined.
        witness = fs / "witness.qcow2"
        os.link(disk, witness)
        luks_at = _fde_offset(disk)
        qcow2_metadata = disk.read_bytes()[:luks_at]
        receipt = scrub_file(disk, ScrubMode.CRYPTO)
        assert receipt.mode is ScrubMode.CRYPTO and luks_at < receipt.bytes < witness.stat().st_size

        witness_io = ["qemu-io", *open_args_for_encrypted(witness, KEY_OBJECT_ID), "-c", "read 0 512"]
        with pytest.raises(HypervisorError, match="qcow2"):
            run_qemu_tool(witness_io, key=key)
        # Even with its qcow2 metadata put back, the old key cannot open it: the LUKS keyslots are gone.
        with witness.open("r+b") as fh:
            fh.write(qcow2_metadata)
        with pytest.raises(HypervisorError, match="LUKS"):
            run_qemu_tool(witness_io, key=key)
        assert LUKS_MAGIC not in witness.read_bytes()
    assert scan_for(image, canary) == []
    assert scan_for(image, LUKS_MAGIC) == []


@needs_qemu_img
def test_snapshot_of_an_encrypted_disk_is_encrypted(tmp_path: Path, image: Path, canary: bytes):
    """Snapshot and restore of an encrypted disk keep it encrypted with the same key; no plaintext reaches the disk."""
    key = secrets.token_bytes(32)
    source = tmp_path / "source.raw"
    _record_file(source, canary, MIB)
    with mounted(image) as fs:
        disk = fs / "disk0.qcow2"
        create_encrypted_qcow2(disk, 8 * MIB, key, iter_time_ms=100)
        run_qemu_tool(
            ["qemu-io", *open_args_for_encrypted(disk, KEY_OBJECT_ID), "-c", f"write -s {source} 0 {MIB}"], key=key
        )
        snapshot = snapshot_disk(disk, fs / "snapshots", "s1", key=key, iter_time_ms=100)
        assert is_encrypted_image(snapshot) and oct(snapshot.stat().st_mode & 0o777) == "0o600"
        receipt = restore_snapshot(snapshot, disk, key=key, iter_time_ms=100, mode=ScrubMode.CRYPTO)
        assert receipt is not None and receipt.mode is ScrubMode.CRYPTO
        plain = tmp_path / "plain.raw"
        convert = ["qemu-img", "convert", *open_args_for_encrypted(disk, KEY_OBJECT_ID), "-O", "raw", str(plain)]
        run_qemu_tool(convert, key=key)
        assert plain.read_bytes()[:MIB] == source.read_bytes()
        receipts = scrub_tree([disk, fs / "snapshots"], ScrubMode.CRYPTO)
        assert {r.mode for r in receipts} == {ScrubMode.CRYPTO}
    assert scan_for(image, canary) == []
    assert scan_for(image, LUKS_MAGIC) == []


@needs_qemu_img
def test_crypto_erase_of_a_raw_luks_image(tmp_path: Path):
    """A raw LUKS image (QEMU's luks driver) is crypto-erasable too: afterwards the old key no longer opens it."""
    key = secrets.token_bytes(32)
    disk, witness = tmp_path / "disk0.luks", tmp_path / "witness.luks"
    opts = f"key-secret={KEY_OBJECT_ID},iter-time=100"
    run_qemu_tool(["qemu-img", "create", "-q", "-f", "luks", "-o", opts, str(disk), str(4 * MIB)], key=key)
    assert is_encrypted_image(disk)
    os.link(disk, witness)
    image_opts = f"driver=luks,file.driver=file,file.filename={witness},key-secret={KEY_OBJECT_ID}"
    read = ["qemu-io", "--image-opts", image_opts, "-c", "read 0 512"]
    run_qemu_tool(read, key=key)
    receipt = scrub_file(disk, ScrubMode.CRYPTO)
    assert receipt.mode is ScrubMode.CRYPTO and receipt.bytes < witness.stat().st_size
    with pytest.raises(HypervisorError, match="LUKS"):
        run_qemu_tool(read, key=key)


@needs_qemu_img
def test_crypto_scrub_of_a_tree_erases_only_images_by_name(tmp_path: Path):
    """A file that merely starts like an encrypted image (a guest writes the start of its console log) is zeroed
    whole; only an encrypted file named as an image is crypto-erased."""
    key = secrets.token_bytes(32)
    vm_dir = tmp_path / "vm"
    vm_dir.mkdir()
    create_encrypted_qcow2(vm_dir / "disk0.qcow2", 4 * MIB, key, iter_time_ms=10)
    create_encrypted_qcow2(vm_dir / "console.log", 4 * MIB, key, iter_time_ms=10)
    size = (vm_dir / "console.log").stat().st_size
    receipts = {r.path.name: r for r in scrub_tree([vm_dir], ScrubMode.CRYPTO)}
    assert receipts["disk0.qcow2"].mode is ScrubMode.CRYPTO
    assert (receipts["console.log"].mode, receipts["console.log"].bytes) == (ScrubMode.ZERO, size)


def _fde_offset(path: Path) -> int:
    """File offset of the LUKS header inside an encrypted qcow2 (its full-disk-encryption header extension)."""
    head = path.read_bytes()[: 64 << 10]
    offset = struct.unpack_from(">I", head, 100)[0]
    while True:
        kind, length = struct.unpack_from(">II", head, offset)
        if kind == 0x0537BE77:
            return int(struct.unpack_from(">Q", head, offset + 8)[0])
        assert kind != 0, "no encryption header extension"
        offset += 8 + -(-length // 8) * 8
