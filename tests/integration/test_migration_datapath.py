"""The migration data path between two hosts on one machine, with real QEMU guests (TCG, 1 vCPU, 128 MiB, 64 MiB disk).

host-a (127.0.0.2) and host-b (127.0.0.3) are two QemuDrivers with their own state dirs and certificates from one CA;
host-c (127.0.0.4) holds a valid certificate of the same CA and plays the impostor. Ports are in 40000-49999.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import re
import shutil
import socket
import ssl
import stat
import struct
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from ferryman.agent.hypervisor import migrate, procscan
from ferryman.agent.hypervisor.migrate import MigrationStatus
from ferryman.agent.hypervisor.procscan import kill_all
from ferryman.agent.hypervisor.qmp import QemuDriver
from ferryman.agent.hypervisor.tlsdir import check_tls_dir, qemu_identity, write_tls_dir
from ferryman.core.clock import SystemClock
from ferryman.core.errors import Conflict, HypervisorError, InvalidInput, PKIError
from ferryman.core.models import DiskSpec, RunState, VMSpec
from ferryman.lab.guest import GuestImage
from ferryman.lab.records import Record, missing_seqs, read_acks, read_records
from ferryman.pki.ca import CA_CERT_FILE, CA_KEY_FILE, CertificateAuthority
from ferryman.pki.csr import load_private_key
from ferryman.testing.pki import HostCredentials, rogue_ca, write_host_credentials

pytestmark = pytest.mark.qemu

BOOT_TIMEOUT = 60.0
DISK_BYTES = 64 * 1024 * 1024
HOSTS = {"host-a": "127.0.0.2", "host-b": "127.0.0.3", "host-c": "127.0.0.4"}
SRC, DST = HOSTS["host-a"], HOSTS["host-b"]


# -- fixtures ------------------------------------------------------------------------------------------------------


@dataclass
class Pki:
    """One CA, each host's credentials, and the QEMU TLS directories of host-a and host-b."""

    root: Path
    ca: CertificateAuthority
    creds: dict[str, HostCredentials]
    tls_a: Path
    tls_b: Path

    def tls(self, name: str, creds: HostCredentials, extra_ca: bytes = b"", crl: bytes | None = None) -> Path:
        return write_tls_dir(
            self.root / "tls" / name,
            cert_pem=creds.cert_path.read_bytes(),
            key_pem=creds.key_path.read_bytes(),
            ca_pem=creds.ca_path.read_bytes() + extra_ca,
            crl_pem=crl,
        )

    def dn(self, host: str) -> str:
        return qemu_identity(self.creds[host].cert_path.read_bytes())


@dataclass
class Lab:
    """The two hosts' drivers and a free port pair on host-b for the test."""

    a: QemuDriver
    b: QemuDriver
    pki: Pki
    migration_port: int
    nbd_port: int


def free_port(address: str, taken: set[int]) -> int:
    """A port in 40000-49999 that can be bound on ``address`` right now."""
    for _ in range(200):
        port = random.randint(40000, 49999)
        if port in taken:
            continue
        with socket.socket() as probe:
            try:
                probe.bind((address, port))
            except OSError:
                continue
        taken.add(port)
        return port
    raise RuntimeError(f"no free port on {address}")


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca = CertificateAuthority.load_or_create(tmp_path / "ca", SystemClock())
    creds = {host: write_host_credentials(ca, host, address, tmp_path / "creds") for host, address in HOSTS.items()}
    pki = Pki(tmp_path, ca, creds, tmp_path, tmp_path)
    pki.tls_a, pki.tls_b = pki.tls("host-a", creds["host-a"]), pki.tls("host-b", creds["host-b"])
    return pki


