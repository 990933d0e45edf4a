"""REST routes of the image registry: uploads into the content-addressed store (``/api/v1/blobs``), images
(``/api/v1/images``) and the trusted signing keys (``/api/v1/image-keys``).

An upload is streamed: the body is hashed and written in worker threads, a few MiB at a time, never held whole in
memory and never on the event loop; a body that does not hash to the digest in its URL stores nothing. Who may read or
change the registry and its trust store is in :data:`ferryman.controller.access.RULES`.
"""

import base64
import time
from typing import Any

import structlog
from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field

from ferryman.cmdb.images import ImageRecord, SigningKeyRecord
from ferryman.controller.images import ImageImport, ImageService
from ferryman.controller.offload import blocking
from ferryman.core import errors
from ferryman.core.models import Host, HostState
from ferryman.images.signing import check_digest, parse_public_key, verify
from ferryman.images.store import receive

log = structlog.get_logger(__name__)

MAX_UPLOAD_BYTES = 256 << 30


class ImageIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    disk: str = Field(description="sha256:<hex> of the disk, uploaded first")
    os: str
    version: str
    signature: str = Field(description="base64 of the publisher's 64-byte Ed25519 signature")
    key: str | None = None
    kernel: str | None = None
    initrd: str | None = None
    cmdline: str | None = None
    firmware: str = "bios"
    guest_agent: bool = False


class RevokeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str


class PushIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hosts: list[str] = Field(default_factory=list, description="hosts to send it to (none: every enrolled host)")


class KeyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    public_key: str = Field(description="PEM, or base64 of the 32 raw Ed25519 bytes")


def signature_status(image: ImageRecord, keys: dict[str, SigningKeyRecord]) -> str:
    """``valid``, ``untrusted`` (its key was removed) or ``invalid`` (no longer matches): the signature as it stands
    now, against the recorded digests (``image verify`` also re-hashes the stored files)."""
    key = keys.get(image.publisher)
    if key is None or not key.trusted:
        return "untrusted"
    try:
        verify(parse_public_key(key.public_key), base64.b64decode(image.signature), image.artefacts())
    except errors.InvalidInput:
        return "invalid"
    return "valid"


def image_out(image: ImageRecord, keys: dict[str, SigningKeyRecord], vms: int | None = None) -> dict[str, Any]:
    status = "revoked" if image.revoked else "active"
    out: dict[str, Any] = {
        "name": image.name,
        "digest": image.disk_digest,
        "size": image.disk_size,
        "format": image.format,
        "virtual_size": image.virtual_size,
        "os": image.os,
        "version": image.version,
        "baseline": f"{image.os} {image.version}",
        "publisher": image.publisher,
        "fingerprint": keys[image.publisher].fingerprint if image.publisher in keys else None,
        "signature": signature_status(image, keys),
        "status": status,
        "boot": image.boot,
        "firmware": image.firmware,
        "guest_agent": image.guest_agent,
        "kernel": image.kernel_digest,
        "initrd": image.initrd_digest,
        "cmdline": image.cmdline,
        "imported_at": image.imported_at,
        "imported_by": image.imported_by,
        "revoked_at": image.revoked_at,
        "revoked_by": image.revoked_by,
        "revoked_reason": image.revoked_reason,
    }
    if vms is not None:
        out["vms"] = vms
    return out


def key_out(key: SigningKeyRecord) -> dict[str, Any]:
    return {
        "name": key.name,
        "fingerprint": key.fingerprint,
        "public_key": key.public_key,
        "trusted": key.trusted,
        "added_at": key.added_at,
        "added_by": key.added_by,
        "removed_at": key.removed_at,
        "removed_by": key.removed_by,
    }


