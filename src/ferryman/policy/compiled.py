"""A policy set compiled for evaluation: selectors as matchers, rules as typed records, VMs grouped into classes.

Why it exists: evaluating the YAML model per (VM, host) pair would be slow and would repeat the same work for
every VM of a tenant. Compiling once turns each policy into records the engine indexes, and groups VMs by the exact
set of policies that select them (their *class*): VMs of one class share their host-only bitsets, their prefer
entries and their migration rules. Classifying a VM is cached by (tenant, profile), so 100,000 VMs of 200 tenants
are matched against the policies a few thousand times, not 100,000 times 50 policies.

What it must not do: know the fleet. Bitsets over hosts live in :mod:`ferryman.policy.engine`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ferryman.policy.facts import VMFacts, profile_security_level
from ferryman.policy.hostrules import HostPredicate, host_predicates
from ferryman.policy.imagerules import ImageBaseline, image_baseline
from ferryman.policy.schema import NeighbourSelector, Policy, PolicySet, Rules, VMSelector

_ProfileMatch = tuple[tuple[str, frozenset[str]], ...]


@dataclass(frozen=True)
class Matcher:
    """The AND of a selector's tenants, profile and VM names (None: not constrained)."""

    tenants: frozenset[str] | None
    profile: _ProfileMatch
    vms: frozenset[str] | None

    @classmethod
    def of(cls, selector: VMSelector) -> Matcher:
        profile = tuple(sorted((k, frozenset(v)) for k, v in (selector.profile or {}).items()))
        return cls(
            frozenset(selector.tenants) if selector.tenants is not None else None,
            profile,
            frozenset(selector.vms) if selector.vms is not None else None,
        )

    def matches(self, vm: VMFacts) -> bool:
        if self.tenants is not None and vm.tenant not in self.tenants:
            return False
        if self.vms is not None and vm.name not in self.vms:
            return False
        for key, values in self.profile:
            value = vm.profile.get(key)
            if value is None or str(value) not in values:
                return False
        return True

    def describe(self) -> str:
        parts: list[str] = []
        if self.tenants is not None:
            parts.append(f"tenant {'/'.join(sorted(self.tenants))}")
        parts += [f"{key}={'/'.join(sorted(values))}" for key, values in self.profile]
        if self.vms is not None:
            parts.append(f"VM {'/'.join(sorted(self.vms))}")
        return ", ".join(parts)


@dataclass(frozen=True)
class Selector:
    """A compiled ``forbidden_neighbours`` entry. ``id`` indexes the engine's per-selector counters; ``hard``: it
    comes from ``require`` (and is therefore symmetric)."""

    id: int
    policy: str
    rule: str
    matcher: Matcher
    other_tenant: bool
    hard: bool

    def base_match(self, vm: VMFacts) -> bool:
        """Whether ``vm`` matches the selector's tenants, profile and names (``other_tenant`` aside)."""
        return self.matcher.matches(vm)

    def matches(self, neighbour: VMFacts, governed_tenant: str) -> bool:
        """Whether ``neighbour`` is forbidden next to a VM of ``governed_tenant``."""
        return (not self.other_tenant or neighbour.tenant != governed_tenant) and self.matcher.matches(neighbour)

    def describe(self) -> str:
        text = self.matcher.describe()
        if self.other_tenant:
            return f"another tenant's VM{', ' + text if text else ''}"
        return text


@dataclass(frozen=True)
class CompiledRules:
    """One rule set (a policy's ``require``, or one ``prefer`` entry with its ``weight``). ``image``: its
    ``min_image_version`` (``require`` only), which reads the VM alone."""

    policy: str
    label: str  # "require" or "prefer[i]"
    host: tuple[HostPredicate, ...]
    max_vms: int | None
    forbids: tuple[Selector, ...]
    dedicated: bool
    min_neighbour_level: int | None
    weight: int = 0
    image: ImageBaseline | None = None

    @property
    def has_neighbour_rules(self) -> bool:
        return bool(self.max_vms is not None or self.forbids or self.dedicated or self.min_neighbour_level is not None)


