"""The agent's HTTPS API. It serves only the controller: every request must come over a connection whose client
certificate (verified against our CA by TLS) has role ``controller`` and the controller's name. Every body and answer
is a type of :mod:`ferryman.wire`, the same the controller's client sends and reads."""

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Annotated, Any

from cryptography import x509
from fastapi import Depends, FastAPI, Request

from ferryman.agent.forensic_routes import forensic_routes
from ferryman.agent.hypervisor.protocol import Hypervisor
from ferryman.agent.hypervisor.qmp import QemuDriver
from ferryman.agent.migration import MigrationAgent
from ferryman.agent.settings import AgentSettings
from ferryman.agent.storage.image_cache import ImageCache
from ferryman.core import errors
from ferryman.core.clock import SystemClock
from ferryman.httperrors import install_error_handlers
from ferryman.images.signing import check_digest
from ferryman.images.store import receive
from ferryman.pki.identity import check_peer
from ferryman.pki.tickets import verify_lease
from ferryman.security.asgi_tls import peer_certificate
from ferryman.wire import migration as w
from ferryman.wire.base import Empty
from ferryman.wire.images import ImageHeld
from ferryman.wire.network import NicsApplied, UpdateNics
from ferryman.wire.vms import (
    ActionDone,
    CreateVM,
    Health,
    RemoveStaleCopy,
    Restore,
    Restored,
    Runtime,
    SnapshotList,
    StaleCopyRemoved,
    VMActionRequest,
    VMList,
)


def create_agent_app(
    settings: AgentSettings,
    driver: Hypervisor,
    migrations: MigrationAgent | None = None,
    images: ImageCache | None = None,
) -> FastAPI:
    clock = SystemClock()
    ca_cert = x509.load_pem_x509_certificate(settings.ca.read_bytes())

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await driver.close()

    app = FastAPI(title=f"Ferryman agent {settings.name}", version="0.1.0", lifespan=lifespan)
    install_error_handlers(app)

    def controller(request: Request) -> str:
        der = peer_certificate(request.scope)
        if der is None:
            raise errors.Unauthenticated("this agent serves only the controller (client certificate required)")
        identity = check_peer(
            der,
            expected_role="controller",
            expected_name=settings.controller_name,
            is_revoked=lambda _serial: False,
            clock=clock,
        )
        return identity.common_name

    Controller = Annotated[str, Depends(controller)]

    @app.get("/v1/health")
    async def health(_: Controller) -> Health:
        return Health(host=settings.name, vms=len(await driver.list()))

    @app.get("/v1/vms")
    async def list_vms(_: Controller) -> VMList:
        return VMList(vms=[Runtime.of(v) for v in await driver.list()])

    def leased(vm_id: str, generation: int, token: str | None) -> None:
        """Fencing: start or resume only with a controller-signed lease for this host, VM and generation."""
        if not token:
            raise errors.Forbidden(f"starting or resuming {vm_id} needs a lease from the controller")
        # a refusal answers 403 with the reason: the controller records it as a fencing event
        verify_lease(token, ca_cert, me=settings.name, vm_id=vm_id, generation=generation, clock=clock)

    @app.post("/v1/vms")
    async def create_vm(body: CreateVM, _: Controller) -> Runtime:
        leased(body.spec.vm_id, body.spec.generation, body.lease)
        driver.use_key(body.spec.vm_id, body.disk_key)
        return Runtime.of(await driver.create(body.spec))

    @app.post("/v1/vms/{vm_id}/action")
    async def vm_action(vm_id: str, body: VMActionRequest, _: Controller) -> ActionDone:
        if body.action in {"start", "resume"}:
            leased(vm_id, driver.load_spec(vm_id).generation, body.lease)
        if body.action == "start":
            driver.use_key(vm_id, body.disk_key)
            return ActionDone(runtime=Runtime.of(await driver.start(vm_id)))
        if body.action == "stop":
            await driver.stop(vm_id)
            return ActionDone(runtime=None)
        if body.action == "pause":
            return ActionDone(runtime=Runtime.of(await driver.pause(vm_id)))
        return ActionDone(runtime=Runtime.of(await driver.resume(vm_id)))

    @app.get("/v1/vms/{vm_id}/nics")
    async def nic_states(vm_id: str, _: Controller) -> NicsApplied:
        return NicsApplied(nics=await driver.nic_states(vm_id))

    @app.post("/v1/vms/{vm_id}/nics")
    async def update_nics(vm_id: str, body: UpdateNics, _: Controller) -> NicsApplied:
        return NicsApplied(nics=await driver.update_nics(vm_id, body.nics))

    if images is not None:
        _image_routes(app, images, Controller)

    @app.delete("/v1/vms/{vm_id}")
    async def destroy_vm(vm_id: str, _: Controller) -> Empty:
        await driver.destroy(vm_id)
        if migrations is not None:
            await migrations.scrub_snapshots(vm_id)
        return Empty()

    if migrations is not None:
        _snapshot_routes(app, migrations, Controller)
        _migration_routes(app, migrations, Controller)
    if isinstance(driver, QemuDriver):
        forensic_routes(app, driver, settings.state_dir, Controller)

    return app


