"""Point-in-time snapshots of a running VM's disks, taken inside its QEMU with QMP ``blockdev-backup``.

A copy made from outside (``qemu-img convert``) is consistent only while the guest is paused, and the pause would
last the whole copy, growing with the disk. ``blockdev-backup`` with ``sync: full`` instead fixes the disk's content
at the moment the job starts (a copy-before-write filter saves each old block the guest overwrites before the job has
copied it) while the guest keeps running. The copy is crash-consistent, as a paused copy is.

The target is a new qcow2 at the ``.partial`` path :func:`~ferryman.agent.storage.snapshots.snapshot_paths` names,
encrypted under the same key as the disk for an encrypted VM (the running QEMU already holds the key's secret object,
defined at launch), and becomes a snapshot only once the job concluded without error
(:func:`~ferryman.agent.storage.snapshots.publish_snapshot`). On any failure the job is cancelled, the target node
removed and the partial file scrubbed.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import structlog

from ferryman.agent.hypervisor.qmp import LUKS_ITER_TIME_MS, QemuDriver
from ferryman.agent.storage.images import KEY_OBJECT_ID, create_encrypted_qcow2, run_qemu_tool
from ferryman.agent.storage.scrub import ScrubMode, scrub_tree
from ferryman.agent.storage.snapshots import publish_snapshot, snapshot_paths
from ferryman.core.errors import HypervisorError

log = structlog.get_logger(__name__)

POLL_INTERVAL = 0.05
JOB_PREFIX, TARGET_PREFIX = "snapshot", "snapshot-target"


async def live_snapshot(
    driver: QemuDriver,
    vm_id: str,
    index: int,
    disk: Path,
    size_bytes: int,
    dest_dir: Path,
    tag: str,
    *,
    key: bytes | None,
    within: float = 3600.0,
) -> Path:
    """Snapshot disk ``index`` (``disk`` on this host) of the running VM into ``dest_dir``; returns the snapshot."""
    node, job = f"{TARGET_PREFIX}{index}", f"{JOB_PREFIX}{index}"
    await clear_leftovers(driver, vm_id)
    partial, final = await asyncio.to_thread(snapshot_paths, disk, dest_dir, tag)
    node_gone = True
    try:
        await asyncio.to_thread(_create_target, partial, size_bytes, key, driver.qemu_img)
        target: dict[str, Any] = {
            "driver": "qcow2",
            "node-name": node,
            "file": {"driver": "file", "filename": str(partial)},
        }
        if key is not None:
            target["encrypt"] = {"format": "luks", "key-secret": KEY_OBJECT_ID}
        await driver.execute(vm_id, "blockdev-add", target)
        node_gone = False
        try:
            await _backup(driver, vm_id, f"disk{index}", node, job, within)
        finally:
            with contextlib.suppress(HypervisorError):
                await driver.execute(vm_id, "blockdev-del", {"node-name": node})
                node_gone = True
    except BaseException:
        if node_gone:
            await asyncio.to_thread(_scrub_partial, partial)
        else:  # QEMU may still write it: it stays, and goes with the snapshot directory's next scrub
            log.warning("partial snapshot still open in QEMU; not scrubbed now", vm=vm_id, path=str(partial))
        raise
    await asyncio.to_thread(publish_snapshot, partial, final)
    log.info("disk snapshotted live", vm=vm_id, disk=str(disk), snapshot=str(final), encrypted=key is not None)
    return final


async def clear_leftovers(driver: QemuDriver, vm_id: str) -> bool:
    """End what an earlier snapshot left in QEMU (its agent died, or its caller gave up): jobs, then target nodes.
    True when none is left, so no partial file is open in QEMU any more."""
    jobs: list[dict[str, Any]] = await driver.execute(vm_id, "query-jobs")
    for job in jobs:
        job_id = str(job.get("id", ""))
        if job_id.startswith(JOB_PREFIX):
            with contextlib.suppress(HypervisorError):
                await driver.execute(vm_id, "job-cancel", {"id": job_id})
            await _dismiss_when_done(driver, vm_id, job_id)
    for name in await _target_nodes(driver, vm_id):
        with contextlib.suppress(HypervisorError):
            await driver.execute(vm_id, "blockdev-del", {"node-name": name})
    return not await _target_nodes(driver, vm_id)


async def _target_nodes(driver: QemuDriver, vm_id: str) -> list[str]:
    nodes: list[dict[str, Any]] = await driver.execute(vm_id, "query-named-block-nodes")
    return [str(n["node-name"]) for n in nodes if str(n.get("node-name", "")).startswith(TARGET_PREFIX)]


def _create_target(path: Path, size: int, key: bytes | None, qemu_img: str) -> None:
    if key is None:
        run_qemu_tool([qemu_img, "create", "-q", "-f", "qcow2", str(path), str(size)])
    else:
        create_encrypted_qcow2(path, size, key, iter_time_ms=LUKS_ITER_TIME_MS, qemu_img=qemu_img)
    path.chmod(0o600)


async def _backup(driver: QemuDriver, vm_id: str, device: str, target: str, job: str, within: float) -> None:
    args = {"job-id": job, "device": device, "target": target, "sync": "full", "auto-dismiss": False}
    await driver.execute(vm_id, "blockdev-backup", args)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    try:
        while (found := await _job(driver, vm_id, job)) is not None and found["status"] != "concluded":
            if loop.time() > deadline:
                raise HypervisorError(f"snapshot of {device} of VM {vm_id} did not finish within {within:g}s")
            await asyncio.sleep(POLL_INTERVAL)
    except BaseException:
        with contextlib.suppress(HypervisorError):
            await driver.execute(vm_id, "job-cancel", {"id": job})
        await _dismiss_when_done(driver, vm_id, job)
        raise
    await _dismiss_when_done(driver, vm_id, job)
    if found is None:
        raise HypervisorError(f"snapshot job of {device} of VM {vm_id} vanished")
    if found.get("error"):
        raise HypervisorError(f"snapshot of {device} of VM {vm_id} failed: {found['error']}")


async def _job(driver: QemuDriver, vm_id: str, job: str) -> dict[str, Any] | None:
    jobs: list[dict[str, Any]] = await driver.execute(vm_id, "query-jobs")
    return next((j for j in jobs if j.get("id") == job), None)


async def _dismiss_when_done(driver: QemuDriver, vm_id: str, job: str, within: float = 30.0) -> None:
    """Dismiss the job once it concluded (a cancelled job concludes too); bounded, errors ignored."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    with contextlib.suppress(HypervisorError):
        while (found := await _job(driver, vm_id, job)) is not None and loop.time() < deadline:
            if found["status"] == "concluded":
                await driver.execute(vm_id, "job-dismiss", {"id": job})
                return
            await asyncio.sleep(POLL_INTERVAL)


def _scrub_partial(path: Path) -> None:
    try:
        scrub_tree([path], ScrubMode.ZERO)
    except Exception:  # the original error is the one to raise
        log.exception("could not scrub a partial snapshot", path=str(path))
