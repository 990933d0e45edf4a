"""The HTTPS server of the controller and the agents (``ferryman.security.asgi_tls``) on loopback with real
certificates: an idle keep-alive connection does not make it sit out its graceful-shutdown timeout when it stops, and
a request in progress when it is asked to stop still gets its answer."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from ferryman.core.clock import SystemClock
from ferryman.pki.ca import CertificateAuthority
from ferryman.pki.csr import write_certificate, write_private_key
from ferryman.pki.tls import client_context
from ferryman.security.asgi_tls import make_server


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def credentials(root: Path) -> tuple[Path, Path, Path]:
    ca = CertificateAuthority.load_or_create(root / "ca", SystemClock())
    key_pem, issued = ca.issue_controller_certificate("ctl1", ["127.0.0.1"])
    cert, key, ca_file = root / "ctl1.pem", root / "ctl1.key", root / "ca.pem"
    write_certificate(cert, issued.pem)
    write_private_key(key, key_pem)
    write_certificate(ca_file, ca.cert_pem)
    return cert, key, ca_file


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Served:
    """An app on make_server: ``/slow`` answers once ``release`` is set (``entered`` says it has begun)."""

    def __init__(self, root: Path) -> None:
        self.cert, self.key, self.ca = credentials(root)
        self.entered, self.release = asyncio.Event(), asyncio.Event()
        self.port = free_port()

        # a function, not a bound method: uvicorn takes a function for ASGI 3
        async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
            await self.handle(scope, receive, send)

        self.server = make_server(
            app, host="127.0.0.1", port=self.port, cert=self.cert, key=self.key, ca=self.ca, client_cert="optional"
        )
        self.records = Records()

    async def handle(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            for expected in ("startup", "shutdown"):
                assert (await receive())["type"] == f"lifespan.{expected}"
                await send({"type": f"lifespan.{expected}.complete"})
            return
        if scope["path"] == "/slow":
            self.entered.set()
            await self.release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": scope["path"].encode()})

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=f"https://127.0.0.1:{self.port}", verify=client_context(self.ca))

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[asyncio.Task[None]]:
        logging.getLogger("uvicorn.error").addHandler(self.records)  # after make_server: it configures logging
        task = asyncio.create_task(self.server.serve())
        try:
            async with asyncio.timeout(60):
                while not self.server.started:  # noqa: ASYNC110 - uvicorn offers a flag, not an event
                    await asyncio.sleep(0.01)
                yield task
        finally:
            logging.getLogger("uvicorn.error").removeHandler(self.records)
            if not task.done():
                task.cancel()

    @property
    def gave_up_waiting(self) -> list[str]:
        """What uvicorn says when it gives up waiting for connections to close."""
        return [m for m in self.records.messages if "graceful shutdown exceeded" in m]


async def test_an_idle_keep_alive_connection_does_not_hold_up_a_stop(tmp_path: Path) -> None:
    served = Served(tmp_path)
    async with served.serving() as task, served.client() as idle:
        assert (await idle.get("/")).text == "/"  # its connection stays open, idle, in the client's pool
        served.server.should_exit = True
        await task
    # closing it the TLS way would wait for a close_notify the idle client never sends, until the timeout
    assert served.gave_up_waiting == []


async def test_a_request_in_progress_gets_its_answer_when_the_server_stops(tmp_path: Path) -> None:
    served = Served(tmp_path)
    async with served.serving() as task, served.client() as busy:
        slow = asyncio.create_task(busy.get("/slow"))
        await served.entered.wait()
        served.server.should_exit = True
        await asyncio.sleep(0.5)  # the server begins to stop while /slow is still being answered
        assert not task.done(), "the server stopped before the request in progress was answered"
        served.release.set()
        answer = await slow
        assert (answer.status_code, answer.text) == (200, "/slow")
        await task
