"""Image signatures as an attacker would try them: an altered artefact, another publisher's key, a stripped kernel,
a malformed signature or key; and the statement a publisher signs, byte for byte."""

from __future__ import annotations

import base64
import hashlib

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ferryman.core.errors import InvalidInput
from ferryman.images.signing import (
    Artefact,
    SignatureInvalid,
    fingerprint,
    new_private_key,
    parse_public_key,
    parse_signature,
    sign,
    signer,
    statement,
    verify,
)


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


DISK = Artefact("disk", digest(b"disk"), 4)
KERNEL = Artefact("kernel", digest(b"kernel"), 6)
INITRD = Artefact("initrd", digest(b"initrd"), 6)


@pytest.fixture
def publisher() -> tuple[bytes, str]:
    return new_private_key()


def test_the_statement_lists_each_artefact_in_a_fixed_order() -> None:
    """What a publisher signs is a stable text: header, then disk, kernel, initrd whatever order they came in."""
    assert statement([INITRD, DISK, KERNEL]).decode().splitlines() == [
        "ferryman-image-v1",
        f"disk {DISK.digest} 4",
        f"kernel {KERNEL.digest} 6",
        f"initrd {INITRD.digest} 6",
    ]
    assert statement([DISK]) == f"ferryman-image-v1\ndisk {DISK.digest} 4\n".encode()


@pytest.mark.parametrize("artefacts", [[KERNEL, INITRD], [DISK, KERNEL]])
def test_an_image_without_disk_or_with_half_a_kernel_is_refused(artefacts: list[Artefact]) -> None:
    with pytest.raises(InvalidInput):
        statement(artefacts)


def test_a_signature_verifies_and_breaks_when_any_artefact_changes(publisher: tuple[bytes, str]) -> None:
    private, public = publisher
    key = parse_public_key(public)
    signature = sign(private, [DISK, KERNEL, INITRD])
    verify(key, signature, [DISK, KERNEL, INITRD])
    altered = Artefact("initrd", digest(b"initrD"), 6)
    for changed in ([DISK, KERNEL, altered], [DISK, KERNEL, Artefact("initrd", INITRD.digest, 7)], [DISK]):
        with pytest.raises(SignatureInvalid):
            verify(key, signature, changed)


def test_the_signer_is_the_trusted_key_that_made_the_signature(publisher: tuple[bytes, str]) -> None:
    private, public = publisher
    other_private, other_public = new_private_key()
    keys = {"acme": parse_public_key(other_public), "debian": parse_public_key(public)}
    assert signer(keys, sign(private, [DISK]), [DISK]) == "debian"
    assert signer(keys, sign(other_private, [DISK]), [DISK]) == "acme"
    rogue, _ = new_private_key()
    with pytest.raises(SignatureInvalid, match="no trusted key"):
        signer(keys, sign(rogue, [DISK]), [DISK])
    with pytest.raises(SignatureInvalid):
        signer({}, sign(private, [DISK]), [DISK])


def test_signatures_are_read_raw_or_base64_and_nothing_else(publisher: tuple[bytes, str]) -> None:
    raw = sign(publisher[0], [DISK])
    assert parse_signature(raw) == raw
    assert parse_signature(base64.b64encode(raw) + b"\n") == raw
    for bad in (b"", b"not base64 !", base64.b64encode(raw[:63]), raw + b"x"):
        with pytest.raises(InvalidInput):
            parse_signature(bad)


def test_public_keys_are_ed25519_pem_or_raw_base64(publisher: tuple[bytes, str]) -> None:
    _, public = publisher
    key = parse_public_key(public)
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert fingerprint(parse_public_key(base64.b64encode(raw))) == fingerprint(key)
    assert fingerprint(key) == "sha256:" + hashlib.sha256(raw).hexdigest()
    rsa_pem = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    for bad in (rsa_pem, b"-----BEGIN PUBLIC KEY-----\ngarbage\n-----END PUBLIC KEY-----\n", b"abc", b""):
        with pytest.raises(InvalidInput):
            parse_public_key(bad)


def test_a_private_key_of_another_kind_cannot_sign() -> None:
    ec = Ed25519PrivateKey.generate()  # unencrypted PKCS#8 is what keygen writes; an encrypted one is refused
    encrypted = ec.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw"),
    )
    for bad in (encrypted, b"not a key"):
        with pytest.raises(InvalidInput):
            sign(bad, [DISK])