@pytest.fixture
async def lab(tmp_path: Path, guest: GuestImage, pki: Pki) -> AsyncIterator[Lab]:
    dirs = [tmp_path / host / "state" for host in ("host-a", "host-b")]
    for path in dirs:
        path.mkdir(parents=True)
    a, b = (QemuDriver(path, guest, "tcg") for path in dirs)
    taken: set[int] = set()
    try:
        yield Lab(a, b, pki, free_port(DST, taken), free_port(DST, taken))
    finally:
        await a.close()
        await b.close()
        for path in dirs:
            await kill_all(path)


# -- helpers -------------------------------------------------------------------------------------------------------


def make_spec(name: str) -> VMSpec:
    """1 vCPU, 128 MiB, one 64 MiB disk, a record every 200 ms."""
    return VMSpec(
        vm_id=str(uuid.uuid4()),
        name=name,
        vcpus=1,
        memory_mb=128,
        disks=(DiskSpec(DISK_BYTES),),
        canary=f"canary-{uuid.uuid4().hex[:12]}",
        record_interval_ms=200,
    )


async def records(driver: QemuDriver, vm_id: str) -> list[Record]:
    return await asyncio.to_thread(read_records, driver.disk_paths(vm_id)[0])


async def wait_seq_above(driver: QemuDriver, vm_id: str, seq: int, within: float = 30.0) -> list[Record]:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        found = await records(driver, vm_id)
        if found and found[-1].seq > seq:
            return found
        await asyncio.sleep(0.2)
    pytest.fail(f"records of {vm_id} on {driver.state_dir} did not pass seq {seq} within {within}s")


async def boot(lab: Lab, name: str) -> VMSpec:
    """Boot a VM on host-a and wait until it has written a record."""
    spec = make_spec(name)
    await lab.a.create(spec)
    console = lab.a.console_log(spec.vm_id)
    deadline = time.monotonic() + BOOT_TIMEOUT
    while b"FERRYMAN-GUEST-READY" not in (console.read_bytes() if console.exists() else b""):
        assert time.monotonic() < deadline, f"guest did not boot: {console.read_text()[-2000:]}"
        await asyncio.sleep(0.1)
    await wait_seq_above(lab.a, spec.vm_id, 0)
    return spec


async def status(driver: QemuDriver, vm_id: str) -> str:
    return str((await driver.execute(vm_id, "query-status"))["status"])


async def prepare(lab: Lab, spec: VMSpec, tls_b: Path | None = None, **overrides: object) -> migrate.IncomingMigration:
    """Prepare host-b for a local-storage migration from host-a (overridable)."""
    arguments: dict[str, object] = {
        "listen": DST,
        "migration_port": lab.migration_port,
        "nbd_port": lab.nbd_port,
        "tls_dir": tls_b or lab.pki.tls_b,
        "allowed_peer_dn": lab.pki.dn("host-a"),
        "with_disk_target": True,
    }
    arguments.update(overrides)
    return await migrate.prepare_incoming(lab.b, spec, **arguments)  # type: ignore[arg-type]


async def mirror(lab: Lab, vm_id: str, tls_a: Path | None = None) -> list[migrate.MirrorProgress]:
    return await migrate.start_mirror(
        lab.a, vm_id, dst_address=DST, dst_name="host-b", nbd_port=lab.nbd_port, tls_dir=tls_a or lab.pki.tls_a
    )


async def transfer(lab: Lab, vm_id: str, tls_a: Path | None = None) -> migrate.MigrationProgress:
    tls_dir = tls_a or lab.pki.tls_a
    await migrate.start_transfer(
        lab.a, vm_id, dst_address=DST, dst_name="host-b", migration_port=lab.migration_port, tls_dir=tls_dir
    )
    return await migrate.wait_transfer(lab.a, vm_id, within=60)


async def refused_on_both_ports(lab: Lab, vm_id: str, tls_a: Path | None = None) -> tuple[str, str]:
    """Try the disk mirror, then the RAM transfer; both must fail. Returns the two error messages."""
    with pytest.raises(HypervisorError) as on_nbd:
        await mirror(lab, vm_id, tls_a)
    with pytest.raises(HypervisorError) as on_migration:
        await transfer(lab, vm_id, tls_a)
    return str(on_nbd.value), str(on_migration.value)


