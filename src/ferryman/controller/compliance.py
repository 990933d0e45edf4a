"""Placement policies at work in the controller: admission of every creation and migration, continuous compliance of
the fleet, remediation plans, and the per-tenant co-location report.

The decisions are :mod:`ferryman.policy`'s (pure); this module feeds it facts from the CMDB and stores what it finds.
It keeps one compiled :class:`~ferryman.policy.engine.FleetIndex` of the policy version in force. Every CMDB change
the fleet announces (a VM created, moved or deleted, a host's attributes changed) updates the index incrementally and
re-checks only the VMs that change affects; a full audit rebuilds the index from the CMDB, after each apply and
periodically. Violations are stored with first-seen and resolved times and each opening or resolution is an event.

It never moves a VM by itself: a remediation plan runs only when an operator executes it, through the secure
migration path. Forcing a placement against hard rules ("break glass") needs a role in :data:`BREAK_GLASS_ROLES` and
is an alarm-level audit event.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import structlog

from ferryman.cmdb.policy_store import Finding, PolicyVersion
from ferryman.controller.fleet import Change, Fleet, VMRequest
from ferryman.core import errors
from ferryman.core.models import VM, Host, HostState, Severity, VMState
from ferryman.policy.engine import FleetIndex, compile_policies
from ferryman.policy.facts import HostFacts, VMFacts
from ferryman.policy.hostrules import unsatisfiable
from ferryman.policy.schema import PolicyError, PolicyErrors, PolicySet, parse_policies
from ferryman.scheduler.governor import GovernorSettings
from ferryman.scheduler.planner import Plan, plan_remediation

log = structlog.get_logger(__name__)

BREAK_GLASS_ROLES = frozenset({"admin"})
IN_FLIGHT_LIMIT = 100_000  # unfinished migrations admission reads (the governor keeps far fewer running at once)
"""Roles whose tokens may force a placement against hard rules (audited as an alarm)."""


@dataclass(frozen=True)
class Preview:
    """What applying a policy set would change: the violations it would open and those it would resolve."""

    would_violate: list[Finding]
    would_resolve: list[Finding]


def _finding(v: Any) -> Finding:
    return Finding(vm_id=v.vm_id, policy=v.policy, rule=v.rule, host=v.host, message=v.message)


class Compliance:
    """Admission (:class:`~ferryman.controller.fleet.Admission`) and compliance of the fleet against the policies."""

    def __init__(self, fleet: Fleet, governor: GovernorSettings) -> None:
        self.fleet = fleet
        self.repo = fleet.repo
        self.governor = governor
        self.version: PolicyVersion | None = None
        self.policies: PolicySet | None = None
        self._index: FleetIndex | None = None
        self.load()

    # -- facts ------------------------------------------------------------------------------------------------------

    def host_facts(self) -> list[HostFacts]:
        levels = {site.name: site.security_level for site in self.repo.list_sites()}
        return [_host_facts(h, levels.get(h.site, 0)) for h in self.repo.list_hosts()]

    def vm_facts(self) -> list[VMFacts]:
        out = []
        for vm in self.repo.list_vms():
            placement = self.repo.current_placement(vm.id)
            out.append(_vm_facts(vm, placement.host if placement else None))
        return out

    # -- the policy version in force --------------------------------------------------------------------------------

    def load(self) -> None:
        """Read the version in force from the CMDB and build its index (at start and after an apply)."""
        version = self.repo.current_policy_version()
        self.version = version
        if version is None or not version.documents:
            self.policies, self._index = None, None
            return
        try:
            self.policies = parse_policies(version.documents)
        except errors.InvalidInput as err:  # validated at apply: only a changed parser can get here
            self.policies, self._index = None, None
            self.fleet.audit(
                "alarm.policy_load_failed",
                f"policy version {version.version} no longer parses; no policy is enforced: {err}",
                "system",
                severity=Severity.ALARM,
            )
            return
        self._index = FleetIndex(compile_policies(self.policies), self.host_facts(), self.vm_facts())

    @property
    def active(self) -> bool:
        return self._index is not None

    def index(self) -> FleetIndex:
        if self._index is None:
            raise errors.Conflict("no placement policy is in force (ferryman policy apply)")
        return self._index

    # -- admission --------------------------------------------------------------------------------------------------

    def admit_creation(self, req: VMRequest, candidates: list[Host], principal: str) -> Host | None:
        """The allowed host among ``candidates`` with the best score (None: no policies, the fleet chooses)."""
        if self._index is None:
            return None
        vm = VMFacts(
            id=f"new:{req.name}",
            name=req.name,
            tenant=req.tenant,
            profile=dict(req.profile),
            memory_mb=req.memory_mb,
            host=None,
        )
        names = {h.name: h for h in candidates}
        with self._arrived(self._in_flight()):
            if req.host is not None:
                reasons = [str(r.message) for r in self._index.admit(vm, req.host)]
            else:
                exclude = [h for h in self._index_hosts() if h not in names]
                decision = self._index.place(vm, exclude=exclude)
        if req.host is not None:
            if reasons:
                self._refuse_or_force(
                    f"creating {req.name} on {req.host}", reasons, req.force, req.role, principal, host=req.host
                )
            return names[req.host]
        if decision.host is None:
            raise errors.PolicyRefused(f"no host may take {req.name}: {decision.summary()}", [decision.summary()])
        return names[decision.host]

    def admit_migration(
        self, vm: VM, destination: str, *, force: bool, role: str, principal: str, automatic: bool = False
    ) -> None:
        """Raise :class:`PolicyRefused` when a hard rule forbids moving ``vm`` to ``destination``."""
        if self._index is None:
            return
        placement = self.repo.current_placement(vm.id)
        facts = _vm_facts(vm, placement.host if placement else None)
        with self._arrived(self._in_flight(excluding=vm.id)):
            reasons = [str(r.message) for r in self._index.admit(facts, destination)]
        if automatic and not self._index.migration_rules(vm.id).auto_balance:
            reasons.append(f"the policies of {vm.name} forbid automatic moves")
        if reasons:
            self._refuse_or_force(
                f"migrating {vm.name} to {destination}", reasons, force, role, principal, host=destination, vm=vm.id
            )

    def migration_target(
        self, vm: VM, candidates: Iterable[str], planned: Mapping[str, str] | None = None
    ) -> str | None:
        """The best allowed destination for ``vm`` among ``candidates`` (None: none allowed); without policies the
        first candidate. ``planned``: VM id -> destination of migrations already started in the same operation (a
        drain), counted as arrived so that two VMs that exclude each other are not sent to the same host."""
        allowed = list(candidates)
        index = self._index
        if index is None:
            return allowed[0] if allowed else None
        placement = self.repo.current_placement(vm.id)
        exclude = [h for h in self._index_hosts() if h not in allowed]
        facts = _vm_facts(vm, placement.host if placement else None)
        with self._arrived({**self._in_flight(excluding=vm.id), **(planned or {})}):
            return index.place(facts, exclude=exclude).host

    def _in_flight(self, *, excluding: str | None = None) -> dict[str, str]:
        """VM id -> destination of every unfinished migration that is not rolling back (but ``excluding``'s):
        admission counts each such VM on its destination as well as on its source, so two requests racing for one
        host are judged together, and a rollback finds its source as it left it."""
        return {
            r.vm_id: r.destination
            for r in self.repo.list_migrations(active_only=True, limit=IN_FLIGHT_LIMIT)
            if r.vm_id != excluding and r.phase != "rolling_back"
        }

    @contextlib.contextmanager
    def _arrived(self, moves: Mapping[str, str]) -> Iterator[None]:
        """Within the block the index also holds each VM of ``moves`` on its destination (a stand-in of the same
        tenant, profile and size); afterwards the stand-ins are gone."""
        index = self.index()
        added: list[str] = []
        try:
            for vm_id, target in moves.items():
                try:
                    facts = index.vm(vm_id)
                except errors.NotFound:
                    continue  # not in the index (deleted meanwhile)
                if facts.host == target:
                    continue  # committed: it is there already
                stand_in = dataclasses.replace(facts, id=f"arriving:{vm_id}", host=target)
                index.add_vm(stand_in)
                added.append(stand_in.id)
            yield
        finally:
            for stand_in_id in reversed(added):
                index.remove_vm(stand_in_id)

    def place(self, tenant: str, profile: dict[str, str], memory_mb: int, name: str = "(new)") -> Any:
        """Where a new VM ``name`` of ``tenant`` with ``profile`` would go now, with every rejected host's reasons."""
        vm = VMFacts(id="new:placement", name=name, tenant=tenant, profile=profile, memory_mb=memory_mb, host=None)
        return self.index().place(vm)

    def _index_hosts(self) -> list[str]:
        return [h.name for h in self.repo.list_hosts()]

    def _refuse_or_force(
        self, what: str, reasons: list[str], force: bool, role: str, principal: str, **where: Any
    ) -> None:
        if not force:
            self.fleet.audit(
                "policy.refused",
                f"{what} refused: " + "; ".join(reasons),
                principal,
                severity=Severity.WARNING,
                reasons=reasons,
                **where,
            )
            raise errors.PolicyRefused(f"{what} is forbidden by policy: " + "; ".join(reasons), reasons)
        if role not in BREAK_GLASS_ROLES:
            raise errors.Forbidden(
                f"--force needs a break-glass role ({', '.join(sorted(BREAK_GLASS_ROLES))}), not {role!r}"
            )
        self.fleet.audit(
            "policy.break_glass",
            f"{what} forced against: " + "; ".join(reasons),
            principal,
            severity=Severity.ALARM,
            reasons=reasons,
            **where,
        )

    # -- continuous compliance --------------------------------------------------------------------------------------

    def on_change(self, change: Change) -> None:
        """Update the index for one CMDB change and re-check only the VMs it affects."""
        index = self._index
        if index is None:
            return
        affected: set[str] = set()
        if change.vm_id is not None:
            vm = self.repo.get_vm(change.vm_id)
            placement = self.repo.current_placement(vm.id) if vm.state is not VMState.DELETED else None
            if placement is None:
                with contextlib.suppress(errors.NotFound):  # deleted before the index ever saw it
                    affected |= set(index.remove_vm(vm.id))
            else:
                try:
                    index.vm(vm.id)
                except errors.NotFound:
                    affected |= set(index.add_vm(_vm_facts(vm, placement.host)))
                else:
                    affected |= set(index.move_vm(vm.id, placement.host))
        if change.host is not None:
            host = self.repo.get_host(change.host)
            level = {s.name: s.security_level for s in self.repo.list_sites()}.get(host.site, 0)
            affected |= set(index.update_host(_host_facts(host, level)))
        if affected:
            self.check(scope=affected)

    def check(self, scope: set[str] | None = None) -> tuple[list[Any], list[Any]]:
        """Store the violations of ``scope`` (None: every VM) as found now; record an event per change."""
        if self._index is None:
            findings: list[Finding] = []
        else:
            findings = [_finding(v) for v in self._index.violations(scope)]
        opened, resolved = self.repo.sync_violations(findings, self.fleet.clock.now(), scope=scope)
        for v in opened:
            self.fleet.audit(
                "compliance.violation",
                v.message,
                "system",
                vm=v.vm_id,
                host=v.host,
                severity=Severity.WARNING,
                policy=v.policy,
                rule=v.rule,
            )
        for v in resolved:
            self.fleet.audit(
                "compliance.resolved",
                f"resolved: {v.message}",
                "system",
                vm=v.vm_id,
                host=v.host,
                policy=v.policy,
                rule=v.rule,
            )
        return opened, resolved

    def audit_all(self) -> tuple[list[Any], list[Any]]:
        """A full audit: rebuild the index from the CMDB and check every VM. A version applied meanwhile (by another
        controller on the same database) is loaded first."""
        current = self.repo.current_policy_version()
        if (current.version if current else None) != (self.version.version if self.version else None):
            self.load()
        elif self.policies is not None:
            self._index = FleetIndex(compile_policies(self.policies), self.host_facts(), self.vm_facts())
        return self.check(None)

    # -- policy versions ---------------------------------------------------------------------------------------------

    def validate(self, documents: dict[str, str]) -> PolicySet:
        """Parse ``documents``; PolicyErrors lists every mistake, and so does a policy no host can ever satisfy."""
        if not documents:
            raise errors.InvalidInput("no policy files given")
        policy_set = parse_policies(documents)
        hosts = self.host_facts()
        problems = unsatisfiable(policy_set, hosts) or self._joint_conflicts(policy_set, hosts)
        if problems:
            raise PolicyErrors(problems)
        return policy_set

    def _joint_conflicts(self, policy_set: PolicySet, hosts: list[HostFacts]) -> list[PolicyError]:
        """Policies that each leave some host but together leave none for a VM of the fleet they all select."""
        vms = self.vm_facts()
        index = FleetIndex(compile_policies(policy_set), hosts, vms)
        found: list[PolicyError] = []
        seen: set[tuple[str, ...]] = set()
        for vm in vms:
            names = tuple(index.policies_of(vm.id))
            if len(names) < 2 or names in seen:
                continue
            seen.add(names)
            if not index.eligible_hosts(vm):
                source = policy_set.source(names[0])
                found.append(
                    PolicyError(
                        source.file,
                        source.line_of("require"),
                        "require",
                        f"together with {', '.join(names[1:])} it leaves no host for {vm.name} (and every VM they "
                        "all select)",
                        "host rules that some host of the fleet satisfies together",
                    )
                )
        return found

    def preview(self, policy_set: PolicySet) -> Preview:
        candidate = FleetIndex(compile_policies(policy_set), self.host_facts(), self.vm_facts())
        after = {f.key: f for f in (_finding(v) for v in candidate.violations(None))}
        before = {v.key: v for v in self.repo.list_violations()}
        return Preview(
            would_violate=[f for k, f in after.items() if k not in before],
            would_resolve=[
                Finding(v.vm_id, v.policy, v.rule, v.host, v.message) for k, v in before.items() if k not in after
            ],
        )

    def apply(self, documents: dict[str, str], principal: str) -> PolicyVersion:
        self.validate(documents)
        version = self.repo.add_policy_version(documents, principal, self.fleet.clock.now())
        self.load()
        self.fleet.audit(
            "policy.applied",
            f"policy version {version.version}: {', '.join(sorted(documents))}",
            principal,
            version=version.version,
            policies=list(self.policies.names if self.policies else ()),
        )
        self.audit_all()
        return version

    def clear(self, principal: str) -> PolicyVersion:
        """A new, empty version: nothing is enforced any more; every open violation resolves."""
        version = self.repo.add_policy_version({}, principal, self.fleet.clock.now())
        self.load()
        self.fleet.audit(
            "policy.applied",
            f"policy version {version.version}: no policy",
            principal,
            version=version.version,
            policies=[],
        )
        self.check(None)
        return version

    # -- remediation ------------------------------------------------------------------------------------------------

    def plan(self) -> Plan:
        """Migrations that remove the current violations within the governor's per-host limits and the VMs'
        cooldowns; VMs migrating now, cooling down, or whose policies forbid automatic moves stay put."""
        index = self.index()
        return plan_remediation(
            index,
            max_moves=None,
            max_out_per_host=self.governor.max_outbound_per_host,
            max_in_per_host=self.governor.max_inbound_per_host,
            frozen_vms=self._frozen(index, self.governor.vm_cooldown_s),
        )

    def _frozen(self, index: FleetIndex, governor_cooldown_s: float) -> dict[str, str]:
        now = self.fleet.clock.now()
        frozen: dict[str, str] = {}
        for record in self.repo.list_migrations(active_only=True):
            frozen[record.vm_id] = "migrating now"
        for vm in self.repo.list_vms():
            if vm.id in frozen:
                continue
            rules = index.migration_rules(vm.id)
            if not rules.auto_balance:
                frozen[vm.id] = "its policies forbid automatic moves"
                continue
            cooldown = max(governor_cooldown_s, rules.cooldown_s)
            last = next((r for r in self.repo.list_migrations(vm_id=vm.id, limit=1) if r.outcome == "done"), None)
            if last is not None and last.finished_at is not None:
                until = last.finished_at + dt.timedelta(seconds=cooldown)
                if until > now:
                    frozen[vm.id] = f"cooling down until {until:%H:%M:%S}"
        return frozen


def _host_facts(host: Host, site_level: int) -> HostFacts:
    return HostFacts(
        name=host.name,
        site=host.site,
        site_security_level=site_level,
        zone=host.zone,
        subnet=host.subnet,
        virt_type=host.virt_type,
        hypervisor=host.hypervisor,
        hypervisor_version=host.hypervisor_version,
        patch_level=host.patch_level,
        role=host.role,
        memory_mb=host.memory_mb,
        schedulable=host.state is HostState.ENROLLED,
    )


def _vm_facts(vm: VM, host: str | None) -> VMFacts:
    return VMFacts(
        id=vm.id, name=vm.name, tenant=vm.tenant, profile=dict(vm.profile), memory_mb=vm.memory_mb, host=host
    )