def _image_routes(app: FastAPI, images: ImageCache, Controller: Any) -> None:
    """The image cache: the controller asks what it holds and streams in what is missing (checked by digest)."""

    @app.get("/v1/images/{digest}")
    def holds_image(digest: str, _: Controller) -> ImageHeld:
        check_digest(digest)
        if not images.store.has(digest):
            return ImageHeld(digest=digest, present=False)
        return ImageHeld(digest=digest, present=True, size=images.store.get(digest).size)

    @app.put("/v1/images/{digest}")
    async def receive_image(digest: str, request: Request, _: Controller) -> ImageHeld:
        upload = await asyncio.to_thread(images.receive, check_digest(digest))
        blob = await receive(upload, request.stream())
        return ImageHeld(digest=blob.digest, present=True, size=blob.size)


def _snapshot_routes(app: FastAPI, m: MigrationAgent, Controller: Any) -> None:
    @app.get("/v1/vms/{vm_id}/snapshots")
    async def snapshots(vm_id: str, _: Controller) -> SnapshotList:
        return m.snapshots(vm_id)

    @app.post("/v1/vms/{vm_id}/restore")
    async def restore(vm_id: str, body: Restore, _: Controller) -> Restored:
        return await m.restore(vm_id, body)

    @app.post("/v1/stale-copies/{vm_id}/remove")
    async def remove_stale_copy(vm_id: str, body: RemoveStaleCopy, _: Controller) -> StaleCopyRemoved:
        return await m.remove_stale_copy(vm_id, body)


def _migration_routes(app: FastAPI, m: MigrationAgent, Controller: Any) -> None:
    """One route per migration step; every one needs the controller's client certificate AND the ticket."""

    @app.post("/v1/migrations/{mid}/snapshot")
    async def snapshot(mid: str, body: w.TakeSnapshot, _: Controller) -> w.Snapshotted:
        return await m.snapshot(mid, body)

    @app.post("/v1/migrations/{mid}/prepare")
    async def prepare(mid: str, body: w.Prepare, _: Controller) -> w.Prepared:
        return await m.prepare(mid, body)

    @app.post("/v1/migrations/{mid}/hooks")
    async def hooks(mid: str, body: w.RunHooks, _: Controller) -> w.HooksRun:
        return await m.hooks(mid, body)

    @app.post("/v1/migrations/{mid}/mirror")
    async def mirror(mid: str, body: w.StartMirror, _: Controller) -> w.Mirrored:
        return await m.mirror(mid, body)

    @app.post("/v1/migrations/{mid}/transfer")
    async def transfer(mid: str, body: w.StartTransfer, _: Controller) -> w.TransferStarted:
        return await m.transfer(mid, body)

    @app.post("/v1/migrations/{mid}/progress")
    async def progress(mid: str, body: w.ReadProgress, _: Controller) -> w.Progress:
        return await m.progress(mid, body)

    @app.post("/v1/migrations/{mid}/switchover")
    async def switchover(mid: str, body: w.SwitchOver, _: Controller) -> w.SwitchedOver:
        return await m.switchover(mid, body)

    @app.post("/v1/migrations/{mid}/activate")
    async def activate(mid: str, body: w.Activate, _: Controller) -> w.Activated:
        return await m.activate(mid, body)

    @app.post("/v1/migrations/{mid}/retire")
    async def retire(mid: str, body: w.Retire, _: Controller) -> Empty:
        return await m.retire(mid, body)

    @app.post("/v1/migrations/{mid}/validate")
    async def validate(mid: str, body: w.Validate, _: Controller) -> w.Validation:
        return await m.validate(mid, body)

    @app.post("/v1/migrations/{mid}/kill-destination")
    async def kill_destination(mid: str, body: w.KillDestination, _: Controller) -> Empty:
        return await m.kill_destination(mid, body)

    @app.post("/v1/migrations/{mid}/resume-source")
    async def resume_source(mid: str, body: w.ResumeSource, _: Controller) -> w.SourceResumed:
        return await m.resume_source(mid, body)

    @app.post("/v1/migrations/{mid}/check-destination")
    async def check_destination(mid: str, body: w.CheckDestination, _: Controller) -> w.DestinationCheck:
        return await m.check_destination(mid, body)

    @app.post("/v1/migrations/{mid}/close")
    async def close(mid: str, body: w.Close, _: Controller) -> w.Closed:
        return await m.close(mid, body)

    @app.post("/v1/migrations/{mid}/scrub")
    async def scrub(mid: str, body: w.Scrub, _: Controller) -> w.Scrubbed:
        return await m.scrub(mid, body)
