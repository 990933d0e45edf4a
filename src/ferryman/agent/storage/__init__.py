"""Host storage: encrypted disk images, disk snapshots and the scrubbing of every artefact a VM leaves behind
(design invariant 5).

The public surface is re-exported here; :mod:`.images`, :mod:`.scrub` and :mod:`.snapshots` explain the guarantees
and their limits.
"""

from __future__ import annotations

from ferryman.agent.storage.images import (
    KEY_OBJECT_ID,
    create_encrypted_qcow2,
    is_encrypted_image,
    luks_passphrase,
    open_args_for_encrypted,
    run_qemu_tool,
    secret_object_arg,
    secret_object_qmp,
)
from ferryman.agent.storage.keystream import Keystream
from ferryman.agent.storage.scrub import ScrubError, ScrubMode, ScrubReceipt, scrub_file, scrub_tree
from ferryman.agent.storage.snapshots import (
    SnapshotInfo,
    leftover_partials,
    list_snapshots,
    prune,
    prune_and_scrub,
    restore_snapshot,
    snapshot_disk,
)

__all__ = [
    "KEY_OBJECT_ID",
    "Keystream",
    "ScrubError",
    "ScrubMode",
    "ScrubReceipt",
    "SnapshotInfo",
    "create_encrypted_qcow2",
    "is_encrypted_image",
    "leftover_partials",
    "list_snapshots",
    "luks_passphrase",
    "open_args_for_encrypted",
    "prune",
    "prune_and_scrub",
    "restore_snapshot",
    "run_qemu_tool",
    "scrub_file",
    "scrub_tree",
    "secret_object_arg",
    "secret_object_qmp",
    "snapshot_disk",
]
