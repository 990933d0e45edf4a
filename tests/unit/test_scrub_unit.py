"""Scrubber and snapshot bookkeeping on the local filesystem: keystream, receipts, verification, non-regular files."""

from __future__ import annotations

import datetime as dt
import hashlib
import mmap
import os
import random
import socket
import subprocess
import time
import zlib
from pathlib import Path

import pytest

from ferryman.agent.storage import (
    Keystream,
    ScrubError,
    ScrubMode,
    is_encrypted_image,
    list_snapshots,
    prune,
    prune_and_scrub,
    scrub_file,
    scrub_tree,
    snapshot_disk,
)
from ferryman.agent.storage.scrub import CHUNK_BYTES, SAMPLE_BYTES, sample_offsets
from ferryman.core.errors import InvalidInput
from ferryman.testing.clock import FakeClock

T0 = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC)
CANARY = b"FMCANARY-unit-5f3a9c"


def _canary_file(path: Path, size: int) -> bytes:
    data = (CANARY * (size // len(CANARY) + 1))[:size]
    path.write_bytes(data)
    return data


# -- keystream ------------------------------------------------------------------------------------------------------


def test_keystream_is_deterministic_per_key_and_offset():
    """The same key gives the same bytes at any offset, whether read in one piece or from the middle."""
    key = bytes(range(32))
    whole = Keystream(key).read(0, 70_000)
    again = Keystream(key)
    for offset in (0, 1, 15, 16, 17, 4095, 4096, 65_537):
        for length in (1, 16, 33, 4096):
            assert again.read(offset, length) == whole[offset : offset + length], (offset, length)
    assert Keystream(bytes(32)).read(0, 4096) != whole[:4096]


def test_keystream_fill_matches_read_in_aligned_buffer():
    """fill() into a page-aligned buffer gives the same bytes as read(), including past the first MiB."""
    stream = Keystream.random()
    buf = mmap.mmap(-1, 3 << 20)
    view = memoryview(buf)
    stream.fill(1 << 20, view)
    assert bytes(view[-4096:]) == stream.read((1 << 20) + (3 << 20) - 4096, 4096)
    assert bytes(view[:64]) == stream.read(1 << 20, 64)


def test_keystream_is_not_compressible_and_rejects_bad_keys():
    """The pattern does not compress (storage cannot shortcut it); a key of the wrong size is refused."""
    data = Keystream.random().read(0, 1 << 20)
    assert len(zlib.compress(data)) > len(data) * 0.99
    with pytest.raises(InvalidInput):
        Keystream(b"short")


def test_keystream_is_fast():
    """The keystream is generated at well over 1 GiB/s (a cipher, not os.urandom per block)."""
    stream = Keystream.random()
    view = memoryview(mmap.mmap(-1, 8 << 20))
    stream.fill(0, view)
    start = time.perf_counter()
    for index in range(16):
        stream.fill(index * (8 << 20), view)
    rate = 128 / (time.perf_counter() - start)
    assert rate > 1024, f"keystream at {rate:.0f} MiB/s"


# -- receipts and in-place overwrite --------------------------------------------------------------------------------


def test_zero_receipt_fields(tmp_path: Path):
    """A zero scrub's receipt has the size, mode, clock times, sample count and the hash of the zeros read back."""
    path = tmp_path / "disk0.qcow2"
    _canary_file(path, 1 << 20)
    clock = FakeClock(T0)
    receipt = scrub_file(path, ScrubMode.ZERO, sample_count=16, clock=clock)
    assert receipt.path == path
    assert receipt.bytes == 1 << 20
    assert receipt.mode is ScrubMode.ZERO
    assert receipt.verified_samples == 16
    assert receipt.sample_hash == hashlib.sha256(bytes(16 * SAMPLE_BYTES)).hexdigest()
    assert receipt.started_at == receipt.finished_at == T0
    assert receipt.duration_s > 0
    assert not path.exists()
    audit = receipt.to_audit()
    assert audit["mode"] == "zero" and audit["bytes"] == 1 << 20 and audit["started_at"] == T0.isoformat()


def test_overwrite_is_in_place_and_covers_the_whole_length(tmp_path: Path):
    """A hard link to the scrubbed inode sees every byte replaced at the same size: no truncate-and-rewrite."""
    size = 2 * CHUNK_BYTES + 12_345  # several chunks and an unaligned tail
    for mode in (ScrubMode.ZERO, ScrubMode.RANDOM):
        path, witness = tmp_path / f"{mode}.img", tmp_path / f"{mode}.witness"
        _canary_file(path, size)
        os.link(path, witness)
        inode = path.stat().st_ino
        receipt = scrub_file(path, mode)
        data = witness.read_bytes()
        assert witness.stat().st_ino == inode and len(data) == size == receipt.bytes
        assert CANARY not in data
        if mode is ScrubMode.ZERO:
            assert data == bytes(size)
        else:
            assert data.count(0) < size // 128
            assert receipt.sample_hash != hashlib.sha256(bytes(receipt.verified_samples * SAMPLE_BYTES)).hexdigest()


def test_sparse_file_holes_are_overwritten(tmp_path: Path):
    """Every byte of a sparse file's length is written: afterwards its blocks cover its whole size."""
    path, witness = tmp_path / "sparse.img", tmp_path / "sparse.witness"
    with path.open("wb") as fh:
        fh.write(CANARY)
        fh.seek(8 << 20)
        fh.write(CANARY)
    os.link(path, witness)
    assert witness.stat().st_blocks * 512 < 1 << 20
    scrub_file(path, ScrubMode.ZERO)
    assert witness.stat().st_blocks * 512 >= witness.stat().st_size


def test_empty_file_gets_a_receipt(tmp_path: Path):
    """An empty file is unlinked with a 0-byte receipt and no samples."""
    path = tmp_path / "empty"
    path.touch()
    receipt = scrub_file(path, ScrubMode.RANDOM)
    assert (receipt.bytes, receipt.verified_samples) == (0, 0)
    assert receipt.sample_hash == hashlib.sha256(b"").hexdigest()
    assert not path.exists()


def test_random_samples_match_recomputed_keystream(tmp_path: Path):
    """Random mode verifies and hashes samples that differ between two scrubs of identical files (fresh key each)."""
    hashes = set()
    for name in ("a", "b"):
        _canary_file(tmp_path / name, 256 << 10)
        hashes.add(scrub_file(tmp_path / name, ScrubMode.RANDOM).sample_hash)
    assert len(hashes) == 2


# -- verification catches writes that did not happen ----------------------------------------------------------------


def test_verification_detects_a_write_that_did_not_happen(tmp_path: Path):
    """A writer that reports success without writing makes the scrub fail, and the file stays for a retry."""
    path = tmp_path / "disk0.qcow2"
    original = _canary_file(path, 3 << 20)

    def liar(fd: int, data: memoryview, offset: int) -> int:
        return len(data)

    for mode in (ScrubMode.ZERO, ScrubMode.RANDOM):
        with pytest.raises(ScrubError, match="verification"):
            scrub_file(path, mode, writer=liar)
        assert path.read_bytes() == original


def test_verification_detects_a_skipped_tail(tmp_path: Path):
    """A writer that silently drops only the last chunk is caught: the last block is always sampled."""
    path = tmp_path / "disk0.qcow2"
    size = 3 * CHUNK_BYTES
    _canary_file(path, size)

    def drops_last_chunk(fd: int, data: memoryview, offset: int) -> int:
        if offset >= size - CHUNK_BYTES:
            return len(data)
        return os.pwrite(fd, data, offset)

    with pytest.raises(ScrubError, match="verification"):
        scrub_file(path, ScrubMode.ZERO, writer=drops_last_chunk, sample_count=2)
    assert path.exists() and CANARY in path.read_bytes()[-CHUNK_BYTES:]


def test_short_writes_are_completed(tmp_path: Path):
    """A writer that writes at most 1000 bytes per call still gets the whole file overwritten."""
    path, witness = tmp_path / "f", tmp_path / "w"
    _canary_file(path, 100_000)
    os.link(path, witness)

    def short(fd: int, data: memoryview, offset: int) -> int:
        return os.pwrite(fd, data[:1000], offset)

    scrub_file(path, ScrubMode.ZERO, writer=short)
    assert witness.read_bytes() == bytes(100_000)


def test_sample_offsets_pin_first_and_last_block():
    """Samples are sorted, distinct, include the first and last block, and cover all blocks of a small file."""
    rng = random.Random(7)
    offsets = sample_offsets(1000 * SAMPLE_BYTES + 5, 16, rng)
    assert len(offsets) == 16 == len(set(offsets))
    assert offsets == sorted(offsets)
    assert offsets[0] == 0 and offsets[-1] == 1000 * SAMPLE_BYTES
    assert sample_offsets(3 * SAMPLE_BYTES, 16, rng) == [0, SAMPLE_BYTES, 2 * SAMPLE_BYTES]
    assert sample_offsets(0, 16, rng) == []


# -- what is not a plain file ---------------------------------------------------------------------------------------


def test_symlink_is_unlinked_and_its_target_untouched(tmp_path: Path):
    """A planted symbolic link is removed with a 0-byte receipt; the file it points to is not overwritten."""
    victim = tmp_path / "victim"
    original = _canary_file(victim, 10_000)
    link = tmp_path / "console.log"
    link.symlink_to(victim)
    receipt = scrub_file(link, ScrubMode.ZERO)
    assert receipt.bytes == 0 and receipt.verified_samples == 0
    assert not os.path.lexists(link)
    assert victim.read_bytes() == original


def test_socket_and_fifo_are_unlinked_without_blocking(tmp_path: Path):
    """A UNIX socket and a FIFO (QMP socket, NBD endpoint) are unlinked with 0-byte receipts."""
    sock_path, fifo = tmp_path / "qmp.sock", tmp_path / "pipe"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(sock_path))
    os.mkfifo(fifo)
    receipts = scrub_tree([sock_path, fifo], ScrubMode.RANDOM)
    assert [r.bytes for r in receipts] == [0, 0]
    assert not os.path.lexists(sock_path) and not os.path.lexists(fifo)


def test_crypto_mode_refuses_a_plaintext_file(tmp_path: Path):
    """Crypto-erase of a file that is not an encrypted image fails and leaves the file in place."""
    path = tmp_path / "spec.json"
    _canary_file(path, 5000)
    assert not is_encrypted_image(path)
    with pytest.raises(ScrubError, match="not a LUKS-encrypted image"):
        scrub_file(path, ScrubMode.CRYPTO)
    assert path.exists()


def test_scrub_tree_walks_directories_and_is_rerunnable(tmp_path: Path):
    """A VM directory is scrubbed file by file and removed; crypto mode zeroes plaintext files; a rerun is a no-op."""
    vm_dir = tmp_path / "vms" / "0b7e7d4e-3c1a-4b9a-9d43-7f3f0c2d9a11"
    (vm_dir / "snapshots").mkdir(parents=True)
    for name in ("disk0.qcow2", "spec.json", "console.log", "snapshots/disk0.x.qcow2"):
        _canary_file(vm_dir / name, 70_000)
    receipts = scrub_tree([vm_dir, tmp_path / "missing"], ScrubMode.CRYPTO, clock=FakeClock(T0))
    assert sorted(r.path.name for r in receipts) == ["console.log", "disk0.qcow2", "disk0.x.qcow2", "spec.json"]
    assert {r.mode for r in receipts} == {ScrubMode.ZERO}
    assert not vm_dir.exists()
    assert scrub_tree([vm_dir], ScrubMode.ZERO) == []


def test_scrub_tree_continues_past_a_failure_and_reports_it(tmp_path: Path):
    """An immutable file fails, the others are still scrubbed, and the error carries their receipts."""
    good, stuck = tmp_path / "good", tmp_path / "stuck"
    _canary_file(good, 10_000)
    _canary_file(stuck, 10_000)
    if subprocess.run(["chattr", "+i", str(stuck)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not supported here")
    try:
        with pytest.raises(ScrubError) as info:
            scrub_tree([stuck, good], ScrubMode.ZERO)
        assert [r.path for r in info.value.receipts] == [good]
        assert str(stuck) in info.value.message
        assert stuck.exists() and not good.exists()
    finally:
        subprocess.run(["chattr", "-i", str(stuck)], check=True)


# -- snapshot bookkeeping -------------------------------------------------------------------------------------------


def _fake_snapshot(directory: Path, disk: str, minute: int, tag: str) -> Path:
    path = directory / f"{disk}.20261123T12{minute:02d}00.000000Z.{tag}.qcow2"
    _canary_file(path, 9000)
    return path


def test_prune_names_old_snapshots_per_disk_and_deletes_nothing(tmp_path: Path):
    """prune keeps the newest N of each disk, returns the rest, and leaves every file in place."""
    old0, mid0, new0 = (_fake_snapshot(tmp_path, "disk0", m, "t") for m in (1, 2, 3))
    old1, new1 = (_fake_snapshot(tmp_path, "disk1", m, "t") for m in (1, 4))
    (tmp_path / ".disk0.20261123T120500.000000Z.t.qcow2.partial").write_bytes(CANARY)
    infos = list_snapshots(tmp_path)
    assert [i.path for i in infos] == [old0, old1, mid0, new0, new1]
    assert infos[0].taken_at == dt.datetime(2026, 11, 23, 12, 1, tzinfo=dt.UTC) and infos[0].tag == "t"
    assert prune(tmp_path, keep=1) == sorted([old0, mid0, old1])
    assert all(p.exists() for p in (old0, mid0, new0, old1, new1))
    assert prune(tmp_path, keep=5) == []


def test_prune_and_scrub_returns_receipts_for_what_it_removed(tmp_path: Path):
    """prune_and_scrub scrubs exactly the snapshots prune names and returns one receipt each."""
    old, new = (_fake_snapshot(tmp_path, "disk0", m, "t") for m in (1, 2))
    receipts = prune_and_scrub(tmp_path, keep=1, mode=ScrubMode.RANDOM)
    assert [r.path for r in receipts] == [old] and receipts[0].bytes == 9000
    assert not old.exists() and new.exists()


def test_snapshot_tag_is_validated(tmp_path: Path):
    """A tag that could escape the naming scheme is refused before anything runs."""
    disk = tmp_path / "disk0.qcow2"
    disk.write_bytes(b"")
    for tag in ("", "../x", "a.b", "x" * 65):
        with pytest.raises(InvalidInput):
            snapshot_disk(disk, tmp_path / "snaps", tag)
    with pytest.raises(InvalidInput):
        prune(tmp_path, keep=-1)
