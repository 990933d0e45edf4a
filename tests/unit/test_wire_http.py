"""The wire end to end: the controller's agent client and the agent app exchange real JSON over HTTP (in process),
so a body one end writes is what the other reads, refusals keep their status and class, and keys stay out of errors.

The agent's QEMU side and migration steps are replaced by recorders; the TLS layer by a scope carrying the
controller's certificate, as the agent's HTTPS server sets it (:mod:`ferryman.security.asgi_tls`)."""

from __future__ import annotations

import base64
import hashlib
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ferryman.agent.app import create_agent_app
from ferryman.agent.migration import MigrationAgent
from ferryman.agent.settings import AgentSettings
from ferryman.agent.storage.image_cache import ImageCache
from ferryman.controller.agent_client import Downloads, HttpAgentClient
from ferryman.core import errors
from ferryman.core.clock import SystemClock
from ferryman.core.models import DiskSpec, Host, RunState, VMRuntime, VMSpec
from ferryman.pki.ca import CertificateAuthority
from ferryman.pki.tickets import issue_lease
from ferryman.wire import migration as w
from ferryman.wire.vms import SnapshotInfo, SnapshotList

KEY = bytes(range(32))
SPEC = VMSpec("vm-1", "web-1", 1, 128, (DiskSpec(1 << 26),), "canary", generation=3)


@dataclass
class Recorder:
    """Stands in for the agent's hypervisor driver and migration steps; keeps what reached it."""

    seen: list[tuple[str, Any]] = field(default_factory=list)
    keys: list[bytes | None] = field(default_factory=list)

    # the driver
    async def list(self) -> list[VMRuntime]:
        return [VMRuntime("vm-1", "web-1", RunState.RUNNING, 4242, 3)]

    def load_spec(self, vm_id: str) -> VMSpec:
        return SPEC

    def use_key(self, vm_id: str, key: bytes | None) -> None:
        self.keys.append(key)

    async def create(self, spec: VMSpec) -> VMRuntime:
        self.seen.append(("create", spec))
        return VMRuntime(spec.vm_id, spec.name, RunState.RUNNING, 1, spec.generation)

    async def resume(self, vm_id: str) -> VMRuntime:
        return VMRuntime(vm_id, "web-1", RunState.RUNNING, 1, 3)

    async def close(self) -> None:
        pass

    # the migration steps
    async def activate(self, mid: str, request: w.Activate) -> w.Activated:
        self.seen.append(("activate", request))
        return w.Activated(generation=4, pid=99, last_seq=12)

    async def scrub(self, mid: str, request: w.Scrub) -> w.Scrubbed:
        raise errors.ScrubIncomplete("disk0.qcow2 is still open", delay=3.0)

    async def prepare(self, mid: str, request: w.Prepare) -> w.Prepared:
        raise errors.Forbidden("ticket already used")

    async def stop(self, vm_id: str) -> None:
        self.seen.append(("stop", vm_id))

    def snapshots(self, vm_id: str) -> SnapshotList:
        return SnapshotList(snapshots=[SnapshotInfo(disk="disk0", tag="pre-1", taken_at="t", size_bytes=1)])


@dataclass
class Wire:
    client: HttpAgentClient
    raw: httpx.AsyncClient
    recorder: Recorder
    ca: CertificateAuthority
    host: Host
    images: ImageCache


def make_wire(tmp_path: Path, *, real_steps: bool = False) -> Wire:
    """The agent app behind an in-process transport; its steps are the recorder's, or (``real_steps``) the real
    :class:`MigrationAgent`'s over the recorder as its driver."""
    ca = CertificateAuthority.load_or_create(tmp_path / "ca", SystemClock())
    settings = AgentSettings(
        name="host-b",
        state_dir=tmp_path / "state",
        listen_host="127.0.0.3",
        listen_port=8444,
        controller_url="https://127.0.0.1:8443",
        controller_ca=tmp_path / "ca" / "ca.pem",
    )
    settings.pki_dir.mkdir(parents=True, exist_ok=True)
    settings.ca.write_bytes(ca.cert_pem)
    recorder = Recorder()
    steps = MigrationAgent(settings, cast(Any, recorder), SystemClock()) if real_steps else recorder
    images = ImageCache(tmp_path / "images")
    app = create_agent_app(settings, cast(Any, recorder), cast(MigrationAgent, steps), images)
    _, issued = ca.issue_controller_certificate("ferryman-controller", ["127.0.0.1"])
    der = x509.load_pem_x509_certificate(issued.pem).public_bytes(serialization.Encoding.DER)

    async def over_tls(scope: Any, receive: Any, send: Any) -> None:  # what the agent's HTTPS server adds
        scope.setdefault("extensions", {})["tls"] = {"client_cert_der": der if scope["path"] != "/anon" else None}
        if scope["path"] == "/anon":
            scope["path"] = "/v1/vms"
        await app(scope, receive, send)

    transport = httpx.ASGITransport(app=over_tls)
    client = HttpAgentClient.__new__(HttpAgentClient)  # the real client; only its TLS peer check is the network's
    client._client = httpx.AsyncClient(transport=transport, timeout=10)
    client._downloads = Downloads(ssl.create_default_context())  # bulk downloads are tested over real TLS
    client._check_agent_identity = lambda host, response: None  # type: ignore[method-assign]
    raw = httpx.AsyncClient(transport=transport, base_url="https://127.0.0.3:8444", timeout=10)
    host = Host("host-b", "127.0.0.3", 8444, "s1", "z1", "10.0.0.0/24", "kvm", "qemu", "7.2", 1)
    return Wire(client, raw, recorder, ca, host, images)


