"""What the engine answers: reasons, violations, placement decisions and their lazy explanations.

Why it exists: these are the values the controller stores, shows and audits, so they are plain frozen data with
stable keys; the one exception is :class:`Rejections`, a read-only mapping that builds the reasons of a rejected host
only when asked, so explaining a decision over 10,000 hosts costs nothing until someone looks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from ferryman.policy.bitsets import iter_bits, popcount

ViolationKey = tuple[str, str, str]
"""(vm_id, policy, rule): stable across audits, so first-seen and resolved times can be kept per key."""


@dataclass(frozen=True)
class Reason:
    """Why a host is refused for a VM. ``policy`` is "" for built-in rules (capacity, schedulable, ...); for a
    symmetric rule it names the neighbour's policy."""

    policy: str
    rule: str
    message: str


@dataclass(frozen=True)
class Violation:
    """A hard rule of ``policy`` that VM ``vm_id`` breaks where it runs now. ``neighbours``: the VMs on the same
    host that cause it (empty for host rules); moving one of them away may fix it."""

    vm_id: str
    vm_name: str
    tenant: str
    host: str
    policy: str
    rule: str
    message: str
    neighbours: tuple[str, ...] = ()

    @property
    def key(self) -> ViolationKey:
        return (self.vm_id, self.policy, self.rule)


@dataclass(frozen=True)
class HostLoad:
    """What runs on a host now."""

    name: str
    vms: int
    memory_used_mb: int
    memory_mb: int
    placeable: bool


@dataclass
class Check:
    """One rule evaluated over the whole fleet for one VM: the hosts that fail it, and how to explain a failure."""

    policy: str
    rule: str
    failing: int
    explain: Callable[[int], str]
    _bytes: bytes | None = field(default=None, repr=False)

    def fails(self, host: int) -> bool:
        if self._bytes is None:
            self._bytes = self.failing.to_bytes((self.failing.bit_length() + 7) // 8 or 1, "little")
        byte = host >> 3
        return byte < len(self._bytes) and bool(self._bytes[byte] >> (host & 7) & 1)


class Rejections(Mapping[str, list[Reason]]):
    """Rejected host name → the reasons it was rejected (at least one each), built on access.

    The set of rejected hosts and the failing rules are fixed when the decision is made; the message texts read the
    fleet when they are built, so read them before changing the index if the wording must match the decision."""

    def __init__(self, names: Sequence[str], index: Mapping[str, int], checks: Sequence[Check], rejected: int) -> None:
        self._names = names
        self._index = index
        self._checks = tuple(checks)
        self._rejected = rejected

    def __getitem__(self, host: str) -> list[Reason]:
        i = self._index.get(host)
        if i is None or not self._rejected >> i & 1:
            raise KeyError(host)
        return [Reason(c.policy, c.rule, c.explain(i)) for c in self._checks if c.fails(i)]

    def __iter__(self) -> Iterator[str]:
        return (self._names[i] for i in iter_bits(self._rejected))

    def __len__(self) -> int:
        return popcount(self._rejected)

    def __contains__(self, host: object) -> bool:
        i = self._index.get(host) if isinstance(host, str) else None
        return i is not None and bool(self._rejected >> i & 1)

    def counts(self) -> dict[tuple[str, str], int]:
        """(policy, rule) → how many hosts it rejects (a host failing two rules counts for both)."""
        found: dict[tuple[str, str], int] = {}
        for c in self._checks:
            n = popcount(c.failing & self._rejected)
            if n:
                found[(c.policy, c.rule)] = found.get((c.policy, c.rule), 0) + n
        return found


@dataclass(frozen=True)
class PlacementDecision:
    """The best allowed host for a VM (None: no host allowed) with its prefer ``score``, the best few allowed
    hosts with their scores, and why every other host was rejected."""

    vm_id: str
    host: str | None
    score: int
    ranked: list[tuple[str, int]]
    rejections: Rejections
    allowed: int  # how many hosts are allowed

    def summary(self, limit: int = 4) -> str:
        """One line for logs and CLI errors, e.g. "no host allowed: acme-production sites rejects 9,000 hosts, ..."."""
        counts = sorted(self.rejections.counts().items(), key=lambda item: (-item[1], item[0]))
        parts = [f"{policy or 'built-in'} {rule} rejects {n:,}" for (policy, rule), n in counts[:limit]]
        more = f" and {len(counts) - limit} more rules" if len(counts) > limit else ""
        head = f"host {self.host} (score {self.score})" if self.host else "no host allowed"
        return f"{head}; {len(self.rejections):,} hosts rejected" + (f": {', '.join(parts)}{more}" if parts else "")
