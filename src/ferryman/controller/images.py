"""The image registry at work: imports verified against the trusted publishers' keys, revocation, and the trust store.

An import names artefacts already uploaded to the controller's content-addressed store (:mod:`ferryman.images.store`,
checked by digest on arrival) and a signature over them; it lands in the CMDB only when a trusted key made that
signature, the disk is a stand-alone raw or qcow2 file, and the name is free. Every import, refusal, revocation and
change of the trust store is an audit event; a refusal keeps nothing but its event.

:meth:`ImageService.verified` is the check every later use repeats (a VM created, booted, migrated or restored from the
image): not revoked, its publisher still trusted, the signature still valid, and the stored files still hash to their
digests. It blocks (it hashes files): callers on the event loop run it in a worker thread.
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ferryman.cmdb.images import ImageRecord, SigningKeyRecord
from ferryman.cmdb.repository import Repository
from ferryman.controller.fleet import LAB_GUEST_IMAGE, Change, Fleet
from ferryman.controller.offload import blocking
from ferryman.core import errors
from ferryman.core.bootparams import DEFAULT_CMDLINE, check_template
from ferryman.core.models import Host, ImageRef, Severity, check_name
from ferryman.images import inspect
from ferryman.images.signing import (
    Artefact,
    SignatureInvalid,
    fingerprint,
    parse_public_key,
    parse_signature,
    public_pem,
    ref_artefacts,
    signer,
    verify,
)
from ferryman.images.store import BlobStore
from ferryman.policy.versions import VersionError, parse_version

log = structlog.get_logger(__name__)

FIRMWARE = ("bios", "uefi")
RESERVED_NAMES = frozenset({LAB_GUEST_IMAGE})


@dataclass(frozen=True)
class ImageImport:
    """What an operator asks to import (digests of files already in the store)."""

    name: str
    disk: str
    os: str
    version: str
    signature: str  # base64 of the 64 signature bytes
    key: str | None = None  # the publisher key that must have signed (None: any trusted key)
    kernel: str | None = None
    initrd: str | None = None
    cmdline: str | None = None
    firmware: str = "bios"
    guest_agent: bool = False


class ImageService:
    def __init__(self, fleet: Fleet, store: BlobStore, *, qemu_img: str = "qemu-img") -> None:
        self.fleet = fleet
        self.store = store
        self.qemu_img = qemu_img

    @property
    def repo(self) -> Repository:
        return self.fleet.repo

    # -- the trust store ---------------------------------------------------------------------------------------------

    def trust(self, name: str, public_key: str, principal: str) -> SigningKeyRecord:
        check_name("key", name)
        key = parse_public_key(public_key)
        record = SigningKeyRecord(
            name=name,
            public_key=public_pem(key),
            fingerprint=fingerprint(key),
            added_at=self.fleet.clock.now(),
            added_by=principal,
        )
        for other in self.repo.list_signing_keys(trusted_only=True):
            if other.fingerprint == record.fingerprint:
                raise errors.Conflict(f"this key is trusted already as {other.name!r}")
        stored = self.repo.add_signing_key(record)
        self.fleet.audit(
            "image.key_trusted",
            f"image signing key {name} ({record.fingerprint}) trusted",
            principal,
            severity=Severity.WARNING,
            key=name,
            fingerprint=record.fingerprint,
        )
        return stored

    def distrust(self, name: str, principal: str) -> SigningKeyRecord:
        record = self.repo.remove_signing_key(name, self.fleet.clock.now(), principal)
        signed = [i.name for i in self.repo.list_images() if i.publisher == name]
        self.fleet.audit(
            "image.key_removed",
            f"image signing key {name} no longer trusted; {len(signed)} image(s) it signed no longer boot",
            principal,
            severity=Severity.WARNING,
            key=name,
            images=signed,
        )
        return record

    def _trusted_keys(self, only: str | None = None) -> dict[str, Ed25519PublicKey]:
        keys = {k.name: parse_public_key(k.public_key) for k in self.repo.list_signing_keys(trusted_only=True)}
        if only is not None:
            if only not in keys:
                raise errors.NotFound(f"no trusted signing key named {only!r} (see 'ferryman image trust list')")
            keys = {only: keys[only]}
        if not keys:
            raise SignatureInvalid("no signing key is trusted yet: add the publisher's with 'ferryman image trust add'")
        return keys

    # -- images ------------------------------------------------------------------------------------------------------

    def import_image(self, req: ImageImport, principal: str) -> ImageRecord:
        try:
            record = self._checked(req, principal)
        except errors.FerrymanError as err:
            self.fleet.audit(
                "image.refused",
                f"import of image {req.name} refused: {err}",
                principal,
                severity=Severity.WARNING,
                image=req.name,
                disk=req.disk,
                reason=str(err),
            )
            raise
        stored = self.repo.add_image(record)
        self.fleet.audit(
            "image.imported",
            f"image {stored.name} ({stored.os} {stored.version}, {stored.disk_digest}) signed by {stored.publisher}",
            principal,
            image=stored.name,
            digest=stored.disk_digest,
            publisher=stored.publisher,
            os=stored.os,
            version=stored.version,
        )
        return stored

    def _checked(self, req: ImageImport, principal: str) -> ImageRecord:
        check_name("image", req.name)
        check_name("OS", req.os)
        try:
            parse_version(req.version)
        except VersionError as err:
            raise errors.InvalidInput(f"bad version {req.version!r}: {err}") from err
        if req.firmware not in FIRMWARE:
            raise errors.InvalidInput(f"unknown firmware {req.firmware!r}: one of {', '.join(FIRMWARE)}")
        if (req.kernel is None) != (req.initrd is None):
            raise errors.InvalidInput("a direct-kernel image needs both --kernel and --initrd")
        if req.cmdline is not None and req.kernel is None:
            raise errors.InvalidInput("a kernel command line needs a direct-kernel image (--kernel and --initrd)")
        if req.cmdline is not None:
            check_template(req.cmdline)
        if req.name in RESERVED_NAMES:
            raise errors.InvalidInput(f"the image name {req.name!r} is reserved: VMs so named boot from their hosts")
        try:
            self.repo.get_image(req.name)
        except errors.NotFound:
            pass
        else:
            raise errors.Conflict(f"an image named {req.name!r} exists already")
        disk = self.store.verify(req.disk)
        facts = inspect.check_importable(inspect.describe(disk.path, qemu_img=self.qemu_img))
        artefacts = [Artefact("disk", disk.digest, disk.size)]
        kernel = initrd = None
        if req.kernel is not None and req.initrd is not None:
            kernel, initrd = self.store.verify(req.kernel), self.store.verify(req.initrd)
            artefacts += [Artefact(role, f.digest, f.size) for role, f in (("kernel", kernel), ("initrd", initrd))]
        self._refuse_revoked_bytes([a.digest for a in artefacts], req.name)
        signature = parse_signature(req.signature.encode())
        publisher = signer(self._trusted_keys(req.key), signature, artefacts)
        return ImageRecord(
            name=req.name,
            disk_digest=disk.digest,
            disk_size=disk.size,
            format=facts.format,
            virtual_size=facts.virtual_size,
            os=req.os,
            version=req.version,
            publisher=publisher,
            signature=base64.b64encode(signature).decode(),
            boot="kernel" if kernel is not None else "firmware",
            imported_at=self.fleet.clock.now(),
            imported_by=principal,
            kernel_digest=kernel.digest if kernel else None,
            kernel_size=kernel.size if kernel else None,
            initrd_digest=initrd.digest if initrd else None,
            initrd_size=initrd.size if initrd else None,
            cmdline=(req.cmdline or DEFAULT_CMDLINE) if kernel is not None else None,
            firmware=req.firmware,
            guest_agent=req.guest_agent,
        )

    def _refuse_revoked_bytes(self, digests: list[str], name: str) -> None:
        """A revocation holds for the bytes, not just the name: no image may use a file a revoked image has."""
        for other in self.repo.list_images():
            if other.revoked and other.name != name:
                shared = {a.digest for a in other.artefacts()} & set(digests)
                if shared:
                    raise errors.Forbidden(
                        f"image {name} uses {sorted(shared)[0]}, a file of image {other.name}, which was revoked:"
                        f" {other.revoked_reason}"
                    )

    def revoke(self, name: str, reason: str, principal: str) -> ImageRecord:
        if not reason.strip():
            raise errors.InvalidInput("a revocation needs a reason (--reason)")
        record = self.repo.revoke_image(name, self.fleet.clock.now(), principal, reason.strip())
        running = [vm.name for vm in self.repo.list_vms() if vm.image == name]
        self.fleet.audit(
            "image.revoked",
            f"image {name} revoked: {reason.strip()}; {len(running)} VM(s) run from it",
            principal,
            severity=Severity.ALARM,
            image=name,
            reason=reason.strip(),
            vms=running,
        )
        self.fleet.changed(Change(image=name))
        return record

    def verified(self, name: str) -> ImageRecord:
        """The image, if it may be used now: not revoked, its publisher trusted, its signature valid and its files
        intact in the store. Otherwise one clear error (and an audit event)."""
        image = self.repo.get_image(name)
        try:
            if image.revoked:
                raise errors.Forbidden(f"image {name} was revoked: {image.revoked_reason}")
            key = self.repo.get_signing_key(image.publisher)
            if not key.trusted:
                raise SignatureInvalid(f"image {name} was signed by {image.publisher}, whose key is no longer trusted")
            self._refuse_revoked_bytes([a.digest for a in image.artefacts()], name)
            for artefact in image.artefacts():
                self.store.verify(artefact.digest)
            verify(parse_public_key(key.public_key), base64.b64decode(image.signature), image.artefacts())
        except errors.FerrymanError as err:
            self.fleet.audit(
                "image.unusable", f"image {name} cannot be used: {err}", "system", severity=Severity.ALARM, image=name
            )
            raise
        return image

    def ref(self, name: str, *, full_copy: bool = False) -> ImageRef:
        """What a host needs to boot ``name`` (after :meth:`verified`: it may be used now)."""
        image = self.verified(name)
        key = self.repo.get_signing_key(image.publisher)
        return ImageRef(
            name=image.name,
            digest=image.disk_digest,
            size=image.disk_size,
            format=image.format,
            signature=image.signature,
            publisher_key=key.public_key,
            boot=image.boot,
            firmware=image.firmware,
            kernel=image.kernel_digest,
            kernel_size=image.kernel_size,
            initrd=image.initrd_digest,
            initrd_size=image.initrd_size,
            cmdline=image.cmdline,
            guest_agent=image.guest_agent,
            full_copy=full_copy,
        )

    async def ensure_on(self, host: Host, ref: ImageRef) -> int:
        """Send ``host`` the files of ``ref`` its cache lacks (it checks each digest on arrival); the bytes sent."""
        sent = 0
        for artefact in ref_artefacts(ref):
            held = await self.fleet.agents.holds_image(host, artefact.digest)
            if held.present:
                continue
            blob = self.store.get(artefact.digest)
            started = time.monotonic()
            await self.fleet.agents.put_image(host, artefact.digest, blob.path, blob.size)
            sent += blob.size
            log.info(
                "image file sent",
                host=host.name,
                image=ref.name,
                digest=artefact.digest,
                bytes=blob.size,
                seconds=round(time.monotonic() - started, 3),
            )
        if sent:
            await blocking(
                self.fleet.audit,
                "image.distributed",
                f"image {ref.name} sent to {host.name} ({sent} bytes)",
                "system",
                host=host.name,
                image=ref.name,
                bytes=sent,
            )
        return sent
