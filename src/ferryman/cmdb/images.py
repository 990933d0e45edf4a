"""What the CMDB keeps of VM images: the registry of imported images and the publishers' keys trusted to sign them.

An image row names its artefacts by digest (the bytes live in the controller's content-addressed store,
:mod:`ferryman.images.store`), carries the publisher's signature over them, and the baseline it claims (OS and
version). Revocation is written once and never undone. A signing key removed from the trust store keeps its row
(``removed_at``): images it signed stay listed, and no longer boot.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Protocol

from ferryman.images.signing import Artefact


@dataclass(frozen=True)
class ImageRecord:
    name: str
    disk_digest: str
    disk_size: int
    format: str  # raw | qcow2
    virtual_size: int
    os: str
    version: str
    publisher: str  # the name of the trusted key whose signature verified at import
    signature: str  # base64 of the 64 Ed25519 bytes
    boot: str  # firmware | kernel
    imported_at: dt.datetime
    imported_by: str
    kernel_digest: str | None = None
    kernel_size: int | None = None
    initrd_digest: str | None = None
    initrd_size: int | None = None
    cmdline: str | None = None  # direct-kernel images: the kernel command line template
    firmware: str = "bios"  # bios (SeaBIOS) | uefi (OVMF)
    guest_agent: bool = False  # the image runs qemu-guest-agent on its virtio-serial port
    revoked_at: dt.datetime | None = None
    revoked_by: str | None = None
    revoked_reason: str | None = None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def artefacts(self) -> list[Artefact]:
        """The signed files: the disk, and a direct-kernel image's kernel and initrd."""
        found = [Artefact("disk", self.disk_digest, self.disk_size)]
        if self.kernel_digest is not None and self.kernel_size is not None:
            found.append(Artefact("kernel", self.kernel_digest, self.kernel_size))
        if self.initrd_digest is not None and self.initrd_size is not None:
            found.append(Artefact("initrd", self.initrd_digest, self.initrd_size))
        return found


@dataclass(frozen=True)
class SigningKeyRecord:
    name: str
    public_key: str  # PEM
    fingerprint: str  # sha256:<hex> of the raw key
    added_at: dt.datetime
    added_by: str
    removed_at: dt.datetime | None = None
    removed_by: str | None = None

    @property
    def trusted(self) -> bool:
        return self.removed_at is None


class ImageRepository(Protocol):
    """The image registry and its trust store."""

    def add_image(self, image: ImageRecord) -> ImageRecord: ...  # Conflict if the name is taken
    def get_image(self, name: str) -> ImageRecord: ...  # NotFound
    def list_images(self) -> list[ImageRecord]: ...  # by name
    def revoke_image(self, name: str, at: dt.datetime, by: str, reason: str) -> ImageRecord: ...  # Conflict: again
    def add_signing_key(self, key: SigningKeyRecord) -> SigningKeyRecord: ...  # Conflict: a trusted key has the name
    def get_signing_key(self, name: str) -> SigningKeyRecord: ...  # NotFound
    def list_signing_keys(self, *, trusted_only: bool = False) -> list[SigningKeyRecord]: ...
    def remove_signing_key(self, name: str, at: dt.datetime, by: str) -> SigningKeyRecord: ...  # NotFound, Conflict
