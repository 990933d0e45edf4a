"""How the controller talks to host agents: mTLS HTTPS, presenting the controller certificate.

The agent's server certificate must chain to our CA, name the host's address (hostname check) and carry the host's
name as CN with role ``host``; a revoked agent certificate is refused. Transport failures become
:class:`AgentUnreachable`; errors the agent reports come back as the same Ferryman error types. Every body is a type
of :mod:`ferryman.wire`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, TypeVar

import httpx
from pydantic import ValidationError

from ferryman.core import errors
from ferryman.core.clock import Clock
from ferryman.core.models import Host, NicSpec, VMRuntime, VMSpec
from ferryman.pki.identity import check_peer
from ferryman.pki.tls import client_context
from ferryman.wire.base import AgentCall, R
from ferryman.wire.errors import ErrorBody, decode_error
from ferryman.wire.images import UPLOAD_PATH, HoldsImage, ImageHeld
from ferryman.wire.network import NicState, ReadNics, UpdateNics
from ferryman.wire.vms import (
    CreateVM,
    DestroyVM,
    ListSnapshots,
    ListVMs,
    RemoveStaleCopy,
    Restore,
    Restored,
    SnapshotInfo,
    StaleCopyRemoved,
    VMActionRequest,
)

T = TypeVar("T")
DOWNLOADS = 2  # bulk downloads from agents at once; more wait their turn


class AgentClient(Protocol):
    async def call(self, host: Host, target: str, request: AgentCall[R], *, limit_s: float | None = None) -> R: ...
    async def fetch(
        self, host: Host, path: str, receive: Callable[[Iterator[bytes]], T], *, limit_s: float = 3600
    ) -> T: ...
    async def create_vm(self, host: Host, spec: VMSpec, lease: str, key: bytes | None = None) -> VMRuntime: ...
    async def vm_action(
        self, host: Host, vm_id: str, action: str, lease: str | None = None, key: bytes | None = None
    ) -> VMRuntime | None: ...
    async def destroy_vm(self, host: Host, vm_id: str) -> None: ...
    async def list_vms(self, host: Host) -> list[VMRuntime]: ...
    async def remove_stale_copy(self, host: Host, vm_id: str, successor: str, keep_disks: bool) -> StaleCopyRemoved: ...
    async def snapshots(self, host: Host, vm_id: str) -> list[SnapshotInfo]: ...
    async def restore(
        self, host: Host, vm_id: str, lease: str, tag: str | None, key: bytes | None = None
    ) -> Restored: ...
    async def holds_image(self, host: Host, digest: str) -> ImageHeld: ...
    async def put_image(
        self, host: Host, digest: str, source: Path, size: int, *, limit_s: float = 3600
    ) -> ImageHeld: ...
    async def nic_states(self, host: Host, vm_id: str) -> list[NicState]: ...
    async def update_nics(self, host: Host, vm_id: str, nics: Sequence[NicSpec]) -> list[NicState]: ...
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
        self._downloads = Downloads(self._ctx)
        self._is_revoked = is_revoked
        self._clock = clock

    async def aclose(self) -> None:
        await self._client.aclose()
        await self._downloads.close()

    async def call(self, host: Host, target: str, request: AgentCall[R], *, limit_s: float | None = None) -> R:
        """Send ``request`` about ``target`` (a VM or migration id) to ``host``'s agent and read its typed answer.
        An error the agent reports comes back as the same error class; a body that does not match the wire types is
        the agent's fault, not the caller's (:class:`HypervisorError`)."""
        raw = await self._send(host, request.method, request.url_path(target), request.body(), limit_s)
        try:
            return request.response_type().model_validate(raw or {})
        except ValidationError as err:
            raise errors.HypervisorError(f"{host.name}: malformed answer to {type(request).__name__}: {err}") from err

    async def _send(
        self, host: Host, method: str, path: str, body: dict[str, Any] | None = None, limit_s: float | None = None
    ) -> Any:
        url = f"{host.agent_url}{path}"
        timeout = httpx.Timeout(limit_s, connect=5.0) if limit_s is not None else httpx.USE_CLIENT_DEFAULT
        try:
            response = await self._client.request(method, url, json=body, timeout=timeout)
        except httpx.TransportError as err:
            raise errors.AgentUnreachable(f"agent of {host.name} is unreachable at {host.agent_url}: {err}") from err
        self._checked(host, response)
        return response.json() if response.content else None

    def _checked(self, host: Host, response: httpx.Response) -> None:
        """The agent's identity, then its error (the same error class) if it reported one."""
        self._check_agent_identity(host, response)
        if response.status_code >= 400:
            try:
                problem = ErrorBody.model_validate(response.json())
            except ValueError:  # not JSON, or not an error body: the proxy or server itself failed
                raise errors.HypervisorError(f"{host.name}: HTTP {response.status_code}: {response.text}") from None
            raise decode_error(problem, prefix=f"{host.name}: ")

    async def nic_states(self, host: Host, vm_id: str) -> list[NicState]:
        return (await self.call(host, vm_id, ReadNics())).nics

    async def update_nics(self, host: Host, vm_id: str, nics: Sequence[NicSpec]) -> list[NicState]:
        return (await self.call(host, vm_id, UpdateNics(nics=list(nics)))).nics

    async def holds_image(self, host: Host, digest: str) -> ImageHeld:
        return await self.call(host, digest, HoldsImage())

    async def put_image(self, host: Host, digest: str, source: Path, size: int, *, limit_s: float = 3600) -> ImageHeld:
        """Stream the file ``source`` (``size`` bytes) into ``host``'s image cache as ``digest`` (the agent checks it
        on arrival)."""

        async def chunks() -> AsyncIterator[bytes]:
            fh = await asyncio.to_thread(source.open, "rb")
            try:
                while chunk := await asyncio.to_thread(fh.read, 4 << 20):
                    yield chunk
            finally:
                fh.close()

        url = f"{host.agent_url}{UPLOAD_PATH.format(target=digest)}"
        headers = {"content-type": "application/octet-stream", "content-length": str(size)}
        try:
            response = await self._client.put(
                url, content=chunks(), headers=headers, timeout=httpx.Timeout(limit_s, connect=5.0)
            )
        except httpx.TransportError as err:
            raise errors.AgentUnreachable(f"agent of {host.name} is unreachable at {host.agent_url}: {err}") from err
        self._checked(host, response)
        try:
            return ImageHeld.model_validate(response.json())
        except (ValueError, ValidationError) as err:
            raise errors.HypervisorError(f"{host.name}: malformed answer to an image upload: {err}") from err

    async def fetch(
        self, host: Host, path: str, receive: Callable[[Iterator[bytes]], T], *, limit_s: float = 3600
    ) -> T:
        """Stream the body of ``GET path`` from ``host``'s agent into ``receive`` (its answer is returned).

        The whole transfer, ``receive`` included, runs in a thread of :class:`Downloads` on a blocking client: TLS
        on the event loop reads through memory BIOs and carried about half the rate of a blocking socket here
        (``bench/downloads``), and the loop stays free for migrations while evidence moves. A
        cancelled fetch stops at its next chunk (``receive`` sees an error and keeps nothing)."""
        return await self._downloads.run(self._fetch_blocking, host, path, receive, limit_s)

    def _fetch_blocking(
        self, stop: threading.Event, host: Host, path: str, receive: Callable[[Iterator[bytes]], T], limit_s: float
    ) -> T:
        unreachable = f"agent of {host.name} is unreachable at {host.agent_url}"
        client = self._downloads.client()
        try:
            with client.stream("GET", f"{host.agent_url}{path}", timeout=httpx.Timeout(limit_s, connect=5.0)) as got:
                if got.status_code >= 400:
                    got.read()
                self._checked(host, got)
                return receive(_chunks(got, stop, unreachable))
        except (httpx.TransportError, RuntimeError) as err:  # RuntimeError: the client was closed under it
            raise errors.AgentUnreachable(f"{unreachable}: {err}") from err

    def _check_agent_identity(self, host: Host, response: httpx.Response) -> None:
        stream = response.extensions.get("network_stream")
        ssl_object = stream.get_extra_info("ssl_object") if stream is not None else None
        # an SSLObject (the event loop's streams) or the C object under a blocking SSLSocket: both take it positionally
        der = ssl_object.getpeercert(True) if ssl_object is not None else None
        if der is None:
            raise errors.Forbidden(f"agent of {host.name} presented no certificate")
        check_peer(der, expected_role="host", expected_name=host.name, is_revoked=self._is_revoked, clock=self._clock)

    async def create_vm(self, host: Host, spec: VMSpec, lease: str, key: bytes | None = None) -> VMRuntime:
        runtime = await self.call(host, spec.vm_id, CreateVM(spec=spec, lease=lease, disk_key=key))
        return runtime.to_domain()

    async def vm_action(
        self, host: Host, vm_id: str, action: str, lease: str | None = None, key: bytes | None = None
    ) -> VMRuntime | None:
        try:
            request = VMActionRequest.model_validate({"action": action, "lease": lease, "disk_key": key})
        except ValidationError as err:
            raise errors.InvalidInput(f"bad VM action {action!r}") from err
        done = await self.call(host, vm_id, request)
        return done.runtime.to_domain() if done.runtime else None

    async def destroy_vm(self, host: Host, vm_id: str) -> None:
        await self.call(host, vm_id, DestroyVM())

    async def list_vms(self, host: Host) -> list[VMRuntime]:
        return [r.to_domain() for r in (await self.call(host, host.name, ListVMs())).vms]

    async def remove_stale_copy(self, host: Host, vm_id: str, successor: str, keep_disks: bool) -> StaleCopyRemoved:
        """Kill and scrub ``host``'s copy of ``vm_id``; ``successor`` is the lease of the copy of record."""
        request = RemoveStaleCopy(successor=successor, keep_disks=keep_disks)
        return await self.call(host, vm_id, request, limit_s=600)

    async def snapshots(self, host: Host, vm_id: str) -> list[SnapshotInfo]:
        return (await self.call(host, vm_id, ListSnapshots())).snapshots

    async def restore(self, host: Host, vm_id: str, lease: str, tag: str | None, key: bytes | None = None) -> Restored:
        return await self.call(host, vm_id, Restore(lease=lease, tag=tag, disk_key=key), limit_s=1800)


