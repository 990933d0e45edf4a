"""Which disks a migration mirrors whole and which only above their image (``blockdev-mirror`` sync mode)."""

from __future__ import annotations

import dataclasses

from ferryman.agent.hypervisor.migrate import mirror_sync
from ferryman.core.models import DiskSpec, ImageRef, VMSpec

IMAGE = ImageRef("debian-12", "sha256:" + "a" * 64, 1 << 20, "raw", "c2ln", "PEM")
SPEC = VMSpec("vm-1", "web-1", 1, 128, (DiskSpec(1 << 26), DiskSpec(1 << 26)), "canary", image=IMAGE)


def test_only_an_overlay_still_on_its_image_mirrors_the_top() -> None:
    assert mirror_sync(SPEC, 0, backed=True) == "top"
    # a snapshot restore flattened it: its zeros must overwrite the destination's image data
    assert mirror_sync(SPEC, 0, backed=False) == "full"
    assert mirror_sync(SPEC, 1, backed=True) == "full"  # other disks have no image beneath them
    full_copy = dataclasses.replace(SPEC, image=dataclasses.replace(IMAGE, full_copy=True))
    assert mirror_sync(full_copy, 0, backed=True) == "full"
    assert mirror_sync(dataclasses.replace(SPEC, image=None), 0, backed=True) == "full"