async def assert_source_unharmed(lab: Lab, vm_id: str) -> None:
    """The source still runs, holds no mirror job or NBD node, and its records keep advancing."""
    assert await status(lab.a, vm_id) == "running"
    assert await migrate.mirror_progress(lab.a, vm_id) == []
    nodes = await lab.a.execute(vm_id, "query-named-block-nodes", {"flat": True})
    assert not [n["node-name"] for n in nodes if n["node-name"].startswith("fm-")]
    seq = (await records(lab.a, vm_id))[-1].seq
    await wait_seq_above(lab.a, vm_id, seq)


def image_locked(path: Path) -> bool:
    """Whether some QEMU holds the image writable (qemu-img without -U then cannot open it)."""
    done = subprocess.run(["qemu-img", "info", str(path)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 or "lock" in done.stderr, done.stderr
    return done.returncode != 0


def revoke(ca_dir: Path, serial: int) -> bytes:
    """A CRL signed by the key of the CA in ``ca_dir``, revoking ``serial``."""
    key = load_private_key((ca_dir / CA_KEY_FILE).read_bytes())
    issuer = x509.load_pem_x509_certificate((ca_dir / CA_CERT_FILE).read_bytes()).subject
    now = dt.datetime.now(dt.UTC)
    entry = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now - dt.timedelta(minutes=1))
    builder = x509.CertificateRevocationListBuilder().issuer_name(issuer)
    builder = builder.last_update(now - dt.timedelta(minutes=5)).next_update(now + dt.timedelta(days=1))
    crl = builder.add_revoked_certificate(entry.build()).sign(key, hashes.SHA256())
    return crl.public_bytes(serialization.Encoding.PEM)


# -- migrations that succeed ---------------------------------------------------------------------------------------


async def test_local_storage_migration_loses_no_record_and_waits_for_activation(lab: Lab) -> None:
    """Disk and RAM move over TLS; the destination stays paused until cont, then continues the records with no gap."""
    spec = await boot(lab, "local")
    vm = spec.vm_id
    await prepare(lab, spec)
    assert await status(lab.b, vm) == "inmigrate"
    assert [(r.run_state, r.managed) for r in await lab.b.list()] == [(RunState.INMIGRATE, True)]
    mirrors = await mirror(lab, vm)
    # in sync, a whole disk's worth copied; the running guest's newest writes may still be in flight (done < total)
    assert [(m.ready, m.done_bytes >= DISK_BYTES, m.total_bytes >= m.done_bytes) for m in mirrors] == [(True,) * 3]
    seen: list[migrate.MigrationProgress] = []
    await migrate.start_transfer(
        lab.a, vm, dst_address=DST, dst_name="host-b", migration_port=lab.migration_port, tls_dir=lab.pki.tls_a
    )
    done = await migrate.wait_transfer(lab.a, vm, within=60, on_progress=seen.append)
    assert done.status is MigrationStatus.COMPLETED and done.transferred_bytes > 0 and seen[-1] == done
    assert done.downtime_ms is not None and done.total_time_ms is not None
    await migrate.finish_outgoing(lab.a, vm)
    assert await status(lab.a, vm) == "postmigrate"
    assert await migrate.mirror_progress(lab.a, vm) == []

    acked = read_acks(lab.a.console_log(vm))
    frozen = await records(lab.b, vm)
    assert acked and missing_seqs(frozen, acked) == []
    await asyncio.sleep(1.0)
    assert await status(lab.b, vm) == "paused"
    assert await records(lab.b, vm) == frozen and read_acks(lab.a.console_log(vm)) == acked

    with pytest.raises(Conflict):
        await lab.b.resume(vm)  # only activation may run a destination
    runtime = await migrate.activate_incoming(lab.b, vm)
    assert runtime.run_state is RunState.RUNNING and not lab.b.is_incoming(vm)
    after = await wait_seq_above(lab.b, vm, max(acked[-1], frozen[-1].seq))
    assert missing_seqs(after, acked + read_acks(lab.b.console_log(vm))) == []
    assert {(r.vm, r.canary) for r in after} == {(vm, spec.canary)}
    source_pid = (await lab.a.list())[0].pid
    await lab.a.stop(vm)
    assert source_pid is not None and not procscan.is_alive(source_pid)
    with pytest.raises(Conflict):
        await migrate.abort_incoming(lab.b, vm)


async def test_shared_storage_migration_hands_the_image_lock_over_at_activation(lab: Lab) -> None:
    """RAM only: the destination opens the source's image, nobody holds it writable between switch-over and cont."""
    spec = await boot(lab, "shared")
    vm = spec.vm_id
    image = lab.a.disk_paths(vm)[0]
    await prepare(lab, spec, nbd_port=None, with_disk_target=False, shared_disks=[image])
    assert lab.b.disk_paths(vm) == [image]
    assert await asyncio.to_thread(image_locked, image)  # by the running source only: the destination opened it
    done = await transfer(lab, vm)
    assert done.status is MigrationStatus.COMPLETED and done.transferred_bytes > 0
    await migrate.finish_outgoing(lab.a, vm)
    acked = read_acks(lab.a.console_log(vm))
    assert missing_seqs(await records(lab.b, vm), acked) == []
    assert not await asyncio.to_thread(image_locked, image)  # both inactive: a rollback could still resume the source

    await migrate.activate_incoming(lab.b, vm)
    assert await asyncio.to_thread(image_locked, image)
    with pytest.raises(HypervisorError, match="lock"):
        await lab.a.execute(vm, "cont")  # the stale source cannot run on the image any more
    after = await wait_seq_above(lab.b, vm, acked[-1])
    assert missing_seqs(after, acked + read_acks(lab.b.console_log(vm))) == []


async def test_cancel_mid_transfer_leaves_the_source_running_and_the_destination_killed(lab: Lab) -> None:
    """A slow (bandwidth-capped) migration is cancelled: source runs on, destination is killed and its files named."""
    spec = await boot(lab, "cancelled")
    vm = spec.vm_id
    incoming = await prepare(lab, spec)
    await mirror(lab, vm)
    await migrate.start_transfer(
        lab.a,
        vm,
        dst_address=DST,
        dst_name="host-b",
        migration_port=lab.migration_port,
        tls_dir=lab.pki.tls_a,
        bandwidth_bytes_per_s=2 * 1024 * 1024,
    )
    with pytest.raises(HypervisorError, match="still active"):
        await migrate.wait_transfer(lab.a, vm, within=2.0)
    moving = await migrate.migration_progress(lab.a, vm)
    assert moving.status is MigrationStatus.ACTIVE and 0 < moving.transferred_bytes < moving.total_bytes

    assert await migrate.cancel_outgoing(lab.a, vm) is RunState.RUNNING
    assert (await migrate.migration_progress(lab.a, vm)).status is MigrationStatus.CANCELLED
    residues = await migrate.abort_incoming(lab.b, vm)
    assert incoming.pid is not None and not procscan.is_alive(incoming.pid)
    names = {path.name for path in residues}
    assert {"disk0.qcow2", "console.log", "spec.json"} <= names and residues[-1] == lab.b.vm_dir(vm)
    assert all(path.is_relative_to(lab.b.vm_dir(vm)) for path in residues)
    await assert_source_unharmed(lab, vm)
    assert missing_seqs(await records(lab.a, vm), read_acks(lab.a.console_log(vm))) == []


# -- spoofing: every one is refused and the source runs on ---------------------------------------------------------


async def test_destination_with_a_rogue_ca_certificate_is_refused(lab: Lab) -> None:
    """host-b's name on a certificate from a rogue CA called "Ferryman CA" is refused on the NBD and migration ports."""
    spec = await boot(lab, "rogue")
    rogue = write_host_credentials(rogue_ca(lab.pki.root), "host-b", DST, lab.pki.root / "rogue")
    await prepare(lab, spec, tls_b=lab.pki.tls("rogue-b", rogue, extra_ca=lab.pki.ca.cert_pem))
    errors = await refused_on_both_ports(lab, spec.vm_id)
    assert all("known issuer" in error for error in errors), errors
    await assert_source_unharmed(lab, spec.vm_id)


async def test_destination_with_another_hosts_certificate_is_refused(lab: Lab) -> None:
    """A valid certificate of host-c on the destination fails tls-hostname=host-b on both ports."""
    spec = await boot(lab, "wrong-host")
    await prepare(lab, spec, tls_b=lab.pki.tls("c-as-b", lab.pki.creds["host-c"]))
    errors = await refused_on_both_ports(lab, spec.vm_id)
    assert all("does not match the hostname host-b" in error for error in errors), errors
    await assert_source_unharmed(lab, spec.vm_id)


async def test_source_impersonated_by_another_host_is_refused_and_the_real_one_admitted(lab: Lab) -> None:
    """The destination's authz admits host-a's DN only: host-c's valid certificate is refused on both ports."""
    spec = await boot(lab, "impostor")
    await prepare(lab, spec)
    impostor = lab.pki.tls("c-as-a", lab.pki.creds["host-c"])
    errors = await refused_on_both_ports(lab, spec.vm_id, tls_a=impostor)
    assert all("TLS channel" in error for error in errors), errors
    await assert_source_unharmed(lab, spec.vm_id)
    assert await status(lab.b, spec.vm_id) == "inmigrate"
    await mirror(lab, spec.vm_id)
    assert (await transfer(lab, spec.vm_id)).status is MigrationStatus.COMPLETED


async def test_expired_certificates_are_refused_by_qemu_and_by_the_peer(lab: Lab) -> None:
    """QEMU will not load an expired certificate on either end, and a peer presenting one is refused by each end."""
    spec = await boot(lab, "expired")
    vm = spec.vm_id
    root = lab.pki.root / "expired"
    expired = {
        h: write_host_credentials(lab.pki.ca, h, HOSTS[h], root, validity="expired") for h in ("host-a", "host-b")
    }
    with pytest.raises(HypervisorError, match="has expired"):
        await prepare(lab, spec, tls_b=lab.pki.tls("expired-b", expired["host-b"]))
    residues = await migrate.abort_incoming(lab.b, vm)
    assert residues[-1] == lab.b.vm_dir(vm) and not await lab.b.list()
    shutil.rmtree(residues[-1])
    with pytest.raises(HypervisorError, match="has expired"):
        await mirror(lab, vm, tls_a=lab.pki.tls("expired-a", expired["host-a"]))

    # A destination that is not QEMU presents host-b's certificate: the valid one passes TLS, the expired one not.
    untrusted = "not trusted|expired"
    for creds, refused in ((lab.pki.creds["host-b"], False), (expired["host-b"], True)):
        server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_ctx.load_cert_chain(creds.cert_path, creds.key_path)
        async with await asyncio.start_server(_hang_up, DST, lab.migration_port, ssl=server_ctx):
            with pytest.raises(HypervisorError) as failed:
                await transfer(lab, vm)
        assert bool(re.search(untrusted, str(failed.value))) is refused, failed.value
    await assert_source_unharmed(lab, vm)

    # A source that is not QEMU presents host-a's certificate to a real destination: refused when expired, else let in.
    await prepare(lab, spec)
    contexts = []
    for creds in (expired["host-a"], lab.pki.creds["host-a"]):
        contexts.append(ssl.create_default_context(cafile=creds.ca_path))
        contexts[-1].load_cert_chain(creds.cert_path, creds.key_path)
    assert await _tls_client_reply(contexts[0], lab.migration_port) == b""
    assert await status(lab.b, vm) == "inmigrate"
    assert await _tls_client_reply(contexts[1], lab.migration_port) is None  # taken as the source's stream


async def test_plain_tcp_clients_get_nothing_and_the_real_migration_still_succeeds(lab: Lab) -> None:
    """Plaintext on the migration port is dropped, on the NBD port it gets "TLS required"; the destination waits on."""
    spec = await boot(lab, "plain")
    await prepare(lab, spec)
    answer = await _plain_migration_reply(lab.migration_port)
    assert answer == b"" or answer[:1] == b"\x15", answer  # closed, at most after a TLS alert record
    assert await status(lab.b, spec.vm_id) == "inmigrate"

    replies = await _plain_nbd_options(lab.nbd_port, b"disk0")
    tls_required = 0x80000005
    assert replies == [tls_required, tls_required], [hex(r) for r in replies]
    assert await status(lab.b, spec.vm_id) == "inmigrate"
    # A silent plaintext connection left open on each port does not hold up the real source.
    idle = [await asyncio.open_connection(DST, port) for port in (lab.nbd_port,)]
    try:
        await mirror(lab, spec.vm_id)
        assert (await transfer(lab, spec.vm_id)).status is MigrationStatus.COMPLETED
    finally:
        for _, writer in idle:
            writer.close()


async def test_revoked_source_certificate_is_refused_and_a_reissued_one_admitted(lab: Lab) -> None:
    """With ca-crl.pem revoking host-a's serial the destination refuses it on both ports; a new serial is admitted."""
    spec = await boot(lab, "revoked")
    crl = revoke(lab.pki.root / "ca", lab.pki.creds["host-a"].serial)
    await prepare(lab, spec, tls_b=lab.pki.tls("b-with-crl", lab.pki.creds["host-b"], crl=crl))
    errors = await refused_on_both_ports(lab, spec.vm_id)
    assert all("TLS channel" in error for error in errors), errors
    await assert_source_unharmed(lab, spec.vm_id)
    assert await status(lab.b, spec.vm_id) == "inmigrate"
    reissued = write_host_credentials(lab.pki.ca, "host-a", SRC, lab.pki.root / "reissued")
    tls_a = lab.pki.tls("a-reissued", reissued)
    await mirror(lab, spec.vm_id, tls_a)
    assert (await transfer(lab, spec.vm_id, tls_a)).status is MigrationStatus.COMPLETED


async def _hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A fake destination: it completes the TLS handshake, then closes."""
    writer.close()


async def _tls_client_reply(ctx: ssl.SSLContext, port: int) -> bytes | None:
    """Send a stream header over TLS to host-b's migration port: b"" if refused, None if it waits for more."""
    reader, writer = await asyncio.open_connection(DST, port, ssl=ctx, server_hostname="host-b")
    try:
        writer.write(b"QEVM\x00\x00\x00\x03")
        return await asyncio.wait_for(reader.read(4096), 3)
    except TimeoutError:
        return None
    except (ssl.SSLError, ConnectionError):
        return b""
    finally:
        writer.close()


async def _plain_migration_reply(port: int) -> bytes:
    """Send a plaintext migration stream header to host-b's migration port; returns what comes back (b"": reset)."""
    reader, writer = await asyncio.open_connection(DST, port)
    try:
        writer.write(b"QEVM\x00\x00\x00\x03" + bytes(64))
        await writer.drain()
        return await asyncio.wait_for(reader.read(4096), 10)
    except ConnectionResetError:
        return b""
    finally:
        writer.close()


async def _plain_nbd_options(port: int, export: bytes) -> list[int]:
    """Speak plaintext NBD: list exports, then ask for ``export``; returns the two reply types."""
    reader, writer = await asyncio.open_connection(DST, port)
    try:
        greeting = await asyncio.wait_for(reader.readexactly(18), 10)
        assert greeting[:16] == b"NBDMAGICIHAVEOPT"
        writer.write(struct.pack(">I", 3))  # fixed newstyle, no zeroes
        nbd_opt_list, nbd_opt_go = 3, 7
        go_data = struct.pack(">I", len(export)) + export + struct.pack(">H", 0)
        replies = []
        for option, data in ((nbd_opt_list, b""), (nbd_opt_go, go_data)):
            writer.write(b"IHAVEOPT" + struct.pack(">II", option, len(data)) + data)
            magic, _, reply, length = struct.unpack(">QIII", await asyncio.wait_for(reader.readexactly(20), 10))
            assert magic == 0x3E889045565A9
            await reader.readexactly(length)
            replies.append(reply)
        return replies
    finally:
        writer.close()


# -- what is refused before QEMU is involved -----------------------------------------------------------------------


def test_tls_dir_is_private_and_refuses_mismatched_or_foreign_material(pki: Pki) -> None:
    """The creds dir is 0700 with 0600 files; a key of another host, a foreign CA or a foreign CRL is refused."""
    a, c = pki.creds["host-a"], pki.creds["host-c"]
    assert stat.S_IMODE(pki.tls_a.stat().st_mode) == 0o700
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in pki.tls_a.iterdir()} == dict.fromkeys(
        ["ca-cert.pem", "server-cert.pem", "server-key.pem", "client-cert.pem", "client-key.pem", "dh-params.pem"],
        0o600,
    )
    assert check_tls_dir(pki.tls_a, "server") == check_tls_dir(pki.tls_a, "client") == pki.tls_a
    target = pki.root / "tls" / "bad"
    good = {"cert_pem": a.cert_path.read_bytes(), "key_pem": a.key_path.read_bytes(), "ca_pem": a.ca_path.read_bytes()}
    with pytest.raises(PKIError, match="does not belong"):
        write_tls_dir(target, **{**good, "key_pem": c.key_path.read_bytes()})
    foreign = rogue_ca(pki.root)
    with pytest.raises(PKIError, match="not signed by any"):
        write_tls_dir(target, **{**good, "ca_pem": foreign.cert_pem})
    with pytest.raises(PKIError, match="CRL"):
        write_tls_dir(target, **good, crl_pem=revoke(pki.root / "rogue-ca", a.serial))
    assert not target.exists()
    write_tls_dir(target, **good, crl_pem=revoke(pki.root / "ca", c.serial))
    assert (target / "ca-crl.pem").exists()
    write_tls_dir(target, **good)
    assert not (target / "ca-crl.pem").exists()  # a CRL not passed again is not kept


