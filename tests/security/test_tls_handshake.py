"""Real TLS handshakes on loopback: who gets in, and who is turned away before any application data."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import ssl
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from ferryman.core.clock import SystemClock
from ferryman.pki.ca import CertificateAuthority
from ferryman.pki.csr import write_certificate, write_private_key
from ferryman.pki.identity import PeerIdentity, identity_from_der, subject_dn_for_qemu
from ferryman.pki.tls import ClientCertMode, client_context, server_context
from ferryman.testing.pki import HostCredentials, forged_ca, rogue_ca, write_host_credentials

TLS_VERSIONS = [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3]
GREETING = b"welcome "


@dataclass(frozen=True)
class Pki:
    ca: CertificateAuthority
    root: Path
    server: HostCredentials


@dataclass
class Server:
    port: int
    accepted: list[PeerIdentity | None] = field(default_factory=list)
    refused: list[Exception] = field(default_factory=list)
    """Why the server's handshake failed, one entry per refused connection."""
    handled: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when the server has finished with a connection, accepted or refused."""


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    # The handshake judges validity by the system clock, so the CA must date certificates by it too.
    ca = CertificateAuthority.load_or_create(tmp_path / "ca", SystemClock())
    key_pem, issued = ca.issue_controller_certificate("ctl1", ["127.0.0.1"])
    directory = tmp_path / "controller"
    directory.mkdir()
    server = HostCredentials(directory / "ctl1.pem", directory / "ctl1.key", directory / "ca.pem", issued.serial)
    write_certificate(server.cert_path, issued.pem)
    write_private_key(server.key_path, key_pem)
    write_certificate(server.ca_path, ca.cert_pem)
    return Pki(ca=ca, root=tmp_path, server=server)


async def _serve(pki: Pki, client_cert: ClientCertMode) -> tuple[asyncio.Server, Server]:
    context = server_context(pki.server.cert_path, pki.server.key_path, pki.server.ca_path, client_cert=client_cert)
    state = Server(port=0)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # TLS is started explicitly (rather than start_server(ssl=...)) so the test sees why a handshake failed.
        try:
            try:
                await writer.start_tls(context, ssl_handshake_timeout=5)
            except (ssl.SSLError, ConnectionError, TimeoutError) as err:
                state.refused.append(err)
                return
            await reader.readline()  # answer only after the client spoke, so a valid client never races the close
            der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
            identity = identity_from_der(der) if der else None
            state.accepted.append(identity)
            writer.write(GREETING + (identity.common_name if identity else "anonymous").encode() + b"\n")
            await writer.drain()
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await writer.wait_closed()
            state.handled.set()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    state.port = server.sockets[0].getsockname()[1]
    return server, state


@pytest.fixture
async def server(pki: Pki) -> AsyncIterator[Server]:
    listener, state = await _serve(pki, "required")
    async with listener:
        yield state


async def _talk(port: int, context: ssl.SSLContext | None) -> bytes:
    """Connect, send a line, and return everything the server sends until it closes."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="127.0.0.1" if context else None),
        timeout=5,
    )
    try:
        writer.write(b"hello\n")
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout=5)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()


async def _assert_refused(state: Server, context: ssl.SSLContext, reason: str) -> None:
    """The server's handshake fails for ``reason``, the client gets no data, and the application never sees it."""
    with pytest.raises((ssl.SSLError, ConnectionError)):
        data = await _talk(state.port, context)
        if not data:  # TLS 1.3: the client's handshake ends first; the refusal then arrives as a close
            raise ConnectionResetError("closed without data")
        pytest.fail(f"server answered {data!r}")
    await asyncio.wait_for(state.handled.wait(), timeout=5)
    assert len(state.refused) == 1
    assert reason in str(state.refused[0])
    assert state.accepted == []


def _client(pki: Pki, creds: HostCredentials | None, version: ssl.TLSVersion) -> ssl.SSLContext:
    context = client_context(pki.server.ca_path, creds.cert_path if creds else None, creds.key_path if creds else None)
    context.maximum_version = version
    return context


@pytest.mark.parametrize("version", TLS_VERSIONS, ids=["tls1.2", "tls1.3"])
async def test_valid_host_certificate_is_accepted(pki: Pki, server: Server, version: ssl.TLSVersion) -> None:
    """A host certificate from our CA completes the handshake and reaches the application with its identity."""
    creds = write_host_credentials(pki.ca, "hv1", "127.0.0.2", pki.root / "hv1")
    assert await _talk(server.port, _client(pki, creds, version)) == GREETING + b"hv1\n"
    assert server.accepted == [identity_from_der(_der(creds.cert_path))]


