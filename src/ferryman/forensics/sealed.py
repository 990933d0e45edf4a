"""Sealed evidence: a byte stream encrypted and authenticated chunk by chunk (AES-256-GCM), hashed while written.

A forensic artefact (a guest's memory, a disk) must be ciphertext from the first byte that reaches any disk, and
whoever opens it later must be able to tell that no byte was altered, dropped, reordered or cut off. One AES-GCM
over a dump of many GiB would need all of it in memory; fixed-size chunks keep memory bounded and let a capture
stream straight from QEMU into the sealed file.

Format, version 1 (integers big-endian)::

    header   "FMSEAL1\\n" | version u8 | reserved u8 = 0 | chunk_size u32 | salt (16) | key_check (16)
             | artefact_len u16 | artefact (UTF-8)
    chunk i  AES-256-GCM ciphertext of plaintext chunk i | tag (16)          i = 0, 1, ..., n

HKDF-SHA256 turns the artefact's key and the file's random salt into the chunk key, an 8-byte nonce prefix and a
16-byte key check; the check tells a wrong key from a damaged file (and makes up for GCM not committing to its key).
Chunk i is sealed under nonce ``prefix || i`` (u32) with associated data ``SHA-256(header) || i (u64) || final (u8)``.
Every chunk but the last holds exactly ``chunk_size`` bytes of plaintext; the last one, flagged final, holds fewer,
possibly none, so every sealed file ends with a final chunk. Hence a changed byte fails a tag (a header byte through
every chunk's associated data, or the key check); a swapped or reordered chunk fails (its index is in nonce and
associated data); a file missing its last chunk ends without a final one; a cut inside a chunk leaves a short chunk
that fails as final; bytes appended after the final chunk join it and make it fail. The artefact's name is bound
the same way, so a sealed memory dump cannot pass for a disk.

Plaintext and sealed bytes are both hashed (SHA-256) as they pass: :class:`SealInfo` is what a manifest records.

This module reads and writes only the file objects it is handed, never chooses where evidence goes, and does not
know where keys come from or how they are kept (the controller wraps them).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ferryman.core.errors import InvalidInput, StorageError

__all__ = [
    "CHUNK_BYTES",
    "KEY_BYTES",
    "MAGIC",
    "SealError",
    "SealInfo",
    "SealedReader",
    "SealedWriter",
    "WrongKey",
    "new_key",
    "open_sealed",
    "unseal_to",
    "verify_sealed",
]

MAGIC = b"FMSEAL1\n"
VERSION = 1
KEY_BYTES = 32
CHUNK_BYTES = 1 << 20
MIN_CHUNK_BYTES = 16
MAX_CHUNK_BYTES = 64 << 20
TAG_BYTES = 16
SALT_BYTES = 16
MAX_ARTEFACT_BYTES = 1024
MAX_CHUNKS = 1 << 32  # the nonce carries the index in 32 bits
_FIXED = struct.Struct(">8sBBI16s16sH")
_KDF_INFO = b"ferryman sealed evidence v1"


class SealError(StorageError):
    """A sealed file does not open: it is not one, or it was altered, reordered or truncated. Whatever plaintext
    was already read from it must be discarded."""


class WrongKey(SealError):
    """The key does not open this sealed file (or the header's salt or key check was altered)."""


@dataclass(frozen=True)
class SealInfo:
    """What was sealed: SHA-256 (hex) and length of the plaintext and of the sealed file, and the artefact's name."""

    plaintext_sha256: str
    plaintext_bytes: int
    sealed_sha256: str
    sealed_bytes: int
    artefact: str


def new_key() -> bytes:
    """A fresh random key for one artefact."""
    return secrets.token_bytes(KEY_BYTES)


@dataclass(frozen=True)
class _Keys:
    aead: AESGCM
    prefix: bytes
    check: bytes


def _derive(key: bytes, salt: bytes) -> _Keys:
    if len(key) != KEY_BYTES:
        raise InvalidInput(f"a sealing key has {KEY_BYTES} bytes, got {len(key)}")
    material = HKDF(algorithm=hashes.SHA256(), length=56, salt=salt, info=_KDF_INFO).derive(key)
    return _Keys(AESGCM(material[:32]), material[32:40], material[40:56])


def _nonce(keys: _Keys, index: int) -> bytes:
    return keys.prefix + struct.pack(">I", index)


def _aad(header_digest: bytes, index: int, final: bool) -> bytes:
    return header_digest + struct.pack(">QB", index, final)


def _artefact_bytes(artefact: str) -> bytes:
    name = artefact.encode()
    if not name or len(name) > MAX_ARTEFACT_BYTES:
        raise InvalidInput(f"an artefact name has 1 to {MAX_ARTEFACT_BYTES} bytes (UTF-8), got {len(name)}")
    return name


class SealedWriter:
    """Seals what is written to it into ``out``; :meth:`close` writes the final chunk and returns the
    :class:`SealInfo`. The header goes out at once; plaintext is buffered up to one chunk, never more.

    A writer that is never closed leaves a file without its final chunk, which never opens: a capture that failed
    half way cannot be mistaken for evidence. ``out`` stays open; syncing it is the caller's business.
    """

    def __init__(self, out: BinaryIO, key: bytes, *, artefact: str, chunk_size: int = CHUNK_BYTES) -> None:
        if not MIN_CHUNK_BYTES <= chunk_size <= MAX_CHUNK_BYTES:
            raise InvalidInput(f"chunk size must be {MIN_CHUNK_BYTES} to {MAX_CHUNK_BYTES} bytes, got {chunk_size}")
        name = _artefact_bytes(artefact)
        salt = secrets.token_bytes(SALT_BYTES)
        self._keys = _derive(key, salt)
        self._out = out
        self.artefact = artefact
        self.chunk_size = chunk_size
        self._buffer = bytearray()
        self._index = 0
        self._plain = hashlib.sha256()
        self._plain_bytes = 0
        self._sealed = hashlib.sha256()
        self._sealed_bytes = 0
        self._info: SealInfo | None = None
        header = _FIXED.pack(MAGIC, VERSION, 0, chunk_size, salt, self._keys.check, len(name)) + name
        self._header_digest = hashlib.sha256(header).digest()
        self._emit(header)

    @property
    def plaintext_bytes(self) -> int:
        """Plaintext bytes written so far (for progress reports)."""
        return self._plain_bytes

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Seal ``data`` (after what was written before); full chunks go out at once."""
        if self._info is not None:
            raise InvalidInput(f"the sealed writer of {self.artefact} is closed")
        view = memoryview(data).cast("B")
        self._plain.update(view)
        self._plain_bytes += len(view)
        if self._buffer:
            take = self.chunk_size - len(self._buffer)
            self._buffer += view[:take]
            view = view[take:]
            if len(self._buffer) < self.chunk_size:
                return
            self._seal(bytes(self._buffer), final=False)
            self._buffer.clear()
        while len(view) >= self.chunk_size:
            self._seal(view[: self.chunk_size], final=False)
            view = view[self.chunk_size :]
        self._buffer += view

    def close(self) -> SealInfo:
        """Write the final chunk (what is buffered, possibly nothing) and return what was sealed; idempotent."""
        if self._info is None:
            self._seal(bytes(self._buffer), final=True)
            self._buffer.clear()
            self._info = SealInfo(
                plaintext_sha256=self._plain.hexdigest(),
                plaintext_bytes=self._plain_bytes,
                sealed_sha256=self._sealed.hexdigest(),
                sealed_bytes=self._sealed_bytes,
                artefact=self.artefact,
            )
        return self._info

    def _seal(self, plaintext: bytes | memoryview, *, final: bool) -> None:
        if self._index >= MAX_CHUNKS:
            raise InvalidInput(f"{self.artefact} is too large for chunks of {self.chunk_size} bytes")
        nonce = _nonce(self._keys, self._index)
        self._emit(self._keys.aead.encrypt(nonce, plaintext, _aad(self._header_digest, self._index, final)))
        self._index += 1

    def _emit(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = self._out.write(view)
            if written is None or written <= 0:  # a non-blocking raw file would return None
                raise StorageError(f"cannot write the sealed {self.artefact}: the output accepted no bytes")
            view = view[written:]
        self._sealed.update(data)
        self._sealed_bytes += len(data)


class SealedReader:
    """Opens a sealed file: the header is read and the key checked at once (:class:`WrongKey`,
    :class:`SealError`); iterating yields the plaintext chunk by chunk, each only once authenticated.

    The stream is known whole only when the iteration ends without an error: a chunk yielded before an error must be
    discarded with everything else. With ``artefact`` the file must have been sealed under that name.
    """

    def __init__(self, inp: BinaryIO, key: bytes, *, artefact: str | None = None) -> None:
        self._inp = inp
        self._sealed = hashlib.sha256()
        self._sealed_bytes = 0
        self._plain = hashlib.sha256()
        self._plain_bytes = 0
        self._done = False
        fixed = self._read(_FIXED.size)
        if len(fixed) < _FIXED.size or not fixed.startswith(MAGIC):
            raise SealError("not a sealed evidence file (no FMSEAL1 header)")
        _, version, reserved, chunk_size, salt, check, name_len = _FIXED.unpack(fixed)
        if version != VERSION or reserved != 0:
            raise SealError(f"unsupported sealed format version {version}.{reserved}")
        if not MIN_CHUNK_BYTES <= chunk_size <= MAX_CHUNK_BYTES or not 0 < name_len <= MAX_ARTEFACT_BYTES:
            raise SealError(f"corrupt sealed header: chunk size {chunk_size}, name length {name_len}")
        name = self._read(name_len)
        try:
            self.artefact = name.decode() if len(name) == name_len else ""
        except UnicodeDecodeError:
            self.artefact = ""
        if not self.artefact:
            raise SealError("corrupt sealed header: the artefact name is cut off or not UTF-8")
        self.chunk_size = chunk_size
        self._keys = _derive(key, salt)
        if not hmac.compare_digest(self._keys.check, check):
            raise WrongKey(f"the key does not open the sealed {self.artefact!r} (or its header was altered)")
        if artefact is not None and artefact != self.artefact:
            raise SealError(f"this file seals {self.artefact!r}, not {artefact!r}")
        self._header_digest = hashlib.sha256(fixed + name).digest()

    def __iter__(self) -> Iterator[bytes]:
        index = 0
        while not self._done:
            block = self._read(self.chunk_size + TAG_BYTES)
            final = len(block) < self.chunk_size + TAG_BYTES
            if len(block) < TAG_BYTES:
                raise SealError(f"sealed {self.artefact!r} is truncated: it ends before its final chunk {index}")
            try:
                plaintext = self._keys.aead.decrypt(
                    _nonce(self._keys, index), block, _aad(self._header_digest, index, final)
                )
            except InvalidTag:
                raise SealError(
                    f"chunk {index} of sealed {self.artefact!r} fails authentication: altered, reordered or truncated"
                ) from None
            self._done = final
            self._plain.update(plaintext)
            self._plain_bytes += len(plaintext)
            index += 1
            yield plaintext

    def info(self) -> SealInfo:
        """The hashes and lengths of what was read; only once iteration has ended."""
        if not self._done:
            raise InvalidInput(f"sealed {self.artefact!r} has not been read to its end")
        return SealInfo(
            plaintext_sha256=self._plain.hexdigest(),
            plaintext_bytes=self._plain_bytes,
            sealed_sha256=self._sealed.hexdigest(),
            sealed_bytes=self._sealed_bytes,
            artefact=self.artefact,
        )

    def _read(self, size: int) -> bytes:
        """Up to ``size`` bytes: fewer only at the end of the file (short reads of pipes and raw files are joined)."""
        parts = []
        wanted = size
        while wanted > 0:
            part = self._inp.read(wanted)
            if not part:
                break
            parts.append(part)
            wanted -= len(part)
        data = b"".join(parts)
        self._sealed.update(data)
        self._sealed_bytes += len(data)
        return data


def open_sealed(inp: BinaryIO, key: bytes, *, artefact: str | None = None) -> Iterator[bytes]:
    """The authenticated plaintext chunks of the sealed file ``inp`` (see :class:`SealedReader`)."""
    return iter(SealedReader(inp, key, artefact=artefact))


def unseal_to(
    inp: BinaryIO,
    out: BinaryIO | None,
    key: bytes,
    *,
    artefact: str | None = None,
    expect_sha256: str | None = None,
) -> SealInfo:
    """Write the plaintext of ``inp`` to ``out`` (None: only verify) and return what was read.

    With ``expect_sha256`` (a manifest's plaintext hash) the plaintext must hash to it. On :class:`SealError` the
    caller must discard whatever reached ``out``.
    """
    reader = SealedReader(inp, key, artefact=artefact)
    for chunk in reader:
        if out is not None:
            out.write(chunk)
    info = reader.info()
    if expect_sha256 is not None and not hmac.compare_digest(info.plaintext_sha256, expect_sha256.lower()):
        raise SealError(
            f"sealed {info.artefact!r} opens but its plaintext hashes to {info.plaintext_sha256}, not {expect_sha256}"
        )
    return info


def verify_sealed(
    inp: BinaryIO, key: bytes, *, artefact: str | None = None, expect_sha256: str | None = None
) -> SealInfo:
    """Authenticate every chunk of ``inp`` without keeping the plaintext; returns what was read."""
    return unseal_to(inp, None, key, artefact=artefact, expect_sha256=expect_sha256)
