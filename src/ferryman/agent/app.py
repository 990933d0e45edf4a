"""The agent's HTTPS API. It serves only the controller: every request must come over a connection whose client
certificate (verified against our CA by TLS) has role ``controller`` and the controller's name."""

import contextlib
from collections.abc import AsyncIterator
from typing import Annotated, Any

from cryptography import x509
from fastapi import Depends, FastAPI, Request

from ferryman.agent.hypervisor.protocol import Hypervisor
from ferryman.agent.settings import AgentSettings
from ferryman.core import errors
from ferryman.core.clock import SystemClock
from ferryman.core.wire import runtime_to_dict, spec_from_dict
from ferryman.httperrors import install_error_handlers
from ferryman.pki.identity import check_peer
from ferryman.pki.tickets import verify_lease
from ferryman.security.asgi_tls import peer_certificate


def create_agent_app(settings: AgentSettings, driver: Hypervisor) -> FastAPI:
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
        return dict(runtime_to_dict(await driver.create(spec)))

    @app.post("/v1/vms/{vm_id}/{action}")
    async def vm_action(
        vm_id: str, action: str, _: Controller, body: dict[str, Any] | None = None
    ) -> dict[str, Any] | None:
        if action in {"start", "resume"}:
            leased(vm_id, driver.load_spec(vm_id).generation, body)
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

    return app
