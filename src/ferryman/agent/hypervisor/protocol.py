"""The narrow interface between the agent service and a hypervisor driver.

The agent decides nothing; it asks a :class:`Hypervisor` to act. :class:`ferryman.agent.hypervisor.qmp.QemuDriver`
drives real QEMU processes over QMP; ``ferryman.testing`` may ship a fake for unit tests of logic only.
"""

from __future__ import annotations

import builtins
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ferryman.core.models import NicSpec, VMRuntime, VMSpec
from ferryman.wire.network import NetworkReport, NicState


@dataclass(frozen=True)
class HypervisorEvent:
    """A QMP event of one VM (``STOP``, ``RESUME``, ``SHUTDOWN``, ...) or ``GONE`` when its process vanished."""

    vm_id: str
    event: str
    data: dict[str, Any] = field(default_factory=dict)
    timestamp: float = 0.0


class Hypervisor(Protocol):
    def load_spec(self, vm_id: str) -> VMSpec:
        """The spec this host holds for ``vm_id`` (its generation says how fresh this copy is). NotFound if none."""
        ...

    def use_key(self, vm_id: str, key: bytes | None) -> None:
        """Hold the disk key the controller sent for an encrypted VM's copy (None: keep what is held)."""
        ...

    async def create(self, spec: VMSpec) -> VMRuntime:
        """Create the VM's disks with qemu-img and boot it. Conflict if the VM exists on this host."""
        ...

    async def start(self, vm_id: str) -> VMRuntime:
        """Boot an existing, stopped VM from its disks."""
        ...

    async def stop(self, vm_id: str) -> None:
        """Power the VM off (QEMU quits); its disks stay."""
        ...

    async def pause(self, vm_id: str) -> VMRuntime: ...
    async def resume(self, vm_id: str) -> VMRuntime: ...

    async def destroy(self, vm_id: str) -> None:
        """Stop the VM if it runs and remove every file it had on this host."""
        ...

    async def update_nics(self, vm_id: str, nics: Sequence[NicSpec]) -> builtins.list[NicState]:
        """Replace the VM's NIC specs (the same NICs, new rules) and install them now if its QEMU runs."""
        ...

    async def nic_states(self, vm_id: str) -> builtins.list[NicState]:
        """The VM's NIC rules as read back now."""
        ...

    async def network_report(self) -> NetworkReport | None:
        """Every NIC table on this host and every foreign one (None: this host plumbs no NICs)."""
        ...

    async def sync_segments(self, peers: Sequence[str]) -> builtins.list[str]:
        """Flood this host's overlay segments to exactly ``peers``; remove those no NIC uses. What changed."""
        ...

    async def list(self) -> builtins.list[VMRuntime]:
        """Every QEMU process of this host, including ones this driver did not start (``managed=False``)."""
        ...

    async def reattach(self) -> builtins.list[VMRuntime]:
        """After an agent restart: reconnect QMP to every VM process still running; never restart one."""
        ...

    def events(self) -> AsyncIterator[HypervisorEvent]: ...

    async def close(self) -> None:
        """Disconnect from QMP; leave every QEMU process running."""
        ...
