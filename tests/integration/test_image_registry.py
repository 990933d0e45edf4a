"""The controller's image registry on a real CMDB, a real store and real ``qemu-img``: imports are checked as an
attacker would try them (unsigned, wrongly signed, untrusted key, altered file, a qcow2 pointing at a host file), each
refusal is audited and keeps nothing, and what was imported survives a controller restart."""

from __future__ import annotations

import base64
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ferryman.cmdb.sql import open_repository
from ferryman.controller.fleet import Fleet
from ferryman.controller.images import ImageImport, ImageService
from ferryman.controller.reconcile import Reconciler
from ferryman.core import errors
from ferryman.images.signing import Artefact, new_private_key, sign
from ferryman.images.store import BlobStore, DigestMismatch
from ferryman.pki.ca import CertificateAuthority
from ferryman.testing.clock import FakeClock

ADMIN = "token:admin"


@dataclass
class World:
    tmp: Path
    service: ImageService
    private: bytes
    public: str

    def file(self, name: str, data: bytes) -> Path:
        path = self.tmp / name
        path.write_bytes(data)
        return path

    def upload(self, path: Path) -> Artefact:
        blob = self.service.store.put_file(path)
        return Artefact("disk", blob.digest, blob.size)

    def signed(self, *artefacts: Artefact, private: bytes | None = None) -> str:
        return base64.b64encode(sign(private or self.private, artefacts)).decode()

    def events(self, kind: str) -> list[str]:
        return [e.message for e in self.service.repo.list_events(kind_prefix=kind)]


def service_at(tmp: Path) -> ImageService:
    clock = FakeClock()
    repo = open_repository(f"sqlite:///{tmp / 'cmdb.sqlite'}", clock=clock)
    ca = CertificateAuthority.load_or_create(tmp / "ca", clock)
    fleet = Fleet(repo, object(), ca, clock, Reconciler(repo, clock, 30))  # type: ignore[arg-type]
    return ImageService(fleet, BlobStore(tmp / "images"))


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    private, public = new_private_key()
    service = service_at(tmp_path)
    service.trust("debian", public, ADMIN)
    yield World(tmp_path, service, private, public)
    service.repo.close()  # type: ignore[attr-defined]


def qcow2(path: Path, *extra: str) -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *extra, str(path), "64M"], check=True)
    return path


def test_a_signed_qcow2_image_is_imported_with_its_facts(world: World) -> None:
    disk = world.upload(qcow2(world.tmp / "disk.qcow2"))
    image = world.service.import_image(
        ImageImport("debian-12", disk.digest, "debian", "12.8", world.signed(disk)), ADMIN
    )
    assert (image.format, image.virtual_size, image.publisher, image.boot) == ("qcow2", 64 << 20, "debian", "firmware")
    assert image.disk_digest == disk.digest and image.imported_by == ADMIN
    assert world.service.verified("debian-12") == image
    assert world.events("image.imported") and not world.events("image.refused")


def test_a_kernel_command_line_may_name_only_the_boot_parameters(world: World) -> None:
    disk = world.upload(world.file("disk.raw", b"\0" * 4096))
    kernel = world.upload(world.file("vmlinuz", b"kernel bytes"))
    initrd = world.upload(world.file("initrd", b"initrd bytes"))
    parts = (disk, Artefact("kernel", kernel.digest, kernel.size), Artefact("initrd", initrd.digest, initrd.size))
    req = ImageImport(
        "tiny",
        disk.digest,
        "busybox",
        "1.35",
        world.signed(*parts),
        kernel=kernel.digest,
        initrd=initrd.digest,
        cmdline="console=ttyS0 root=${rootdev}",
    )
    with pytest.raises(errors.InvalidInput, match="rootdev"):
        world.service.import_image(req, ADMIN)


def test_a_direct_kernel_image_is_signed_over_all_three_files(world: World) -> None:
    disk = world.upload(world.file("disk.raw", b"\0" * 4096))
    kernel = world.upload(world.file("vmlinuz", b"kernel bytes"))
    initrd = world.upload(world.file("initrd", b"initrd bytes"))
    parts = (disk, Artefact("kernel", kernel.digest, kernel.size), Artefact("initrd", initrd.digest, initrd.size))
    only_disk = world.signed(disk)
    req = ImageImport("tiny", disk.digest, "busybox", "1.35", only_disk, kernel=kernel.digest, initrd=initrd.digest)
    with pytest.raises(errors.InvalidInput, match="no trusted key"):  # a signature over the disk alone is not enough
        world.service.import_image(req, ADMIN)
    image = world.service.import_image(ImageImport(**{**req.__dict__, "signature": world.signed(*parts)}), ADMIN)
    assert (image.boot, image.cmdline, image.format) == ("kernel", "console=ttyS0", "raw")


