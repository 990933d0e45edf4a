"""Keys and certificate signing requests, as a host makes them when it enrols.

A host generates its own EC P-256 key, keeps it on its disk (mode 0600, written atomically so a crash never leaves a
truncated key), and sends only a CSR to the controller. The CSR carries nothing but ``CN=<host>``: the CA decides every
other field, so there is no point in asking for more. This module never talks to the network and never sees the CA key.
"""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ferryman import durable
from ferryman.core.errors import PKIError

CURVE = ec.SECP256R1
"""The only curve Ferryman issues or accepts keys on."""


def generate_key() -> ec.EllipticCurvePrivateKey:
    """A new EC P-256 private key."""
    return ec.generate_private_key(CURVE())


def key_to_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """The key as unencrypted PKCS#8 PEM (protected by file permissions, not by a passphrase)."""
    return key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )


def load_private_key(pem: bytes) -> ec.EllipticCurvePrivateKey:
    """Parse a PEM private key; anything but an unencrypted EC P-256 key is a :class:`PKIError`."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as err:
        raise PKIError(f"cannot load private key: {err}") from err
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, CURVE):
        raise PKIError("private key is not an EC P-256 key")
    return key


def make_csr(key: ec.EllipticCurvePrivateKey, host: str) -> bytes:
    """A PEM CSR for ``CN=<host>``, signed with ``key`` (SHA-256)."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    try:
        csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
    except ValueError as err:
        raise PKIError(f"cannot build a CSR for {host!r}: {err}") from err
    return csr.public_bytes(serialization.Encoding.PEM)


def write_atomic(path: Path, data: bytes, *, mode: int) -> None:
    """Write ``data`` to ``path`` atomically and durably (:func:`ferryman.durable.write_atomic`), created with ``mode``;
    a failure is a :class:`PKIError`."""
    try:
        durable.write_atomic(path, data, mode=mode)
    except OSError as err:
        raise PKIError(f"cannot write {path}: {err}") from err


def write_private_key(path: Path, pem: bytes) -> None:
    """Write a private key PEM readable by its owner only (0600), atomically."""
    write_atomic(path, pem, mode=0o600)


def write_certificate(path: Path, pem: bytes) -> None:
    """Write a certificate PEM (public, 0644), atomically."""
    write_atomic(path, pem, mode=0o644)
