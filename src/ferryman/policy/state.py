"""The fleet as the engine indexes it: hosts, VMs and the per-host counters and bitsets kept current incrementally.

Why it exists: :class:`ferryman.policy.engine.FleetIndex` answers questions; this base class only keeps the state
those answers read, so every change (a VM added, removed or moved, a host patched) is a handful of O(1) counter and
bit updates, and the code that keeps the counters right is in one place, away from the code that reads them.

What it must not do: decide anything. No rule is evaluated here except host-only predicates, cached as bitsets.

Per host i (bit i of every bitset): the VMs on it, their memory, how many there are (``Thresholds``: hosts with at
least k VMs), their tenants, security levels and classes (``Presence``), and for each compiled selector the VMs
matching it and the VMs whose ``require`` forbids it, for each policy with ``max_vms_per_host``,
``dedicated_host`` or ``min_neighbour_security_level`` the VMs it governs (``TenantPresence``): the engine derives
"hosts where rule R holds for VM v" from these with a few int operations.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterable, Iterator
from contextlib import contextmanager

from ferryman.core.errors import Conflict, NotFound
from ferryman.policy.bitsets import LabelIndex, MemoryLadder, Presence, TenantPresence, Thresholds, iter_bits
from ferryman.policy.compiled import CompiledPolicies, CompiledRules, MigrationRules, VMTraits
from ferryman.policy.facts import HostFacts, VMFacts
from ferryman.policy.hostrules import HostPredicate
from ferryman.policy.results import HostLoad
from ferryman.policy.versions import Version, version_or_none

_LABELS = ("site", "zone", "subnet", "virt_type", "hypervisor", "site_security_level", "patch_level")
_MIN_COUNT_LEVELS = 64  # VM-count bitsets kept for tie-breaks, beyond the largest max_vms_per_host


class IndexedVM:
    """A VM in the index: its facts, its compiled traits and the index of its host (None: not placed)."""

    __slots__ = ("facts", "host", "traits")

    def __init__(self, facts: VMFacts, traits: VMTraits, host: int | None) -> None:
        self.facts = facts
        self.traits = traits
        self.host = host


class FleetState:
    """Hosts, VMs and compiled policies, indexed and kept current incrementally (the engine's state).

    Not thread-safe: even questions (place, admit) take the VM asked about off its host for their duration. Host
    names must be unique (:class:`Conflict` otherwise); a host or VM unknown to the index is :class:`NotFound`.
    """

    def __init__(self, compiled: CompiledPolicies, hosts: Iterable[HostFacts], vms: Iterable[VMFacts]) -> None:
        self.compiled = compiled
        self._names: list[str] = []
        self._index: dict[str, int] = {}
        self._hosts: list[HostFacts | None] = []
        self._versions: list[Version | None] = []
        self._present = 0
        self._placeable = 0
        self._appended = 0  # hosts added out of name order (ties among them are broken by name explicitly)
        self._last_in_order: str | None = None
        self._labels = LabelIndex()
        self._pred_fail: dict[HostPredicate, int] = {}
        self._rules_fail: dict[int, int] = {}  # id(CompiledRules) -> hosts failing its host rules
        self._targets: dict[frozenset[str], int] = {}
        self._vms: dict[str, IndexedVM] = {}
        self._on: list[dict[str, IndexedVM]] = []
        self._used: list[int] = []
        self._counts = Thresholds(max(_MIN_COUNT_LEVELS, compiled.max_cap + 1))
        self._memory = MemoryLadder()
        self._tenants = TenantPresence()
        self._levels: Presence[int] = Presence()
        self._classes: Presence[tuple[int, ...]] = Presence()
        self._caps: Presence[str] = Presence()
        self._demands: Presence[str] = Presence()
        self._dedicated = {name: TenantPresence() for name in compiled.dedicated}
        self._selected = [TenantPresence() for _ in compiled.selectors]  # VMs matching each selector
        self._forbidders = [TenantPresence() for _ in compiled.selectors]  # VMs whose require forbids it
        for host in sorted(hosts, key=lambda h: h.name):
            self._add_host(host)
        for vm in vms:
            self.add_vm(vm)

    # ------------------------------------------------------------------------------------------------- lookups

    def host(self, name: str) -> HostFacts:
        facts = self._hosts[self._host_index(name)]
        assert facts is not None
        return facts

    def vm(self, vm_id: str) -> VMFacts:
        return self._vm(vm_id).facts

    def hosts(self) -> list[HostFacts]:
        """Every host, by name."""
        return sorted((h for h in self._hosts if h is not None), key=lambda h: h.name)

    def vm_ids(self) -> list[str]:
        return list(self._vms)

    def facts(self) -> tuple[list[HostFacts], list[VMFacts]]:
        """Every host (by name) and every VM as the index holds them now: what another index of the same fleet is
        built from. The facts are frozen, so the copy stays as it is whatever happens to the index afterwards."""
        return self.hosts(), [record.facts for record in self._vms.values()]

    def vms_on(self, host: str) -> tuple[str, ...]:
        """The ids of the VMs on ``host``."""
        return tuple(self._on[self._host_index(host)])

    def host_load(self, host: str) -> HostLoad:
        i = self._host_index(host)
        facts = self._hosts[i]
        assert facts is not None
        return HostLoad(facts.name, len(self._on[i]), self._used[i], facts.memory_mb, bool(self._placeable >> i & 1))

    def hosts_report(self) -> list[HostLoad]:
        """The load of every host, by name."""
        return [self.host_load(h.name) for h in self.hosts()]

    def policies_of(self, vm_id: str) -> tuple[str, ...]:
        """The names of the policies that select the VM."""
        return self._vm(vm_id).traits.cls.policies

    def migration_rules(self, vm_id: str) -> MigrationRules:
        """Allowed targets (intersection), cooldown (longest) and auto_balance (false wins) of the VM's policies."""
        return self._vm(vm_id).traits.cls.migration

    def eligible_hosts(self, vm: VMFacts) -> list[str]:
        """Hosts whose labels satisfy the host-only hard rules of ``vm``'s policies (neighbours, capacity and
        schedulability aside): where it could ever go."""
        cls = self.compiled.traits(vm).cls
        failing = 0
        for rules in cls.requires:
            failing |= self._host_rules_failing(rules)
        return sorted(self._names[i] for i in iter_bits(self._present & ~failing))

    def _host_index(self, name: str) -> int:
        i = self._index.get(name)
        if i is None:
            raise NotFound(f"unknown host {name!r}")
        return i

    def _vm(self, vm_id: str) -> IndexedVM:
        found = self._vms.get(vm_id)
        if found is None:
            raise NotFound(f"unknown VM {vm_id!r}")
        return found

    # ------------------------------------------------------------------------------------------ hosts: changes

    def update_host(self, host: HostFacts) -> frozenset[str]:
        """Add ``host`` or replace its facts (labels, patch level, memory, schedulability). Returns the VMs to
        re-check: those on the host."""
        i = self._index.get(host.name)
        if i is None:
            self._add_host(host)
            return frozenset()
        old = self._hosts[i]
        assert old is not None
        if old == host:
            return frozenset()
        self._index_labels(i, old, add=False)
        self._hosts[i] = host
        self._versions[i] = version_or_none(host.hypervisor_version)
        self._index_labels(i, host, add=True)
        bit = 1 << i
        self._placeable = self._placeable | bit if host.placeable else self._placeable & ~bit
        if host.memory_mb != old.memory_mb:
            self._memory.set_free(i, host.memory_mb - self._used[i])
        version = self._versions[i]
        for predicate, failing in self._pred_fail.items():
            self._pred_fail[predicate] = failing & ~bit if predicate.test(host, version) else failing | bit
        self._rules_fail.clear()
        return frozenset(self._on[i])

    def remove_host(self, name: str) -> frozenset[str]:
        """Forget a host that runs no VM (raises :class:`Conflict` otherwise: move or remove them first)."""
        i = self._host_index(name)
        if self._on[i]:
            raise Conflict(f"host {name} still runs {len(self._on[i])} VMs; remove or move them first")
        old = self._hosts[i]
        assert old is not None
        self._index_labels(i, old, add=False)
        bit = 1 << i
        self._present &= ~bit
        self._placeable &= ~bit
        self._hosts[i] = None
        del self._index[name]
        self._memory.set_free(i, None)
        self._invalidate_host_caches()
        return frozenset()

    def _add_host(self, host: HostFacts) -> None:
        if host.name in self._index:
            raise Conflict(f"host {host.name} is given twice")
        i = len(self._names)
        bit = 1 << i
        if self._last_in_order is not None and host.name <= self._last_in_order:
            self._appended |= bit
        else:
            self._last_in_order = host.name
        self._names.append(host.name)
        self._index[host.name] = i
        self._hosts.append(host)
        self._versions.append(version_or_none(host.hypervisor_version))
        self._on.append({})
        self._used.append(0)
        self._index_labels(i, host, add=True)
        self._present |= bit
        if host.placeable:
            self._placeable |= bit
        self._memory.set_free(i, host.memory_mb)
        self._invalidate_host_caches()

    def _index_labels(self, i: int, host: HostFacts, *, add: bool) -> None:
        change = self._labels.add if add else self._labels.remove
        for attribute in _LABELS:
            change(attribute, getattr(host, attribute), i)
        version = version_or_none(host.hypervisor_version)
        if version is not None:
            change("hypervisor_version", version, i)

    def _invalidate_host_caches(self) -> None:
        self._pred_fail.clear()
        self._rules_fail.clear()
        self._targets.clear()

    # -------------------------------------------------------------------------------------------- VMs: changes

    def add_vm(self, vm: VMFacts) -> frozenset[str]:
        """Add a VM (placed on ``vm.host``, or not placed). Returns the VMs to re-check: it and its neighbours."""
        if vm.id in self._vms:
            raise Conflict(f"VM {vm.id} is already in the index")
        host = self._host_index(vm.host) if vm.host is not None else None
        record = IndexedVM(vm, self.compiled.traits(vm), None)
        self._vms[vm.id] = record
        if host is None:
            return frozenset({vm.id})
        affected = frozenset({vm.id, *self._on[host]})
        self._attach(record, host)
        return affected

    def remove_vm(self, vm_id: str) -> frozenset[str]:
        """Forget a VM. Returns the VMs to re-check: it (its violations are resolved) and its former neighbours."""
        record = self._vm(vm_id)
        affected = {vm_id}
        if record.host is not None:
            affected.update(self._on[record.host])
            self._detach(record)
        del self._vms[vm_id]
        return frozenset(affected)

    def move_vm(self, vm_id: str, host: str | None) -> frozenset[str]:
        """Record that a VM now runs on ``host`` (None: nowhere). Returns it, its old and its new neighbours."""
        record = self._vm(vm_id)
        target = self._host_index(host) if host is not None else None
        affected = {vm_id}
        if record.host is not None:
            affected.update(self._on[record.host])
            self._detach(record)
        record.facts = dataclasses.replace(record.facts, host=host)
        if target is not None:
            affected.update(self._on[target])
            self._attach(record, target)
        return frozenset(affected)

    def update_vm(self, vm: VMFacts) -> frozenset[str]:
        """Replace a VM's facts (profile, tenant, memory, host, image). Returns the VMs to re-check."""
        affected = set(self.remove_vm(vm.id))
        affected.update(self.add_vm(vm))
        return frozenset(affected)

    def _attach(self, record: IndexedVM, host: int) -> None:
        record.host = host
        vm = record.facts
        on = self._on[host]
        on[vm.id] = record
        self._counts.raised(host, len(on))
        self._used[host] += vm.memory_mb
        self._set_free(host)
        self._tenant_structures(record, host, add=True)

    def _detach(self, record: IndexedVM) -> None:
        host = record.host
        assert host is not None
        vm = record.facts
        on = self._on[host]
        del on[vm.id]
        self._counts.lowered(host, len(on))
        self._used[host] -= vm.memory_mb
        self._set_free(host)
        self._tenant_structures(record, host, add=False)
        record.host = None

    def _set_free(self, host: int) -> None:
        facts = self._hosts[host]
        assert facts is not None
        self._memory.set_free(host, facts.memory_mb - self._used[host])

    def _tenant_structures(self, record: IndexedVM, host: int, *, add: bool) -> None:
        tenant, traits = record.facts.tenant, record.traits
        if add:
            self._tenants.add(host, tenant)
            self._levels.add(traits.level, host)
            self._classes.add(traits.cls.key, host)
        else:
            self._tenants.remove(host, tenant)
            self._levels.remove(traits.level, host)
            self._classes.remove(traits.cls.key, host)
        for s in traits.selectors:
            (self._selected[s].add if add else self._selected[s].remove)(host, tenant)
        for rules in traits.cls.requires:
            if rules.max_vms is not None:
                (self._caps.add if add else self._caps.remove)(rules.policy, host)
            for selector in rules.forbids:
                (self._forbidders[selector.id].add if add else self._forbidders[selector.id].remove)(host, tenant)
            if rules.dedicated:
                dedicated = self._dedicated[rules.policy]
                (dedicated.add if add else dedicated.remove)(host, tenant)
            if rules.min_neighbour_level is not None:
                (self._demands.add if add else self._demands.remove)(rules.policy, host)

    @contextmanager
    def _lifted(self, vm: VMFacts) -> Iterator[IndexedVM]:
        """``vm`` as a VM about to arrive: if the index holds it, it is taken off its host for the duration."""
        stored = self._vms.get(vm.id)
        host = stored.host if stored is not None else None
        if stored is not None and host is not None:
            self._detach(stored)
        try:
            yield IndexedVM(vm, self.compiled.traits(vm), None)
        finally:
            if stored is not None and host is not None:
                self._attach(stored, host)

    def _bits_of(self, names: Collection[str]) -> int:
        bits = 0
        for name in names:
            i = self._index.get(name)
            if i is not None:
                bits |= 1 << i
        return bits

    def _predicate_failing(self, predicate: HostPredicate) -> int:
        failing = self._pred_fail.get(predicate)
        if failing is None:
            failing = self._pred_fail[predicate] = self._present & ~predicate.bits(self._labels)
        return failing

    def _host_rules_failing(self, rules: CompiledRules) -> int:
        key = id(rules)
        failing = self._rules_fail.get(key)
        if failing is None:
            failing = 0
            for predicate in rules.host:
                failing |= self._predicate_failing(predicate)
            self._rules_fail[key] = failing
        return failing

    def _facts(self, h: int) -> HostFacts:
        facts = self._hosts[h]
        assert facts is not None
        return facts