def image_routes(app: FastAPI, images: ImageService, Person: Any) -> None:
    repo = images.repo

    def keys() -> dict[str, SigningKeyRecord]:
        return {k.name: k for k in repo.list_signing_keys()}

    @app.get("/api/v1/blobs/{digest}")
    def blob(digest: str, _: Person) -> dict[str, Any]:
        found = images.store.get(check_digest(digest))
        return {"digest": found.digest, "size": found.size}

    @app.put("/api/v1/blobs/{digest}", status_code=201)
    async def upload(digest: str, request: Request, who: Person) -> dict[str, Any]:
        check_digest(digest)
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_UPLOAD_BYTES:
            raise errors.InvalidInput(f"an image file may hold at most {MAX_UPLOAD_BYTES >> 30} GiB")
        upload = await blocking(images.store.upload, digest)
        stored = await receive(upload, request.stream(), limit=MAX_UPLOAD_BYTES)
        return {"digest": stored.digest, "size": stored.size}

    @app.post("/api/v1/images", status_code=201)
    def import_image(body: ImageIn, who: Person) -> dict[str, Any]:
        image = images.import_image(ImageImport(**body.model_dump()), who.name)
        return image_out(image, keys(), vms=0)

    @app.get("/api/v1/images")
    def list_images(who: Person) -> list[dict[str, Any]]:
        known = keys()
        counts: dict[str, int] = {}
        for vm in repo.list_vms():
            if who.tenant is None or vm.tenant == who.tenant:  # a tenant counts its own VMs only
                counts[vm.image] = counts.get(vm.image, 0) + 1
        return [image_out(i, known, counts.get(i.name, 0)) for i in repo.list_images()]

    @app.get("/api/v1/images/{name}")
    def show_image(name: str, who: Person) -> dict[str, Any]:
        image = repo.get_image(name)
        vms = sorted(
            vm.name for vm in repo.list_vms() if vm.image == name and who.tenant in (None, vm.tenant)
        )  # a tenant's principal sees its own VMs of the image, never another tenant's
        return {**image_out(image, keys(), len(vms)), "vm_names": vms}

    @app.post("/api/v1/images/{name}/verify")
    def verify_image(name: str, _: Person) -> dict[str, Any]:
        try:
            images.verified(name)
        except errors.FerrymanError as err:
            return {"name": name, "ok": False, "detail": str(err)}
        return {"name": name, "ok": True, "detail": "signature valid, files intact, not revoked"}

    @app.post("/api/v1/images/{name}/revoke")
    def revoke_image(name: str, body: RevokeIn, who: Person) -> dict[str, Any]:
        return image_out(images.revoke(name, body.reason, who.name), keys())

    @app.post("/api/v1/images/{name}/push")
    async def push_image(name: str, body: PushIn, who: Person) -> dict[str, Any]:
        """Verify the image now and send it to hosts ahead of use (a drain or a boot then finds it there)."""
        ref = await blocking(images.ref, name)
        hosts = await blocking(_push_targets, images, body.hosts)
        sent: dict[str, int] = {}
        for host in hosts:
            started = time.monotonic()
            sent[host.name] = await images.ensure_on(host, ref)
            log.info("image pushed", image=name, host=host.name, seconds=round(time.monotonic() - started, 3))
        return {"name": name, "digest": ref.digest, "sent_bytes": sent}

    @app.get("/api/v1/image-keys")
    def list_keys(_: Person, all: bool = False) -> list[dict[str, Any]]:
        return [key_out(k) for k in repo.list_signing_keys(trusted_only=not all)]

    @app.post("/api/v1/image-keys", status_code=201)
    def add_key(body: KeyIn, who: Person) -> dict[str, Any]:
        return key_out(images.trust(body.name, body.public_key, who.name))

    @app.delete("/api/v1/image-keys/{name}")
    def remove_key(name: str, who: Person) -> dict[str, Any]:
        return key_out(images.distrust(name, who.name))


def _push_targets(images: ImageService, names: list[str]) -> list[Host]:
    if names:
        return [images.repo.get_host(n) for n in names]
    return [h for h in images.repo.list_hosts() if h.state is HostState.ENROLLED]