@pytest.mark.parametrize("version", TLS_VERSIONS, ids=["tls1.2", "tls1.3"])
async def test_rogue_ca_with_our_name_is_refused(pki: Pki, server: Server, version: ssl.TLSVersion) -> None:
    """A certificate from another CA named "Ferryman CA" fails the handshake: trust is in the key, not the name."""
    rogue = rogue_ca(pki.root)
    assert rogue.cert.subject == pki.ca.cert.subject
    creds = write_host_credentials(rogue, "hv1", "127.0.0.2", pki.root / "rogue")
    await _assert_refused(server, _client(pki, creds, version), "unable to get local issuer certificate")


@pytest.mark.parametrize("version", TLS_VERSIONS, ids=["tls1.2", "tls1.3"])
async def test_forged_copy_of_our_ca_is_refused(pki: Pki, server: Server, version: ssl.TLSVersion) -> None:
    """A CA that copies our CA certificate field for field but holds another key fails on the signature."""
    forged = forged_ca(pki.ca)
    assert forged.cert.subject == pki.ca.cert.subject
    assert forged.cert.serial_number == pki.ca.cert.serial_number
    creds = write_host_credentials(forged, "hv1", "127.0.0.2", pki.root / "forged")
    await _assert_refused(server, _client(pki, creds, version), "certificate signature failure")


@pytest.mark.parametrize("version", TLS_VERSIONS, ids=["tls1.2", "tls1.3"])
async def test_expired_certificate_is_refused(pki: Pki, server: Server, version: ssl.TLSVersion) -> None:
    """An expired certificate from our own CA fails the handshake."""
    creds = write_host_credentials(pki.ca, "hv1", "127.0.0.2", pki.root / "hv1", validity="expired")
    await _assert_refused(server, _client(pki, creds, version), "certificate has expired")


async def test_not_yet_valid_certificate_is_refused(pki: Pki, server: Server) -> None:
    """A certificate dated in the future fails the handshake."""
    creds = write_host_credentials(pki.ca, "hv1", "127.0.0.2", pki.root / "hv1", validity="not-yet-valid")
    await _assert_refused(server, _client(pki, creds, ssl.TLSVersion.TLSv1_3), "certificate is not yet valid")


@pytest.mark.parametrize("version", TLS_VERSIONS, ids=["tls1.2", "tls1.3"])
async def test_client_without_certificate_is_refused(pki: Pki, server: Server, version: ssl.TLSVersion) -> None:
    """With client_cert="required", a client that presents no certificate is turned away."""
    await _assert_refused(server, _client(pki, None, version), "peer did not return a certificate")


async def test_plain_tcp_client_gets_no_application_data(server: Server) -> None:
    """A client that skips TLS never reaches the application and receives nothing but, at most, a TLS alert."""
    try:
        data = await _talk(server.port, None)
    except ConnectionError:
        data = b""
    assert GREETING not in data
    assert data == b"" or data[0] == 0x15  # 0x15: TLS alert record
    await asyncio.wait_for(server.handled.wait(), timeout=5)
    assert isinstance(server.refused[0], ssl.SSLError)
    assert server.accepted == []


async def test_optional_client_certificate_still_verifies_what_is_presented(pki: Pki) -> None:
    """With client_cert="optional" an anonymous client gets in, but a rogue certificate is still refused."""
    listener, state = await _serve(pki, "optional")
    async with listener:
        assert await _talk(state.port, _client(pki, None, ssl.TLSVersion.TLSv1_3)) == GREETING + b"anonymous\n"
        assert state.accepted == [None]
        await asyncio.wait_for(state.handled.wait(), timeout=5)
        state.accepted.clear()
        state.handled.clear()
        rogue_creds = write_host_credentials(rogue_ca(pki.root), "hv1", "127.0.0.2", pki.root / "rogue")
        await _assert_refused(
            state, _client(pki, rogue_creds, ssl.TLSVersion.TLSv1_3), "unable to get local issuer certificate"
        )


async def test_client_refuses_a_server_from_the_rogue_ca(pki: Pki) -> None:
    """The client side trusts only our CA: a server certificate from the same-named rogue CA is refused."""
    rogue_creds = write_host_credentials(rogue_ca(pki.root), "ctl1", "127.0.0.1", pki.root / "rogue")
    impostor = Pki(ca=pki.ca, root=pki.root, server=rogue_creds)
    listener, state = await _serve(impostor, "none")
    async with listener:
        with pytest.raises(ssl.SSLCertVerificationError):
            await _talk(state.port, _client(pki, None, ssl.TLSVersion.TLSv1_3))
    assert state.accepted == []


def _der(cert_path: Path) -> bytes:
    return x509.load_pem_x509_certificate(cert_path.read_bytes()).public_bytes(Encoding.DER)


# --- QEMU's own TLS: the DN we compute is the one its authz-simple accepts ----------------------------------------

QEMU_NBD = shutil.which("qemu-nbd")
QEMU_IMG = shutil.which("qemu-img")
needs_qemu_tools = pytest.mark.skipif(QEMU_NBD is None or QEMU_IMG is None, reason="qemu-nbd/qemu-img not installed")