@dataclass(frozen=True)
class MigrationRules:
    """How a VM may be moved, combined over every policy that selects it: the intersection of the allowed targets
    (None: any host), the longest cooldown, and ``auto_balance`` false if any policy says so."""

    allowed_targets: frozenset[str] | None
    cooldown_s: float
    auto_balance: bool
    target_policies: tuple[str, ...] = ()  # the policies that restrict the targets
    manual_only_policies: tuple[str, ...] = ()  # the policies that set auto_balance false


@dataclass(frozen=True, eq=False)
class VMClass:
    """The VMs selected by exactly the policies ``policies``; ``tenants``: the tenants its VMs can have (None: any)."""

    key: tuple[int, ...]
    policies: tuple[str, ...]
    requires: tuple[CompiledRules, ...]
    prefers: tuple[CompiledRules, ...]
    tenants: frozenset[str] | None
    migration: MigrationRules
    targets_by_policy: tuple[tuple[str, frozenset[str]], ...]

    @property
    def host_predicates(self) -> tuple[tuple[str, HostPredicate], ...]:
        return tuple((rules.policy, p) for rules in self.requires for p in rules.host)


@dataclass(frozen=True)
class VMTraits:
    """What the engine needs of one VM: its class, the selectors it matches (by id) and its security level."""

    cls: VMClass
    selectors: tuple[int, ...]
    level: int


@dataclass(frozen=True)
class CompiledPolicy:
    index: int
    name: str
    policy: Policy
    select: Matcher
    require: CompiledRules | None
    prefers: tuple[CompiledRules, ...]


class CompiledPolicies:
    """A policy set ready for :class:`ferryman.policy.engine.FleetIndex`. Immutable after construction except for
    its classification caches, which only ever gain entries equal to what any other caller would compute, so one
    compiled set may be shared by indexes used in different threads (each index itself is not thread-safe)."""

    def __init__(self, policy_set: PolicySet) -> None:
        self.policy_set = policy_set
        selectors: list[Selector] = []
        compiled: list[CompiledPolicy] = []
        for index, policy in enumerate(policy_set):
            require = _rules(policy.name, "require", policy.require, selectors, hard=True)
            prefers = tuple(
                rules
                for i, entry in enumerate(policy.prefer)
                if (rules := _rules(policy.name, f"prefer[{i}]", entry, selectors, hard=False, weight=entry.weight))
            )
            compiled.append(CompiledPolicy(index, policy.name, policy, Matcher.of(policy.select), require, prefers))
        self.policies: tuple[CompiledPolicy, ...] = tuple(compiled)
        self.selectors: tuple[Selector, ...] = tuple(selectors)
        requires = [(p, p.require) for p in compiled if p.require is not None]
        self.caps: tuple[tuple[str, int], ...] = tuple(
            (p.name, r.max_vms) for p, r in requires if r.max_vms is not None
        )
        self.dedicated: tuple[str, ...] = tuple(p.name for p, r in requires if r.dedicated)
        self.demands: tuple[tuple[str, int], ...] = tuple(
            (p.name, r.min_neighbour_level) for p, r in requires if r.min_neighbour_level is not None
        )
        self.max_cap = max([m for _, m in self.caps] + [r.max_vms or 0 for p in compiled for r in p.prefers] + [0])
        self._by_name = {p.name: p for p in compiled}
        self._name_free = tuple(p for p in compiled if p.select.vms is None)
        self._by_vm_name = tuple(p for p in compiled if p.select.vms is not None)
        self._free_selectors = tuple(s for s in selectors if s.matcher.vms is None)
        self._named_selectors = tuple(s for s in selectors if s.matcher.vms is not None)
        self._classes: dict[tuple[int, ...], VMClass] = {}
        self._cache: dict[tuple[str, frozenset[tuple[str, str]]], tuple[tuple[int, ...], tuple[int, ...]]] = {}

    def policy(self, name: str) -> CompiledPolicy:
        return self._by_name[name]

    def traits(self, vm: VMFacts) -> VMTraits:
        """The class, matched selectors and security level of ``vm`` (cached by tenant and profile)."""
        key = (vm.tenant, frozenset((k, str(v)) for k, v in vm.profile.items()))
        cached = self._cache.get(key)
        if cached is None:
            policies = tuple(p.index for p in self._name_free if p.select.matches(vm))
            matched = tuple(s.id for s in self._free_selectors if s.base_match(vm))
            cached = self._cache[key] = (policies, matched)
        policies, matched = cached
        if self._by_vm_name:
            policies = tuple(sorted((*policies, *(p.index for p in self._by_vm_name if p.select.matches(vm)))))
        if self._named_selectors:
            matched = tuple(sorted((*matched, *(s.id for s in self._named_selectors if s.base_match(vm)))))
        return VMTraits(self.vm_class(policies), matched, profile_security_level(vm.profile))

    def vm_class(self, key: tuple[int, ...]) -> VMClass:
        """The class of VMs selected by exactly the policies with indices ``key`` (sorted)."""
        found = self._classes.get(key)
        if found is None:
            # setdefault, not assignment: two threads classifying at once must end up with the same object, since
            # the engine tells classes apart by identity.
            found = self._classes.setdefault(key, self._make_class(key))
        return found

    def policies_for(self, vm: VMFacts) -> tuple[str, ...]:
        """The names of the policies that select ``vm``."""
        return self.traits(vm).cls.policies

    def _make_class(self, key: tuple[int, ...]) -> VMClass:
        members = [self.policies[i] for i in key]
        requires = tuple(p.require for p in members if p.require is not None)
        prefers = tuple(entry for p in members for entry in p.prefers)
        tenant_sets = [p.select.tenants for p in members if p.select.tenants is not None]
        tenants = frozenset.intersection(*tenant_sets) if tenant_sets else None
        targets = tuple(
            (p.name, frozenset(p.policy.migration.allowed_targets))
            for p in members
            if p.policy.migration.allowed_targets is not None
        )
        return VMClass(
            key=key,
            policies=tuple(p.name for p in members),
            requires=requires,
            prefers=prefers,
            tenants=tenants,
            migration=_combine_migration(members, targets),
            targets_by_policy=targets,
        )


