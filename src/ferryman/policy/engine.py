"""The placement-policy engine: admission, placement and compliance over a whole fleet, incrementally.

Why it exists: every placement, manual or automatic, passes admission, and the whole fleet is re-checked
continuously (DESIGN.md, "Policies"). Evaluating every (VM, host) pair would cost 10,000 rule evaluations per
decision; instead host-only rules are bitsets over hosts (one int, bit i = host i) computed once from label indexes,
and neighbour rules are read from per-host counters kept current as VMs come and go, so a decision is a few dozen
whole-fleet int operations and every rejected host is explained by the rule whose bitset excludes it.

What it must not do: I/O, read the clock, or decide when to move anything (that is the planner and the governor).

Semantics (what the reference evaluator of the tests spells out pair by pair). For a VM v of tenant T and security
level L on host h, the *own* hard rules of every policy selecting v must hold, where "neighbours" are the other VMs on
h: host rules on h's labels; ``max_vms_per_host`` m: neighbours + 1 ≤ m; ``forbidden_neighbours``: no neighbour
matches a selector (``other_tenant``: and has a tenant ≠ T); ``dedicated_host``: every neighbour has tenant T;
``min_neighbour_security_level`` n: every neighbour has level ≥ n; ``min_image_version``: v's image (OS and version
as the image registry records them) is at least the minimum of its OS, if the rule names that OS, and an image the
registry does not know breaks it whatever its OS (it reads v alone, so it fails on every host or on none; the
reference evaluator, which compares hosts, leaves it out). Placing v on h (:meth:`FleetIndex.place`,
:meth:`FleetIndex.admit`) also requires the rules of every VM already on h to keep holding with v added (symmetric
rules), enough free memory, a schedulable host, and, for a VM already placed elsewhere, a host among its policies'
``migration.allowed_targets``. :meth:`FleetIndex.violations` reports the own rules only: a symmetric breach shows up as
the violation of the VM whose rule it is (with the offending neighbours named). A ``prefer`` entry adds its weight
to a host's score when all its rules hold there as own rules of v (soft rules are not symmetric).

API (everything a controller needs)::

    compiled = compile_policies(policy_set)              # a policy-set change: compile and build a new index
    index = FleetIndex(compiled, hosts, vms)             # hosts: HostFacts, vms: VMFacts (host None: not placed)
    index.place(vm, exclude=(), top=5) -> PlacementDecision   # best host, ranked, rejections (lazy, all explained)
    index.admit(vm, host) -> list[Reason]                # [] = allowed (creation, manual migration)
    index.conflicts(vm_a, vm_b) -> list[Reason]         # pairwise neighbour rules two VMs break together
    index.violations(vm_ids=None) -> list[Violation]     # None: full audit; else the VMs given
    index.add_vm(vm) / remove_vm(id) / move_vm(id, host) / update_vm(vm) -> frozenset[str]   # VMs to re-check
    index.update_host(host) / remove_host(name) -> frozenset[str]                             # VMs to re-check
    index.migration_rules(vm_id) -> MigrationRules      # targets, cooldown, auto_balance
    index.eligible_hosts(vm), index.vms_on(host), index.host_load(host), index.hosts_report()
    index.facts() -> (hosts, vms)                        # a frozen copy, to build another index from

Ties between equally scored hosts go to the host with the fewest VMs, then to the first name.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from functools import partial

from ferryman.policy.bitsets import iter_bits, lowest_bit
from ferryman.policy.compiled import (
    CompiledPolicies,
    CompiledRules,
    MigrationRules,
    Selector,
    VMClass,
    compile_policies,
)
from ferryman.policy.facts import HostFacts, VMFacts
from ferryman.policy.hostrules import HostPredicate
from ferryman.policy.results import (
    Check,
    HostLoad,
    PlacementDecision,
    Reason,
    Rejections,
    Violation,
    ViolationKey,
)
from ferryman.policy.state import FleetState, IndexedVM

__all__ = [
    "CompiledPolicies",
    "FleetIndex",
    "HostLoad",
    "MigrationRules",
    "PlacementDecision",
    "Reason",
    "Rejections",
    "Violation",
    "ViolationKey",
    "compile_policies",
]


class FleetIndex(FleetState):
    """Hosts, VMs and compiled policies, indexed for fast decisions and kept current incrementally."""

    def recompile(self, compiled: CompiledPolicies) -> FleetIndex:
        """A new index of the same fleet under another policy set (then run a full audit)."""
        return FleetIndex(compiled, *self.facts())

    # ------------------------------------------------------------------------------------------------ decisions

    def place(self, vm: VMFacts, *, exclude: Collection[str] = (), top: int = 5) -> PlacementDecision:
        """The best host for ``vm``: allowed by every hard rule (own and symmetric), capacity and schedulability,
        then highest prefer score, fewest VMs, first name. A VM already placed is placed as a migration: its own
        host is rejected and its policies' allowed targets apply. ``exclude``: hosts the caller rules out."""
        with self._lifted(vm) as arriving:
            checks = self._arrival_checks(arriving, moving=vm.host is not None)
            current = self._index.get(vm.host) if vm.host is not None else None
            if current is not None:
                checks.append(Check("", "current_host", 1 << current, _runs_here))
            excluded = self._present & self._bits_of(exclude) & ~(1 << current if current is not None else 0)
            if excluded:
                checks.append(Check("", "excluded", excluded, _excluded))
            failing = 0
            for check in checks:
                failing |= check.failing
            allowed = self._present & ~failing
            entries = self._preference_bits(arriving)
            ranked = self._rank(allowed, entries, max(top, 1))
        rejections = Rejections(self._names, self._index, checks, self._present & failing)
        best, score = ranked[0] if ranked else (None, 0)
        return PlacementDecision(
            vm_id=vm.id,
            host=self._names[best] if best is not None else None,
            score=score,
            ranked=[(self._names[h], s) for h, s in ranked[:top]],
            rejections=rejections,
            allowed=allowed.bit_count(),
        )

    def admit(self, vm: VMFacts, host: str) -> list[Reason]:
        """Why ``vm`` may not run on ``host`` (empty: it may), with the rules of the VMs already there. A VM already
        on ``host`` is checked as staying (schedulability and allowed targets do not apply)."""
        i = self._index.get(host)
        if i is None:
            return [Reason("", "unknown_host", f"host {host} is not in the fleet")]
        staying = vm.host == host
        with self._lifted(vm) as arriving:
            checks = self._arrival_checks(arriving, moving=vm.host is not None and not staying)
            return [
                Reason(c.policy, c.rule, c.explain(i))
                for c in checks
                if c.fails(i) and not (staying and c.rule == "schedulable")
            ]

    def conflicts(self, first: VMFacts, second: VMFacts) -> list[Reason]:
        """The pairwise neighbour rules (``forbidden_neighbours``, ``dedicated_host``,
        ``min_neighbour_security_level``) that ``first`` and ``second`` would break by sharing any host, whoever's
        rule it is. Counts (``max_vms_per_host``), capacity and host rules are not pairwise and not included."""
        found: list[Reason] = []
        one, two = self.compiled.traits(first), self.compiled.traits(second)
        for owner, traits, other, level in ((first, one, second, two.level), (second, two, first, one.level)):
            for rules in traits.cls.requires:
                policy = rules.policy
                for s in rules.forbids:
                    if s.matches(other, owner.tenant):
                        what = f"forbids {other.name} as a neighbour of {owner.name} ({s.describe()})"
                        found.append(Reason(policy, s.rule, f"{policy} {what}"))
                if rules.dedicated and other.tenant != owner.tenant:
                    what = f"requires a host of {owner.tenant} alone for {owner.name}; {other.name} is {other.tenant}'s"
                    found.append(Reason(policy, "dedicated_host", f"{policy} {what}"))
                floor = rules.min_neighbour_level
                if floor is not None and level < floor:
                    what = f"requires neighbours of level ≥ {floor} for {owner.name}; {other.name} has {level}"
                    found.append(Reason(policy, "min_neighbour_security_level", f"{policy} {what}"))
        return found

    def _arrival_checks(self, arriving: IndexedVM, *, moving: bool) -> list[Check]:
        """Every rule that refuses some host for ``arriving``, with the hosts it refuses."""
        vm, cls = arriving.facts, arriving.traits.cls
        present = self._present
        checks = [
            Check("", "schedulable", present & ~self._placeable, self._explain_unschedulable),
            Check("", "capacity", present & ~self._memory.fitting(vm.memory_mb), partial(self._explain_memory, vm)),
        ]
        if moving:
            checks += self._target_checks(cls)
        for rules in cls.requires:
            checks += self._host_checks(rules)
            checks += self._image_checks(rules, vm)
            checks += self._own_checks(rules, arriving)
        checks += self._symmetric_checks(arriving)
        return [c for c in checks if c.failing]

    def _image_checks(self, rules: CompiledRules, vm: VMFacts) -> list[Check]:
        """The image rule of ``rules``: every host when ``vm``'s image breaks it, none otherwise."""
        if rules.image is None:
            return []
        why = rules.image.failure(vm, rules.policy)
        if why is None:
            return []
        return [Check(rules.policy, rules.image.rule, self._present, partial(_everywhere, why))]

    def _target_checks(self, cls: VMClass) -> list[Check]:
        found: list[Check] = []
        for policy, targets in cls.targets_by_policy:
            bits = self._targets.get(targets)
            if bits is None:
                bits = self._targets[targets] = self._bits_of(targets)
            explain = partial(self._explain_target, policy)
            found.append(Check(policy, "migration.allowed_targets", self._present & ~bits, explain))
        return found

    def _host_checks(self, rules: CompiledRules) -> list[Check]:
        def explain_host(predicate: HostPredicate) -> Callable[[int], str]:
            return partial(self._explain_host, predicate.explain, rules.policy)

        return [Check(rules.policy, p.rule, self._predicate_failing(p), explain_host(p)) for p in rules.host]

    def _own_checks(self, rules: CompiledRules, arriving: IndexedVM) -> list[Check]:
        """The neighbour rules of ``rules`` for a VM arriving (on no host yet): the hosts where they would fail."""
        vm, policy = arriving.facts, rules.policy
        tenant, found = vm.tenant, []
        if rules.max_vms is not None:
            explain = partial(self._explain_count, rules.max_vms, policy)
            found.append(Check(policy, "max_vms_per_host", self._counts.at_least(rules.max_vms), explain))
        for s in rules.forbids:
            held = self._selected[s.id]
            failing = held.other_than(tenant) if s.other_tenant else held.any
            what = f"which {policy} forbids as neighbours ({s.describe()})"
            explain = partial(self._explain_neighbour, vm, partial(_forbidden_by, s, tenant), what)
            found.append(Check(policy, s.rule, failing, explain))
        if rules.dedicated:
            what = f"of another tenant; {policy} requires a dedicated host"
            explain = partial(self._explain_neighbour, vm, partial(_other_tenant, tenant), what)
            found.append(Check(policy, "dedicated_host", self._tenants.other_than(tenant), explain))
        if rules.min_neighbour_level is not None:
            floor = rules.min_neighbour_level
            failing = 0
            for level, hosts in self._levels.items():
                if level < floor:
                    failing |= hosts
            explain = partial(self._explain_level, vm, floor, policy)
            found.append(Check(policy, "min_neighbour_security_level", failing, explain))
        return found

    def _symmetric_checks(self, arriving: IndexedVM) -> list[Check]:
        """The rules of the VMs already on each host that ``arriving`` would break."""
        vm, traits = arriving.facts, arriving.traits
        tenant, found = vm.tenant, []
        for policy, m in self.compiled.caps:
            held = self._caps.bits(policy)
            if held:
                explain = partial(self._explain_their_count, m, policy)
                found.append(Check(policy, "max_vms_per_host", held & self._counts.at_least(m), explain))
        for sid in traits.selectors:
            s = self.compiled.selectors[sid]
            holders = self._forbidders[sid]
            if s.hard and holders.any:
                failing = holders.other_than(tenant) if s.other_tenant else holders.any
                found.append(Check(s.policy, s.rule, failing, partial(self._explain_forbidder, vm, s)))
        for policy, dedicated in self._dedicated.items():
            if dedicated.any:
                what = f"whose policy {policy} requires a host of their tenant alone"
                explain = partial(self._explain_their_rule, vm, policy, what)
                found.append(Check(policy, "dedicated_host", dedicated.other_than(tenant), explain))
        for policy, floor in self.compiled.demands:
            if traits.level < floor:
                what = (
                    f"whose policy {policy} requires neighbours of security level ≥ {floor}; this VM has {traits.level}"
                )
                explain = partial(self._explain_their_rule, vm, policy, what)
                found.append(Check(policy, "min_neighbour_security_level", self._demands.bits(policy), explain))
        return found

    # ---------------------------------------------------------------------------------------------------- ranking

    def _preference_bits(self, arriving: IndexedVM) -> list[tuple[int, int]]:
        """(weight, hosts satisfying the entry) for every prefer entry of ``arriving``'s policies."""
        entries: list[tuple[int, int]] = []
        for rules in arriving.traits.cls.prefers:
            failing = self._host_rules_failing(rules)
            for check in self._own_checks(rules, arriving):
                failing |= check.failing
            entries.append((rules.weight, self._present & ~failing))
        return entries

    def _rank(self, allowed: int, entries: list[tuple[int, int]], top: int) -> list[tuple[int, int]]:
        """The first ``top`` allowed hosts by score (descending), VM count, name: (host index, score)."""
        slices = _bit_sliced_sum(entries)
        ranked: list[tuple[int, int]] = []
        remaining = allowed
        while remaining and len(ranked) < top:
            tier = remaining
            for digit in reversed(slices):
                narrowed = tier & digit
                if narrowed:
                    tier = narrowed
            first = lowest_bit(tier)
            score = sum(weight for weight, hosts in entries if hosts >> first & 1)
            ranked += [(h, score) for h in self._by_load_then_name(tier, top - len(ranked))]
            remaining &= ~tier
        return ranked

    def _by_load_then_name(self, bits: int, n: int) -> list[int]:
        chosen: list[int] = []
        counts = self._counts
        for k in range(counts.limit):
            level = bits & ~counts.at_least(k + 1)
            bits &= ~level
            while level and len(chosen) < n:
                h = self._first_by_name(level)
                chosen.append(h)
                level &= ~(1 << h)
            if len(chosen) >= n or not bits:
                return chosen
        rest = sorted(iter_bits(bits), key=lambda h: (len(self._on[h]), self._names[h]))
        return chosen + rest[: n - len(chosen)]

    def _first_by_name(self, bits: int) -> int:
        in_order = bits & ~self._appended
        candidates = [lowest_bit(in_order)] if in_order else []
        candidates += iter_bits(bits & self._appended)
        return min(candidates, key=self._names.__getitem__)

    # ------------------------------------------------------------------------------------------------ compliance

    def violations(self, vm_ids: Iterable[str] | None = None) -> list[Violation]:
        """Hard-rule violations of VMs where they run now: of the VMs given (unknown or unplaced ones have none), or
        of the whole fleet (``None``, a full audit, sorted by key)."""
        if vm_ids is None:
            return self._audit()
        found: list[Violation] = []
        for vm_id in vm_ids:
            record = self._vms.get(vm_id)
            if record is not None and record.host is not None:
                found += self._vm_violations(record)
        return found

    def _audit(self) -> list[Violation]:
        found: list[Violation] = []
        for key, hosts in list(self._classes.items()):
            cls = self.compiled.vm_class(key)
            if not cls.requires:
                continue
            suspects = self._suspect_hosts(cls, hosts)
            for h in iter_bits(suspects):
                for record in list(self._on[h].values()):
                    if record.traits.cls is cls:
                        found += self._vm_violations(record)
        found.sort(key=lambda v: v.key)
        return found

    def _suspect_hosts(self, cls: VMClass, hosts: int) -> int:
        """A superset of the hosts where some VM of ``cls`` breaks a rule (exact for host rules, counts, dedicated)."""
        suspects = 0
        counts = self._counts
        for rules in cls.requires:
            if rules.image is not None:  # read per VM: every host of the class is suspect
                return hosts
            suspects |= hosts & self._host_rules_failing(rules)
            if rules.max_vms is not None:
                suspects |= hosts & counts.at_least(rules.max_vms + 1)
            for s in rules.forbids:
                held = self._selected[s.id]
                if s.other_tenant and cls.tenants is not None and len(cls.tenants) == 1:
                    (tenant,) = cls.tenants
                    suspects |= hosts & held.other_than(tenant)
                else:
                    suspects |= hosts & held.any
            if rules.dedicated:
                suspects |= hosts & self._tenants.mixed
            if rules.min_neighbour_level is not None:
                for level, where in self._levels.items():
                    if level < rules.min_neighbour_level:
                        suspects |= hosts & where
        return suspects

    def _vm_violations(self, record: IndexedVM) -> list[Violation]:
        h = record.host
        assert h is not None
        host = self._facts(h)
        version = self._versions[h]
        found: list[Violation] = []
        for rules in record.traits.cls.requires:
            for predicate in rules.host:
                if not predicate.test(host, version):
                    message = predicate.explain(host, rules.policy)
                    found.append(self._violation(record, rules.policy, predicate.rule, message))
            if rules.image is not None:
                why = rules.image.failure(record.facts, rules.policy)
                if why is not None:
                    found.append(self._violation(record, rules.policy, rules.image.rule, why))
            found += self._neighbour_violations(record, rules)
        return found

    def _neighbour_violations(self, record: IndexedVM, rules: CompiledRules) -> list[Violation]:
        h = record.host
        assert h is not None
        vm, traits = record.facts, record.traits
        on, name, policy = self._on[h], self._names[h], rules.policy
        found: list[Violation] = []
        if rules.max_vms is not None and len(on) > rules.max_vms:
            message = f"host {name} runs {len(on)} VMs; {policy} allows at most {rules.max_vms} per host"
            found.append(self._violation(record, policy, "max_vms_per_host", message, self._others(record, None)))
        for s in rules.forbids:
            held = self._selected[s.id]
            if s.other_tenant:
                hit = held.has_other(h, vm.tenant)
            else:
                hit = held.total(h) - (1 if s.id in traits.selectors else 0) > 0
            if hit:
                culprits = self._others(record, partial(_forbidden_by, s, vm.tenant))
                listed = _names_of(self, culprits)
                message = f"host {name} runs {listed}, forbidden as neighbours by {policy} ({s.describe()})"
                found.append(self._violation(record, policy, s.rule, message, culprits))
        if rules.dedicated and self._tenants.has_other(h, vm.tenant):
            culprits = self._others(record, partial(_other_tenant, vm.tenant))
            listed = _names_of(self, culprits)
            message = f"host {name} runs {listed} of other tenants; {policy} requires a dedicated host"
            found.append(self._violation(record, policy, "dedicated_host", message, culprits))
        floor = rules.min_neighbour_level
        if floor is not None:
            low = any(
                self._levels.count(level, h) - (level == traits.level) > 0
                for level in self._levels.keys()  # noqa: SIM118 (a Presence, not a dict)
                if level < floor
            )
            if low:
                culprits = self._others(record, lambda u: self._vms[u.id].traits.level < floor)
                message = (
                    f"host {name} runs {_names_of(self, culprits)} below security level {floor}, "
                    f"the neighbour floor of {policy}"
                )
                found.append(self._violation(record, policy, "min_neighbour_security_level", message, culprits))
        return found

    def _others(self, record: IndexedVM, keep: Callable[[VMFacts], bool] | None) -> tuple[str, ...]:
        h = record.host
        assert h is not None
        return tuple(
            sorted(u.facts.id for u in self._on[h].values() if u is not record and (keep is None or keep(u.facts)))
        )

    def _violation(
        self, record: IndexedVM, policy: str, rule: str, message: str, neighbours: tuple[str, ...] = ()
    ) -> Violation:
        vm = record.facts
        assert record.host is not None
        return Violation(vm.id, vm.name, vm.tenant, self._names[record.host], policy, rule, message, neighbours)

    # ---------------------------------------------------------------------------------------------- explanations
    # Each takes the host index last, so partial() binds the rest when the check is built.

    def _explain_unschedulable(self, h: int) -> str:
        facts = self._facts(h)
        why = "in quarantine" if facts.role == "quarantine" else "not schedulable (down or draining)"
        return f"host {facts.name} is {why}"

    def _explain_memory(self, vm: VMFacts, h: int) -> str:
        return f"host {self._names[h]} has {self._memory.free(h)} MiB free, the VM needs {vm.memory_mb} MiB"

    def _explain_target(self, policy: str, h: int) -> str:
        return f"host {self._names[h]} is not among the allowed targets of {policy}"

    def _explain_host(self, explain: Callable[[HostFacts, str], str], policy: str, h: int) -> str:
        return explain(self._facts(h), policy)

    def _explain_count(self, m: int, policy: str, h: int) -> str:
        return (
            f"host {self._names[h]} already runs {len(self._on[h])} VMs; {policy} allows at most {m} per host, "
            "this VM included"
        )

    def _explain_their_count(self, m: int, policy: str, h: int) -> str:
        holders = [u.facts.name for u in self._on[h].values() if policy in u.traits.cls.policies]
        return (
            f"host {self._names[h]} runs {len(self._on[h])} VMs, and {_listing(holders)} under {policy} "
            f"allow at most {m} per host"
        )

    def _explain_neighbour(self, vm: VMFacts, match: Callable[[VMFacts], bool], what: str, h: int) -> str:
        hits = [u.facts for u in self._on[h].values() if u.facts.id != vm.id and match(u.facts)]
        listed = _listing([f"{u.name} ({u.tenant})" for u in hits])
        return f"host {self._names[h]} runs {listed}, {what}"

    def _explain_level(self, vm: VMFacts, floor: int, policy: str, h: int) -> str:
        hits = [u for u in self._on[h].values() if u.facts.id != vm.id and u.traits.level < floor]
        listed = _listing([f"{u.facts.name} (level {u.traits.level})" for u in hits])
        return f"host {self._names[h]} runs {listed}, below security level {floor} required of neighbours by {policy}"

    def _explain_forbidder(self, vm: VMFacts, s: Selector, h: int) -> str:
        holders = [
            u.facts.name
            for u in self._on[h].values()
            if u.facts.id != vm.id
            and (not s.other_tenant or u.facts.tenant != vm.tenant)
            and any(x is s for r in u.traits.cls.requires for x in r.forbids)
        ]
        return (
            f"host {self._names[h]} runs {_listing(holders)}, whose policy {s.policy} forbids neighbours like this VM "
            f"({s.describe()})"
        )

    def _explain_their_rule(self, vm: VMFacts, policy: str, what: str, h: int) -> str:
        holders = [
            f"{u.facts.name} ({u.facts.tenant})"
            for u in self._on[h].values()
            if u.facts.id != vm.id and policy in u.traits.cls.policies
        ]
        return f"host {self._names[h]} runs {_listing(holders)}, {what}"


def _everywhere(why: str, h: int) -> str:
    return why


def _runs_here(h: int) -> str:
    return "the VM runs here already"


def _excluded(h: int) -> str:
    return "excluded by the caller"


def _forbidden_by(selector: Selector, tenant: str, neighbour: VMFacts) -> bool:
    return selector.matches(neighbour, tenant)


def _other_tenant(tenant: str, neighbour: VMFacts) -> bool:
    return neighbour.tenant != tenant


def _bit_sliced_sum(entries: list[tuple[int, int]]) -> list[int]:
    """Per-host sums of weights as binary digits: digit k holds the hosts whose score has bit k set."""
    digits: list[int] = []
    for entry_weight, hosts in entries:
        weight, position = entry_weight, 0
        while weight:
            if weight & 1:
                carry, k = hosts, position
                while carry:
                    while len(digits) <= k:
                        digits.append(0)
                    digits[k], carry = digits[k] ^ carry, digits[k] & carry
                    k += 1
            weight >>= 1
            position += 1
    return digits


def _listing(items: list[str], limit: int = 3) -> str:
    if not items:
        return "no VM"
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _names_of(index: FleetIndex, vm_ids: tuple[str, ...]) -> str:
    return _listing([index.vm(v).name for v in vm_ids])
