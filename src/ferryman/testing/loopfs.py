"""A real filesystem on a loop device, and a scan of its raw bytes: how tests prove data is gone from the disk.

:func:`loop_mount` makes an image file, puts a filesystem on it (ext4 by default), attaches it with ``losetup``,
mounts it, and on exit unmounts, detaches and removes the mount point (the image stays for :func:`scan_for` unless
asked to go). The filesystem is mounted without online discard, so a freed block keeps its bytes exactly as a
filesystem on a real disk does: a file merely unlinked is still found by the scan.

Needs root and util-linux. Every wait has a bound; nothing is left attached or mounted when the context exits, even
when the body raised.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_TIMEOUT = 60.0
_UMOUNT_ATTEMPTS = 10
_UMOUNT_PAUSE = 0.2
_SCAN_CHUNK = 4 << 20


class LoopFsError(RuntimeError):
    """Setting up or tearing down the loop filesystem failed."""


@contextmanager
def loop_mount(
    image: Path,
    *,
    size_mib: int = 64,
    fstype: str = "ext4",
    mkfs_args: tuple[str, ...] = ("-q", "-F", "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0"),
    remove_image: bool = False,
) -> Iterator[Path]:
    """Create ``image`` (``size_mib`` MiB) with a fresh ``fstype`` filesystem, loop-mount it, yield the mount point.

    On exit: unmount (retrying a bounded number of times while busy), detach the loop device, remove the mount
    point, and remove ``image`` only if ``remove_image``.
    """
    if image.exists():
        raise LoopFsError(f"{image} already exists; loop_mount creates its own image")
    with image.open("wb") as fh:
        fh.truncate(size_mib << 20)
    try:
        _run("mkfs." + fstype, *mkfs_args, str(image))
        device = _run("losetup", "--find", "--show", str(image)).strip()
        try:
            mount_point = Path(tempfile.mkdtemp(prefix="ferryman-loopfs-"))
            try:
                options = "nodiscard" if fstype == "ext4" else "defaults"
                _run("mount", "-t", fstype, "-o", options, device, str(mount_point))
                try:
                    yield mount_point
                finally:
                    _umount(mount_point)
            finally:
                mount_point.rmdir()
        finally:
            _run("losetup", "--detach", device)
    finally:
        if remove_image:
            image.unlink(missing_ok=True)


def scan_for(image_path: Path, needle: bytes) -> list[int]:
    """Offsets of every occurrence of ``needle`` in the raw bytes of ``image_path``, read in chunks.

    Consecutive chunks overlap by ``len(needle) - 1`` bytes, so a match that straddles a chunk boundary is found
    once, and the file may be larger than memory.
    """
    if not needle:
        raise ValueError("scan_for needs a non-empty needle")
    overlap = len(needle) - 1
    found: list[int] = []
    base = 0  # file offset of carry[0]
    carry = b""
    with image_path.open("rb", buffering=0) as fh:
        while chunk := fh.read(_SCAN_CHUNK):
            window = carry + chunk
            at = window.find(needle)
            while at != -1:
                found.append(base + at)
                at = window.find(needle, at + 1)
            keep = min(overlap, len(window))
            # The carried tail is shorter than the needle, so no match found here lies inside it: none is counted twice.
            carry = window[len(window) - keep :] if keep else b""
            base += len(window) - len(carry)
    return found


def _umount(mount_point: Path) -> None:
    os.sync()
    last = ""
    for _ in range(_UMOUNT_ATTEMPTS):
        done = subprocess.run(["umount", str(mount_point)], capture_output=True, text=True, timeout=_TIMEOUT)
        if done.returncode == 0:
            return
        last = done.stderr.strip()
        if "busy" not in last:
            break
        time.sleep(_UMOUNT_PAUSE)
    # Still busy: detach it from the tree anyway so the loop device can be released, then report the failure.
    subprocess.run(["umount", "--lazy", str(mount_point)], capture_output=True, timeout=_TIMEOUT)
    raise LoopFsError(f"cannot unmount {mount_point}: {last}")


def _run(*argv: str) -> str:
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise LoopFsError(f"{argv[0]} failed: {err}") from err
    if done.returncode != 0:
        raise LoopFsError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout
