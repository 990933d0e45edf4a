"""The remediation planner: the fewest migrations that bring violating VMs back into compliance, in one wave.

Why it exists: the compliance audit finds VMs that break hard placement rules (a host lost its patch level, a test
VM was placed next to production by hand, a site's level was lowered). Fixing them means migrations, and migrations
cost (DESIGN.md, "Threats": thrashing), so the plan uses as few as it can, never moves a VM that may not move now
(cooldown, ``auto_balance: false``, an operator freeze), respects per-host inbound/outbound limits over the whole
plan, and lands every VM where all hard rules hold after all the plan's moves, symmetric rules included.

How: a greedy pass first (move each violating VM to the best host the engine allows; if it cannot move, move the
neighbours that cause its violation), simulated on the index so each choice sees the previous ones. When the greedy
plan leaves violations, or uses more moves than a lower bound (each move leaves one host, so every host with a
violation needs a move out of it, and every VM breaking a host-only rule must move itself), a CP-SAT model picks
among a few engine-approved hosts per candidate VM (the violating VMs and the neighbours named in their violations):
exactly one host each, capacity, ``max_vms_per_host`` and pairwise neighbour conflicts, the limits, and the objective
"fix as many as possible, then move as few as possible". Large fleets are solved in groups of hosts of at most
``max_candidates`` candidate VMs, one after the other, sharing the time limit (deterministic: one worker, a fixed
seed and a deterministic-time limit). Both plans are checked on the index; the better sound one wins.

What it must not do: I/O, read the clock, or leave the index changed. Simulation moves VMs in the index and moves
them back before returning (the index is not thread-safe: do not share it while planning).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace

from ortools.sat.python import cp_model

from ferryman.core.errors import InvalidInput
from ferryman.policy.engine import FleetIndex, Violation, ViolationKey
from ferryman.policy.facts import VMFacts
from ferryman.policy.schema import HOST_RULE_FIELDS

_HOST_RULES = frozenset(HOST_RULE_FIELDS)

_MoveTuple = tuple[str, str, str]  # (vm_id, source, target)
_GREEDY_PASSES = 3


@dataclass(frozen=True)
class Move:
    """Migrate ``vm_id`` from ``source`` to ``target``; ``fixes``: the violation keys it resolves."""

    vm_id: str
    vm_name: str
    source: str
    target: str
    fixes: tuple[ViolationKey, ...]


@dataclass(frozen=True)
class Plan:
    """Moves in execution order, and the violations left with why. ``solver``: "none" (nothing to fix), "greedy" or
    "cp-sat"; ``lower_bound``: no plan fixing every violation can use fewer moves."""

    moves: list[Move]
    unresolved: list[tuple[Violation, str]]
    solver: str = "none"
    lower_bound: int = 0


@dataclass(frozen=True)
class _Limits:
    max_moves: int | None
    max_out: int
    max_in: int


def plan_remediation(
    index: FleetIndex,
    *,
    max_moves: int | None,
    max_out_per_host: int,
    max_in_per_host: int,
    frozen_vms: Mapping[str, str],
    time_limit_s: float = 2.0,
    candidate_hosts: int = 6,
    max_candidates: int = 60,
) -> Plan:
    """A plan fixing the fleet's hard-rule violations (see the module docstring). ``frozen_vms``: VM id → why it
    may not move now. ``candidate_hosts``/``max_candidates`` bound the CP-SAT model (hosts per VM, VMs)."""
    if max_out_per_host < 0 or max_in_per_host < 0 or (max_moves is not None and max_moves < 0):
        raise InvalidInput("planner limits must be >= 0")
    initial = index.violations()
    if not initial:
        return Plan([], [])
    limits = _Limits(max_moves, max_out_per_host, max_in_per_host)
    bound = lower_bound(initial)
    with _restoring(index):
        greedy, notes = _greedy(index, initial, limits, frozen_vms)
    with _restoring(index):
        left = _outcome(index, initial, greedy)
    moves, solver = greedy, "greedy"
    if left or len(greedy) > bound:
        with _restoring(index):
            solved = _cp_sat_plan(index, initial, limits, frozen_vms, candidate_hosts, max_candidates, time_limit_s)
        if solved is not None:
            with _restoring(index):
                solved_left = _outcome(index, initial, solved)
            better = (len(solved_left), len(solved)) < (len(left), len(greedy))
            if better and _sound(initial, solved, solved_left):
                moves, solver, left = solved, "cp-sat", solved_left
    with _restoring(index):
        ordered = _order(index, moves)
    with _restoring(index):
        for vm_id, _, target in ordered:
            index.move_vm(vm_id, target)
        final = {v.key for v in index.violations()}
        fixes = _fixes(ordered, initial, final)
        planned = [
            Move(vm_id, index.vm(vm_id).name, source, target, keys)
            for (vm_id, source, target), keys in zip(ordered, fixes, strict=True)
        ]
        unresolved = [(v, _why_unresolved(index, v, notes, frozen_vms, limits, ordered)) for v in index.violations()]
    return Plan(planned, unresolved, solver, bound)


def _sound(initial: Sequence[Violation], moves: Sequence[_MoveTuple], left: Sequence[Violation]) -> bool:
    """No violation the fleet did not have, and every moved VM compliant where it lands (the model's host
    options and pairwise conflicts are an approximation; the index has the last word)."""
    before = {v.key for v in initial}
    moved = {m[0] for m in moves}
    return all(v.key in before and v.vm_id not in moved for v in left)


def lower_bound(violations: Sequence[Violation]) -> int:
    """Moves any complete fix needs: every host with a violation needs a move out of it (arrivals never fix a
    violation), and every VM breaking a host-only rule must itself move."""
    hosts: dict[str, set[str]] = {}
    for v in violations:
        movers = hosts.setdefault(v.host, set())
        if v.rule in _HOST_RULES:
            movers.add(v.vm_id)
    return sum(max(1, len(movers)) for movers in hosts.values())


@contextmanager
def _restoring(index: FleetIndex) -> Iterator[None]:
    """Put every VM back on the host it was on when the block started."""
    before = {vm_id: index.vm(vm_id).host for vm_id in index.vm_ids()}
    try:
        yield
    finally:
        for vm_id, host in before.items():
            if index.vm(vm_id).host != host:
                index.move_vm(vm_id, host)


def _frozen(index: FleetIndex, vm_id: str, frozen_vms: Mapping[str, str]) -> str | None:
    if vm_id in frozen_vms:
        return f"VM {index.vm(vm_id).name} may not move now: {frozen_vms[vm_id]}"
    rules = index.migration_rules(vm_id)
    if not rules.auto_balance:
        return f"auto_balance is false for VM {index.vm(vm_id).name} ({', '.join(rules.manual_only_policies)})"
    return None


# ----------------------------------------------------------------------------------------------------------- greedy


class _Greedy:
    """Moves applied to the index one by one, with the plan's counters."""

    def __init__(self, index: FleetIndex, limits: _Limits, frozen_vms: Mapping[str, str]) -> None:
        self.index = index
        self.limits = limits
        self.frozen_vms = frozen_vms
        self.moves: list[_MoveTuple] = []
        self.moved: set[str] = set()
        self.outbound: Counter[str] = Counter()
        self.inbound: Counter[str] = Counter()

    def move(self, vm_id: str) -> str | None:
        """Move the VM to its best allowed host; None on success, else why it cannot move."""
        index, limits = self.index, self.limits
        if vm_id in self.moved:
            return "it already moves in this plan"
        why = _frozen(index, vm_id, self.frozen_vms)
        if why is not None:
            return why
        if limits.max_moves is not None and len(self.moves) >= limits.max_moves:
            return f"the plan reached max_moves={limits.max_moves}"
        vm = index.vm(vm_id)
        source = vm.host
        assert source is not None
        if self.outbound[source] >= limits.max_out:
            return f"host {source} already sends {self.outbound[source]} VMs (max_out_per_host={limits.max_out})"
        if limits.max_in == 0:
            return "max_in_per_host=0: no host may receive a VM"
        full = [host for host, n in self.inbound.items() if n >= limits.max_in]
        decision = index.place(vm, exclude=full)
        if decision.host is None:
            throttled = f"; {len(full)} hosts reached max_in_per_host={limits.max_in}" if full else ""
            return f"no allowed host for VM {vm.name}: {decision.summary()}{throttled}"
        index.move_vm(vm_id, decision.host)
        self.moves.append((vm_id, source, decision.host))
        self.moved.add(vm_id)
        self.outbound[source] += 1
        self.inbound[decision.host] += 1
        return None


