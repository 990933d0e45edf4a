"""Fixtures for tests that boot real QEMU guests through :class:`QemuDriver`.

Every QEMU a test starts is killed in teardown by pid (``procscan.kill_all`` over the test's state dir), never by name.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from ferryman.agent.hypervisor.procscan import kill_all
from ferryman.agent.hypervisor.qmp import QemuDriver
from ferryman.lab.disk_image import DiskLayout, ensure_guest_disk
from ferryman.lab.guest import GuestImage, ensure_guest

QEMU = "qemu-system-x86_64"


@pytest.fixture(scope="session")
def guest() -> GuestImage:
    if shutil.which(QEMU) is None:
        pytest.skip(f"{QEMU} is not installed")
    return ensure_guest()


@pytest.fixture(scope="module")
def layout(guest: GuestImage, tmp_path_factory: pytest.TempPathFactory) -> DiskLayout:
    """The guest disk, built by ensure_guest_disk into a private cache that reuses the already built guest."""
    cache = tmp_path_factory.mktemp("cache")
    (cache / "guest").mkdir()
    (cache / "guest" / guest.kernel.parent.name).symlink_to(guest.kernel.parent)
    return ensure_guest_disk(cache)


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    """A state dir deep enough that its QMP socket paths exceed the 107-byte UNIX socket limit."""
    path = tmp_path / ("deep-" * 12) / "state"
    path.mkdir(parents=True)
    yield path
    asyncio.run(kill_all(path))


@pytest.fixture
async def driver(state_dir: Path, guest: GuestImage) -> AsyncIterator[QemuDriver]:
    qemu = QemuDriver(state_dir, guest, "tcg")
    try:
        yield qemu
    finally:
        await qemu.close()
        await kill_all(state_dir)
