"""Bitsets over hosts (Python ints, bit i = host i) and the counters that keep them current as VMs come and go.

Why it exists: the engine answers "on which of 10,000 hosts does rule R hold for this VM" with a handful of
whole-fleet int operations instead of a loop over hosts. Each structure here keeps, per host, a count of something
(VMs, VMs of a tenant, VMs matching a selector, VMs demanding a level, free memory) and the bitset of hosts where
that count is non-zero (or above a threshold), updated in O(1) per VM added or removed.

What it must not do: know policies. The engine decides what is counted; these are plain containers.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator
from typing import Any, Generic, TypeVar

from ferryman.policy.versions import Version

K = TypeVar("K")

_BYTE_BITS: tuple[tuple[int, ...], ...] = tuple(tuple(j for j in range(8) if byte >> j & 1) for byte in range(256))


def iter_bits(bits: int) -> Iterator[int]:
    """The indices of the set bits of a non-negative ``bits``, ascending."""
    if bits <= 0:
        return
    data = bits.to_bytes((bits.bit_length() + 7) // 8, "little")
    for i, byte in enumerate(data):
        if byte:
            base = i * 8
            for j in _BYTE_BITS[byte]:
                yield base + j


def popcount(bits: int) -> int:
    """How many bits are set."""
    return bits.bit_count()


def lowest_bit(bits: int) -> int:
    """The index of the lowest set bit of a positive ``bits``."""
    return (bits & -bits).bit_length() - 1


class Presence(Generic[K]):
    """Per key, how many items sit on each host, and the bitset of hosts holding at least one."""

    __slots__ = ("_bits", "_counts")

    def __init__(self) -> None:
        self._counts: dict[K, dict[int, int]] = {}
        self._bits: dict[K, int] = {}

    def add(self, key: K, host: int) -> None:
        counts = self._counts.get(key)
        if counts is None:
            counts = self._counts[key] = {}
            self._bits[key] = 0
        count = counts.get(host, 0)
        counts[host] = count + 1
        if not count:
            self._bits[key] |= 1 << host

    def remove(self, key: K, host: int) -> None:
        counts = self._counts[key]
        count = counts[host] - 1
        if count:
            counts[host] = count
            return
        del counts[host]
        if counts:
            self._bits[key] &= ~(1 << host)
        else:
            del self._counts[key]
            del self._bits[key]

    def bits(self, key: K) -> int:
        """Hosts holding at least one item of ``key``."""
        return self._bits.get(key, 0)

    def count(self, key: K, host: int) -> int:
        counts = self._counts.get(key)
        return counts.get(host, 0) if counts is not None else 0

    def keys(self) -> Iterable[K]:
        return self._bits.keys()

    def items(self) -> Iterable[tuple[K, int]]:
        """(key, hosts holding it) for every key present somewhere."""
        return self._bits.items()


class TenantPresence:
    """Items on each host counted per tenant: which hosts hold any, several tenants, or only tenant T."""

    __slots__ = ("_counts", "_totals", "any", "mixed", "only")

    def __init__(self) -> None:
        self._counts: dict[int, dict[str, int]] = {}
        self._totals: dict[int, int] = {}
        self.any = 0  # hosts holding at least one item
        self.mixed = 0  # hosts holding items of two tenants or more
        self.only: dict[str, int] = {}  # tenant -> hosts holding items of that tenant alone

    def add(self, host: int, tenant: str) -> None:
        bit = 1 << host
        counts = self._counts.get(host)
        if counts is None:
            self._counts[host] = {tenant: 1}
            self._totals[host] = 1
            self.any |= bit
            self.only[tenant] = self.only.get(tenant, 0) | bit
            return
        self._totals[host] += 1
        if tenant in counts:
            counts[tenant] += 1
            return
        counts[tenant] = 1
        if len(counts) == 2:
            (previous,) = (t for t in counts if t != tenant)
            self.only[previous] &= ~bit
            self.mixed |= bit

    def remove(self, host: int, tenant: str) -> None:
        bit = 1 << host
        counts = self._counts[host]
        self._totals[host] -= 1
        left = counts[tenant] - 1
        if left:
            counts[tenant] = left
            return
        del counts[tenant]
        if not counts:
            del self._counts[host]
            del self._totals[host]
            self.any &= ~bit
            self.only[tenant] &= ~bit
        elif len(counts) == 1:
            (remaining,) = counts
            self.only[remaining] = self.only.get(remaining, 0) | bit
            self.mixed &= ~bit

    def other_than(self, tenant: str) -> int:
        """Hosts holding at least one item of a tenant other than ``tenant``."""
        return self.any & ~self.only.get(tenant, 0)

    def total(self, host: int) -> int:
        return self._totals.get(host, 0)

    def has_other(self, host: int, tenant: str) -> bool:
        """Whether ``host`` holds an item of a tenant other than ``tenant``."""
        counts = self._counts.get(host)
        return counts is not None and (len(counts) > 1 or tenant not in counts)


class Thresholds:
    """Hosts whose count reaches k, for k = 1..limit: ``at_least(k)``. Counts above ``limit`` are tracked too,
    but only up to the limit as bitsets."""

    __slots__ = ("_bits", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._bits = [0] * (limit + 2)

    def raised(self, host: int, new_count: int) -> None:
        """``host``'s count went from new_count - 1 to new_count."""
        if new_count <= self.limit:
            self._bits[new_count] |= 1 << host

    def lowered(self, host: int, new_count: int) -> None:
        """``host``'s count went from new_count + 1 to new_count."""
        if new_count + 1 <= self.limit:
            self._bits[new_count + 1] &= ~(1 << host)

    def at_least(self, k: int) -> int:
        """Hosts with a count ≥ k (k ≥ 1, k ≤ limit)."""
        return self._bits[k]


