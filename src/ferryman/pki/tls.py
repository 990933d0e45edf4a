"""TLS contexts for Ferryman's own connections (controller API, agent API): TLS 1.2 or newer, our CA only.

A server context that asks for client certificates trusts exactly one CA, the one in ``ca_path``; the system trust
store is never loaded, so a certificate from any public CA (or from a rogue CA with our CA's name) fails the handshake.
The handshake proves "certified by our CA"; which peer is allowed is decided afterwards by
:func:`ferryman.pki.identity.check_peer`.

What it must not do: offer a mode without certificate verification on the client side, or fall back to plaintext.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Literal

from ferryman.core.errors import InvalidInput, PKIError

ClientCertMode = Literal["required", "optional", "none"]

_VERIFY_MODES: dict[str, ssl.VerifyMode] = {
    "required": ssl.CERT_REQUIRED,
    "optional": ssl.CERT_OPTIONAL,
    "none": ssl.CERT_NONE,
}


def _harden(context: ssl.SSLContext) -> None:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    # RFC 5280 conformance checks (e.g. a CA must have critical basic constraints); our CA issues conforming certs.
    context.verify_flags |= ssl.VERIFY_X509_STRICT


def _load_chain(context: ssl.SSLContext, cert_path: Path, key_path: Path | None) -> None:
    try:
        context.load_cert_chain(certfile=cert_path, keyfile=key_path)
    except (OSError, ssl.SSLError) as err:
        raise PKIError(f"cannot load certificate {cert_path} with key {key_path or cert_path}: {err}") from err


def _load_ca(context: ssl.SSLContext, ca_path: Path) -> None:
    try:
        context.load_verify_locations(cafile=ca_path)
    except (OSError, ssl.SSLError) as err:
        raise PKIError(f"cannot load CA certificate {ca_path}: {err}") from err


def server_context(
    cert_pem_path: Path, key_path: Path, ca_path: Path, *, client_cert: ClientCertMode
) -> ssl.SSLContext:
    """A server context presenting ``cert_pem_path``; client certificates are checked against ``ca_path`` only."""
    if client_cert not in _VERIFY_MODES:
        raise InvalidInput(f"client_cert must be one of {sorted(_VERIFY_MODES)}, not {client_cert!r}")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(context)
    _load_chain(context, cert_pem_path, key_path)
    if client_cert != "none":
        _load_ca(context, ca_path)
    context.verify_mode = _VERIFY_MODES[client_cert]
    return context


def client_context(
    ca_path: Path, cert_path: Path | None = None, key_path: Path | None = None, *, check_hostname: bool = True
) -> ssl.SSLContext:
    """A client context that verifies the server against ``ca_path`` only and optionally presents a certificate.

    ``check_hostname`` False still verifies the chain; the caller must then check the peer with
    :func:`ferryman.pki.identity.check_peer`.
    """
    if key_path is not None and cert_path is None:
        raise InvalidInput("a client key was given without its certificate")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _harden(context)
    context.check_hostname = check_hostname
    context.verify_mode = ssl.CERT_REQUIRED
    _load_ca(context, ca_path)
    if cert_path is not None:
        _load_chain(context, cert_path, key_path)
    return context
