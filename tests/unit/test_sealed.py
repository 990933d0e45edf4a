"""The sealed evidence format: round trips, and every kind of damage refused (ferryman.forensics.sealed)."""

from __future__ import annotations

import hashlib
import io
import itertools
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ferryman.core.errors import InvalidInput, StorageError
from ferryman.forensics.sealed import (
    MAGIC,
    TAG_BYTES,
    SealedReader,
    SealedWriter,
    SealError,
    SealInfo,
    WrongKey,
    new_key,
    open_sealed,
    unseal_to,
    verify_sealed,
)

CHUNK = 64
ARTEFACT = "memory.elf"


def seal(plaintext: bytes, key: bytes, *, chunk: int = CHUNK, pieces: int = 1, artefact: str = ARTEFACT) -> bytes:
    """``plaintext`` sealed, written in ``pieces`` roughly equal writes."""
    out = io.BytesIO()
    writer = SealedWriter(out, key, artefact=artefact, chunk_size=chunk)
    step = max(1, -(-len(plaintext) // pieces))
    for start in range(0, len(plaintext), step):
        writer.write(plaintext[start : start + step])
    info = writer.close()
    sealed = out.getvalue()
    assert info == SealInfo(
        plaintext_sha256=hashlib.sha256(plaintext).hexdigest(),
        plaintext_bytes=len(plaintext),
        sealed_sha256=hashlib.sha256(sealed).hexdigest(),
        sealed_bytes=len(sealed),
        artefact=artefact,
    )
    return sealed


def unseal(sealed: bytes, key: bytes, **kwargs: str) -> bytes:
    out = io.BytesIO()
    unseal_to(io.BytesIO(sealed), out, key, **kwargs)
    return out.getvalue()


def header_len(artefact: str = ARTEFACT) -> int:
    return len(MAGIC) + 1 + 1 + 4 + 16 + 16 + 2 + len(artefact.encode())


class Trickle(io.RawIOBase):
    """A stream that returns at most 7 bytes per read, as a pipe or socket may."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        part = self._data.read(min(7, len(buffer)))
        buffer[: len(part)] = part
        return len(part)


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, 3 * CHUNK + 5])
@pytest.mark.parametrize("pieces", [1, 3, 1000])
def test_round_trip_of_any_length_written_in_any_pieces(size: int, pieces: int) -> None:
    """What is sealed unseals to the same bytes, with the same hashes, however the writes were cut."""
    key = new_key()
    plaintext = os.urandom(size)
    sealed = seal(plaintext, key, pieces=pieces)
    assert sealed.startswith(MAGIC)
    assert unseal(sealed, key) == plaintext
    digest = hashlib.sha256(plaintext).hexdigest()
    info = verify_sealed(io.BytesIO(sealed), key, artefact=ARTEFACT, expect_sha256=digest)
    assert (info.plaintext_bytes, info.sealed_bytes) == (size, len(sealed))
    assert info.sealed_sha256 == hashlib.sha256(sealed).hexdigest()
    # every chunk but the last is full; the last is final and shorter (empty when the plaintext fills whole chunks)
    assert len(sealed) == header_len() + (size // CHUNK + 1) * TAG_BYTES + size
    assert [len(c) for c in open_sealed(io.BytesIO(sealed), key)] == [CHUNK] * (size // CHUNK) + [size % CHUNK]


@settings(max_examples=50, deadline=None)
@given(data=st.binary(max_size=600), cuts=st.lists(st.integers(0, 600), max_size=8))
def test_round_trip_for_arbitrary_data_and_write_boundaries(data: bytes, cuts: list[int]) -> None:
    """Arbitrary plaintext, written in arbitrary slices, unseals to itself, also through 7-byte reads."""
    key = new_key()
    out = io.BytesIO()
    writer = SealedWriter(out, key, artefact="disk0.raw", chunk_size=CHUNK)
    bounds = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    for start, end in itertools.pairwise(bounds):
        writer.write(memoryview(data)[start:end])
    writer.close()
    assert b"".join(SealedReader(io.BufferedReader(Trickle(out.getvalue())), key)) == data


def test_the_default_chunk_size_round_trips_a_few_mib() -> None:
    """With 1 MiB chunks a plaintext of a few MiB, written in odd pieces, round-trips."""
    key = new_key()
    plaintext = os.urandom(3 * (1 << 20) + 12345)
    out = io.BytesIO()
    writer = SealedWriter(out, key, artefact=ARTEFACT)
    for start in range(0, len(plaintext), 300_001):
        writer.write(plaintext[start : start + 300_001])
    writer.close()
    assert unseal(out.getvalue(), key) == plaintext


def test_every_byte_flipped_anywhere_is_detected() -> None:
    """A changed byte in the header, any chunk's ciphertext or any tag makes the file refuse to open."""
    key = new_key()
    sealed = seal(os.urandom(2 * CHUNK + 22), key)
    for position in range(len(sealed)):
        damaged = bytearray(sealed)
        damaged[position] ^= 0x01
        with pytest.raises(SealError):
            unseal(bytes(damaged), key)
        damaged[position] ^= 0xFF  # every other bit of it too
        with pytest.raises(SealError):
            unseal(bytes(damaged), key)


@pytest.mark.parametrize("size", [2 * CHUNK + 22, 2 * CHUNK])
def test_every_truncation_is_detected(size: int) -> None:
    """Cutting the file anywhere (inside a chunk, at a chunk boundary, dropping the last chunk) is refused."""
    key = new_key()
    sealed = seal(os.urandom(size), key)
    for length in range(len(sealed)):
        with pytest.raises(SealError):
            unseal(sealed[:length], key)
    last_chunk = size % CHUNK + TAG_BYTES
    with pytest.raises(SealError, match="truncated"):
        unseal(sealed[:-last_chunk], key)


def test_swapped_duplicated_or_appended_chunks_are_detected() -> None:
    """Chunks are bound to their position and the final chunk to being last."""
    key = new_key()
    sealed = seal(os.urandom(3 * CHUNK + 10), key)
    head, block = header_len(), CHUNK + TAG_BYTES
    chunks = [sealed[head + i * block : head + (i + 1) * block] for i in range(3)]
    tail = sealed[head + 3 * block :]
    with pytest.raises(SealError, match="chunk 0"):
        unseal(sealed[:head] + chunks[1] + chunks[0] + chunks[2] + tail, key)
    with pytest.raises(SealError, match="chunk 1"):
        unseal(sealed[:head] + chunks[0] + chunks[0] + chunks[2] + tail, key)
    with pytest.raises(SealError):
        unseal(sealed + b"\0", key)
    with pytest.raises(SealError):
        unseal(sealed + tail, key)
    with pytest.raises(SealError):
        unseal(sealed + os.urandom(block), key)


def test_a_chunk_from_another_file_under_the_same_key_is_refused() -> None:
    """Each file has its own salt, so even under one key a chunk cannot move between files."""
    key = new_key()
    one, other = seal(os.urandom(2 * CHUNK), key), seal(os.urandom(2 * CHUNK), key)
    head, block = header_len(), CHUNK + TAG_BYTES
    with pytest.raises(SealError, match="chunk 0"):
        unseal(one[:head] + other[head : head + block] + one[head + block :], key)


def test_wrong_key_wrong_artefact_and_wrong_hash_are_told_apart() -> None:
    """A wrong key is WrongKey; a file sealed under another name or with another plaintext hash is a SealError."""
    key = new_key()
    sealed = seal(b"evidence", key)
    with pytest.raises(WrongKey):
        unseal(sealed, new_key())
    with pytest.raises(SealError, match=r"not 'disk0\.raw'"):
        unseal(sealed, key, artefact="disk0.raw")
    with pytest.raises(SealError, match="hashes to"):
        unseal(sealed, key, expect_sha256=hashlib.sha256(b"other").hexdigest())
    assert unseal(sealed, key, artefact=ARTEFACT, expect_sha256=hashlib.sha256(b"evidence").hexdigest().upper())
    assert issubclass(SealError, StorageError)


def test_not_a_sealed_file_and_an_unfinished_one_are_refused() -> None:
    """Random bytes, an empty file and a writer never closed (a capture that failed) do not open."""
    key = new_key()
    for junk in (b"", os.urandom(100), MAGIC + os.urandom(100)):
        with pytest.raises(SealError):
            unseal(junk, key)
    out = io.BytesIO()
    writer = SealedWriter(out, key, artefact=ARTEFACT, chunk_size=CHUNK)
    writer.write(os.urandom(3 * CHUNK))
    with pytest.raises(SealError, match="truncated"):
        unseal(out.getvalue(), key)


def test_empty_plaintext_seals_to_a_header_and_one_final_chunk() -> None:
    """An empty artefact is still authenticated: a header and an empty final chunk."""
    key = new_key()
    sealed = seal(b"", key)
    assert len(sealed) == header_len() + TAG_BYTES
    assert unseal(sealed, key) == b""
    reader = SealedReader(io.BytesIO(sealed), key)
    with pytest.raises(InvalidInput):
        reader.info()
    assert list(reader) == [b""]
    assert reader.info().plaintext_sha256 == hashlib.sha256(b"").hexdigest()


def test_sealed_bytes_never_contain_a_plaintext_marker() -> None:
    """No 16-byte piece of a marker repeated all through the plaintext appears in the sealed file."""
    key = new_key()
    marker = b"FERRYMAN-CANARY-0123456789abcdef"
    plaintext = b"".join(marker + os.urandom(n % 50) for n in range(40_000))
    sealed = seal(plaintext, key, chunk=1 << 20)
    assert plaintext.count(marker) == 40_000
    for start in range(len(marker) - 15):
        assert marker[start : start + 16] not in sealed
    assert unseal(sealed, key) == plaintext


def test_bad_keys_names_and_chunk_sizes_and_writes_after_close_are_refused() -> None:
    """Keys are 32 bytes, names non-empty, chunk sizes bounded, and a closed writer takes nothing more."""
    out = io.BytesIO()
    with pytest.raises(InvalidInput):
        SealedWriter(out, os.urandom(16), artefact=ARTEFACT)
    with pytest.raises(InvalidInput):
        SealedWriter(out, new_key(), artefact="")
    with pytest.raises(InvalidInput):
        SealedWriter(out, new_key(), artefact=ARTEFACT, chunk_size=8)
    writer = SealedWriter(io.BytesIO(), new_key(), artefact=ARTEFACT)
    assert writer.close() == writer.close()
    with pytest.raises(InvalidInput):
        writer.write(b"late")
