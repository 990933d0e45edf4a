"""What the CMDB keeps of virtual networks: tenant networks and the NICs of VMs on them.

Addresses are allocated inside the transaction that writes the NIC (:mod:`ferryman.network.ipam` picks them), so
two VMs never share a MAC or an address of one network. A deleted VM's NICs keep their rows, released: the history of
who held an address stays (incident response maps an alert's address back to a VM), and the address is free again.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Protocol

from ferryman.core.models import Network, Nic


@dataclass(frozen=True)
class NicRequest:
    """One NIC a new VM asks for: its network and, optionally, its IPv4 address (else the next free one)."""

    network: str
    ipv4: str | None = None


class NetworkRepository(Protocol):
    def add_network(self, network: Network) -> Network:
        """Store a new network; ``vni`` 0 allocates the next free VNI. Conflict on a name its tenant has already
        or a taken VNI."""
        ...

    def get_network(self, name: str, *, tenant: str | None = None) -> Network:
        """The network of this name in ``tenant``; without one, InvalidInput when several tenants use the name."""
        ...

    def list_networks(self, tenant: str | None = None) -> list[Network]: ...

    def add_nics(self, vm_id: str, requests: list[NicRequest]) -> list[Nic]:
        """Allocate and store the VM's NICs (MAC, addresses) in one transaction; NotFound for a network of another
        tenant, Conflict for a taken address, CapacityError for a full network."""
        ...

    def nics_of(self, vm_id: str) -> list[Nic]:
        """The VM's live NICs, in device order."""
        ...

    def nics_on(self, network: Network) -> list[Nic]:
        """The live NICs of ``network``."""
        ...

    def all_live_nics(self) -> list[Nic]: ...

    def update_nic(self, nic_id: str, **changes: object) -> Nic:
        """Change ``isolated`` (bumps the revision), or record ``host``/``rules_hash``/``applied_at``."""
        ...

    def release_nics(self, vm_id: str, at: dt.datetime) -> list[Nic]:
        """The VM is deleted: its NICs' addresses are free again (the rows stay)."""
        ...
