"""A fast, seekable pseudo-random byte stream for the ``random`` scrub mode.

The bytes are the AES-256-CTR keystream of a per-scrub random key, addressed by byte offset: the block with counter
``offset // 16`` is the keystream at ``offset``. Any range can therefore be recomputed from the key alone, which is
how a scrub verifies that the device holds what was written without keeping a copy of it. With AES-NI one core
produces several GiB/s, far more than a disk absorbs, whereas ``os.urandom`` per block would be the bottleneck.

This is a fill pattern, not a secret: a scrub needs bytes that are unpredictable to the storage layer (so it cannot
deduplicate or compress them away) and reproducible for verification. The key is never stored.
"""

from __future__ import annotations

import os

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from ferryman.core.errors import InvalidInput

KEY_BYTES = 32
_BLOCK = 16
_ZEROS_CHUNK = 1 << 20


class Keystream:
    """The AES-256-CTR keystream of one key; ``fill`` and ``read`` give the bytes at any offset."""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise InvalidInput(f"keystream key must be {KEY_BYTES} bytes, got {len(key)}")
        self._algorithm = algorithms.AES(key)
        self._zeros = memoryview(bytes(_ZEROS_CHUNK))

    @classmethod
    def random(cls) -> Keystream:
        """A keystream under a fresh key from the kernel's CSPRNG."""
        return cls(os.urandom(KEY_BYTES))

    def fill(self, offset: int, out: memoryview) -> None:
        """Write the keystream bytes ``[offset, offset + len(out))`` into ``out`` (a writable byte buffer)."""
        if offset < 0:
            raise InvalidInput(f"keystream offset must be >= 0, got {offset}")
        out = out.cast("B")
        skip = offset % _BLOCK
        encryptor = Cipher(self._algorithm, modes.CTR((offset // _BLOCK).to_bytes(_BLOCK, "big"))).encryptor()
        if skip:
            # CTR is a stream mode, so dropping the head of the first block keeps the rest aligned to the counter.
            head = encryptor.update(bytes(_BLOCK))[skip:]
            take = min(len(head), len(out))
            out[:take] = head[:take]
            out = out[take:]
        done = 0
        while done < len(out):
            step = min(_ZEROS_CHUNK, len(out) - done)
            written = encryptor.update_into(self._zeros[:step], out[done : done + step])
            if written != step:
                raise RuntimeError(f"AES-CTR produced {written} bytes for {step}")
            done += step

    def read(self, offset: int, length: int) -> bytes:
        """The keystream bytes ``[offset, offset + length)``."""
        buf = bytearray(length)
        self.fill(offset, memoryview(buf))
        return bytes(buf)