def _greedy(
    index: FleetIndex, initial: Sequence[Violation], limits: _Limits, frozen_vms: Mapping[str, str]
) -> tuple[list[_MoveTuple], dict[str, str]]:
    by_vm: dict[str, list[Violation]] = {}
    for v in initial:
        by_vm.setdefault(v.vm_id, []).append(v)
    involvement = Counter(n for v in initial for n in v.neighbours)
    plan = _Greedy(index, limits, frozen_vms)
    notes: dict[str, str] = {}
    for _ in range(_GREEDY_PASSES):  # a later pass may use room an earlier pass made
        made = len(plan.moves)
        notes = {}
        for vm_id in sorted(by_vm, key=lambda vm_id: (-len(by_vm[vm_id]), vm_id)):
            why = _greedy_fix(index, plan, vm_id, involvement)
            if why is not None:
                notes[vm_id] = why
        if len(plan.moves) == made or not notes:
            break
    return plan.moves, notes


def _greedy_fix(index: FleetIndex, plan: _Greedy, vm_id: str, involvement: Counter[str]) -> str | None:
    """Fix the VM's violations by moving it, else by moving the neighbours named in them; None when fixed."""
    if not index.violations([vm_id]):
        return None
    why = plan.move(vm_id)
    if why is None:
        return None
    for violation in index.violations([vm_id]):
        for neighbour in sorted(violation.neighbours, key=lambda n: (-involvement[n], n)):
            if violation.key not in {v.key for v in index.violations([vm_id])}:
                break
            neighbour_why = plan.move(neighbour)
            if neighbour_why is not None and len(why) < 600:
                why += f"; neighbour {index.vm(neighbour).name} cannot move: {neighbour_why}"
    return why if index.violations([vm_id]) else None