@pytest.mark.parametrize("attack", ["unsigned", "other-files", "rogue-key", "wrong-key-name", "garbage"])
def test_an_import_not_signed_by_a_trusted_key_is_refused_audited_and_keeps_nothing(world: World, attack: str) -> None:
    disk = world.upload(world.file("disk.raw", b"\1" * 8192))
    other = world.upload(world.file("other.raw", b"\2" * 8192))
    rogue, _ = new_private_key()
    signature, key = {
        "unsigned": (base64.b64encode(bytes(64)).decode(), None),
        "other-files": (world.signed(other), None),
        "rogue-key": (world.signed(disk, private=rogue), None),
        "wrong-key-name": (world.signed(disk), "nobody"),
        "garbage": ("bm90IGEgc2lnbmF0dXJl", None),
    }[attack]
    with pytest.raises(errors.FerrymanError):
        world.service.import_image(ImageImport("evil", disk.digest, "debian", "12", signature, key=key), ADMIN)
    assert world.service.repo.list_images() == []
    assert len(world.events("image.refused")) == 1


def test_a_qcow2_naming_a_host_file_as_backing_or_data_is_refused(world: World) -> None:
    base = world.file("base.raw", b"\0" * (1 << 20))
    external = ["-o", f"data_file={world.tmp / 'data'}"]
    for name, extra in (("backed", ["-F", "raw", "-b", str(base)]), ("external", external)):
        disk = world.upload(qcow2(world.tmp / f"{name}.qcow2", *extra))
        with pytest.raises(errors.InvalidInput, match=r"backing file|data file"):
            world.service.import_image(ImageImport(name, disk.digest, "debian", "12", world.signed(disk)), ADMIN)
    assert world.service.repo.list_images() == []


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"name": "Bad Name"}, "bad image name"),
        ({"version": "twelve"}, "bad version"),
        ({"firmware": "coreboot"}, "unknown firmware"),
        ({"disk": "sha256:" + "0" * 64}, "no image file"),
        ({"cmdline": "console=ttyS0"}, "needs a direct-kernel image"),
    ],
    ids=["name", "version", "firmware", "missing-disk", "cmdline-without-kernel"],
)
def test_bad_import_requests_are_one_clear_error(world: World, change: dict[str, str], problem: str) -> None:
    disk = world.upload(world.file("disk.raw", b"\3" * 4096))
    req = ImageImport("ok-name", disk.digest, "debian", "12.8", world.signed(disk))
    with pytest.raises(errors.FerrymanError, match=problem):
        world.service.import_image(ImageImport(**{**req.__dict__, **change}), ADMIN)


def test_an_image_altered_in_the_store_revoked_or_whose_key_was_removed_may_not_be_used(world: World) -> None:
    disk = world.upload(world.file("disk.raw", b"\4" * 4096))
    for name in ("a", "b", "c"):
        world.service.import_image(ImageImport(name, disk.digest, "debian", "12", world.signed(disk)), ADMIN)
    path = world.service.store.path(disk.digest)
    path.chmod(0o644)
    path.write_bytes(b"\4" * 4095 + b"\5")  # one byte
    with pytest.raises(DigestMismatch):
        world.service.verified("a")
    path.write_bytes(b"\4" * 4096)
    world.service.verified("a")
    world.service.revoke("b", "CVE-2026-0001", "token:security")
    with pytest.raises(errors.Forbidden, match="revoked: CVE-2026-0001"):
        world.service.verified("b")
    with pytest.raises(errors.Conflict, match="revoked already"):
        world.service.revoke("b", "again", ADMIN)
    world.service.distrust("debian", ADMIN)
    with pytest.raises(errors.InvalidInput, match="no longer trusted"):
        world.service.verified("c")
    assert len(world.events("image.unusable")) == 3 and world.events("image.revoked")


def test_the_registry_and_its_store_survive_a_controller_restart(world: World) -> None:
    disk = world.upload(qcow2(world.tmp / "disk.qcow2"))
    world.service.import_image(ImageImport("debian-12", disk.digest, "debian", "12.8", world.signed(disk)), ADMIN)
    world.service.repo.close()  # type: ignore[attr-defined]
    restarted = service_at(world.tmp)
    world.service = restarted
    assert restarted.verified("debian-12").disk_digest == disk.digest
    assert restarted.store.digests() == [disk.digest]


def test_a_key_is_trusted_once_under_one_name(world: World) -> None:
    with pytest.raises(errors.Conflict, match="trusted already as 'debian'"):
        world.service.trust("debian-again", world.public, ADMIN)
    with pytest.raises(errors.InvalidInput):
        world.service.trust("Bad_Name", new_private_key()[1], ADMIN)
    assert [k.name for k in world.service.repo.list_signing_keys()] == ["debian"]
    assert world.events("image.key_trusted")


def test_a_revocation_holds_for_the_bytes_under_any_name(world: World) -> None:
    """Re-importing a revoked image's file under another name is refused; an alias imported before is unusable."""
    disk = world.upload(world.file("disk.raw", b"\6" * 4096))
    for name in ("orig", "alias"):
        world.service.import_image(ImageImport(name, disk.digest, "debian", "12", world.signed(disk)), ADMIN)
    world.service.revoke("orig", "CVE-2026-0002", ADMIN)
    with pytest.raises(errors.Forbidden, match="which was revoked: CVE-2026-0002"):
        world.service.import_image(ImageImport("again", disk.digest, "debian", "12", world.signed(disk)), ADMIN)
    with pytest.raises(errors.Forbidden, match="a file of image orig"):
        world.service.verified("alias")
    with pytest.raises(errors.InvalidInput, match="reserved"):
        world.service.import_image(
            ImageImport("ferryman-lab-guest", disk.digest, "debian", "12", world.signed(disk)), ADMIN
        )
