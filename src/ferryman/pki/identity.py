"""Who is on the other end of a TLS connection, and may they be there.

The TLS layer proves that the peer holds a key certified by our CA; that is not enough. A migration is bound to one
specific host pair and the agent API to the controller, so after the handshake :func:`check_peer` reads the verified
certificate and checks its role (OU), its name (CN), its validity against the injected clock, and revocation. Every
failure is :class:`~ferryman.core.errors.Forbidden` with a message that says what was expected and what was presented.

:func:`subject_dn_for_qemu` produces the string QEMU's ``authz-simple`` object compares with the peer's DN, so QEMU's
own TLS layer can enforce the same binding on the migration and NBD streams.

What it must not do: treat a certificate as verified on its own word. :func:`identity_from_der` and :func:`check_peer`
assume the chain was verified by the TLS layer (or by :func:`verify_issued_by`) and only read it.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import NameOID

from ferryman.core.clock import Clock
from ferryman.core.errors import Forbidden, PKIError


@dataclass(frozen=True)
class PeerIdentity:
    """The identity a verified peer certificate states."""

    common_name: str
    role: str
    """The OU: ``host``, ``controller``, or anything else a foreign certificate says (never trusted for access)."""
    serial: int
    not_after: dt.datetime
    subject: str
    """RFC 4514, most specific first: ``CN=hv1,OU=host,O=Ferryman``."""


def _load_der(der: bytes) -> x509.Certificate:
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError as err:
        raise Forbidden(f"peer certificate cannot be parsed: {err}") from err


def _single(cert: x509.Certificate, oid: x509.ObjectIdentifier, label: str, *, required: bool) -> str:
    values = [attr.value for attr in cert.subject.get_attributes_for_oid(oid)]
    if len(values) > 1:
        raise Forbidden(f"peer certificate {cert.subject.rfc4514_string()!r} has {len(values)} {label} attributes")
    if not values:
        if required:
            raise Forbidden(f"peer certificate {cert.subject.rfc4514_string()!r} has no {label}")
        return ""
    value = values[0]
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def _identity(cert: x509.Certificate) -> PeerIdentity:
    return PeerIdentity(
        common_name=_single(cert, NameOID.COMMON_NAME, "common name (CN)", required=True),
        role=_single(cert, NameOID.ORGANIZATIONAL_UNIT_NAME, "role (OU)", required=False),
        serial=cert.serial_number,
        not_after=cert.not_valid_after_utc,
        subject=cert.subject.rfc4514_string(),
    )


def identity_from_der(der: bytes) -> PeerIdentity:
    """The identity in a DER certificate that the TLS layer has already verified against our CA."""
    return _identity(_load_der(der))


def verify_issued_by(cert: x509.Certificate, ca_cert: x509.Certificate) -> None:
    """Raise :class:`Forbidden` unless ``cert`` carries a valid signature of ``ca_cert``'s key.

    Names are not enough: a rogue CA can be called "Ferryman CA" too. Only the signature is checked here, not validity
    times or revocation (see :func:`check_peer`).
    """
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature) as err:
        raise Forbidden(
            f"certificate {cert.subject.rfc4514_string()!r} was not issued by {ca_cert.subject.rfc4514_string()!r}"
        ) from err


def check_peer(
    der: bytes,
    *,
    expected_role: str,
    expected_name: str | None,
    is_revoked: Callable[[int], bool],
    clock: Clock,
    issuer: x509.Certificate | None = None,
) -> PeerIdentity:
    """Check that a peer certificate is the one this connection expects, and return its identity.

    ``expected_name`` None accepts any name with the right role (e.g. any host may report to the controller). When
    ``issuer`` is given the CA signature is checked too, for certificates that did not come through a verifying
    handshake. Raises :class:`Forbidden` for an expired, not-yet-valid or revoked certificate, or a wrong role or name.
    """
    cert = _load_der(der)
    if issuer is not None:
        verify_issued_by(cert, issuer)
    identity = _identity(cert)
    now = clock.now()
    if now < cert.not_valid_before_utc:
        raise Forbidden(
            f"certificate of {identity.common_name!r} is not valid before {cert.not_valid_before_utc.isoformat()}"
        )
    if now > cert.not_valid_after_utc:
        raise Forbidden(f"certificate of {identity.common_name!r} expired at {cert.not_valid_after_utc.isoformat()}")
    if identity.role != expected_role:
        raise Forbidden(
            f"peer {identity.common_name!r} has role {identity.role or '(none)'!r}, expected {expected_role!r}"
        )
    if expected_name is not None and identity.common_name != expected_name:
        raise Forbidden(f"peer is {identity.common_name!r}, expected {expected_name!r}")
    if is_revoked(identity.serial):
        raise Forbidden(f"certificate of {identity.common_name!r} (serial {identity.serial:x}) is revoked")
    return identity


# Attribute values that need no escaping in either RFC 4514 or GnuTLS' older DN format, so the two cannot disagree.
_PLAIN_VALUE = re.compile(r"^[A-Za-z0-9.-](?:[A-Za-z0-9 .-]*[A-Za-z0-9.-])?$")
_QEMU_ATTRIBUTES = {
    NameOID.COMMON_NAME: "CN",
    NameOID.ORGANIZATIONAL_UNIT_NAME: "OU",
    NameOID.ORGANIZATION_NAME: "O",
    NameOID.LOCALITY_NAME: "L",
    NameOID.STATE_OR_PROVINCE_NAME: "ST",
    NameOID.COUNTRY_NAME: "C",
    NameOID.DOMAIN_COMPONENT: "DC",
}


def subject_dn_for_qemu(cert: x509.Certificate) -> str:
    """The subject DN exactly as QEMU's ``authz-simple`` ``identity`` must spell it for this x509 peer.

    QEMU (``crypto/tlssession.c``) takes the DN from ``gnutls_x509_crt_get_dn()``, which keeps GnuTLS' pre-3.5.6
    format: RDNs in the order they are *encoded* in the certificate, not reversed as RFC 4514 prescribes. Our
    certificates encode ``O, OU, CN``, so a host's DN is ``O=Ferryman,OU=host,CN=hv1``, while RFC 4514 (and
    :attr:`PeerIdentity.subject`) says ``CN=hv1,OU=host,O=Ferryman``. Checked against QEMU 7.2 with GnuTLS 3.7: the
    first form is authorised, the second is denied. On a command line (``-object authz-simple,identity=...``) every
    comma must be doubled; QMP ``object-add`` takes the string as is.

    Raises :class:`PKIError` for subjects whose spelling could differ between the two formats (escaped characters,
    multi-valued RDNs, unusual attributes); Ferryman never issues such certificates.
    """
    parts: list[str] = []
    for rdn in cert.subject.rdns:
        attributes = list(rdn)
        if len(attributes) != 1:
            raise PKIError(f"subject {cert.subject.rfc4514_string()!r} has a multi-valued RDN")
        attribute = attributes[0]
        label = _QEMU_ATTRIBUTES.get(attribute.oid)
        value = attribute.value if isinstance(attribute.value, str) else ""
        if label is None or not _PLAIN_VALUE.fullmatch(value):
            raise PKIError(f"subject {cert.subject.rfc4514_string()!r} cannot be spelled reliably for QEMU authz")
        parts.append(f"{label}={value}")
    if not parts:
        raise PKIError("certificate has an empty subject")
    return ",".join(parts)


def qemu_dn_of_host(host: str) -> str:
    """The DN QEMU sees for the host certificates this CA issues to ``host`` (they are issued as
    ``O=Ferryman, OU=host, CN=<host>``, in that order; see :func:`subject_dn_for_qemu`)."""
    return f"O=Ferryman,OU=host,CN={host}"