def _outcome(index: FleetIndex, initial: Sequence[Violation], moves: Sequence[_MoveTuple]) -> list[Violation]:
    """The violations left after applying ``moves`` (it leaves them applied; call under _restoring)."""
    touched = {v.vm_id for v in initial}
    for vm_id, _, target in moves:
        touched |= index.move_vm(vm_id, target)
    return index.violations(sorted(touched))


# ----------------------------------------------------------------------------------------------------------- CP-SAT


@dataclass
class _Wave:
    """What earlier parts of a plan already used: moves per source and target host, and the VMs moved."""

    outbound: Counter[str]
    inbound: Counter[str]
    moved: set[str]


def _cp_sat_plan(
    index: FleetIndex,
    initial: Sequence[Violation],
    limits: _Limits,
    frozen_vms: Mapping[str, str],
    candidate_hosts: int,
    max_candidates: int,
    time_limit_s: float,
) -> list[_MoveTuple] | None:
    """Solve the exact model host group by host group (each at most ``max_candidates`` VMs), each group seeing
    the moves of the previous ones; the time limit is shared. None when no group could be solved."""
    groups = _host_groups(initial, max_candidates)
    wave = _Wave(Counter(), Counter(), set())
    moves: list[_MoveTuple] = []
    for hosts in groups:
        left = None if limits.max_moves is None else limits.max_moves - len(moves)
        if left == 0:
            break
        here = [v for h in hosts for v in index.violations(index.vms_on(h))]
        if not here:
            continue
        model = _CpSat(index, here, replace(limits, max_moves=left), frozen_vms, candidate_hosts, wave)
        found = model.solve(time_limit_s / len(groups))
        for vm_id, source, target in found or ():
            index.move_vm(vm_id, target)
            wave.outbound[source] += 1
            wave.inbound[target] += 1
            wave.moved.add(vm_id)
        moves += found or []
    return moves if groups else None


