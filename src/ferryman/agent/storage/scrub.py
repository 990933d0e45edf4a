"""Scrubbing: destroy the data of every artefact a VM leaves on a host, prove it, and say so in a receipt.

Deleting a file frees its blocks with the data still in them; design invariant 5 ("nothing left behind") needs the
blocks themselves overwritten. :func:`scrub_file` overwrites a file *in place* (the same blocks, never truncate then
write), over its whole length (holes of a sparse file are filled too, so they need free space), in chunks of a few
MiB so any size works; then it fsyncs, reads back random samples and checks they hold what was written, and only
then unlinks the file and fsyncs its directory. The result is a :class:`ScrubReceipt` for the audit log.

Modes (:class:`ScrubMode`):

``zero``
    Zeros. The fastest; good for disks that overwrite in place.
``random``
    The AES-256-CTR keystream of a fresh key per scrub (:mod:`.keystream`): storage that compresses or deduplicates
    cannot shortcut it, and verification recomputes the expected bytes from the key.
``crypto``
    Crypto-erase of an image created LUKS-encrypted (:func:`~.images.create_encrypted_qcow2`) with a key the controller
    holds. The caller destroys the key; this module overwrites the image's qcow2 header and its whole LUKS header,
    keyslots included, with keystream. The master key existed only wrapped in those keyslots, so afterwards the data
    clusters are ciphertext under a key that exists nowhere, and not even the old passphrase opens the image. The
    data area is deliberately not overwritten (that is what makes crypto-erase fast); scrub with ``zero`` instead to
    overwrite it as well. :func:`scrub_tree` in ``crypto`` mode crypto-erases encrypted images and zeroes every other
    artefact (console log, spec, temp files); each receipt names the mode actually applied.

Writes use ``O_DIRECT`` so the page cache cannot make a write look done, and verification reads bypass it the same
way. Where the filesystem refuses ``O_DIRECT`` the scrub falls back to buffered writes, fsync, and dropping the cached
pages before reading back.

What an in-place overwrite cannot reach, and what to do instead: copy-on-write filesystems (btrfs, ZFS, XFS files
sharing reflinked extents) write new blocks instead of overwriting (a warning is logged when detected); SSDs and thin
provisioning remap blocks below the filesystem; ext4 with ``data=journal`` keeps data in the journal. On such storage
only ``crypto`` mode is sound, which is why offline images are encrypted at rest.

This module never follows symbolic links (a planted link must not redirect the overwrite; links, sockets and FIFOs
are only unlinked, with a receipt of 0 bytes), never unlinks a file whose verification failed (it stays in place for
a retry), and does not decide which files belong to a VM: the caller names them. It blocks; async callers use
``asyncio.to_thread``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import hashlib
import mmap
import os
import random
import stat
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import structlog

from ferryman.agent.storage.images import encrypted_header_end, is_encrypted_image
from ferryman.agent.storage.keystream import Keystream
from ferryman.core.clock import Clock, SystemClock
from ferryman.core.errors import InvalidInput, PermanentError
from ferryman.durable import fsync_directory

__all__ = [
    "ALIGN",
    "CHUNK_BYTES",
    "IMAGE_SUFFIXES",
    "QUEUE_DEPTH",
    "SAMPLE_BYTES",
    "ScrubError",
    "ScrubMode",
    "ScrubReceipt",
    "Writer",
    "filesystem_type",
    "sample_offsets",
    "scrub_file",
    "scrub_tree",
]

log = structlog.get_logger(__name__)

CHUNK_BYTES = 4 << 20
QUEUE_DEPTH = 2
# O_DIRECT needs offsets, lengths and buffers aligned to the device's logical block; 4096 covers every common device.
ALIGN = 4096
SAMPLE_BYTES = ALIGN
_COW_FILESYSTEMS = frozenset({"btrfs", "zfs", "bcachefs"})

Writer = Callable[[int, memoryview, int], int]
"""Writes a buffer at an offset of an open file and returns how many bytes it wrote; ``os.pwrite`` by default."""


class ScrubMode(StrEnum):
    """How the blocks of an artefact are destroyed."""

    ZERO = "zero"
    RANDOM = "random"
    CRYPTO = "crypto"


class ScrubError(PermanentError):
    """An artefact could not be scrubbed; it was left in place. ``receipts`` are the artefacts that were scrubbed."""

    def __init__(self, message: str, receipts: Sequence[ScrubReceipt] = ()) -> None:
        super().__init__(message)
        self.receipts = tuple(receipts)


@dataclass(frozen=True)
class ScrubReceipt:
    """Proof that one artefact was overwritten, verified and unlinked.

    ``bytes`` is how many bytes were overwritten (the file's length; the header region in crypto mode; 0 for a
    link, socket or FIFO). ``sample_hash`` is the SHA-256 of the bytes read back during verification.
    """

    path: Path
    bytes: int
    mode: ScrubMode
    duration_s: float
    verified_samples: int
    sample_hash: str
    started_at: dt.datetime
    finished_at: dt.datetime

    def to_audit(self) -> dict[str, Any]:
        """The receipt as a JSON-ready mapping for the audit log."""
        return {
            "path": str(self.path),
            "bytes": self.bytes,
            "mode": self.mode.value,
            "duration_s": round(self.duration_s, 6),
            "verified_samples": self.verified_samples,
            "sample_hash": self.sample_hash,
            "started_at": self.started_at.isoformat(),
            "finished_at": self.finished_at.isoformat(),
        }


# -- scrubbing ------------------------------------------------------------------------------------------------------


def scrub_file(
    path: Path,
    mode: ScrubMode,
    *,
    sample_count: int = 16,
    clock: Clock | None = None,
    writer: Writer = os.pwrite,
) -> ScrubReceipt:
    """Overwrite ``path`` in place, verify ``sample_count`` samples, unlink it; return the receipt.

    No process may write the file meanwhile (its QEMU is gone); a size change is detected, other writes are not.
    A symbolic link, socket or FIFO is only unlinked (0 bytes). Raises :class:`ScrubError` if the file is missing,
    is a directory, cannot be written, changed size meanwhile (a process still writes it), fails verification, or
    (``crypto`` mode) is not a LUKS-encrypted image; in every case the file is left where it was. ``writer`` exists
    for tests that must prove verification catches a write that did not happen.
    """
    if sample_count < 1:
        raise InvalidInput(f"sample_count must be >= 1, got {sample_count}")
    clock = clock or SystemClock()
    started_at, t0 = clock.now(), time.perf_counter()
    try:
        info = path.lstat()
    except OSError as err:
        raise ScrubError(f"cannot scrub {path}: {err.strerror or err}") from err
    if stat.S_ISDIR(info.st_mode):
        raise ScrubError(f"cannot scrub {path}: it is a directory (use scrub_tree)")
    if not stat.S_ISREG(info.st_mode):
        _unlink(path)
        return _receipt(path, 0, mode, t0, [], started_at, clock)
    try:
        written, samples = _scrub_regular(path, info, mode, sample_count, writer)
    except OSError as err:
        raise ScrubError(f"cannot scrub {path}: {err.strerror or err}") from err
    _unlink(path)
    receipt = _receipt(path, written, mode, t0, samples, started_at, clock)
    log.info(
        "artefact scrubbed",
        path=str(path),
        mode=mode.value,
        bytes=written,
        seconds=round(receipt.duration_s, 3),
        samples=len(samples),
    )
    return receipt


def scrub_tree(
    paths: Iterable[Path], mode: ScrubMode, *, sample_count: int = 16, clock: Clock | None = None
) -> list[ScrubReceipt]:
    """Scrub every artefact named (files, links, sockets; directories recursively, then removed); return receipts.

    Paths that do not exist are skipped, so a scrub interrupted by a crash can simply be run again. In ``crypto``
    mode, artefacts that are not encrypted images are zeroed. Every artefact is attempted even when one fails; then
    :class:`ScrubError` lists the failures and carries the receipts of the rest.
    """
    receipts: list[ScrubReceipt] = []
    failures: list[str] = []
    for root in paths:
        directories: list[Path] = []
        try:
            for target, is_dir in _walk(root):
                if is_dir:
                    directories.append(target)
                    continue
                try:
                    receipts.append(scrub_file(target, _mode_for(target, mode), sample_count=sample_count, clock=clock))
                except ScrubError as err:
                    failures.append(err.message)
        except ScrubError as err:
            failures.append(err.message)
        for directory in directories:
            try:
                directory.rmdir()
                fsync_directory(directory.parent)
            except OSError as err:
                failures.append(f"cannot remove directory {directory}: {err.strerror or err}")
    if failures:
        log.error("scrub incomplete", failed=len(failures), scrubbed=len(receipts), first=failures[0])
        raise ScrubError(f"{len(failures)} artefact(s) not scrubbed: " + "; ".join(failures), receipts)
    return receipts


def _walk(root: Path) -> Iterator[tuple[Path, bool]]:
    """``(path, is_dir)`` for ``root`` and everything below it, children before their directory; no links followed."""
    try:
        info = root.lstat()
    except FileNotFoundError:
        log.warning("scrub target already gone", path=str(root))
        return
    except OSError as err:
        raise ScrubError(f"cannot scrub {root}: {err.strerror or err}") from err
    if stat.S_ISDIR(info.st_mode):
        try:
            children = sorted(root.iterdir())
        except OSError as err:
            raise ScrubError(f"cannot list {root}: {err.strerror or err}") from err
        for child in children:
            yield from _walk(child)
        yield root, True
    else:
        yield root, False


IMAGE_SUFFIXES = frozenset({".qcow2", ".luks"})
"""Only files named as images (``disk0.qcow2``, ``.disk0.qcow2.replaced.partial``) are crypto-erased by
:func:`scrub_tree`: a header alone proves nothing, since a guest writes the start of a fresh console log and could
make it look like a LUKS header."""


def _mode_for(path: Path, mode: ScrubMode) -> ScrubMode:
    if mode is not ScrubMode.CRYPTO:
        return mode
    image = bool(IMAGE_SUFFIXES & set(path.suffixes)) and path.is_file() and not path.is_symlink()
    return ScrubMode.CRYPTO if image and is_encrypted_image(path) else ScrubMode.ZERO


def _scrub_regular(
    path: Path, info: os.stat_result, mode: ScrubMode, sample_count: int, writer: Writer
) -> tuple[int, list[bytes]]:
    """Overwrite and verify an open regular file; returns (bytes overwritten, samples read back)."""
    fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        opened = os.fstat(fd)
        if (opened.st_dev, opened.st_ino) != (info.st_dev, info.st_ino) or not stat.S_ISREG(opened.st_mode):
            raise ScrubError(f"cannot scrub {path}: it was replaced while being opened")
        _warn_if_copy_on_write(path, opened.st_dev)
        end: int | None = opened.st_size
        if mode is ScrubMode.CRYPTO:
            end = encrypted_header_end(fd, opened.st_size)
        if end is None:
            raise ScrubError(
                f"cannot crypto-erase {path}: it is not a LUKS-encrypted image; scrub it with zero or random"
            )
        stream = None if mode is ScrubMode.ZERO else Keystream.random()
        direct = _overwrite(path, fd, end, stream, writer)
        os.fsync(fd)
        if os.fstat(fd).st_size != opened.st_size:
            raise ScrubError(f"{path} changed size during the scrub: a process still writes it")
        samples = _verify(path, fd, end, stream, sample_count, direct)
    finally:
        os.close(fd)
    return end, samples


def _overwrite(path: Path, fd: int, end: int, stream: Keystream | None, writer: Writer) -> bool:
    """Write the pattern over ``[0, end)``: the aligned body with O_DIRECT if allowed, the unaligned tail buffered.

    O_DIRECT is switched on the descriptor already open (``F_SETFL``) rather than by opening the path again, which
    could reach a different file. Returns whether O_DIRECT was used; a filesystem that accepts the flag but refuses
    the writes (EINVAL) gets the whole range again, buffered.
    """
    body = end - end % ALIGN
    direct = body > 0 and _set_direct(path, fd, True)
    start = 0
    if direct:
        try:
            _write_range(fd, 0, body, stream, writer)
            start = body
        except OSError as err:
            if err.errno != errno.EINVAL:
                raise
            log.debug("O_DIRECT write refused; writing buffered", path=str(path))
            direct = False
        finally:
            _set_direct(path, fd, False)
    _write_range(fd, start, end, stream, writer)
    return direct


def _write_range(fd: int, start: int, end: int, stream: Keystream | None, writer: Writer) -> None:
    """Write the pattern over ``[start, end)`` of ``fd`` with up to ``QUEUE_DEPTH`` writes in flight.

    Several writes in flight keep the device busy where one synchronous O_DIRECT write at a time leaves it idle
    between requests; keystream generation for the next chunk overlaps the writes. Zero mode shares one read-only
    buffer; random mode has one buffer more than the queue depth, and a buffer is refilled only after its write
    completed. Buffers are anonymous mappings, page-aligned as O_DIRECT requires.
    """
    if start >= end:
        return
    size = min(CHUNK_BYTES, end - start)
    zeros = memoryview(_aligned(size) if stream is None else b"")
    buffers = [] if stream is None else [memoryview(_aligned(size)) for _ in range(QUEUE_DEPTH + 1)]
    inflight: deque[Future[None]] = deque()
    with ThreadPoolExecutor(max_workers=QUEUE_DEPTH, thread_name_prefix="scrub-write") as pool:
        try:
            for index, offset in enumerate(range(start, end, size)):
                length = min(size, end - offset)
                if stream is None:
                    chunk = zeros[:length]
                else:
                    chunk = buffers[index % len(buffers)][:length]
                    stream.fill(offset, chunk)
                while len(inflight) >= QUEUE_DEPTH:
                    inflight.popleft().result()
                inflight.append(pool.submit(_write_all, fd, chunk, offset, writer))
            while inflight:
                inflight.popleft().result()
        finally:
            wait(inflight)  # on an error, no write may still run once the caller closes the descriptor


def _write_all(fd: int, data: memoryview, offset: int, writer: Writer) -> None:
    while data:
        written = writer(fd, data, offset)
        if written <= 0:
            raise OSError(errno.EIO, f"write at offset {offset} made no progress")
        data, offset = data[written:], offset + written


def _verify(path: Path, fd: int, end: int, stream: Keystream | None, sample_count: int, direct: bool) -> list[bytes]:
    """Read back samples of ``[0, end)`` past the page cache and compare with the pattern; returns them."""
    if not (direct and _set_direct(path, fd, True)):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    view = memoryview(_aligned(SAMPLE_BYTES))
    samples = []
    for offset in sample_offsets(end, sample_count, random.SystemRandom()):
        length = min(SAMPLE_BYTES, end - offset)
        got = os.preadv(fd, [view], offset)
        sample = bytes(view[: min(got, length)])
        expected = bytes(length) if stream is None else stream.read(offset, length)
        if sample != expected:
            raise ScrubError(
                f"verification of {path} failed at offset {offset}: the device does not hold what was written;"
                " the file is left in place"
            )
        samples.append(sample)
    return samples


def sample_offsets(end: int, count: int, rng: random.Random) -> list[int]:
    """Sorted offsets of ``count`` sample blocks in ``[0, end)``: the first and last block always, the rest random.

    The first block holds image headers and the last one the tail a short write would miss; all blocks are sampled
    when there are no more than ``count``.
    """
    blocks = -(-end // SAMPLE_BYTES)
    if blocks <= count:
        chosen = set(range(blocks))
    else:
        chosen = {0, blocks - 1} if count >= 2 else {0}
        chosen.update(rng.sample(range(1, blocks - 1), count - len(chosen)))
    return [block * SAMPLE_BYTES for block in sorted(chosen)]


def _receipt(
    path: Path,
    written: int,
    mode: ScrubMode,
    t0: float,
    samples: list[bytes],
    started_at: dt.datetime,
    clock: Clock,
) -> ScrubReceipt:
    digest = hashlib.sha256()
    for sample in samples:
        digest.update(sample)
    return ScrubReceipt(
        path=path,
        bytes=written,
        mode=mode,
        duration_s=time.perf_counter() - t0,
        verified_samples=len(samples),
        sample_hash=digest.hexdigest(),
        started_at=started_at,
        finished_at=clock.now(),
    )


def _set_direct(path: Path, fd: int, on: bool) -> bool:
    """Switch O_DIRECT on or off for ``fd``; False where the filesystem refuses it (tmpfs before Linux 6.6)."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT if on else flags & ~os.O_DIRECT)
    except OSError as err:
        if err.errno != errno.EINVAL:
            raise
        log.debug("O_DIRECT refused; using buffered I/O with fsync and cache drop", path=str(path))
        return False
    return True


def _aligned(size: int) -> mmap.mmap:
    """A zero-filled, page-aligned buffer, as O_DIRECT requires."""
    return mmap.mmap(-1, -(-size // ALIGN) * ALIGN)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
        fsync_directory(path.parent)
    except OSError as err:
        raise ScrubError(f"overwrote {path} but cannot unlink it: {err.strerror or err}") from err


def _warn_if_copy_on_write(path: Path, st_dev: int) -> None:
    fstype = filesystem_type(st_dev)
    if fstype in _COW_FILESYSTEMS:
        log.warning(
            "overwrite on a copy-on-write filesystem does not reach the old blocks; use encrypted images and crypto",
            path=str(path),
            filesystem=fstype,
        )


def filesystem_type(st_dev: int) -> str | None:
    """The type of the mounted filesystem with device number ``st_dev`` (from /proc/self/mountinfo), if found."""
    wanted = f"{os.major(st_dev)}:{os.minor(st_dev)}"
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            fields = line.split()
            if len(fields) > 3 and fields[2] == wanted and " - " in line:
                return line.split(" - ", 1)[1].split()[0]
    return None
