"""The controller's bulk download from an agent (evidence files) over real mTLS on loopback: the body reaches the
receiver in a worker thread, intact; the agent's identity is checked before a byte is handed over (another host's
certificate is refused); the agent's error comes back as its own class; a host that does not answer is unreachable."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from ferryman.controller.agent_client import HttpAgentClient
from ferryman.core import errors
from ferryman.core.clock import SystemClock
from ferryman.core.models import Host
from ferryman.pki.ca import ROLE_HOST, CertificateAuthority
from ferryman.pki.csr import generate_key, key_to_pem, write_certificate, write_private_key
from ferryman.security.asgi_tls import make_server

BODY = hashlib.sha256(b"seed").digest() * (3 << 16)  # 6 MiB, several reads' worth
SLOW: dict[str, asyncio.Event] = {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        for expected in ("startup", "shutdown"):
            assert (await receive())["type"] == f"lifespan.{expected}"
            await send({"type": f"lifespan.{expected}.complete"})
        return
    if scope["path"] == "/v1/blob":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/x")]})
        for start in range(0, len(BODY), 1 << 20):
            await send({"type": "http.response.body", "body": BODY[start : start + (1 << 20)], "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    if scope["path"] == "/v1/slow":  # one chunk, then nothing until the test lets it finish
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/x")]})
        await send({"type": "http.response.body", "body": BODY[: 1 << 20], "more_body": True})
        SLOW["sent"].set()
        await SLOW["finish"].wait()
        await send({"type": "http.response.body", "body": b""})
        return
    problem = b'{"error": "NotFound", "detail": "no sealed memory of capture c1 on this host", "retryable": false}'
    await send({"type": "http.response.start", "status": 404, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": problem})


class Fleet:
    """A CA, the controller's client credentials, and an agent server presenting the certificate of ``serves_as``."""

    def __init__(self, root: Path, serves_as: str) -> None:
        self.ca = CertificateAuthority.load_or_create(root / "ca", SystemClock())
        self.ca_file = root / "ca.pem"
        write_certificate(self.ca_file, self.ca.cert_pem)
        key_pem, issued = self.ca.issue_controller_certificate("ctl1", ["127.0.0.1"])
        self.ctl_cert, self.ctl_key = root / "ctl.pem", root / "ctl.key"
        write_certificate(self.ctl_cert, issued.pem)
        write_private_key(self.ctl_key, key_pem)
        key = generate_key()
        now = dt.datetime.now(dt.UTC)
        agent = self.ca.issue(
            key.public_key(),
            serves_as,
            ROLE_HOST,
            [serves_as, "127.0.0.1"],
            not_before=now - dt.timedelta(minutes=1),
            not_after=now + dt.timedelta(hours=1),
        )
        self.agent_cert, self.agent_key = root / "agent.pem", root / "agent.key"
        write_certificate(self.agent_cert, agent.pem)
        write_private_key(self.agent_key, key_to_pem(key))
        self.port = free_port()

    def client(self) -> HttpAgentClient:
        return HttpAgentClient(
            ca=self.ca_file, cert=self.ctl_cert, key=self.ctl_key, is_revoked=lambda serial: False, clock=SystemClock()
        )

    def host(self, port: int | None = None) -> Host:
        return Host("host-b", "127.0.0.1", port or self.port, "s1", "z1", "10.0.0.0/24", "kvm", "qemu", "7.2", 1)

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[None]:
        server = make_server(
            app,
            host="127.0.0.1",
            port=self.port,
            cert=self.agent_cert,
            key=self.agent_key,
            ca=self.ca_file,
            client_cert="required",
        )
        task = asyncio.create_task(server.serve())
        try:
            async with asyncio.timeout(60):
                while not server.started:  # noqa: ASYNC110 - uvicorn offers a flag, not an event
                    await asyncio.sleep(0.01)
            yield
        finally:
            server.should_exit = True
            await asyncio.wait_for(task, 30)


