"""Certificates for tests: rogue CAs, expired and not-yet-valid host certificates, credentials written to disk.

The rogue CA deliberately has the same name as the real one ("Ferryman CA"), and the forged CA copies the real CA's
certificate in every field but the key, so tests prove that trust rests on the CA's key, not on its name. Expired and
not-yet-valid certificates are dated relative to the CA's clock; a TLS handshake checks them against the system clock,
so handshake tests should give the CA a :class:`SystemClock`.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from ferryman.core.clock import Clock, SystemClock
from ferryman.pki.ca import ROLE_HOST, CertificateAuthority, IssuedCertificate
from ferryman.pki.csr import generate_key, key_to_pem, make_csr, write_certificate, write_private_key

Validity = Literal["valid", "expired", "not-yet-valid"]

_LIFETIME = dt.timedelta(days=30)
_MARGIN = dt.timedelta(days=1)


@dataclass(frozen=True)
class HostCredentials:
    """Paths of a host's certificate, key and CA certificate, and the certificate's serial."""

    cert_path: Path
    key_path: Path
    ca_path: Path
    serial: int


def rogue_ca(tmp_dir: Path, clock: Clock | None = None) -> CertificateAuthority:
    """Another CA, in ``tmp_dir/rogue-ca``, with the same name as the real one but its own key."""
    return CertificateAuthority.load_or_create(tmp_dir / "rogue-ca", clock or SystemClock(), name="Ferryman CA")


def forged_ca(real: CertificateAuthority) -> CertificateAuthority:
    """A CA whose certificate copies the real one field for field (name, serial, key identifiers, dates, extensions)
    but holds another key: what an attacker who has read ``ca.pem`` can build. Certificates it issues name the real
    CA's key identifier as their authority key, so a verifier finds the real CA and must catch the bad signature."""
    key = generate_key()
    original = real.cert
    builder = (
        x509.CertificateBuilder()
        .subject_name(original.subject)
        .issuer_name(original.issuer)
        .public_key(key.public_key())
        .serial_number(original.serial_number)
        .not_valid_before(original.not_valid_before_utc)
        .not_valid_after(original.not_valid_after_utc)
    )
    for extension in original.extensions:
        builder = builder.add_extension(extension.value, critical=extension.critical)
    return CertificateAuthority(key, builder.sign(key, hashes.SHA256()), real.clock)


def expired_host_cert(
    ca: CertificateAuthority, host: str, address: str, key: ec.EllipticCurvePrivateKey, clock: Clock | None = None
) -> IssuedCertificate:
    """A host certificate for ``key`` that expired a day ago (by ``clock``, default the CA's clock)."""
    now = (clock or ca.clock).now()
    return ca.issue(
        key.public_key(), host, ROLE_HOST, [host, address], not_before=now - _LIFETIME, not_after=now - _MARGIN
    )


def not_yet_valid_host_cert(
    ca: CertificateAuthority, host: str, address: str, key: ec.EllipticCurvePrivateKey, clock: Clock | None = None
) -> IssuedCertificate:
    """A host certificate for ``key`` that becomes valid tomorrow (by ``clock``, default the CA's clock)."""
    now = (clock or ca.clock).now()
    return ca.issue(
        key.public_key(), host, ROLE_HOST, [host, address], not_before=now + _MARGIN, not_after=now + _LIFETIME
    )


def write_host_credentials(
    ca: CertificateAuthority, host: str, address: str, directory: Path, *, validity: Validity = "valid"
) -> HostCredentials:
    """Enrol ``host`` with ``ca`` and write ``<host>.pem``, ``<host>.key`` and ``<host>-ca.pem`` to ``directory``.

    The CA file is the issuing CA's and is named per host, so credentials from a rogue CA written to the same directory
    never replace the real CA certificate. ``validity`` picks a normal, an expired or a not-yet-valid certificate.
    """
    directory.mkdir(parents=True, exist_ok=True)
    key = generate_key()
    if validity == "expired":
        issued = expired_host_cert(ca, host, address, key)
    elif validity == "not-yet-valid":
        issued = not_yet_valid_host_cert(ca, host, address, key)
    else:
        issued = ca.sign_host_csr(make_csr(key, host), host, address)
    credentials = HostCredentials(
        cert_path=directory / f"{host}.pem",
        key_path=directory / f"{host}.key",
        ca_path=directory / f"{host}-ca.pem",
        serial=issued.serial,
    )
    write_certificate(credentials.cert_path, issued.pem)
    write_private_key(credentials.key_path, key_to_pem(key))
    write_certificate(credentials.ca_path, ca.cert_pem)
    return credentials
