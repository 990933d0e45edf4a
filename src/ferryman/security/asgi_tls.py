"""An HTTPS server (uvicorn) that tells the application which certificate the peer presented.

The ASGI scope gets ``scope["extensions"]["tls"]["client_cert_der"]``: the DER of the peer's certificate, already
verified by the TLS layer against our CA, or ``None`` when the peer sent none. Authorisation by identity (which host,
which role, revoked or not) is the application's job and happens on every request.

This module must not decide who may connect; it only carries the fact of the handshake to the application.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Any, Any], Awaitable[None]]


class _PeerCertH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, with the peer certificate of the connection injected into every request scope."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        inner: ASGIApp = self.app

        async def app(scope: Scope, receive: Any, send: Any) -> None:
            scope.setdefault("extensions", {})["tls"] = {"client_cert_der": der}
            await inner(scope, receive, send)

        self.app = app

    def shutdown(self) -> None:
        """uvicorn's graceful shutdown, but an idle keep-alive connection is dropped at once. Closing it the TLS way
        waits for the peer's close_notify, which an idle client pool never sends: the server would sit out its
        whole graceful-shutdown timeout. A request in progress still finishes first."""
        if self.cycle is None or self.cycle.response_complete:
            self.transport.abort()
        else:
            super().shutdown()


def peer_certificate(scope: Scope) -> bytes | None:
    """The DER certificate the peer presented on this request's connection, if any."""
    tls = (scope.get("extensions") or {}).get("tls") or {}
    der = tls.get("client_cert_der")
    return der if isinstance(der, bytes) else None


def make_server(
    app: Any,
    *,
    host: str,
    port: int,
    cert: Path,
    key: Path,
    ca: Path,
    client_cert: str,
    log_level: str = "warning",
) -> uvicorn.Server:
    """An uvicorn server on ``host:port`` with TLS; ``client_cert`` is ``required`` or ``optional``."""
    reqs = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL}[client_cert]
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=_PeerCertH11Protocol,
        ws="none",
        lifespan="on",
        ssl_certfile=str(cert),
        ssl_keyfile=str(key),
        ssl_ca_certs=str(ca),
        ssl_cert_reqs=reqs,
        ssl_version=ssl.PROTOCOL_TLS_SERVER,
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=5,
    )
    return uvicorn.Server(config)
