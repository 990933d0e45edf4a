"""A VM's NICs on this host: each one a tap on its network's segment, guarded by its own verified nftables table.

The order is the point: the tap is opened (in the host's network namespace, on the segment's bridge) and the NIC's
rules are installed and read back *before* QEMU gets the tap, so no frame of the VM ever passes unfiltered; the tap
closes with QEMU (nothing to clean up after a crash), and the rules go when the VM leaves the host (destroy, a
migration's retired source or rolled-back destination). The host answers the guest's DHCP requests on the tap with
the NIC's address (:mod:`ferryman.agent.network.dhcp`) from the moment its rules are in until they go.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import structlog

from ferryman.core.errors import NetworkError
from ferryman.core.models import NicSpec, VMSpec
from ferryman.wire.network import NetworkReport, NicState

if TYPE_CHECKING:
    from ferryman.agent.network.host import HostNetwork, RulesState

log = structlog.get_logger(__name__)


def _state(rules: RulesState) -> NicState:
    return NicState(
        nic_id=rules.nic_id,
        table=rules.table,
        hash=rules.hash,
        counters=dict(rules.counters),
        tap_present=rules.tap_present,
    )


class VMNics:
    """The driver's view of the host network: None means this host plumbs no NICs (a VM with NICs is refused)."""

    def __init__(self, network: HostNetwork | None) -> None:
        self.network = network

    def _host(self, spec_or_nics: VMSpec | Sequence[NicSpec]) -> HostNetwork | None:
        nics = spec_or_nics.nics if isinstance(spec_or_nics, VMSpec) else spec_or_nics
        if nics and self.network is None:
            raise NetworkError("this host has no network configured (agent --netns/--underlay-ip): it cannot run NICs")
        return self.network

    async def plumb(self, spec: VMSpec) -> list[int]:
        """Open every NIC's tap and install and verify its rules; the tap descriptors, in NIC order, for QEMU.
        On failure nothing of it stays: the taps opened are closed, the rules installed removed."""
        network = self._host(spec)
        if network is None or not spec.nics:
            return []
        fds: list[int] = []
        try:
            for nic in spec.nics:
                fds.append(await asyncio.to_thread(network.open_tap, nic))
                await asyncio.to_thread(network.install_rules, nic)
                await asyncio.to_thread(network.dhcp.serve, nic)  # the guest's address, asked for by DHCP
        except BaseException:
            for fd in fds:
                os.close(fd)
            await self.release(spec)
            raise
        return fds

    async def resume(self, spec: VMSpec) -> None:
        """Answer the DHCP requests of a VM found running at the agent's start (its taps are its QEMU's still)."""
        if self.network is None:
            return
        for nic in spec.nics:
            try:
                await asyncio.to_thread(self.network.dhcp.serve, nic)
            except NetworkError as err:  # the VM runs on; only its next DHCP request goes unanswered
                log.error("cannot answer DHCP for a reattached VM", vm=spec.vm_id, nic=nic.id, error=str(err))

    async def release(self, spec: VMSpec) -> None:
        """Remove the VM's NIC rules from this host (idempotent; its taps went with its QEMU)."""
        if self.network is None:
            return
        for nic in spec.nics:
            self.network.dhcp.stop(nic.id)
            try:
                await asyncio.to_thread(self.network.remove_rules, nic.id)
            except NetworkError as err:  # reconciliation reports a table left behind
                log.error("cannot remove NIC rules", vm=spec.vm_id, nic=nic.id, error=str(err))

    async def install(self, nics: Sequence[NicSpec]) -> list[NicState]:
        """Install (replace) the rules of ``nics`` now, for a running VM whose rules changed."""
        network = self._host(nics)
        if network is None:
            return []
        states = [_state(await asyncio.to_thread(network.install_rules, nic)) for nic in nics]
        for nic in nics:
            network.dhcp.update(nic)
        return states

    async def states(self, spec: VMSpec) -> list[NicState]:
        """The rules of the VM's NICs as read back now (NICs without a table are left out)."""
        network = self._host(spec)
        if network is None:
            return []
        found = [await asyncio.to_thread(network.rules_state, nic.id) for nic in spec.nics]
        return [_state(rules) for rules in found if rules is not None]

    async def sync_segments(self, peers: Sequence[str]) -> list[str]:
        """Flood every segment here to exactly ``peers`` and remove the segments no tap uses (see
        :meth:`HostNetwork.sync_segments`); what changed."""
        if self.network is None:
            return []
        return await asyncio.to_thread(self.network.sync_segments, peers)

    async def report(self) -> NetworkReport | None:
        if self.network is None:
            return None
        report = await asyncio.to_thread(self.network.report)
        foreign = list(report.foreign_tables)
        if self.network.netns is None:  # the host's own firewall lives here: only tables that see a tap's frames count
            foreign = [table for table in foreign if table.split()[0] in ("netdev", "bridge")]
        return NetworkReport(nics=[_state(r) for r in report.nics], foreign_tables=foreign)
