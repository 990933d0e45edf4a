"""The host side of VM networking: segments, taps in the host's network namespace, and per-NIC nftables rules.

:class:`HostNetwork` is the public surface (:mod:`.host` explains the order of operations and what drift detection
sees); :mod:`.netns` runs commands and opens taps in a namespace; :mod:`.nftables` loads, reads back and hashes
tables. What the rules say is decided in :mod:`ferryman.network.rules`, never here.
"""

from __future__ import annotations

from ferryman.agent.network.host import VXLAN_PORT, HostNetwork, NetworkReport, RulesState
from ferryman.agent.network.nftables import CanonicalHashes

__all__ = ["VXLAN_PORT", "CanonicalHashes", "HostNetwork", "NetworkReport", "RulesState"]
