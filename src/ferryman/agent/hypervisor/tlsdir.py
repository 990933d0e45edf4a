"""The directory QEMU's ``tls-creds-x509`` object reads, prepared from a host's certificate, key and CA.

QEMU takes a directory and looks for fixed file names in it: ``ca-cert.pem`` (the CAs it trusts), ``server-cert.pem``
and ``server-key.pem`` (for ``endpoint=server``), ``client-cert.pem`` and ``client-key.pem`` (for ``endpoint=client``),
and ``ca-crl.pem`` when revocations must be enforced. A host is the server of its incoming migrations and the client
of its outgoing ones under one identity (host certificates carry both serverAuth and clientAuth), so one directory
serves both ends.

For ``endpoint=server`` QEMU also reads ``dh-params.pem``; without that file it generates fresh 2048-bit
Diffie-Hellman parameters at every ``object-add``, which took 0.07-0.65 s on the lab machine, on the destination's
critical path. We write the RFC 7919 group ``ffdhe2048`` instead: a vetted, published group (GnuTLS and OpenSSL name
it), used only by TLS 1.2 DHE suites; TLS 1.3 negotiates its own groups.

The files are checked before QEMU sees them, so a mistake is reported here by name rather than as a GnuTLS error at
``object-add``: the key must match the certificate, the certificate must be signed by one of the trusted CAs, a CRL must
be signed by one of them too. The directory is 0700 and every file 0600: the key is the host's migration identity.

What it must not do: accept a key that does not match, write anything readable by others, or keep a CRL from an
earlier call that the caller did not pass again (a stale file would silently change who is refused).
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from ferryman.core.errors import PKIError
from ferryman.pki.csr import load_private_key, write_atomic
from ferryman.pki.identity import subject_dn_for_qemu

CA_CERT = "ca-cert.pem"
CRL = "ca-crl.pem"
SERVER_CERT = "server-cert.pem"
SERVER_KEY = "server-key.pem"
CLIENT_CERT = "client-cert.pem"
CLIENT_KEY = "client-key.pem"
DH_PARAMS = "dh-params.pem"

FFDHE2048_PEM = b"""-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
"""
"""RFC 7919 appendix A.1, ffdhe2048 (generator 2), as PKCS #3 parameters."""

REQUIRED = {"server": (CA_CERT, SERVER_CERT, SERVER_KEY, DH_PARAMS), "client": (CA_CERT, CLIENT_CERT, CLIENT_KEY)}
"""The files QEMU needs in the directory for each endpoint role."""


def write_tls_dir(
    directory: Path, *, cert_pem: bytes, key_pem: bytes, ca_pem: bytes, crl_pem: bytes | None = None
) -> Path:
    """Write a ``tls-creds-x509`` directory for one host identity and return it.

    ``ca_pem`` may hold several CA certificates. ``crl_pem`` becomes ``ca-crl.pem``; without it any earlier CRL file
    is removed. Raises :class:`PKIError` for unreadable PEM, a key that does not match the certificate, a certificate
    or CRL not signed by a CA in ``ca_pem``.
    """
    cert = _load_cert(cert_pem)
    cas = _load_cas(ca_pem)
    if load_private_key(key_pem).public_key() != cert.public_key():
        raise PKIError(f"the key does not belong to certificate {cert.subject.rfc4514_string()!r}")
    _require_issuer(cert, cas)
    if crl_pem is not None:
        _check_crl(crl_pem, cas)
    _make_private_dir(directory)
    write_atomic(directory / CA_CERT, ca_pem, mode=0o600)
    for name, data in ((SERVER_CERT, cert_pem), (CLIENT_CERT, cert_pem), (SERVER_KEY, key_pem), (CLIENT_KEY, key_pem)):
        write_atomic(directory / name, data, mode=0o600)
    write_atomic(directory / DH_PARAMS, FFDHE2048_PEM, mode=0o600)
    if crl_pem is not None:
        write_atomic(directory / CRL, crl_pem, mode=0o600)
    else:
        with contextlib.suppress(FileNotFoundError):
            (directory / CRL).unlink()
    return directory


def tls_dir_from_files(directory: Path, *, cert: Path, key: Path, ca: Path, crl: Path | None = None) -> Path:
    """:func:`write_tls_dir` from a host's credential files (e.g. its enrolment's ``host.pem``/``host.key``)."""
    try:
        cert_pem, key_pem, ca_pem = cert.read_bytes(), key.read_bytes(), ca.read_bytes()
        crl_pem = crl.read_bytes() if crl is not None else None
    except OSError as err:
        raise PKIError(f"cannot read TLS credentials: {err}") from err
    return write_tls_dir(directory, cert_pem=cert_pem, key_pem=key_pem, ca_pem=ca_pem, crl_pem=crl_pem)


def check_tls_dir(directory: Path, endpoint: str) -> Path:
    """Return ``directory`` if it holds what QEMU needs for ``endpoint`` (server or client) and is private to us."""
    try:
        mode = stat.S_IMODE(os.stat(directory).st_mode)
    except OSError as err:
        raise PKIError(f"TLS directory {directory} is not usable: {err}") from err
    if mode & 0o077:
        raise PKIError(f"TLS directory {directory} is accessible by other users (mode {mode:o})")
    missing = [name for name in REQUIRED[endpoint] if not (directory / name).is_file()]
    if missing:
        raise PKIError(f"TLS directory {directory} lacks {', '.join(missing)} for endpoint={endpoint}")
    return directory


def qemu_identity(cert_pem: bytes) -> str:
    """The DN that QEMU's ``authz-simple`` must name to admit the holder of this certificate."""
    return subject_dn_for_qemu(_load_cert(cert_pem))


def _make_private_dir(directory: Path) -> None:
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if directory.is_symlink() or not directory.is_dir():
            raise PKIError(f"TLS directory {directory} is not a plain directory")
        directory.chmod(0o700)
    except OSError as err:
        raise PKIError(f"cannot create TLS directory {directory}: {err}") from err


def _load_cert(pem: bytes) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as err:
        raise PKIError(f"cannot load certificate: {err}") from err


def _load_cas(pem: bytes) -> list[x509.Certificate]:
    try:
        cas = x509.load_pem_x509_certificates(pem)
    except ValueError as err:
        raise PKIError(f"cannot load CA certificates: {err}") from err
    if not cas:
        raise PKIError("no CA certificate given")
    return cas


def _require_issuer(cert: x509.Certificate, cas: list[x509.Certificate]) -> None:
    for ca in cas:
        with contextlib.suppress(ValueError, TypeError, InvalidSignature):
            cert.verify_directly_issued_by(ca)
            return
    raise PKIError(f"certificate {cert.subject.rfc4514_string()!r} is not signed by any of the given CAs")


def _check_crl(pem: bytes, cas: list[x509.Certificate]) -> None:
    try:
        crl = x509.load_pem_x509_crl(pem)
    except ValueError as err:
        raise PKIError(f"cannot load CRL: {err}") from err
    for ca in cas:
        public_key = ca.public_key()
        with contextlib.suppress(TypeError, ValueError):
            if crl.issuer == ca.subject and crl.is_signature_valid(public_key):  # type: ignore[arg-type]
                return
    raise PKIError(f"CRL of {crl.issuer.rfc4514_string()!r} is not signed by any of the given CAs")
