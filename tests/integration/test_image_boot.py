"""VMs booted from registry images on a real QEMU driver: the image's files come from the host's cache, checked
against the publisher's signature at every boot; the VM writes only to its own overlay; a file altered in the cache
by one byte, a signature by another key, or a missing file stops the boot with one clear error."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ferryman.agent.hypervisor.qmp import QemuDriver
from ferryman.agent.probes import GUEST_AGENT_SOCKET, guest_ping
from ferryman.agent.storage.image_cache import ImageUnverified
from ferryman.core.models import DiskSpec, ImageRef, VMSpec
from ferryman.images.signing import Artefact, new_private_key, sign
from ferryman.lab.guest import GUEST_CMDLINE, GuestImage
from ferryman.lab.records import missing_seqs, read_acks, read_records

pytestmark = pytest.mark.qemu

BOOT_TIMEOUT = 90.0
DISK = 32 << 20


def sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def publisher() -> tuple[bytes, str]:
    return new_private_key()


def kernel_image(driver: QemuDriver, guest: GuestImage, tmp: Path, private: bytes, public: str) -> ImageRef:
    """The lab guest as a direct-kernel image (kernel, initrd, an empty raw disk), cached on the driver's host."""
    disk = tmp / "base.raw"
    with disk.open("wb") as fh:
        fh.truncate(DISK)
    blobs = [driver.images.store.put_file(path) for path in (disk, guest.kernel, guest.initrd)]
    parts = [Artefact(role, b.digest, b.size) for role, b in zip(("disk", "kernel", "initrd"), blobs, strict=True)]
    return ImageRef(
        name="lab-kernel",
        digest=blobs[0].digest,
        size=blobs[0].size,
        format="raw",
        signature=base64.b64encode(sign(private, parts)).decode(),
        publisher_key=public,
        boot="kernel",
        kernel=blobs[1].digest,
        kernel_size=blobs[1].size,
        initrd=blobs[2].digest,
        initrd_size=blobs[2].size,
        cmdline=GUEST_CMDLINE,
    )


def spec_of(image: ImageRef) -> VMSpec:
    return VMSpec(
        vm_id=str(uuid.uuid4()),
        name="img-vm",
        vcpus=1,
        memory_mb=128,
        disks=(DiskSpec(DISK),),
        canary=f"canary-{uuid.uuid4().hex[:12]}",
        record_interval_ms=250,
        image=image,
    )


async def wait_acks(driver: QemuDriver, vm_id: str, count: int) -> list[int]:
    deadline = time.monotonic() + BOOT_TIMEOUT
    console = driver.console_log(vm_id)
    while time.monotonic() < deadline:
        acks = read_acks(console) if console.exists() else []
        if len(acks) >= count:
            return acks
        await asyncio.sleep(0.2)
    pytest.fail(f"no {count} acks from {vm_id}: {console.read_text()[-1500:] if console.exists() else ''}")


@pytest.fixture
def no_vm_dirs(driver: QemuDriver) -> Iterator[None]:
    yield
    leftovers = list((driver.state_dir / "vms").glob("*")) if (driver.state_dir / "vms").exists() else []
    assert leftovers == [], f"a refused boot left {leftovers}"


async def test_a_direct_kernel_image_boots_and_writes_only_to_the_vms_overlay(
    driver: QemuDriver, guest: GuestImage, tmp_path: Path, publisher: tuple[bytes, str]
) -> None:
    image = kernel_image(driver, guest, tmp_path, *publisher)
    base = driver.images.store.path(image.digest)
    spec = spec_of(image)
    await driver.create(spec)
    acks = await wait_acks(driver, spec.vm_id, 3)
    disk0 = driver.disk_paths(spec.vm_id)[0]
    found = await asyncio.to_thread(read_records, disk0)
    assert missing_seqs(found, acks) == [] and {r.canary for r in found} == {spec.canary}
    assert sha256(base) == image.digest and await asyncio.to_thread(read_records, base) == []
    await driver.stop(spec.vm_id)
    await driver.start(spec.vm_id)  # verified again at this boot too
    await wait_acks(driver, spec.vm_id, len(acks) + 2)


async def test_one_byte_changed_in_the_cache_stops_the_next_boot(
    driver: QemuDriver, guest: GuestImage, tmp_path: Path, publisher: tuple[bytes, str]
) -> None:
    image = kernel_image(driver, guest, tmp_path, *publisher)
    spec = spec_of(image)
    await driver.create(spec)
    await wait_acks(driver, spec.vm_id, 1)
    await driver.stop(spec.vm_id)
    kernel = driver.images.store.path(image.kernel or "")
    kernel.chmod(0o644)
    data = bytearray(kernel.read_bytes())
    data[len(data) // 2] ^= 0x01
    kernel.write_bytes(bytes(data))
    with pytest.raises(ImageUnverified, match="altered on disk"):
        await driver.start(spec.vm_id)
    assert not driver.is_alive(spec.vm_id)


async def test_a_signature_by_another_key_or_a_missing_file_refuses_the_create(
    driver: QemuDriver, guest: GuestImage, tmp_path: Path, publisher: tuple[bytes, str], no_vm_dirs: None
) -> None:
    image = kernel_image(driver, guest, tmp_path, *publisher)
    _, stranger = new_private_key()
    with pytest.raises(ImageUnverified, match="signature does not verify"):
        await driver.create(spec_of(dataclasses.replace(image, publisher_key=stranger)))
    absent = "sha256:" + "0" * 64
    with pytest.raises(ImageUnverified, match="not on this host"):
        await driver.create(spec_of(dataclasses.replace(image, digest=absent)))


async def test_the_lab_disk_boots_through_the_firmware_with_its_parameters_from_smbios_and_its_agent_answers(
    driver: QemuDriver, tmp_path: Path, publisher: tuple[bytes, str]
) -> None:
    """SeaBIOS, the MBR and syslinux on the image boot the guest; its records go to its own overlay's records
    partition, and the cached image stays as it was."""
    from ferryman.lab.disk_image import ensure_guest_disk

    layout = await asyncio.to_thread(ensure_guest_disk)
    blob = driver.images.store.put_file(layout.path)
    private, public = publisher
    signature = base64.b64encode(sign(private, [Artefact("disk", blob.digest, blob.size)])).decode()
    image = ImageRef("lab-guest", blob.digest, blob.size, "raw", signature, public, guest_agent=True)
    spec = dataclasses.replace(spec_of(image), disks=(DiskSpec(layout.size_bytes),))
    await driver.create(spec)
    acks = await wait_acks(driver, spec.vm_id, 3)
    # the guest's own agent answers on its virtio-serial port
    await asyncio.wait_for(guest_ping(driver.vm_dir(spec.vm_id) / GUEST_AGENT_SOCKET), 30)
    found = await asyncio.to_thread(read_records, driver.disk_paths(spec.vm_id)[0])
    assert missing_seqs(found, acks) == [] and {r.canary for r in found} == {spec.canary}
    assert {r.vm for r in found} == {spec.vm_id}
    assert sha256(driver.images.store.path(blob.digest)) == blob.digest