def _host_groups(violations: Sequence[Violation], max_candidates: int) -> list[list[str]]:
    """Hosts with violations, grouped so each group has at most ``max_candidates`` VMs to consider (a host with
    more is left to the greedy plan)."""
    per_host: dict[str, set[str]] = {}
    for v in violations:
        per_host.setdefault(v.host, set()).update((v.vm_id, *v.neighbours))
    groups: list[list[str]] = []
    size = 0
    for host in sorted(per_host):
        n = len(per_host[host])
        if n > max_candidates:
            continue
        if not groups or size + n > max_candidates:
            groups.append([])
            size = 0
        groups[-1].append(host)
        size += n
    return groups


class _CpSat:
    """The exact model over a small neighbourhood of the problem (see the module docstring)."""

    def __init__(
        self,
        index: FleetIndex,
        violations: Sequence[Violation],
        limits: _Limits,
        frozen_vms: Mapping[str, str],
        candidate_hosts: int,
        wave: _Wave,
    ) -> None:
        self.index = index
        self.limits = limits
        self.frozen_vms = frozen_vms
        self.top = candidate_hosts
        self.wave = wave
        self.violating = {v.vm_id for v in violations}
        self.candidates = sorted(self.violating | {n for v in violations for n in v.neighbours})
        self.origin = {c: index.vm(c).host or "" for c in self.candidates}

    def solve(self, time_limit_s: float) -> list[_MoveTuple] | None:
        """The moves of the best plan found within the time limit, or None (no solution)."""
        self._survey()
        model, x = self._model()
        solver = cp_model.CpSolver()
        solver.parameters.max_time_in_seconds = max(time_limit_s, 0.01)
        solver.parameters.max_deterministic_time = max(time_limit_s, 0.01)  # same answer on a busy machine
        solver.parameters.num_workers = 1
        solver.parameters.random_seed = 0
        status = solver.solve(model)
        if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            return None
        return [
            (c, self.origin[c], h) for (c, h), var in sorted(x.items()) if h != self.origin[c] and solver.value(var)
        ]

    def _movable(self, vm_id: str) -> bool:
        return vm_id not in self.wave.moved and _frozen(self.index, vm_id, self.frozen_vms) is None

    def _survey(self) -> None:
        """With every candidate lifted off its host: each one's options, whether staying breaks its rules, the
        fixed VMs' counts, caps and free memory per host, and the pairs of candidates that may not share a host."""
        index = self.index
        facts = {c: index.vm(c) for c in self.candidates}
        for c in self.candidates:
            index.move_vm(c, None)
        try:
            self.options: dict[str, list[str]] = {}
            self.stay_bad: dict[str, bool] = {}
            # Spread the options: a host offered to as many candidates as it may receive is offered to no more,
            # or every candidate would list the same few emptiest hosts.
            offered: Counter[str] = Counter()
            full = {h for h, n in self.wave.inbound.items() if n >= self.limits.max_in}
            for c in self.candidates:
                origin = self.origin[c]
                options = [origin]
                if self._movable(c) and self.limits.max_in > 0:
                    best = [h for h, _ in index.place(facts[c], top=2).ranked]
                    spread = [h for h, _ in index.place(facts[c], exclude=full, top=self.top).ranked]
                    options += list(dict.fromkeys(best + spread))
                    offered.update(options[1:])
                    full.update(h for h in options[1:] if offered[h] >= self.limits.max_in)
                self.options[c] = options
                self.stay_bad[c] = any(r.rule != "capacity" for r in index.admit(facts[c], origin))
            self.hosts = sorted({h for options in self.options.values() for h in options})
            self.fixed_count = {h: len(index.vms_on(h)) for h in self.hosts}
            self.free = {h: _free(index, h) for h in self.hosts}
            self.fixed_cap = {h: _min_cap(index, index.vms_on(h)) for h in self.hosts}
            self.cap = {c: _min_cap(index, (c,)) for c in self.candidates}
            self.memory = {c: facts[c].memory_mb for c in self.candidates}
            self.conflicts = self._conflicts(facts)
        finally:
            for c in self.candidates:
                index.move_vm(c, self.origin[c])

    def _conflicts(self, facts: Mapping[str, VMFacts]) -> list[tuple[str, str, str]]:
        """(a, b, host): a and b both may end on host, and together they break a pairwise neighbour rule."""
        found: list[tuple[str, str, str]] = []
        options = {c: set(self.options[c]) for c in self.candidates}
        for i, a in enumerate(self.candidates):
            for b in self.candidates[i + 1 :]:
                shared = options[a] & options[b]
                if shared and self.index.conflicts(facts[a], facts[b]):
                    found += [(a, b, h) for h in sorted(shared)]
        return found

    def _model(self) -> tuple[cp_model.CpModel, dict[tuple[str, str], cp_model.IntVar]]:
        model = cp_model.CpModel()
        x = {(c, h): model.new_bool_var(f"x[{c},{h}]") for c in self.candidates for h in self.options[c]}
        ok = {c: model.new_bool_var(f"ok[{c}]") for c in self.candidates}
        for c in self.candidates:
            stays = x[c, self.origin[c]]
            model.add_exactly_one(x[c, h] for h in self.options[c])
            if c not in self.violating:
                model.add(ok[c] == 1)
            model.add_bool_or([ok[c], stays])  # a VM that moves must land in compliance
            if self.stay_bad[c]:
                model.add_bool_or([ok[c].Not(), stays.Not()])
        for a, b, h in self.conflicts:
            if h == self.origin[a] == self.origin[b]:  # together now: at least one of them stays in violation
                model.add_bool_or([x[a, h].Not(), x[b, h].Not(), ok[a].Not(), ok[b].Not()])
            else:  # no arrival may create a conflict
                model.add_bool_or([x[a, h].Not(), x[b, h].Not()])
        self._host_constraints(model, x, ok)
        moves = [1 - x[c, self.origin[c]] for c in self.candidates]
        if self.limits.max_moves is not None:
            model.add(sum(moves) <= self.limits.max_moves)
        weight = len(self.candidates) + 1
        model.minimize(weight * sum(1 - ok[c] for c in self.candidates) + sum(moves))
        return model, x

    def _host_constraints(
        self, model: cp_model.CpModel, x: dict[tuple[str, str], cp_model.IntVar], ok: dict[str, cp_model.IntVar]
    ) -> None:
        for h in self.hosts:
            here = [c for c in self.candidates if h in self.options[c]]
            landing = sum(x[c, h] for c in here)
            arriving = [x[c, h] for c in here if self.origin[c] != h]
            gains = model.new_bool_var(f"gains[{h}]")  # 1 if some VM arrives (implied, may be 1 regardless)
            for arrival in arriving:
                model.add_implication(arrival, gains)
            for c in here:
                cap = self.cap[c]
                if cap is not None:  # its cap holds if it is to be compliant, or if anything arrives next to it
                    model.add(self.fixed_count[h] + landing <= cap).only_enforce_if([ok[c], x[c, h]])
                    model.add(self.fixed_count[h] + landing <= cap).only_enforce_if([gains, x[c, h]])
            fixed_cap = self.fixed_cap[h]
            if fixed_cap is not None:
                model.add(landing <= max(fixed_cap - self.fixed_count[h], 0))
            leaving = [1 - x[c, h] for c in here if self.origin[c] == h]
            if leaving:
                model.add(sum(leaving) <= max(self.limits.max_out - self.wave.outbound[h], 0))
            if arriving:
                model.add(sum(arriving) <= max(self.limits.max_in - self.wave.inbound[h], 0))
            if sum(self.memory[c] for c in here if self.origin[c] == h) <= self.free[h]:
                model.add(sum(self.memory[c] * x[c, h] for c in here) <= self.free[h])
            elif arriving:  # already over its memory: nothing may arrive
                model.add(sum(arriving) == 0)