class MemoryLadder:
    """Hosts with at least t MiB free, for every t in a ladder of thresholds (the memory sizes asked so far)."""

    __slots__ = ("_bits", "_free", "_thresholds")

    def __init__(self) -> None:
        self._thresholds: list[int] = []
        self._bits: list[int] = []
        self._free: dict[int, int] = {}

    def set_free(self, host: int, free: int | None) -> None:
        """``host`` now has ``free`` MiB free (None: the host is gone)."""
        old = self._free.pop(host, None)
        if free is not None:
            self._free[host] = free
        low, high = _span(old, free)
        if low is None:
            return
        start = bisect.bisect_right(self._thresholds, low)
        stop = bisect.bisect_right(self._thresholds, high) if high is not None else len(self._thresholds)
        bit = 1 << host
        gained = free is not None and (old is None or free > old)
        for i in range(start, stop):
            self._bits[i] = self._bits[i] | bit if gained else self._bits[i] & ~bit

    def free(self, host: int) -> int | None:
        return self._free.get(host)

    def fitting(self, need: int) -> int:
        """Hosts with at least ``need`` MiB free (adds ``need`` to the ladder the first time it is asked)."""
        i = bisect.bisect_left(self._thresholds, need)
        if i == len(self._thresholds) or self._thresholds[i] != need:
            bits = 0
            for host, free in self._free.items():
                if free >= need:
                    bits |= 1 << host
            self._thresholds.insert(i, need)
            self._bits.insert(i, bits)
        return self._bits[i]


def _identity(value: Any) -> Any:
    return value


def _span(old: int | None, new: int | None) -> tuple[int | None, int | None]:
    """The thresholds t with low < t ≤ high flip when free memory goes from old to new (None = no host)."""
    if old is None and new is None:
        return None, None
    if old is None or new is None:
        present = new if old is None else old
        return -(1 << 62), present
    if old == new:
        return None, None
    return min(old, new), max(old, new)


class LabelIndex:
    """Host labels as bitsets: value → hosts per label, and floors over ordered labels through sorted suffixes.
    Implements :class:`ferryman.policy.hostrules.HostAttributes`."""

    def __init__(self) -> None:
        self._values: dict[str, dict[object, int]] = {}
        self._suffix: dict[str, tuple[list[Any], list[int]]] = {}

    def add(self, attribute: str, value: object, host: int) -> None:
        values = self._values.setdefault(attribute, {})
        values[value] = values.get(value, 0) | 1 << host
        self._suffix.pop(attribute, None)

    def remove(self, attribute: str, value: object, host: int) -> None:
        values = self._values[attribute]
        left = values[value] & ~(1 << host)
        if left:
            values[value] = left
        else:
            del values[value]
        self._suffix.pop(attribute, None)

    def any_of(self, attribute: str, values: Iterable[str]) -> int:
        known = self._values.get(attribute, {})
        bits = 0
        for value in values:
            bits |= known.get(value, 0)
        return bits

    def at_least(self, attribute: str, floor: int | Version) -> int:
        keys, suffix = self._sorted(attribute)
        i = bisect.bisect_left(keys, floor)  # keys are ints or Versions, like floor
        return suffix[i]

    def _sorted(self, attribute: str) -> tuple[list[Any], list[int]]:
        cached = self._suffix.get(attribute)
        if cached is not None:
            return cached
        values = self._values.get(attribute, {})
        keys: list[Any] = sorted(values, key=_identity)  # ints or Versions, never mixed
        suffix = [0] * (len(keys) + 1)
        for i in range(len(keys) - 1, -1, -1):
            suffix[i] = suffix[i + 1] | values[keys[i]]
        self._suffix[attribute] = (keys, suffix)
        return keys, suffix