class Downloads:
    """Bulk downloads from agents on one blocking client, in threads of their own (never the loop's default
    executor, which every CMDB step shares), at most :data:`DOWNLOADS` at once."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self._ctx = ctx
        self._pool = ThreadPoolExecutor(DOWNLOADS, thread_name_prefix="agent-download")
        self._client: httpx.Client | None = None
        self._lock = threading.Lock()
        self._closed = False

    def client(self) -> httpx.Client:
        with self._lock:
            if self._closed:
                raise errors.AgentUnreachable("the controller is shutting down: no download starts")
            if self._client is None:
                self._client = httpx.Client(verify=self._ctx)
            return self._client

    async def run(self, func: Callable[..., T], *args: Any) -> T:
        """``func(stop, *args)`` in a download thread; if the caller is cancelled, ``stop`` is set and the thread
        waited for (it owns a file being written) before the cancellation goes on."""
        stop = threading.Event()
        try:
            future = asyncio.get_running_loop().run_in_executor(self._pool, func, stop, *args)
        except RuntimeError as err:  # the pool was shut down: the controller is stopping
            raise errors.AgentUnreachable("the controller is shutting down: no download starts") from err
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            stop.set()
            with contextlib.suppress(Exception):
                await future
            raise

    async def close(self) -> None:
        """No download starts after this; one in progress ends with AgentUnreachable as its connection closes."""
        with self._lock:
            self._closed = True
            client, self._client = self._client, None
        self._pool.shutdown(wait=False)
        if client is not None:
            await asyncio.to_thread(client.close)


def _chunks(response: httpx.Response, stop: threading.Event, unreachable: str) -> Iterator[bytes]:
    """The body's chunks until ``stop`` is set; a transport failure as AgentUnreachable, whoever reads them."""
    body = response.iter_bytes()
    while True:
        try:
            chunk: bytes | None = next(body)
        except StopIteration:
            chunk = None
        except (httpx.TransportError, RuntimeError) as err:
            raise errors.AgentUnreachable(f"{unreachable}: {err}") from err
        if stop.is_set():  # checked after each read: the last one may have waited long
            raise errors.AgentUnreachable(f"{unreachable}: the download was cancelled")
        if chunk is None:
            return
        yield chunk