def _free(index: FleetIndex, host: str) -> int:
    load = index.host_load(host)
    return load.memory_mb - load.memory_used_mb


def _min_cap(index: FleetIndex, vm_ids: Sequence[str]) -> int | None:
    """The smallest max_vms_per_host of the policies of ``vm_ids`` (None: no cap)."""
    caps = [
        rules.max_vms
        for vm_id in vm_ids
        for name in index.policies_of(vm_id)
        if (rules := index.compiled.policy(name).require) is not None and rules.max_vms is not None
    ]
    return min(caps) if caps else None


# ----------------------------------------------------------------------------------------------- order and reasons


def _order(index: FleetIndex, moves: Sequence[_MoveTuple]) -> list[_MoveTuple]:
    """Moves in an order where each one is admitted in the state the previous ones leave (capacity and every rule)
    where possible; failing that, one whose target has room; failing that, the next one. Each pass takes every
    move admitted at that point, so a plan of n moves costs a few passes, not n."""
    pending = list(moves)
    ordered: list[_MoveTuple] = []
    while pending:
        waiting: list[_MoveTuple] = []
        for move in pending:
            if index.admit(index.vm(move[0]), move[2]):
                waiting.append(move)
            else:
                index.move_vm(move[0], move[2])
                ordered.append(move)
        if len(waiting) == len(pending):
            forced = next((m for m in waiting if _has_room(index, m)), waiting[0])
            index.move_vm(forced[0], forced[2])
            ordered.append(forced)
            waiting.remove(forced)
        pending = waiting
    return ordered