@pytest.fixture
async def wire(tmp_path: Path) -> AsyncIterator[Wire]:
    made = make_wire(tmp_path)
    yield made
    await made.raw.aclose()
    await made.client.aclose()


@pytest.fixture
async def agent_wire(tmp_path: Path) -> AsyncIterator[Wire]:
    made = make_wire(tmp_path, real_steps=True)
    yield made
    await made.raw.aclose()
    await made.client.aclose()


async def test_a_typed_request_arrives_as_sent_and_its_answer_comes_back_typed(wire: Wire) -> None:
    """Activate crosses as JSON (its disk key as base64) and reaches the step as the same typed request."""
    sent = w.Activate(ticket="ticket-1", lease="lease-1", disk_key=KEY)
    answer = await wire.client.call(wire.host, "m-1", sent)
    assert answer == w.Activated(generation=4, pid=99, last_seq=12)
    assert wire.recorder.seen == [("activate", sent)]


async def test_vm_routes_speak_the_domain_types(wire: Wire) -> None:
    """Listing, creating under a lease and listing snapshots go through the same typed wire."""
    assert await wire.client.list_vms(wire.host) == [VMRuntime("vm-1", "web-1", RunState.RUNNING, 4242, 3)]
    _, lease = issue_lease(wire.ca, vm_id="vm-1", host="host-b", generation=3)
    created = await wire.client.create_vm(wire.host, SPEC, lease, KEY)
    assert created.generation == 3 and wire.recorder.seen == [("create", SPEC)] and wire.recorder.keys == [KEY]
    assert [s.tag for s in await wire.client.snapshots(wire.host, "vm-1")] == ["pre-1"]


async def test_an_agents_error_comes_back_as_the_same_class_with_its_retryability(wire: Wire) -> None:
    """A transient scrub failure stays transient (with its delay); a refusal stays a refusal."""
    with pytest.raises(errors.ScrubIncomplete, match=r"^host-b: disk0.qcow2 is still open$") as caught:
        await wire.client.call(wire.host, "m-1", w.Scrub(ticket="t", side="source"))
    assert caught.value.delay == 3.0
    with pytest.raises(errors.Forbidden, match="ticket already used"):
        await wire.client.call(wire.host, "m-1", w.Prepare(ticket="t", spec=SPEC, source_dn="CN=host-a"))


async def test_a_step_without_a_ticket_and_a_start_without_a_lease_are_refused_as_forbidden(agent_wire: Wire) -> None:
    """Missing credentials are a refusal (403), not a malformed request, and never reach the hypervisor."""
    wire = agent_wire
    refused = await wire.raw.post("/v1/migrations/m-1/retire", json={})
    assert refused.status_code == 403 and refused.json()["error"] == "Forbidden", refused.text
    assert "migration ticket" in refused.json()["detail"]
    created = await wire.raw.post("/v1/vms", json={"spec": {**SPEC.__dict__, "disks": [{"size_bytes": 1 << 26}]}})
    assert created.status_code == 403 and "needs a lease" in created.json()["detail"], created.text
    resumed = await wire.raw.post("/v1/vms/vm-1/action", json={"action": "resume"})
    assert resumed.status_code == 403 and "needs a lease" in resumed.json()["detail"], resumed.text
    assert wire.recorder.seen == []


async def test_a_malformed_body_is_a_clear_400_that_never_echoes_a_key(wire: Wire) -> None:
    """A short disk key is refused as invalid input, and the error does not repeat the key it was given."""
    short = base64.b64encode(b"0123456789").decode()
    response = await wire.raw.post("/v1/migrations/m-1/activate", json={"ticket": "t", "lease": "l", "disk_key": short})
    assert response.status_code == 400 and response.json()["error"] == "InvalidInput", response.text
    assert short not in response.text and "0123456789" not in response.text
    unknown = await wire.raw.post("/v1/migrations/m-1/scrub", json={"ticket": "t", "side": "source", "force": 1})
    assert unknown.status_code == 400 and "force" in unknown.json()["detail"]


async def test_without_the_controllers_certificate_nothing_is_served(wire: Wire) -> None:
    """A request over a connection with no client certificate is refused before any route runs."""
    response = await wire.raw.get("/anon")
    assert response.status_code == 401 and response.json()["error"] == "Unauthenticated"


async def test_an_image_file_is_streamed_into_the_hosts_cache_and_checked_on_arrival(wire: Wire, tmp_path: Path):
    """What the controller streams lands under its digest; bytes that do not hash to it are refused, none kept."""
    source = tmp_path / "image.raw"
    source.write_bytes(b"\x01" * (5 << 20) + b"end")
    digest = "sha256:" + hashlib.sha256(source.read_bytes()).hexdigest()
    assert not (await wire.client.holds_image(wire.host, digest)).present
    held = await wire.client.put_image(wire.host, digest, source, source.stat().st_size)
    assert (held.digest, held.present, held.size) == (digest, True, source.stat().st_size)
    assert (await wire.client.holds_image(wire.host, digest)).present
    assert wire.images.store.verify(digest).path.read_bytes() == source.read_bytes()
    other = "sha256:" + hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(errors.InvalidInput, match="nothing was stored"):
        await wire.client.put_image(wire.host, other, source, source.stat().st_size)
    assert wire.images.store.digests() == [digest]
    with pytest.raises(errors.InvalidInput, match="bad digest"):
        await wire.client.holds_image(wire.host, "sha256:../../etc")
