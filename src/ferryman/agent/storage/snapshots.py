"""External, point-in-time disk snapshots made with ``qemu-img``, and their removal through the scrubber only.

A snapshot is a standalone qcow2 copy of one disk, ``<dest_dir>/<disk stem>.<UTC stamp>.<tag>.qcow2``, made by
``qemu-img convert -U`` (``-U`` because a paused QEMU still holds the image lock). That is a consistent copy only
while nothing writes the disk: the VM is stopped, or paused (QEMU flushes its block layer when it pauses). A
*running* VM's snapshot is taken inside its QEMU with QMP ``blockdev-backup``
(:func:`ferryman.agent.hypervisor.backup.live_snapshot`), into the paths :func:`snapshot_paths` names; this module
does not talk to QEMU.

Snapshots of an encrypted disk (``key`` given) are encrypted with the same key: an offline copy is never plaintext.

No snapshot file is ever unlinked here without being scrubbed: :func:`prune` only names the files to drop (the
caller scrubs them and records the receipts), :func:`prune_and_scrub` does both, and a copy that failed half-way is
scrubbed before the error is raised. All functions block; async callers use ``asyncio.to_thread``.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from dataclasses import dataclass
from pathlib import Path

import structlog

from ferryman.agent.storage.images import KEY_OBJECT_ID, encrypt_options, open_args_for_encrypted, run_qemu_tool
from ferryman.agent.storage.scrub import ScrubError, ScrubMode, ScrubReceipt, scrub_tree
from ferryman.core.clock import Clock, SystemClock
from ferryman.core.errors import Conflict, HypervisorError, InvalidInput, NotFound
from ferryman.durable import fsync_directory

log = structlog.get_logger(__name__)

SUFFIX = ".qcow2"
PARTIAL = ".partial"
_TAG_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_STAMP_FORMAT = "%Y%m%dT%H%M%S.%fZ"
_NAME_RE = re.compile(r"^(?P<disk>[^/]+?)\.(?P<stamp>\d{8}T\d{6}\.\d{6}Z)\.(?P<tag>[A-Za-z0-9_-]{1,64})\.qcow2$")
_CONVERT_TIMEOUT = 6 * 3600.0


@dataclass(frozen=True)
class SnapshotInfo:
    """One snapshot file: which disk it copies, its tag, when it was taken, its size on disk."""

    path: Path
    disk: str
    tag: str
    taken_at: dt.datetime
    size_bytes: int


def snapshot_disk(
    disk: Path,
    dest_dir: Path,
    tag: str,
    *,
    key: bytes | None = None,
    iter_time_ms: int = 2000,
    clock: Clock | None = None,
    qemu_img: str = "qemu-img",
) -> Path:
    """Copy ``disk`` (qcow2, VM stopped or paused) to a new snapshot in ``dest_dir``; returns its path.

    The copy is written to a ``.partial`` file and linked into place only when complete, so a listed snapshot is
    always whole. With ``key`` the snapshot gets its own LUKS header under the same key (``iter_time_ms`` as in
    :func:`~ferryman.agent.storage.images.create_encrypted_qcow2`).

    Raises :class:`InvalidInput` for a bad tag, :class:`NotFound` if ``disk`` is missing, :class:`Conflict` if the
    same snapshot name exists, :class:`HypervisorError` if qemu-img fails (the partial copy is scrubbed first).
    """
    partial, final = snapshot_paths(disk, dest_dir, tag, clock=clock)
    _convert(disk, partial, key=key, iter_time_ms=iter_time_ms, qemu_img=qemu_img, share=True)
    publish_snapshot(partial, final)
    log.info("disk snapshotted", disk=str(disk), snapshot=str(final), encrypted=key is not None)
    return final


def snapshot_paths(disk: Path, dest_dir: Path, tag: str, *, clock: Clock | None = None) -> tuple[Path, Path]:
    """(partial, final) paths of a new snapshot of ``disk`` tagged ``tag``; ``dest_dir`` exists afterwards.

    Whoever fills ``partial`` (``qemu-img convert`` here, or QMP ``blockdev-backup`` inside a running QEMU) calls
    :func:`publish_snapshot` once it is complete, or scrubs it.
    """
    if not _TAG_RE.match(tag):
        raise InvalidInput(f"bad snapshot tag {tag!r}: use 1-64 of letters, digits, _ and -")
    if not disk.is_file():
        raise NotFound(f"disk {disk} does not exist")
    stamp = (clock or SystemClock()).now().astimezone(dt.UTC).strftime(_STAMP_FORMAT)
    final = dest_dir / f"{disk.stem}.{stamp}.{tag}{SUFFIX}"
    if final.exists():
        raise Conflict(f"snapshot {final.name} already exists")
    dest_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    partial = dest_dir / f".{final.name}{PARTIAL}"
    if partial.exists():
        scrub_tree([partial], ScrubMode.ZERO)  # left by a crash; overwriting would free its blocks unscrubbed
    return partial, final


def publish_snapshot(partial: Path, final: Path) -> None:
    """Link a complete ``partial`` copy into place as snapshot ``final`` (Conflict, partial scrubbed, if taken;
    HypervisorError, partial scrubbed, if the filesystem refuses)."""
    try:
        partial.chmod(0o600)
        os.link(partial, final)
    except FileExistsError as err:
        _scrub_quietly(partial)
        raise Conflict(f"snapshot {final.name} already exists") from err
    except OSError as err:
        _scrub_quietly(partial)
        raise HypervisorError(f"cannot keep snapshot {final.name}: {err.strerror or err}") from err
    partial.unlink()  # the data stays reachable through ``final``: nothing is freed here
    fsync_directory(final.parent)


def list_snapshots(directory: Path) -> list[SnapshotInfo]:
    """The snapshots in ``directory``, oldest first (by the stamp in their name); partial copies are not listed."""
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = _NAME_RE.match(path.name)
        if match is None or not path.is_file():
            continue
        taken_at = dt.datetime.strptime(match["stamp"], _STAMP_FORMAT).replace(tzinfo=dt.UTC)
        found.append(SnapshotInfo(path, match["disk"], match["tag"], taken_at, path.stat().st_size))
    return sorted(found, key=lambda info: (info.taken_at, info.disk, info.tag))


def leftover_partials(directory: Path) -> list[Path]:
    """Partial copies left by an interrupted :func:`snapshot_disk` or :func:`restore_snapshot`: residue to scrub.

    Call it only when no snapshot or restore is running on ``directory`` (agent start-up, recovery).
    """
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.name.startswith(".") and p.name.endswith(PARTIAL))


def prune(directory: Path, keep: int) -> list[Path]:
    """The snapshots to drop so that each disk keeps its ``keep`` newest; nothing is deleted.

    The caller must scrub every returned path (:func:`ferryman.agent.storage.scrub.scrub_tree`), or call
    :func:`prune_and_scrub`.
    """
    if keep < 0:
        raise InvalidInput(f"keep must be >= 0, got {keep}")
    by_disk: dict[str, list[SnapshotInfo]] = {}
    for info in list_snapshots(directory):
        by_disk.setdefault(info.disk, []).append(info)
    drop = [info.path for infos in by_disk.values() for info in infos[: max(0, len(infos) - keep)]]
    return sorted(drop)


def prune_and_scrub(directory: Path, keep: int, mode: ScrubMode, *, clock: Clock | None = None) -> list[ScrubReceipt]:
    """Scrub the snapshots :func:`prune` names; returns their receipts (raises :class:`ScrubError` on failure)."""
    return scrub_tree(prune(directory, keep), mode, clock=clock)


def restore_snapshot(
    snapshot: Path,
    disk: Path,
    *,
    key: bytes | None = None,
    iter_time_ms: int = 2000,
    mode: ScrubMode = ScrubMode.ZERO,
    clock: Clock | None = None,
    qemu_img: str = "qemu-img",
) -> ScrubReceipt | None:
    """Replace ``disk`` with a copy of ``snapshot``; the replaced disk is scrubbed and its receipt returned.

    The VM must be stopped: a disk QEMU holds open is refused (:class:`Conflict`). The copy is complete before the
    disk is swapped, so a failure leaves the old disk untouched. Returns None when there was no disk to replace.
    """
    if not snapshot.is_file():
        raise NotFound(f"snapshot {snapshot} does not exist")
    if disk.exists():
        _ensure_not_in_use(disk, key=key, qemu_img=qemu_img)
    partial = disk.parent / f".{disk.name}.restore{PARTIAL}"
    _convert(snapshot, partial, key=key, iter_time_ms=iter_time_ms, qemu_img=qemu_img, share=False)
    replaced = disk.parent / f".{disk.name}.replaced{PARTIAL}"
    # A crash between the swap and the scrub leaves the old disk here; replacing it would free it unscrubbed.
    scrub_tree([replaced], mode, clock=clock)
    had_disk = disk.exists()
    if had_disk:
        os.replace(disk, replaced)
    os.replace(partial, disk)
    fsync_directory(disk.parent)
    log.info("snapshot restored", snapshot=str(snapshot), disk=str(disk))
    if not had_disk:
        return None
    return scrub_tree([replaced], mode, clock=clock)[0]


def _convert(source: Path, target: Path, *, key: bytes | None, iter_time_ms: int, qemu_img: str, share: bool) -> None:
    """``qemu-img convert`` source to a new qcow2 target (encrypted with ``key`` if given); scrubs it on failure."""
    if target.exists():
        # Left by a crash; qemu-img would truncate it and free its blocks unscrubbed.
        scrub_tree([target], ScrubMode.ZERO)
    argv = [qemu_img, "convert", "-q"]
    if share:
        argv.append("-U")
    if key is None:
        argv += ["-f", "qcow2", str(source), "-O", "qcow2", str(target)]
    else:
        opts = encrypt_options(iter_time_ms)
        argv += [*open_args_for_encrypted(source, KEY_OBJECT_ID), "-O", "qcow2", "-o", opts, str(target)]
    try:
        run_qemu_tool(argv, key=key, timeout=_CONVERT_TIMEOUT)
        target.chmod(0o600)
    except (HypervisorError, OSError):
        _scrub_quietly(target)
        raise


def _ensure_not_in_use(disk: Path, *, key: bytes | None, qemu_img: str) -> None:
    """Refuse a disk some QEMU holds: without ``-U``, qemu-img cannot take the image lock a running QEMU owns."""
    argv = [qemu_img, "info", "--output=json"]
    argv += open_args_for_encrypted(disk, KEY_OBJECT_ID) if key is not None else ["-f", "qcow2", str(disk)]
    try:
        run_qemu_tool(argv, key=key)
    except HypervisorError as err:
        if "lock" in err.message:
            raise Conflict(f"disk {disk} is in use by a QEMU process; stop the VM before restoring") from err
        raise


def _scrub_quietly(path: Path) -> None:
    """Scrub a partial copy on an error path; a failure is logged so the original error is the one raised."""
    if not os.path.lexists(path):
        return
    try:
        scrub_tree([path], ScrubMode.ZERO)
    except ScrubError as err:
        log.error("partial copy not scrubbed", path=str(path), error=err.message)