class Sink:
    """A receiver that hashes what it is given and notes the thread it ran in and how it ended."""

    def __init__(self) -> None:
        self.threads: list[int] = []
        self.failures: list[BaseException] = []

    def __call__(self, chunks: Iterator[bytes]) -> str:
        self.threads.append(threading.get_ident())
        digest = hashlib.sha256()
        try:
            for chunk in chunks:
                digest.update(chunk)
        except BaseException as err:
            self.failures.append(err)
            raise
        return digest.hexdigest()


@pytest.fixture
def slow() -> Iterator[dict[str, asyncio.Event]]:
    SLOW.update(sent=asyncio.Event(), finish=asyncio.Event())
    yield SLOW
    SLOW["finish"].set()


async def test_a_body_streams_into_the_receiver_in_a_worker_thread(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path, "host-b")
    client, sink = fleet.client(), Sink()
    try:
        async with fleet.serving():
            for _ in range(2):  # the second on the kept-alive connection
                assert await client.fetch(fleet.host(), "/v1/blob", sink) == hashlib.sha256(BODY).hexdigest()
            with pytest.raises(errors.NotFound, match=r"^host-b: no sealed memory of capture c1 on this host$"):
                await client.fetch(fleet.host(), "/v1/missing", sink)
    finally:
        await client.aclose()
    assert len(sink.threads) == 2 and threading.get_ident() not in sink.threads


async def test_another_hosts_certificate_gets_nothing_handed_over(tmp_path: Path) -> None:
    """The server at host-b's address presents host-c's (valid) certificate: refused before the receiver runs."""
    fleet = Fleet(tmp_path, "host-c")
    client, sink = fleet.client(), Sink()
    try:
        async with fleet.serving():
            with pytest.raises(errors.Forbidden, match="host-c"):
                await client.fetch(fleet.host(), "/v1/blob", sink)
    finally:
        await client.aclose()
    assert sink.threads == []


async def test_a_host_that_does_not_answer_is_unreachable(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path, "host-b")
    client, sink = fleet.client(), Sink()
    try:
        with pytest.raises(errors.AgentUnreachable, match="host-b"):
            await client.fetch(fleet.host(free_port()), "/v1/blob", sink)
    finally:
        await client.aclose()
    assert sink.threads == []


async def test_a_cancelled_fetch_stops_its_receiver_and_waits_for_it(tmp_path: Path, slow: Any) -> None:
    """The capture that asked is cancelled mid-transfer: the receiver's next chunk is an error (so it keeps
    nothing), and the cancellation reaches the caller only once the receiver has returned."""
    fleet = Fleet(tmp_path, "host-b")
    client, sink = fleet.client(), Sink()
    try:
        async with fleet.serving():
            task = asyncio.create_task(client.fetch(fleet.host(), "/v1/slow", sink))
            await asyncio.wait_for(slow["sent"].wait(), 30)
            await asyncio.sleep(0.2)  # the receiver has the first chunk and waits for the next
            task.cancel()
            slow["finish"].set()  # the server ends the body: the receiver's next step sees the stop
            with pytest.raises(asyncio.CancelledError):
                await task
            assert [type(f) for f in sink.failures] == [errors.AgentUnreachable]
            assert "cancelled" in str(sink.failures[0])
    finally:
        await client.aclose()


async def test_a_download_cut_by_the_controllers_shutdown_is_an_unreachable_agent(tmp_path: Path, slow: Any) -> None:
    """Closing the client under a download ends it as AgentUnreachable (the capture then discards and reports),
    never as a bare RuntimeError; no download starts after it."""
    fleet = Fleet(tmp_path, "host-b")
    client, sink = fleet.client(), Sink()
    async with fleet.serving():
        task = asyncio.create_task(client.fetch(fleet.host(), "/v1/slow", sink))
        await asyncio.wait_for(slow["sent"].wait(), 30)
        await asyncio.sleep(0.2)
        closing = asyncio.create_task(client.aclose())
        await asyncio.sleep(0.5)
        slow["finish"].set()
        with pytest.raises(errors.AgentUnreachable):
            await asyncio.wait_for(task, 30)
        await asyncio.wait_for(closing, 30)
        with pytest.raises(errors.AgentUnreachable, match="shutting down"):
            await client.fetch(fleet.host(), "/v1/blob", sink)
