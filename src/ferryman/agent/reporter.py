"""Pushes what actually runs on this host, and every QEMU event, to the controller over mTLS.

The controller takes this host's identity from the certificate; the body carries no host name it would believe.
Delivery is best effort per period: a failed push is logged and the next period sends a fresh inventory; events wait in
a bounded buffer (oldest dropped, counted) so that a long controller outage cannot exhaust memory.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from typing import Any

import httpx
import structlog

from ferryman.agent.hypervisor.protocol import Hypervisor, HypervisorEvent
from ferryman.agent.settings import AgentSettings
from ferryman.pki.tls import client_context
from ferryman.wire.vms import runtime_to_dict

log = structlog.get_logger(__name__)

MAX_BUFFERED_EVENTS = 1000


class Reporter:
    def __init__(self, settings: AgentSettings, driver: Hypervisor) -> None:
        self._settings = settings
        self._driver = driver
        ctx = client_context(settings.ca, settings.cert, settings.key, check_hostname=True)
        self._client = httpx.AsyncClient(base_url=settings.controller_url, verify=ctx, timeout=10.0)
        self._events: collections.deque[HypervisorEvent] = collections.deque(maxlen=MAX_BUFFERED_EVENTS)
        self._wake = asyncio.Event()
        self.dropped_events = 0

    async def run(self) -> None:
        """Run until cancelled: collect events, and push an inventory every period or as soon as an event arrives."""
        collector = asyncio.create_task(self._collect())
        try:
            while True:
                await self._push_once()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._settings.report_interval_s)
                self._wake.clear()
        finally:
            collector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await collector
            await self._client.aclose()

    async def _collect(self) -> None:
        async for event in self._driver.events():
            if len(self._events) == self._events.maxlen:
                self.dropped_events += 1
            self._events.append(event)
            self._wake.set()

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any] | None:
        """The controller's answer, or None if it did not take the report."""
        try:
            response = await self._client.post(path, json=body)
        except httpx.TransportError as err:
            log.warning("controller unreachable", path=path, error=str(err))
            return None
        if response.status_code != 200:
            log.warning("controller refused report", path=path, status=response.status_code, body=response.text[:200])
            return None
        try:
            answer = response.json()
        except ValueError:
            return {}
        return answer if isinstance(answer, dict) else {}

    async def _push_once(self) -> None:
        if self._events:
            batch = list(self._events)
            body = {
                "events": [
                    {"vm_id": e.vm_id, "event": e.event, "data": e.data, "timestamp": e.timestamp} for e in batch
                ]
            }
            if await self._post("/agent/v1/events", body) is not None:
                for _ in batch:
                    self._events.popleft()
        try:
            vms = await self._driver.list()
        except Exception as err:  # the inventory must keep flowing even if one listing fails
            log.error("inventory listing failed", error=str(err))
            return
        report: dict[str, Any] = {"vms": [runtime_to_dict(v) for v in vms]}
        try:
            network = await self._driver.network_report()
        except Exception as err:  # the inventory flows without it; the controller sees the NIC tables as missing
            log.error("network report failed", error=str(err))
        else:
            if network is not None:
                report["network"] = network.model_dump(mode="json")
        answer = await self._post("/agent/v1/report", report)
        peers = answer.get("underlay_peers") if answer else None
        if isinstance(peers, list) and all(isinstance(p, str) for p in peers):
            try:  # the overlay as the controller knows it: new hosts flooded to, departed ones no more
                await self._driver.sync_segments(peers)
            except Exception as err:  # the next report tries again
                log.error("segment sync failed", error=str(err))