def compile_policies(policy_set: PolicySet) -> CompiledPolicies:
    """Compile ``policy_set`` for :class:`ferryman.policy.engine.FleetIndex`."""
    return CompiledPolicies(policy_set)


def _rules(
    policy: str, label: str, rules: Rules, selectors: list[Selector], *, hard: bool, weight: int = 0
) -> CompiledRules | None:
    if rules.is_empty():
        return None
    prefix = "" if label == "require" else f"{label}."
    forbids: list[Selector] = []
    for i, neighbour in enumerate(rules.forbidden_neighbours or ()):
        forbids.append(_selector(len(selectors), policy, f"{prefix}forbidden_neighbours[{i}]", neighbour, hard))
        selectors.append(forbids[-1])
    return CompiledRules(
        policy=policy,
        label=label,
        host=host_predicates(rules),
        max_vms=rules.max_vms_per_host,
        forbids=tuple(forbids),
        dedicated=rules.dedicated_host,
        min_neighbour_level=rules.min_neighbour_security_level,
        weight=weight,
        image=image_baseline(rules),
    )


def _selector(index: int, policy: str, rule: str, selector: NeighbourSelector, hard: bool) -> Selector:
    return Selector(index, policy, rule, Matcher.of(selector), selector.other_tenant, hard)


def _combine_migration(
    members: list[CompiledPolicy], targets: tuple[tuple[str, frozenset[str]], ...]
) -> MigrationRules:
    allowed: frozenset[str] | None = None
    for _, hosts in targets:
        allowed = hosts if allowed is None else allowed & hosts
    manual = tuple(p.name for p in members if not p.policy.migration.auto_balance)
    return MigrationRules(
        allowed_targets=allowed,
        cooldown_s=max([p.policy.migration.cooldown for p in members] + [0.0]),
        auto_balance=not manual,
        target_policies=tuple(name for name, _ in targets),
        manual_only_policies=manual,
    )
