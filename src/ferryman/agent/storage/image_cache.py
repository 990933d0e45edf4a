"""This host's cache of registry images: the files VMs boot from, kept by digest and checked before every use.

The controller sends an image's files on demand (:meth:`ImageCache.receive`, verified by digest on arrival) and names
the image in every VM spec that boots from it (:class:`~ferryman.core.models.ImageRef`). Before any QEMU opens them
(a boot, a restart, a migration destination, a snapshot restore) :meth:`ImageCache.verified` hashes each file again
and checks the publisher's signature over the digests: a cached file changed behind the agent's back, by one byte,
does not boot. Cached files are read-only (0444); a VM's own disk is an overlay that only reads them.

It decides nothing about trust: the controller sends an image only while it is not revoked and its publisher is
trusted, and the key to check the signature with comes from the controller in the spec. It blocks (hashing);
async callers use ``asyncio.to_thread``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
from dataclasses import dataclass
from pathlib import Path

from ferryman.core.errors import Conflict, InvalidInput, NotFound
from ferryman.core.models import ImageRef
from ferryman.images.signing import parse_public_key, ref_artefacts, verify
from ferryman.images.store import BlobStore, DigestMismatch, Upload


class ImageUnverified(Conflict):
    """A cached image file that is missing, altered, or not covered by the publisher's signature: it must not boot
    (the host's copy conflicts with what the controller vouches for; not a fencing refusal)."""


@dataclass(frozen=True)
class ImageFiles:
    """The verified paths of one image's files on this host."""

    disk: Path
    kernel: Path | None = None
    initrd: Path | None = None


class ImageCache:
    def __init__(self, root: Path) -> None:
        self.store = BlobStore(root)

    def receive(self, digest: str) -> Upload:
        """An upload of the file ``digest`` (checked against it when it ends)."""
        return self.store.upload(digest)

    def verified(self, ref: ImageRef) -> ImageFiles:
        """The image's files, each hashed again now and covered by the publisher's signature (ImageUnverified)."""
        paths: dict[str, Path] = {}
        for artefact in ref_artefacts(ref):
            try:
                blob = self.store.verify(artefact.digest)
            except NotFound:
                missing = f"image {ref.name}: its {artefact.role} {artefact.digest} is not on this host"
                raise ImageUnverified(missing) from None
            except DigestMismatch as err:
                # dropped, so that the controller sends it again before the next use; it boots nothing meanwhile
                with contextlib.suppress(OSError):
                    self.store.path(artefact.digest).unlink()
                raise ImageUnverified(f"image {ref.name}: {err}; the cached copy was dropped") from None
            if blob.size != artefact.size:
                wrong = f"image {ref.name}: its {artefact.role} has {blob.size} bytes, not {artefact.size}"
                raise ImageUnverified(wrong)
            paths[artefact.role] = blob.path
        try:
            signature = base64.b64decode(ref.signature, validate=True)
            verify(parse_public_key(ref.publisher_key), signature, ref_artefacts(ref))
        except (InvalidInput, binascii.Error, ValueError) as err:
            raise ImageUnverified(f"image {ref.name}: the publisher's signature does not verify: {err}") from None
        return ImageFiles(paths["disk"], paths.get("kernel"), paths.get("initrd"))
