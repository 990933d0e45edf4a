"""The content-addressed image store: files land under their digest, read-only, only when the bytes match; a file
altered on disk is found by the next verification; an interrupted upload leaves nothing behind."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from ferryman.core.errors import InvalidInput, NotFound
from ferryman.images.store import BlobStore, DigestMismatch


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
def store(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "images")


def uploads(store: BlobStore) -> list[str]:
    return sorted(p.name for p in (store.root / "tmp").iterdir())


def test_a_file_is_stored_under_its_digest_read_only(store: BlobStore, tmp_path: Path) -> None:
    source = tmp_path / "disk.raw"
    source.write_bytes(os.urandom(3 << 20) + b"tail")
    blob = store.put_file(source)
    assert blob.digest == digest(source.read_bytes()) and blob.size == source.stat().st_size
    assert blob.path.read_bytes() == source.read_bytes()
    assert stat.S_IMODE(blob.path.stat().st_mode) == 0o444
    assert store.has(blob.digest) and store.digests() == [blob.digest] and uploads(store) == []
    assert store.put_file(source, blob.digest) == blob  # again: the same file, nothing new


def test_bytes_that_do_not_match_the_announced_digest_store_nothing(store: BlobStore) -> None:
    with pytest.raises(DigestMismatch):
        store.put_chunks([b"evil", b" bytes"], digest(b"good bytes"))
    assert store.digests() == [] and uploads(store) == []
    good = store.put_chunks([b"good ", b"bytes"], digest(b"good bytes"))
    with pytest.raises(DigestMismatch):  # a file already stored still checks what is sent for it
        store.put_chunks([b"evil bytes"], good.digest)
    assert store.verify(good.digest).path.read_bytes() == b"good bytes"


def test_one_byte_changed_on_disk_is_found(store: BlobStore) -> None:
    blob = store.put_chunks([b"x" * 4096])
    blob.path.chmod(0o644)
    with blob.path.open("r+b") as fh:
        fh.seek(100)
        fh.write(b"y")
    with pytest.raises(DigestMismatch, match="altered on disk"):
        store.verify(blob.digest)


def test_bad_digests_and_missing_files_are_clear_errors(store: BlobStore) -> None:
    for bad in ("sha256:abc", "md5:" + "0" * 32, "sha256:" + "A" * 64, "../../etc/passwd"):
        with pytest.raises(InvalidInput):
            store.path(bad)
    with pytest.raises(NotFound):
        store.get(digest(b"absent"))


def test_an_upload_interrupted_by_a_crash_is_cleared_at_start(store: BlobStore) -> None:
    upload = store.upload()
    upload.write(b"half of an image")
    assert len(uploads(store)) == 1  # the process dies here: no finish, no discard
    reopened = BlobStore(store.root)
    assert uploads(reopened) == [] and reopened.digests() == []
