"""A content-addressed store of image files: each file is kept under its SHA-256 digest, written once, read-only.

The controller keeps every imported artefact here, and each host caches the images it runs the same way. A file is
hashed while it is written, into a temporary file beside its final place; only a file whose digest is the one
announced (or, for a new upload, the one computed) is renamed into place, synced, and made read-only (0444), so a
reader never sees a partial or unverified file. :meth:`BlobStore.verify` hashes a stored file again: a file altered
on disk behind the store's back (one byte) is found there, and every boot, migration and restore asks for it.

What it must not do: decide whether an image is trusted (signatures are :mod:`ferryman.images.signing`'s, trust the
registry's) or delete a file some VM still backs onto (callers decide what is unused).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import secrets
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ferryman.core.errors import InvalidInput, NotFound, PermanentError
from ferryman.durable import fsync_directory
from ferryman.images.signing import check_digest

CHUNK = 1 << 20
FLUSH_BYTES = 4 << 20  # what a streamed upload buffers before one write
_TMP_RE = re.compile(r"^\.upload-[0-9a-f]{16}$")


class DigestMismatch(InvalidInput):
    """The bytes received or stored do not hash to the digest they were announced as."""


class StoreError(PermanentError):
    """The store's directory could not be read or written."""


@dataclass(frozen=True)
class Blob:
    digest: str
    size: int
    path: Path


def sha256_file(path: Path) -> str:
    """``sha256:<hex>`` of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


class BlobStore:
    """Files under ``root/sha256/<hex>``; uploads in progress under ``root/tmp``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._blobs = root / "sha256"
        self._tmp = root / "tmp"
        try:
            self._blobs.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._tmp.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as err:
            raise StoreError(f"cannot create the image store at {root}: {err}") from err
        for leftover in self._tmp.iterdir():  # an upload a crash interrupted: never a stored file
            if _TMP_RE.match(leftover.name):
                with contextlib.suppress(OSError):
                    leftover.unlink()

    def path(self, digest: str) -> Path:
        return self._blobs / check_digest(digest).removeprefix("sha256:")

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def get(self, digest: str) -> Blob:
        path = self.path(digest)
        try:
            return Blob(digest, path.stat().st_size, path)
        except FileNotFoundError:
            raise NotFound(f"no image file {digest} in the store") from None

    def verify(self, digest: str) -> Blob:
        """The stored file, hashed again now (DigestMismatch if it changed since it was stored)."""
        blob = self.get(digest)
        try:
            actual = sha256_file(blob.path)
        except OSError as err:
            raise StoreError(f"cannot read stored image file {digest}: {err}") from err
        if actual != digest:
            raise DigestMismatch(f"stored image file {digest} now hashes to {actual}: it was altered on disk")
        return blob

    def put_file(self, source: Path, expected: str | None = None) -> Blob:
        """Copy ``source`` in (hashing while copying); ``expected``: the digest it must have."""
        try:
            with source.open("rb") as fh:
                return self.put_chunks(iter(lambda: fh.read(CHUNK), b""), expected)
        except OSError as err:
            raise InvalidInput(f"cannot read {source}: {err.strerror or err}") from err

    def put_chunks(self, chunks: Iterable[bytes], expected: str | None = None) -> Blob:
        upload = self.upload(expected)
        try:
            for chunk in chunks:
                upload.write(chunk)
            return upload.finish()
        finally:
            upload.discard()

    def upload(self, expected: str | None = None) -> Upload:
        """An upload to feed with :meth:`Upload.write` and end with :meth:`Upload.finish` (or :meth:`Upload.discard`).
        A file already here is not written again, but the bytes sent are hashed and checked nonetheless."""
        present = expected is not None and self.has(check_digest(expected))
        tmp = None if present else self._tmp / f".upload-{secrets.token_hex(8)}"
        return Upload(self, tmp, expected)

    def _stored(self, upload: Upload, digest: str) -> Blob:
        target = self.path(digest)
        if upload.tmp is None or target.exists():
            return self.get(digest)
        try:
            os.chmod(upload.tmp, 0o444)
            os.link(upload.tmp, target)  # never replaces a file another upload stored meanwhile
        except FileExistsError:
            pass
        except OSError as err:
            raise StoreError(f"cannot store {digest}: {err}") from err
        fsync_directory(self._blobs)
        return self.get(digest)

    def remove(self, digest: str) -> None:
        """Delete a stored file (NotFound if absent); the caller knows nothing uses it."""
        try:
            self.path(digest).unlink()
        except FileNotFoundError:
            raise NotFound(f"no image file {digest} in the store") from None
        fsync_directory(self._blobs)

    def digests(self) -> list[str]:
        return sorted("sha256:" + p.name for p in self._blobs.iterdir() if p.is_file())


async def receive(upload: Upload, chunks: AsyncIterator[bytes], *, limit: int | None = None) -> Blob:
    """Feed an HTTP body (or any stream) into ``upload`` and finish it: written in worker threads a few MiB at a
    time, never on the caller's event loop; more than ``limit`` bytes is InvalidInput. The upload is discarded
    whatever happens (a stored file is a link of its own)."""
    try:
        pending: list[bytes] = []
        buffered = received = 0
        async for chunk in chunks:
            received += len(chunk)
            if limit is not None and received > limit:
                raise InvalidInput(f"an image file may hold at most {limit >> 30} GiB")
            pending.append(chunk)
            buffered += len(chunk)
            if buffered >= FLUSH_BYTES:
                await asyncio.to_thread(upload.write, b"".join(pending))
                pending, buffered = [], 0
        if pending:
            await asyncio.to_thread(upload.write, b"".join(pending))
        return await asyncio.to_thread(upload.finish)
    finally:
        await asyncio.to_thread(upload.discard)


class Upload:
    """One file arriving: hashed as it is written to a temporary file (none when the store holds it already)."""

    def __init__(self, store: BlobStore, tmp: Path | None, expected: str | None) -> None:
        self.tmp = tmp
        self.size = 0
        self._store = store
        self._expected = expected
        self._hash = hashlib.sha256()
        self._fh: BinaryIO | None = None
        if tmp is not None:
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            except OSError as err:
                raise StoreError(f"cannot write to the image store: {err}") from err
            self._fh = os.fdopen(fd, "wb")

    def write(self, chunk: bytes) -> None:
        self._hash.update(chunk)
        self.size += len(chunk)
        if self._fh is not None:
            try:
                self._fh.write(chunk)
            except OSError as err:
                raise StoreError(f"cannot write to the image store: {err}") from err

    def finish(self) -> Blob:
        """Store the file under its digest (DigestMismatch, nothing stored, if it is not the one expected)."""
        if self._fh is not None:
            try:
                self._fh.flush()
                os.fsync(self._fh.fileno())
            except OSError as err:
                raise StoreError(f"cannot write to the image store: {err}") from err
            finally:
                self._fh.close()
                self._fh = None
        digest = "sha256:" + self._hash.hexdigest()
        if self._expected is not None and digest != self._expected:
            raise DigestMismatch(f"received bytes hash to {digest}, not {self._expected}: nothing was stored")
        return self._store._stored(self, digest)

    def discard(self) -> None:
        """Drop the temporary file (after :meth:`finish` too: the stored file is a link of its own)."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self.tmp is not None:
            with contextlib.suppress(OSError):
                self.tmp.unlink()
