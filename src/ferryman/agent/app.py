"""The agent's HTTPS API. It serves only the controller: every request must come over a connection whose client
certificate (verified against our CA by TLS) has role ``controller`` and the controller's name."""

import base64
import binascii
import contextlib
from collections.abc import AsyncIterator
from typing import Annotated, Any

from cryptography import x509
from fastapi import Depends, FastAPI, Request

from ferryman.agent.hooks import HookPoint
from ferryman.agent.hypervisor.protocol import Hypervisor
from ferryman.agent.migration import MigrationAgent
from ferryman.agent.settings import AgentSettings
from ferryman.agent.storage.scrub import ScrubMode
from ferryman.core import errors
from ferryman.core.clock import SystemClock
from ferryman.core.wire import runtime_to_dict, spec_from_dict
from ferryman.httperrors import install_error_handlers
from ferryman.pki.identity import check_peer
from ferryman.pki.tickets import verify_lease
from ferryman.security.asgi_tls import peer_certificate


def create_agent_app(settings: AgentSettings, driver: Hypervisor, migrations: MigrationAgent | None = None) -> FastAPI:
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
    async def health(_: Controller) -> dict[str, Any]:
        return {"host": settings.name, "vms": len(await driver.list())}

    @app.get("/v1/vms")
    async def list_vms(_: Controller) -> list[dict[str, Any]]:
        return [dict(runtime_to_dict(v)) for v in await driver.list()]

    def leased(vm_id: str, generation: int, body: dict[str, Any] | None) -> None:
        """Fencing: start or resume only with a controller-signed lease for this host, VM and generation."""
        token = (body or {}).get("lease")
        if not isinstance(token, str):
            raise errors.Forbidden(f"starting or resuming {vm_id} needs a lease from the controller")
        # a refusal answers 403 with the reason: the controller records it as a fencing event
        verify_lease(token, ca_cert, me=settings.name, vm_id=vm_id, generation=generation, clock=clock)

    @app.post("/v1/vms")
    async def create_vm(body: dict[str, Any], _: Controller) -> dict[str, Any]:
        spec = spec_from_dict(body.get("spec") or {})
        leased(spec.vm_id, spec.generation, body)
        driver.use_key(spec.vm_id, disk_key(body))
        return dict(runtime_to_dict(await driver.create(spec)))

    if migrations is not None:  # before /v1/vms/{vm_id}/{action}, which would take /restore as an action
        _snapshot_routes(app, migrations, Controller)

    @app.post("/v1/vms/{vm_id}/{action}")
    async def vm_action(
        vm_id: str, action: str, _: Controller, body: dict[str, Any] | None = None
    ) -> dict[str, Any] | None:
        if action in {"start", "resume"}:
            leased(vm_id, driver.load_spec(vm_id).generation, body)
        if action == "start":
            driver.use_key(vm_id, disk_key(body))
        if action == "start":
            return dict(runtime_to_dict(await driver.start(vm_id)))
        if action == "stop":
            await driver.stop(vm_id)
            return None
        if action == "pause":
            return dict(runtime_to_dict(await driver.pause(vm_id)))
        if action == "resume":
            return dict(runtime_to_dict(await driver.resume(vm_id)))
        raise errors.NotFound(f"unknown action {action!r}")

    @app.delete("/v1/vms/{vm_id}")
    async def destroy_vm(vm_id: str, _: Controller) -> None:
        await driver.destroy(vm_id)
        if migrations is not None:
            await migrations.scrub_snapshots(vm_id)

    if migrations is not None:
        _migration_routes(app, migrations, Controller)

    return app


def disk_key(body: dict[str, Any] | None) -> bytes | None:
    """The copy's disk key the controller sent with a request (base64 ``disk_key``), or None."""
    raw = (body or {}).get("disk_key")
    if raw is None:
        return None
    try:
        key = base64.b64decode(str(raw), validate=True)
    except (binascii.Error, ValueError):
        raise errors.InvalidInput("disk_key must be base64") from None
    if len(key) < 16:
        raise errors.InvalidInput("disk_key is too short")
    return key


def _ticket(body: dict[str, Any]) -> str:
    token = body.get("ticket")
    if not isinstance(token, str):
        raise errors.Forbidden("a migration step needs the controller's migration ticket")
    return token


def _snapshot_routes(app: FastAPI, m: MigrationAgent, Controller: Any) -> None:
    @app.get("/v1/vms/{vm_id}/snapshots")
    async def snapshots(vm_id: str, _: Controller) -> list[dict[str, Any]]:
        return m.snapshots(vm_id)

    @app.post("/v1/vms/{vm_id}/restore")
    async def restore(vm_id: str, body: dict[str, Any], _: Controller) -> dict[str, Any]:
        tag = body.get("tag")
        return await m.restore(vm_id, str(body.get("lease", "")), str(tag) if tag else None, disk_key(body))


