"""The controller's certificate authority: one EC P-256 key that signs every host and controller certificate.

The CA decides what a certificate says. A host's CSR only proves that the host holds the private key and names the host;
every other field the CSR asks for (extra names, ``CA=true``, other key usages) is ignored, and the CA writes its own
subject (``CN=<name>, OU=<role>, O=Ferryman``), subject alternative names, basic constraints and key usages. The role in
the OU is what peers check (a host certificate cannot act as the controller), so nobody but this module chooses it.

Key usage of issued certificates is ``digitalSignature`` + ``keyAgreement`` and is *not* marked critical: RFC 5480
forbids ``keyEncipherment`` on EC keys, and QEMU (``crypto/tlscredsx509.c``) refuses a certificate whose *critical* key
usage lacks ``keyEncipherment``. A non-critical extension is still enforced by OpenSSL and GnuTLS during the handshake.

What it must not do: hand out the CA key, issue a certificate without a CN it has checked, or issue anything that can
sign other certificates. Revocation is kept elsewhere; the CA only mints serials.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ferryman.core.clock import Clock
from ferryman.core.errors import InvalidInput, PKIError
from ferryman.pki.csr import CURVE, generate_key, key_to_pem, load_private_key, write_atomic, write_private_key

ORGANIZATION = "Ferryman"
ROLE_HOST = "host"
ROLE_CONTROLLER = "controller"
CA_KEY_FILE = "ca.key"
CA_CERT_FILE = "ca.pem"

CA_VALIDITY = dt.timedelta(days=3650)
DEFAULT_VALIDITY = dt.timedelta(days=365)
CLOCK_SKEW = dt.timedelta(minutes=5)
"""Certificates start this long before "now", so a peer whose clock is a little behind still accepts them."""

# One DNS name of at most 64 characters (the X.509 upper bound for a CN); no wildcards, no underscores, no commas or
# other characters that would need escaping in a distinguished name (QEMU's authz compares DN strings verbatim).
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_NAME = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*$")
_ROLE = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
_MAX_CN = 64


@dataclass(frozen=True)
class IssuedCertificate:
    """A certificate the CA has just signed."""

    pem: bytes
    serial: int
    not_before: dt.datetime
    not_after: dt.datetime
    subject: str
    """RFC 4514 string, most specific attribute first: ``CN=hv1,OU=host,O=Ferryman``."""


def check_dns_name(name: str, what: str = "name") -> str:
    """Return ``name`` if it is a plain DNS name usable as a CN, else raise :class:`InvalidInput`."""
    if len(name) > _MAX_CN or not _DNS_NAME.fullmatch(name):
        raise InvalidInput(f"{what} {name!r} is not a valid DNS name of at most {_MAX_CN} characters")
    return name


def _general_name(value: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        return x509.DNSName(check_dns_name(value, "subject alternative name"))


class CertificateAuthority:
    """Signs host and controller certificates with the controller's CA key."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate, clock: Clock) -> None:
        if cert.public_key() != key.public_key():
            raise PKIError("CA certificate does not match the CA key")
        self._key = key
        self._cert = cert
        self._clock = clock

    @classmethod
    def load_or_create(cls, directory: Path, clock: Clock, name: str = "Ferryman CA") -> CertificateAuthority:
        """Load ``ca.key`` and ``ca.pem`` from ``directory``, creating both (and the directory, 0700) on first start."""
        key_path, cert_path = directory / CA_KEY_FILE, directory / CA_CERT_FILE
        if key_path.exists() or cert_path.exists():
            return cls._load(key_path, cert_path, clock)
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            directory.chmod(0o700)
        except OSError as err:
            raise PKIError(f"cannot create CA directory {directory}: {err}") from err
        key = generate_key()
        cert = _self_signed_ca(key, name, clock.now())
        # The key goes first: a crash between the two writes leaves a key without a certificate, which _load reports,
        # never a certificate whose key is lost.
        write_private_key(key_path, key_to_pem(key))
        write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
        return cls(key, cert, clock)

    @classmethod
    def _load(cls, key_path: Path, cert_path: Path, clock: Clock) -> CertificateAuthority:
        missing = [path.name for path in (key_path, cert_path) if not path.exists()]
        if missing:
            raise PKIError(f"incomplete CA in {key_path.parent}: {', '.join(missing)} missing; restore it from backup")
        try:
            key_mode = stat.S_IMODE(os.stat(key_path).st_mode)
            key_pem = key_path.read_bytes()
            cert_pem = cert_path.read_bytes()
        except OSError as err:
            raise PKIError(f"cannot read the CA in {key_path.parent}: {err}") from err
        if key_mode & 0o077:
            raise PKIError(f"CA key {key_path} is accessible by other users (mode {key_mode:o}); chmod 600 it")
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
        except ValueError as err:
            raise PKIError(f"cannot load CA certificate {cert_path}: {err}") from err
        return cls(load_private_key(key_pem), cert, clock)

    @property
    def cert(self) -> x509.Certificate:
        """The CA certificate (self-signed)."""
        return self._cert

    @property
    def clock(self) -> Clock:
        """The clock that dates the certificates this CA issues."""
        return self._clock

    @property
    def cert_pem(self) -> bytes:
        """The CA certificate as PEM, for peers' trust stores."""
        return self._cert.public_bytes(serialization.Encoding.PEM)

    def sign(self, data: bytes) -> bytes:
        """An ECDSA (SHA-256) signature of ``data`` by the CA key: tickets and leases (see ``ferryman.pki.tickets``)."""
        return self._key.sign(data, ec.ECDSA(hashes.SHA256()))

    def issue_crl(
        self, revoked: Sequence[tuple[int, dt.datetime]], validity: dt.timedelta = dt.timedelta(days=1)
    ) -> bytes:
        """A PEM certificate revocation list naming ``(serial, revoked_at)`` pairs, for peers that read CRL files
        (QEMU's ``tls-creds-x509`` reads ``ca-crl.pem``)."""
        now = self._clock.now()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self._cert.subject)
            .last_update(now - CLOCK_SKEW)
            .next_update(now + validity)
        )
        for serial, at in revoked:
            entry = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(at).build()
            builder = builder.add_revoked_certificate(entry)
        crl = builder.sign(self._key, hashes.SHA256())
        return crl.public_bytes(serialization.Encoding.PEM)

    def sign_host_csr(
        self, csr_pem: bytes, host: str, address: str, validity: dt.timedelta = DEFAULT_VALIDITY
    ) -> IssuedCertificate:
        """Issue a host certificate for the key in ``csr_pem``, which must be validly signed and name ``CN=<host>``.

        Everything else in the CSR is ignored. ``address`` becomes an IP SAN when it is an IP address, else a DNS SAN.
        """
        check_dns_name(host, "host name")
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as err:
            raise PKIError(f"malformed CSR for host {host!r}: {err}") from err
        if not csr.is_signature_valid:
            raise PKIError(f"CSR for host {host!r} has an invalid signature")
        names = [attr.value for attr in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        if names != [host]:
            raise PKIError(f"CSR names {names!r} but the enrolling host is {host!r}")
        now = self._clock.now()
        return self.issue(
            csr.public_key(), host, ROLE_HOST, [host, address], not_before=now - CLOCK_SKEW, not_after=now + validity
        )

    def issue_controller_certificate(
        self, name: str, addresses: list[str], validity: dt.timedelta = DEFAULT_VALIDITY
    ) -> tuple[bytes, IssuedCertificate]:
        """A new key and certificate for a controller: ``OU=controller``, SANs ``name``, ``localhost`` and addresses."""
        key = generate_key()
        now = self._clock.now()
        issued = self.issue(
            key.public_key(),
            name,
            ROLE_CONTROLLER,
            [name, "localhost", *addresses],
            not_before=now - CLOCK_SKEW,
            not_after=now + validity,
        )
        return key_to_pem(key), issued

    def issue(
        self,
        public_key: CertificatePublicKeyTypes,
        common_name: str,
        role: str,
        sans: Sequence[str],
        *,
        not_before: dt.datetime,
        not_after: dt.datetime,
    ) -> IssuedCertificate:
        """Sign a leaf certificate ``CN=<common_name>, OU=<role>, O=Ferryman`` for an EC P-256 ``public_key``.

        ``sans`` are IP addresses or DNS names. ``not_after`` is cut to the CA's own expiry. The times are taken as
        given (no clock skew allowance), which lets tests mint expired and not-yet-valid certificates.
        """
        if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(public_key.curve, CURVE):
            raise PKIError(f"refusing to certify {common_name!r}: the key is not an EC P-256 key")
        check_dns_name(common_name, "common name")
        if not _ROLE.fullmatch(role):
            raise InvalidInput(f"role {role!r} is not a short lower-case word")
        not_after = min(not_after, self._cert.not_valid_after_utc)
        if not_after <= not_before:
            raise InvalidInput(
                f"certificate for {common_name!r} would end ({not_after}) before it starts ({not_before})"
            )
        alt_names = list(dict.fromkeys(_general_name(value) for value in sans))
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
                x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            ]
        )
        ca_ski = self._cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self._cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_leaf_key_usage(), critical=False)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        )
        try:
            cert = builder.sign(self._key, hashes.SHA256())
        except (ValueError, TypeError) as err:
            raise PKIError(f"cannot sign certificate for {common_name!r}: {err}") from err
        return IssuedCertificate(
            pem=cert.public_bytes(serialization.Encoding.PEM),
            serial=cert.serial_number,
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            subject=cert.subject.rfc4514_string(),
        )


def _leaf_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=True,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def _self_signed_ca(key: ec.EllipticCurvePrivateKey, name: str, now: dt.datetime) -> x509.Certificate:
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
    )
    try:
        return builder.sign(key, hashes.SHA256())
    except ValueError as err:
        raise PKIError(f"cannot create CA certificate {name!r}: {err}") from err
