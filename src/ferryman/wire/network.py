"""NICs on the wire: the rules a host installed and read back for a VM's NICs, and a change of them (isolation).

A NIC's state is what the host read back from its nftables table (``nft -s list table``): its sha256, the packets
its named counters dropped, and whether the NIC's tap exists. A host's network report (with its inventory) lists
every Ferryman table it holds and every table that is not Ferryman's: reconciliation compares both with the CMDB.
"""

from __future__ import annotations

from typing import ClassVar

from ferryman.core.models import NicSpec
from ferryman.wire.base import AgentCall, Reply


class NicState(Reply):
    nic_id: str
    table: str
    hash: str  # sha256:<hex> of the table as read back
    counters: dict[str, int] = {}
    tap_present: bool = False


class NicsApplied(Reply):
    nics: list[NicState]


class ReadNics(AgentCall[NicsApplied]):
    """The rules of the VM's NICs as this host reads them back now (a NIC without a table is left out)."""

    method: ClassVar[str] = "GET"
    path: ClassVar[str] = "/v1/vms/{target}/nics"


class UpdateNics(AgentCall[NicsApplied]):
    """Replace the VM's NIC specs (same ids, new rules: isolation) and, if its QEMU runs, install the rules now."""

    path: ClassVar[str] = "/v1/vms/{target}/nics"
    nics: list[NicSpec]


class NetworkReport(Reply):
    """Every Ferryman NIC table in the host's network namespace, and every table there that is not Ferryman's."""

    nics: list[NicState] = []
    foreign_tables: list[str] = []