def _qemu_tls_dir(directory: Path, creds: HostCredentials, endpoint: str) -> Path:
    """Lay out credentials the way QEMU's tls-creds-x509 expects them (ca-cert.pem, <endpoint>-cert.pem, ...)."""
    directory.mkdir(parents=True)
    shutil.copy(creds.ca_path, directory / "ca-cert.pem")
    shutil.copy(creds.cert_path, directory / f"{endpoint}-cert.pem")
    shutil.copy(creds.key_path, directory / f"{endpoint}-key.pem")
    return directory


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # Unix socket paths are limited to 108 bytes; pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="fm-nbd-") as name:
        yield Path(name)


@contextlib.contextmanager
def _nbd_server(tls_dir: Path, identity: str, work: Path) -> Iterator[tuple[Path, Path]]:
    """qemu-nbd serving a small raw image over TLS, allowing only the peer whose DN is ``identity``."""
    assert QEMU_NBD is not None
    image, socket, log = work / "disk.raw", work / "nbd.sock", work / "nbd.log"
    image.write_bytes(bytes(1 << 20))
    qemu_identity = identity.replace(",", ",,")  # QemuOpts escaping on the command line
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            [
                QEMU_NBD,
                "--object",
                f"tls-creds-x509,id=tls0,dir={tls_dir},endpoint=server,verify-peer=on",
                "--object",
                f"authz-simple,id=auth0,identity={qemu_identity}",
                "--tls-creds=tls0",
                "--tls-authz=auth0",
                "--persistent",
                "--format=raw",
                f"--socket={socket}",
                str(image),
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 10
        while not socket.exists():
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "qemu-nbd did not start"
            time.sleep(0.05)
        yield socket, log
    finally:
        process.terminate()
        process.wait(timeout=10)


def _qemu_img_info(tls_dir: Path, socket: Path, server_name: str) -> subprocess.CompletedProcess[str]:
    assert QEMU_IMG is not None
    return subprocess.run(
        [
            QEMU_IMG,
            "info",
            "--object",
            f"tls-creds-x509,id=tls0,dir={tls_dir},endpoint=client",
            "--image-opts",
            f"driver=nbd,path={socket},tls-creds=tls0,tls-hostname={server_name}",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@needs_qemu_tools
def test_qemu_authz_accepts_the_dn_we_compute_and_only_that_host(pki: Pki, short_dir: Path) -> None:
    """QEMU's authz-simple admits the host whose DN subject_dn_for_qemu spells, and refuses another host of our CA."""
    hv1 = write_host_credentials(pki.ca, "hv1", "127.0.0.2", pki.root / "hv1")
    hv2 = write_host_credentials(pki.ca, "hv2", "127.0.0.3", pki.root / "hv2")
    hv3 = write_host_credentials(pki.ca, "hv3", "127.0.0.4", pki.root / "hv3")
    identity = subject_dn_for_qemu(x509.load_pem_x509_certificate(hv1.cert_path.read_bytes()))
    server_dir = _qemu_tls_dir(pki.root / "qemu" / "hv2", hv2, "server")
    with _nbd_server(server_dir, identity, short_dir) as (socket, log):
        allowed = _qemu_img_info(_qemu_tls_dir(pki.root / "qemu" / "hv1", hv1, "client"), socket, "hv2")
        assert allowed.returncode == 0, allowed.stderr
        other = _qemu_img_info(_qemu_tls_dir(pki.root / "qemu" / "hv3", hv3, "client"), socket, "hv2")
        assert other.returncode != 0
    assert "authz check for O=Ferryman,OU=host,CN=hv3 is denied" in log.read_text()


@needs_qemu_tools
def test_qemu_authz_denies_the_rfc4514_spelling(pki: Pki, short_dir: Path) -> None:
    """The RFC 4514 order (CN first) is not what QEMU compares, so using it would lock every host out."""
    hv1 = write_host_credentials(pki.ca, "hv1", "127.0.0.2", pki.root / "hv1")
    hv2 = write_host_credentials(pki.ca, "hv2", "127.0.0.3", pki.root / "hv2")
    rfc4514 = x509.load_pem_x509_certificate(hv1.cert_path.read_bytes()).subject.rfc4514_string()
    assert rfc4514 == "CN=hv1,OU=host,O=Ferryman"
    server_dir = _qemu_tls_dir(pki.root / "qemu" / "hv2", hv2, "server")
    with _nbd_server(server_dir, rfc4514, short_dir) as (socket, log):
        result = _qemu_img_info(_qemu_tls_dir(pki.root / "qemu" / "hv1", hv1, "client"), socket, "hv2")
        assert result.returncode != 0
    assert "authz check for O=Ferryman,OU=host,CN=hv1 is denied" in log.read_text()