def _has_room(index: FleetIndex, move: _MoveTuple) -> bool:
    return _free(index, move[2]) >= index.vm(move[0]).memory_mb


def _fixes(
    ordered: Sequence[_MoveTuple], initial: Sequence[Violation], final: set[ViolationKey]
) -> list[tuple[ViolationKey, ...]]:
    """Per move, the initial violations it resolves: its own, and those it was named a cause of (the first such
    move gets them), or else those on the host it leaves (the first move leaving it; arrivals never fix)."""
    moved = {m[0]: i for i, m in enumerate(ordered)}
    first_leaving: dict[str, int] = {}
    for i, (_, source, _) in enumerate(ordered):
        first_leaving.setdefault(source, i)
    fixes: list[list[ViolationKey]] = [[] for _ in ordered]
    for v in initial:
        if v.key in final:
            continue
        causes = [moved[n] for n in v.neighbours if n in moved]
        owner = moved.get(v.vm_id, min(causes, default=first_leaving.get(v.host, -1)))
        if owner >= 0:
            fixes[owner].append(v.key)
    return [tuple(keys) for keys in fixes]


def _why_unresolved(
    index: FleetIndex,
    violation: Violation,
    notes: Mapping[str, str],
    frozen_vms: Mapping[str, str],
    limits: _Limits,
    ordered: Sequence[_MoveTuple],
) -> str:
    """Why a violation is left, read from the final state of the plan (the index holds it)."""
    if violation.vm_id in notes:
        return notes[violation.vm_id]
    frozen = _frozen(index, violation.vm_id, frozen_vms)
    if frozen is not None:
        return frozen + " and moving its neighbours does not fix it within the limits"
    if limits.max_moves is not None and len(ordered) >= limits.max_moves:
        return f"the plan reached max_moves={limits.max_moves}"
    decision = index.place(index.vm(violation.vm_id))
    if decision.host is None:
        return f"no allowed host: {decision.summary()}"
    return (
        f"host {decision.host} would take it, but the plan's limits (max_in_per_host={limits.max_in}, "
        f"max_out_per_host={limits.max_out}) or its size kept the move out"
    )