def test_tls_dir_carries_the_published_ffdhe2048_group(pki: Pki) -> None:
    """The server's DH parameters are RFC 7919's ffdhe2048, so QEMU neither generates its own at each ``object-add``
    nor uses a group nobody vetted. OpenSSL, a second implementation, names the group only if prime and generator
    are exactly the published ones."""
    path = pki.tls_a / "dh-params.pem"
    described = subprocess.run(
        ["openssl", "pkeyparam", "-in", str(path), "-noout", "-text"], capture_output=True, text=True, check=True
    )
    assert "GROUP: ffdhe2048" in described.stdout


async def test_migration_refuses_missing_tls_material_before_starting_qemu(lab: Lab) -> None:
    """Without server or client credentials nothing starts: there is no plaintext fallback."""
    spec = make_spec("no-tls")
    empty = lab.pki.root / "empty"
    empty.mkdir(mode=0o700)
    with pytest.raises(PKIError, match="lacks"):
        await prepare(lab, spec, tls_b=empty)
    assert not lab.b.vm_dir(spec.vm_id).exists()
    with pytest.raises(PKIError, match="lacks"):
        await migrate.start_transfer(
            lab.a, spec.vm_id, dst_address=DST, dst_name="host-b", migration_port=lab.migration_port, tls_dir=empty
        )
    with pytest.raises(InvalidInput):
        await prepare(lab, spec, allowed_peer_dn=" ")
