"""Image signatures: a publisher's Ed25519 signature over the digests of an image's artefacts.

What is signed is a short text, the *statement*, never the image itself: the SHA-256 digest and size of the disk and,
for a direct-kernel image, of its kernel and initrd (OpenStack's kernel and ramdisk images), one line each::

    ferryman-image-v1
    disk sha256:<64 hex> <bytes>
    kernel sha256:<64 hex> <bytes>
    initrd sha256:<64 hex> <bytes>

so a signature covers every artefact that boots, one byte changed in any of them breaks it, and a publisher can sign
a multi-GiB image without reading it twice. A publisher signs with ``ferryman image sign`` or with OpenSSL
(``openssl pkeyutl -sign -rawin -inkey key.pem -in statement.txt``); the signature file holds the 64 raw bytes or
their base64. Public keys are PEM (SubjectPublicKeyInfo) or the base64 of the 32 raw bytes.

This module is pure: it reads no file and trusts no key by itself; which keys are trusted is the registry's.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ferryman.core.errors import InvalidInput
from ferryman.core.models import ImageRef

STATEMENT_HEADER = "ferryman-image-v1"
ROLES = ("disk", "kernel", "initrd")
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


class SignatureInvalid(InvalidInput):
    """A signature that does not verify, or that no trusted key made."""


@dataclass(frozen=True)
class Artefact:
    """One file of an image: its role (``disk``, ``kernel`` or ``initrd``), ``sha256:<hex>`` digest and size."""

    role: str
    digest: str
    size: int

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise InvalidInput(f"unknown image artefact {self.role!r}: one of {', '.join(ROLES)}")
        check_digest(self.digest)
        if self.size < 0:
            raise InvalidInput(f"bad size {self.size} for the {self.role}")


def ref_artefacts(ref: ImageRef) -> list[Artefact]:
    """The signed files of the image a VM spec names: its disk, and a direct-kernel image's kernel and initrd."""
    found = [Artefact("disk", ref.digest, ref.size)]
    if ref.kernel is not None and ref.initrd is not None:
        found.append(Artefact("kernel", ref.kernel, ref.kernel_size or 0))
        found.append(Artefact("initrd", ref.initrd, ref.initrd_size or 0))
    return found


def check_digest(digest: str) -> str:
    """``digest`` if it is ``sha256:`` and 64 lower-case hex digits (InvalidInput otherwise)."""
    if not _DIGEST_RE.match(digest):
        raise InvalidInput(f"bad digest {digest!r}: expected sha256:<64 lower-case hex digits>")
    return digest


def statement(artefacts: Iterable[Artefact]) -> bytes:
    """The bytes a publisher signs: the header, then one line per artefact in the order disk, kernel, initrd."""
    by_role = {a.role: a for a in artefacts}
    if "disk" not in by_role:
        raise InvalidInput("an image needs a disk")
    if ("kernel" in by_role) != ("initrd" in by_role):
        raise InvalidInput("a direct-kernel image needs both a kernel and an initrd")
    lines = [STATEMENT_HEADER] + [f"{r} {by_role[r].digest} {by_role[r].size}" for r in ROLES if r in by_role]
    return ("\n".join(lines) + "\n").encode()


def parse_signature(data: bytes) -> bytes:
    """The 64 signature bytes from a signature file: raw, or base64 text."""
    if len(data) == 64:
        return data
    return _base64_of(data, 64, "a signature must be 64 raw Ed25519 bytes or their base64")


def parse_public_key(data: bytes | str) -> Ed25519PublicKey:
    """An Ed25519 public key from PEM (SubjectPublicKeyInfo) or the base64 of its 32 raw bytes."""
    text = data.encode() if isinstance(data, str) else data
    if b"-----BEGIN" in text:
        try:
            key = serialization.load_pem_public_key(text)
        except ValueError as err:
            raise InvalidInput(f"unreadable public key: {err}") from err
        if not isinstance(key, Ed25519PublicKey):
            raise InvalidInput(f"image signing keys are Ed25519, not {type(key).__name__.removesuffix('PublicKey')}")
        return key
    raw = _base64_of(text, 32, "a public key must be PEM or the base64 of 32 raw Ed25519 bytes")
    return Ed25519PublicKey.from_public_bytes(raw)


def _base64_of(text: bytes, length: int, problem: str) -> bytes:
    """The ``length`` bytes ``text`` holds in base64 (InvalidInput saying ``problem`` otherwise)."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != length:
        raise InvalidInput(problem)
    return raw


def public_pem(key: Ed25519PublicKey) -> str:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def fingerprint(key: Ed25519PublicKey) -> str:
    """``sha256:<hex>`` of the raw public key: how a key is named in listings and audit events."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def verify(key: Ed25519PublicKey, signature: bytes, artefacts: Iterable[Artefact]) -> None:
    """SignatureInvalid unless ``signature`` is ``key``'s over the statement of ``artefacts``."""
    try:
        key.verify(signature, statement(artefacts))
    except InvalidSignature:
        raise SignatureInvalid("the signature does not match the image's artefacts and the publisher's key") from None


def signer(keys: dict[str, Ed25519PublicKey], signature: bytes, artefacts: Iterable[Artefact]) -> str:
    """The name of the trusted key that made ``signature`` (SignatureInvalid if none did)."""
    body = statement(artefacts)
    for name, key in sorted(keys.items()):
        try:
            key.verify(signature, body)
        except InvalidSignature:
            continue
        return name
    raise SignatureInvalid("no trusted key made this signature: unsigned, altered, or signed by an untrusted publisher")


def sign(private_pem: bytes, artefacts: Iterable[Artefact]) -> bytes:
    """A publisher's signature (64 bytes) over the statement of ``artefacts``."""
    try:
        key = serialization.load_pem_private_key(private_pem, password=None)
    except (ValueError, TypeError) as err:
        raise InvalidInput(f"unreadable private key: {err}") from err
    if not isinstance(key, Ed25519PrivateKey):
        raise InvalidInput("image signing keys are Ed25519")
    return key.sign(statement(artefacts))


def new_private_key() -> tuple[bytes, str]:
    """A new publisher key: its private PEM (PKCS#8, unencrypted) and public PEM."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return private, public_pem(key.public_key())