def _migration_routes(app: FastAPI, m: MigrationAgent, Controller: Any) -> None:
    """One route per migration step; every one needs the controller's client certificate AND the ticket."""

    @app.post("/v1/migrations/{mid}/snapshot")
    async def snapshot(mid: str, body: dict[str, Any], _: Controller) -> dict[str, Any]:
        return await m.snapshot(mid, _ticket(body), disk_key(body))

    @app.post("/v1/migrations/{mid}/prepare")
    async def prepare(mid: str, body: dict[str, Any], _: Controller) -> dict[str, Any]:
        return await m.prepare(mid, _ticket(body), body, disk_key(body))

    @app.post("/v1/migrations/{mid}/hooks/{point}")
    async def hooks(mid: str, point: str, body: dict[str, Any], _: Controller) -> dict[str, Any]:
        try:
            hook_point = HookPoint(point)
        except ValueError:
            raise errors.NotFound(f"unknown hook point {point!r}") from None
        return await m.hooks(mid, _ticket(body), hook_point, body.get("context") or {})

    @app.post("/v1/migrations/{mid}/mirror")
    async def mirror(mid: str, body: dict[str, Any], _: Controller) -> dict[str, Any]:
        return await m.mirror(mid, _ticket(body), body)

    @app.post("/v1/migrations/{mid}/transfer")
    async def transfer(mid: str, body: dict[str, Any], _: Controller) -> dict[str, Any]:
        return await m.transfer(mid, _ticket(body), body)

    @app.post("/v1/migrations/{mid}/progress")
    async def progress(mid: str, body: dict[str, Any], _: Controller) -> dict[str, Any]:
        return await m.progress(mid, _ticket(body), wait_s=float(body.get("wait_s", 0)))

    @app.post("/v1/migrations/{mid}/switchover")
    async def switchover(mid: str, body: dict[str, Any], _: Controller) -> dict[str, Any]:
        return await m.switchover(mid, _ticket(body), float(body.get("within", 600)))

    @app.post("/v1/migrations/{mid}/activate")
    async def activate(mid: str, body: dict[str, Any], _: Controller) -> dict[str, Any]:
        return await m.activate(mid, _ticket(body), str(body.get("lease", "")), disk_key(body))

    @app.post("/v1/migrations/{mid}/retire")
    async def retire(mid: str, body: dict[str, Any], _: Controller) -> dict[str, Any]:
        return await m.retire(mid, _ticket(body))

    @app.post("/v1/migrations/{mid}/validate")
    async def validate(mid: str, body: dict[str, Any], _: Controller) -> dict[str, Any]:
        return await m.validate(mid, _ticket(body), disk_key(body))

    @app.post("/v1/migrations/{mid}/kill-destination")
    async def kill_destination(mid: str, body: dict[str, Any], _: Controller) -> dict[str, Any]:
        return await m.kill_destination(mid, _ticket(body))

    @app.post("/v1/migrations/{mid}/resume-source")
    async def resume_source(mid: str, body: dict[str, Any], _: Controller) -> dict[str, Any]:
        return await m.resume_source(mid, _ticket(body), str(body.get("lease", "")), disk_key(body))

    @app.post("/v1/migrations/{mid}/check-destination")
    async def check_destination(mid: str, body: dict[str, Any], _: Controller) -> dict[str, Any]:
        return await m.check_destination(mid, _ticket(body))

    @app.post("/v1/stale-copies/{vm_id}/remove")
    async def remove_stale_copy(vm_id: str, body: dict[str, Any], _: Controller) -> dict[str, Any]:
        return await m.remove_stale_copy(vm_id, str(body.get("successor", "")), bool(body.get("keep_disks", False)))

    @app.post("/v1/migrations/{mid}/close")
    async def close(mid: str, body: dict[str, Any], _: Controller) -> dict[str, Any]:
        role = body.get("role")
        if role not in {"source", "destination"}:
            raise errors.InvalidInput("role must be source or destination")
        return await m.close(mid, _ticket(body), role)

    @app.post("/v1/migrations/{mid}/scrub")
    async def scrub(mid: str, body: dict[str, Any], _: Controller) -> dict[str, Any]:
        side = body.get("side")
        if side not in {"source", "destination"}:
            raise errors.InvalidInput("side must be source or destination")
        try:
            mode = ScrubMode(body.get("mode", "zero"))
        except ValueError:
            raise errors.InvalidInput("mode must be zero, random or crypto") from None
        return await m.scrub(mid, _ticket(body), side, mode)
