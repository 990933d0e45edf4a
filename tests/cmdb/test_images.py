"""The image registry and its trust store on SQLite and PostgreSQL: names are unique, revocation and key removal are
written once, a removed key's name can be trusted again, and an image needs a known publisher."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest

from ferryman.cmdb.images import ImageRecord, SigningKeyRecord
from ferryman.cmdb.sql import SqlRepository
from ferryman.core.errors import Conflict, NotFound

T0 = dt.datetime(2026, 12, 6, 10, tzinfo=dt.UTC)
D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
D3 = "sha256:" + "3" * 64


def key(name: str = "debian", fp: str = D1) -> SigningKeyRecord:
    return SigningKeyRecord(name, "-----BEGIN PUBLIC KEY-----\n...", fp, T0, "token:admin")


def image(name: str = "debian-12", **changes: object) -> ImageRecord:
    base = ImageRecord(
        name=name,
        disk_digest=D1,
        disk_size=1 << 20,
        format="qcow2",
        virtual_size=2 << 30,
        os="debian",
        version="12.8",
        publisher="debian",
        signature="c2ln",
        boot="firmware",
        imported_at=T0,
        imported_by="token:admin",
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_images_round_trip_and_names_are_unique(repo: SqlRepository) -> None:
    repo.add_signing_key(key())
    stored = repo.add_image(image())
    kernel = image(
        "tiny",
        boot="kernel",
        kernel_digest=D2,
        kernel_size=10,
        initrd_digest=D3,
        initrd_size=20,
        cmdline="console=ttyS0",
        guest_agent=True,
    )
    repo.add_image(kernel)
    assert repo.get_image("debian-12") == stored
    assert repo.get_image("tiny") == kernel and [a.role for a in kernel.artefacts()] == ["disk", "kernel", "initrd"]
    assert [i.name for i in repo.list_images()] == ["debian-12", "tiny"]
    with pytest.raises(Conflict):
        repo.add_image(image())
    with pytest.raises(NotFound):
        repo.get_image("nope")


def test_an_image_needs_a_known_publisher(repo: SqlRepository) -> None:
    with pytest.raises(NotFound, match="signing key"):
        repo.add_image(image(publisher="nobody"))
    assert repo.list_images() == []


def test_a_revocation_is_written_once(repo: SqlRepository) -> None:
    repo.add_signing_key(key())
    repo.add_image(image())
    later = T0 + dt.timedelta(hours=1)
    revoked = repo.revoke_image("debian-12", later, "token:sec", "CVE-2026-0001")
    assert revoked.revoked and (revoked.revoked_at, revoked.revoked_by) == (later, "token:sec")
    with pytest.raises(Conflict, match="revoked already"):
        repo.revoke_image("debian-12", later + dt.timedelta(hours=1), "token:other", "again")
    assert repo.get_image("debian-12").revoked_reason == "CVE-2026-0001"
    with pytest.raises(NotFound):
        repo.revoke_image("nope", later, "x", "y")


def test_keys_are_removed_once_and_a_removed_name_can_be_trusted_again(repo: SqlRepository) -> None:
    repo.add_signing_key(key())
    with pytest.raises(Conflict):
        repo.add_signing_key(key(fp=D2))
    removed = repo.remove_signing_key("debian", T0 + dt.timedelta(days=1), "token:admin")
    assert not removed.trusted
    with pytest.raises(Conflict):
        repo.remove_signing_key("debian", T0 + dt.timedelta(days=2), "token:admin")
    assert repo.list_signing_keys(trusted_only=True) == []
    again = repo.add_signing_key(key(fp=D2))
    assert repo.get_signing_key("debian") == again and again.trusted and again.fingerprint == D2
    assert [k.name for k in repo.list_signing_keys()] == ["debian"]
