"""What the CMDB keeps of encrypted VMs' disk keys: one row per copy (VM, host, generation), holding the copy's key
wrapped by a controller key-encryption key (KEK), until the key is destroyed.

A destroyed row keeps its history (when, why) but no key material: ``wrapped`` and ``kek_id`` become NULL. Wrapping
and the KEKs themselves are the controller's business (:mod:`ferryman.controller.keys`); the store never sees a key in
the clear.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class DiskKeyRecord:
    id: str
    vm_id: str
    host: str
    generation: int
    kek_id: int | None
    wrapped: bytes | None
    created_at: dt.datetime
    destroyed_at: dt.datetime | None = None
    destroyed_reason: str | None = None

    @property
    def live(self) -> bool:
        return self.destroyed_at is None


class KeyRepository(Protocol):
    """Wrapped per-copy disk keys."""

    def add_disk_key(self, record: DiskKeyRecord) -> DiskKeyRecord: ...  # Conflict if the copy has a live key
    def live_disk_key(self, vm_id: str, host: str, generation: int) -> DiskKeyRecord | None: ...
    def list_disk_keys(self, vm_id: str | None = None, *, live_only: bool = False) -> list[DiskKeyRecord]: ...
    def destroy_disk_keys(
        self, vm_id: str, at: dt.datetime, reason: str, *, host: str | None = None, generation: int | None = None
    ) -> list[DiskKeyRecord]: ...  # the rows destroyed now (already destroyed ones are left alone)
    def rewrap_disk_keys(self, rewrapped: dict[str, tuple[int, bytes]]) -> int: ...  # key id -> (kek id, wrapped)
