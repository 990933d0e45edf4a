"""How the controller talks to host agents: mTLS HTTPS, presenting the controller certificate.

The agent's server certificate must chain to our CA, name the host's address (hostname check) and carry the host's
name as CN with role ``host``; a revoked agent certificate is refused. Transport failures become
:class:`AgentUnreachable`; errors the agent reports come back as the same Ferryman error types.
"""

from __future__ import annotations

import base64
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import httpx

from ferryman.core import errors
from ferryman.core.clock import Clock
from ferryman.core.models import Host, VMRuntime, VMSpec
from ferryman.core.wire import runtime_from_dict, spec_to_dict
from ferryman.httperrors import ERROR_TYPES
from ferryman.pki.identity import check_peer
from ferryman.pki.tls import client_context


class AgentClient(Protocol):
    async def create_vm(self, host: Host, spec: VMSpec, lease: str, key: bytes | None = None) -> VMRuntime: ...
    async def vm_action(
        self, host: Host, vm_id: str, action: str, lease: str | None = None, key: bytes | None = None
    ) -> VMRuntime | None: ...
    async def destroy_vm(self, host: Host, vm_id: str) -> None: ...
    async def list_vms(self, host: Host) -> list[VMRuntime]: ...
    async def remove_stale_copy(self, host: Host, vm_id: str, successor: str, keep_disks: bool) -> Any: ...
    async def snapshots(self, host: Host, vm_id: str) -> Any: ...
    async def restore(self, host: Host, vm_id: str, lease: str, tag: str | None, key: bytes | None = None) -> Any: ...
    async def aclose(self) -> None: ...


class HttpAgentClient:
    """The real :class:`AgentClient`."""

    def __init__(
        self,
        *,
        ca: Path,
        cert: Path,
        key: Path,
        is_revoked: Callable[[int], bool],
        clock: Clock,
        timeout_s: float = 60.0,
    ) -> None:
        self._ctx: ssl.SSLContext = client_context(ca, cert, key, check_hostname=True)
        self._client = httpx.AsyncClient(verify=self._ctx, timeout=httpx.Timeout(timeout_s, connect=5.0))
        self._is_revoked = is_revoked
        self._clock = clock

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _call(
        self, host: Host, method: str, path: str, body: dict[str, Any] | None = None, limit_s: float | None = None
    ) -> Any:
        url = f"{host.agent_url}{path}"
        timeout = httpx.Timeout(limit_s, connect=5.0) if limit_s is not None else httpx.USE_CLIENT_DEFAULT
        try:
            response = await self._client.request(method, url, json=body, timeout=timeout)
        except httpx.TransportError as err:
            raise errors.AgentUnreachable(f"agent of {host.name} is unreachable at {host.agent_url}: {err}") from err
        self._check_agent_identity(host, response)
        if response.status_code >= 400:
            try:
                payload = response.json()
                kind, detail = payload.get("error", ""), payload.get("detail", response.text)
            except ValueError:
                kind, detail = "", response.text
            raise ERROR_TYPES.get(kind, errors.HypervisorError)(f"{host.name}: {detail}")
        return response.json() if response.content else None

    def _check_agent_identity(self, host: Host, response: httpx.Response) -> None:
        stream = response.extensions.get("network_stream")
        ssl_object = stream.get_extra_info("ssl_object") if stream is not None else None
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if der is None:
            raise errors.Forbidden(f"agent of {host.name} presented no certificate")
        check_peer(der, expected_role="host", expected_name=host.name, is_revoked=self._is_revoked, clock=self._clock)

    async def create_vm(self, host: Host, spec: VMSpec, lease: str, key: bytes | None = None) -> VMRuntime:
        body = with_key({"spec": spec_to_dict(spec), "lease": lease}, key)
        return runtime_from_dict(await self._call(host, "POST", "/v1/vms", body))

    async def vm_action(
        self, host: Host, vm_id: str, action: str, lease: str | None = None, key: bytes | None = None
    ) -> VMRuntime | None:
        body = with_key({"lease": lease}, key) if lease else None
        raw = await self._call(host, "POST", f"/v1/vms/{vm_id}/{action}", body)
        return runtime_from_dict(raw) if raw else None

    async def destroy_vm(self, host: Host, vm_id: str) -> None:
        await self._call(host, "DELETE", f"/v1/vms/{vm_id}")

    async def list_vms(self, host: Host) -> list[VMRuntime]:
        return [runtime_from_dict(r) for r in await self._call(host, "GET", "/v1/vms")]

    async def remove_stale_copy(self, host: Host, vm_id: str, successor: str, keep_disks: bool) -> Any:
        """Kill and scrub ``host``'s copy of ``vm_id``; ``successor`` is the lease of the copy of record."""
        body = {"successor": successor, "keep_disks": keep_disks}
        return await self._call(host, "POST", f"/v1/stale-copies/{vm_id}/remove", body, 600)

    async def snapshots(self, host: Host, vm_id: str) -> Any:
        return await self._call(host, "GET", f"/v1/vms/{vm_id}/snapshots")

    async def restore(self, host: Host, vm_id: str, lease: str, tag: str | None, key: bytes | None = None) -> Any:
        body = with_key({"lease": lease, "tag": tag}, key)
        return await self._call(host, "POST", f"/v1/vms/{vm_id}/restore", body, 1800)

    async def migration_step(
        self, host: Host, migration_id: str, step: str, body: dict[str, Any], limit_s: float = 120
    ) -> Any:
        """One step of a migration on ``host`` (the body carries the migration ticket)."""
        return await self._call(host, "POST", f"/v1/migrations/{migration_id}/{step}", body, limit_s)


def with_key(body: dict[str, Any], key: bytes | None) -> dict[str, Any]:
    """``body`` with the copy's disk key added (base64 ``disk_key``) when there is one."""
    return body if key is None else {**body, "disk_key": base64.b64encode(key).decode()}
