"""Placement policies at work in the controller: admission of every creation and migration, continuous compliance of
the fleet, remediation plans, and the per-tenant co-location report.

The decisions are :mod:`ferryman.policy`'s (pure); this module feeds it facts from the CMDB and stores what it finds.
It keeps one compiled :class:`~ferryman.policy.engine.FleetIndex` of the policy version in force. Every CMDB change
the fleet announces (a VM created, moved or deleted, a host's attributes changed) updates the index incrementally and
re-checks only the VMs that change affects; a full audit rebuilds the index from the CMDB, periodically and when
another controller applied a version.

An apply parses its files once and compiles them once: :meth:`Compliance.prepare` returns a :class:`Candidate` whose
index serves the fleet-feasibility check, the preview, and, once :meth:`Compliance.install` stored the version, the
engine in force, which the audit after the apply reads as it is.

Threads: the slow work (reading the fleet from the CMDB, parsing, compiling, building an index, planning) runs
without the service's lock, so API routes may run it in worker threads while the event loop keeps admitting
migrations. An index is not thread-safe: the one in force is read and changed only under the lock, and held there
only for a few whole-fleet integer operations and one CMDB transaction at a time. An index built without the lock
catches up, when it is put in force, with the changes announced while it was built (the service numbers them).
Violations are computed and stored under the lock, so an older finding never overwrites a newer one.

Policies read a VM's image baseline (OS and version) from the image registry, copied into its facts once per read of
the fleet. The registry has findings of its own, policies or not: a VM that runs from a revoked image is an open
violation of :data:`IMAGE_REGISTRY` (rule :data:`IMAGE_REVOKED`) until the VM is gone, stored with the policies'
violations by every full audit and incremental check; a revocation announced as ``Change(image=name)`` re-checks the
VMs of that image at once.

It never moves a VM by itself: a remediation plan runs only when an operator executes it, through the secure
migration path. Forcing a placement against hard rules ("break glass") needs a role in :data:`BREAK_GLASS_ROLES` and
is an alarm-level audit event.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import structlog

from ferryman.cmdb.images import ImageRecord
from ferryman.cmdb.policy_store import Finding, PolicyVersion
from ferryman.controller.fleet import LAB_GUEST_IMAGE, Change, Fleet, VMRequest
from ferryman.core import errors
from ferryman.core.models import VM, Host, HostState, Severity, VMState
from ferryman.policy.engine import CompiledPolicies, FleetIndex, PlacementDecision, compile_policies
from ferryman.policy.facts import HostFacts, VMFacts
from ferryman.policy.hostrules import unsatisfiable
from ferryman.policy.imagerules import RULE as IMAGE_RULE
from ferryman.policy.schema import PolicyError, PolicyErrors, PolicySet, parse_policies
from ferryman.scheduler.governor import GovernorSettings
from ferryman.scheduler.planner import Plan, plan_remediation

log = structlog.get_logger(__name__)

BREAK_GLASS_ROLES = frozenset({"admin", "fleet-admin", "security-officer"})
"""Roles that may force a placement against hard rules (audited as an alarm): a second check behind the API's Cedar
action ``placement:force`` and its two-person rule; ``admin`` is the controller's own automatic requests."""
IN_FLIGHT_LIMIT = 100_000  # unfinished migrations admission reads (the governor keeps far fewer running at once)
KEPT_CHANGES = 10_000
"""CMDB changes remembered for indexes under construction; one built while more happened reads the fleet again."""
IMAGE_REGISTRY = "image-registry"
"""The policy name of the findings the image registry makes itself, with or without placement policies."""
IMAGE_REVOKED = "image_revoked"
"""The rule of a VM that runs from a revoked image."""

Parser = Callable[[Mapping[str, str]], PolicySet]
Compiler = Callable[[PolicySet], CompiledPolicies]


@dataclass(frozen=True)
class Preview:
    """What applying a policy set would change: the violations it would open and those it would resolve."""

    would_violate: list[Finding]
    would_resolve: list[Finding]


@dataclass(frozen=True)
class Candidate:
    """Policy files parsed, checked against the fleet and compiled, ready to preview and to install. ``index``: the
    fleet as read after change number ``since``, under these policies; nobody else holds it until it is installed."""

    documents: Mapping[str, str]
    policies: PolicySet
    index: FleetIndex
    since: int


@dataclass(frozen=True)
class _InForce:
    version: PolicyVersion | None
    policies: PolicySet | None
    index: FleetIndex | None


def _number(version: PolicyVersion | None) -> int:
    return version.version if version is not None else 0


def _finding(v: Any) -> Finding:
    return Finding(vm_id=v.vm_id, policy=v.policy, rule=v.rule, host=v.host, message=v.message)


class Compliance:
    """Admission (:class:`~ferryman.controller.fleet.Admission`) and compliance of the fleet against the policies.

    ``parser`` and ``compiler`` turn policy files into a policy set and a policy set into what the engine indexes
    (:func:`~ferryman.policy.schema.parse_policies`, :func:`~ferryman.policy.engine.compile_policies`); every parse
    and compilation of the service goes through them."""

    def __init__(
        self,
        fleet: Fleet,
        governor: GovernorSettings,
        *,
        parser: Parser = parse_policies,
        compiler: Compiler = compile_policies,
    ) -> None:
        self.fleet = fleet
        self.repo = fleet.repo
        self.governor = governor
        self._parse = parser
        self._compile = compiler
        self._lock = threading.RLock()
        self._changes: deque[tuple[int, Change]] = deque(maxlen=KEPT_CHANGES)
        self._last_change = 0
        self._in_force = _InForce(None, None, None)
        self.load()

    # -- facts ------------------------------------------------------------------------------------------------------

    def host_facts(self) -> list[HostFacts]:
        levels = {site.name: site.security_level for site in self.repo.list_sites()}
        return [_host_facts(h, levels.get(h.site, 0)) for h in self.repo.list_hosts()]

    def vm_facts(self) -> list[VMFacts]:
        images = {image.name: image for image in self.repo.list_images()}
        out = []
        for vm in self.repo.list_vms():
            placement = self.repo.current_placement(vm.id)
            out.append(_vm_facts(vm, placement.host if placement else None, images.get(vm.image)))
        return out

    def _image(self, name: str) -> ImageRecord | None:
        """The registry's record of image ``name`` (None: the registry does not know it)."""
        try:
            return self.repo.get_image(name)
        except errors.NotFound:
            return None

    def _facts_of(self, vm: VM, host: str | None) -> VMFacts:
        return _vm_facts(vm, host, self._image(vm.image))

    def _fleet_facts(self) -> tuple[int, list[HostFacts], list[VMFacts]]:
        """The number of the last change announced, then the VMs and the hosts as the CMDB has them now. VMs are
        read first: hosts are never removed, so every host a VM names is among the hosts read after it."""
        with self._lock:
            since = self._last_change
        vms = self.vm_facts()
        return since, self.host_facts(), vms

    # -- the policy version in force --------------------------------------------------------------------------------

    @property
    def version(self) -> PolicyVersion | None:
        return self._in_force.version

    @property
    def policies(self) -> PolicySet | None:
        return self._in_force.policies

    def in_force(self) -> tuple[PolicyVersion | None, PolicySet | None]:
        """The version in force and its policies, read together."""
        state = self._in_force
        return state.version, state.policies

    def load(self) -> None:
        """Read the version in force from the CMDB and build its index (at start, and when another controller has
        applied one)."""
        version = self.repo.current_policy_version()
        if version is None or not version.documents:
            self._put_in_force(_InForce(version, None, None), since=0)
            return
        try:
            policies = self._parse(version.documents)
        except errors.InvalidInput as err:  # validated at apply: only a changed parser can get here
            self._put_in_force(_InForce(version, None, None), since=0)
            self.fleet.audit(
                "alarm.policy_load_failed",
                f"policy version {version.version} no longer parses; no policy is enforced: {err}",
                "system",
                severity=Severity.ALARM,
            )
            return
        since, hosts, vms = self._fleet_facts()
        self._put_in_force(_InForce(version, policies, FleetIndex(self._compile(policies), hosts, vms)), since)

    def _put_in_force(self, state: _InForce, since: int) -> bool:
        """Put ``state`` in force unless a newer version already is (False). Its index, built from the fleet as read
        after change ``since``, first catches up with the changes announced since then."""
        while True:
            with self._lock:
                if _number(state.version) < _number(self._in_force.version):
                    return False
                if state.index is None or self._catch_up(state.index, since):
                    self._in_force = state
                    return True
            # more changes than are kept happened while it was built: read the fleet again
            compiled = state.index.compiled
            since, hosts, vms = self._fleet_facts()
            state = dataclasses.replace(state, index=FleetIndex(compiled, hosts, vms))

    def _catch_up(self, index: FleetIndex, since: int) -> bool:
        """Apply to ``index`` every change announced after ``since`` (False: some are no longer kept). Under the lock;
        a change already in the facts the index was built from is applied again harmlessly."""
        if self._last_change == since:
            return True
        if not self._changes or self._changes[0][0] > since + 1:
            return False
        for number, change in self._changes:
            if number > since:
                self._apply_change(index, change)
        return True

    @property
    def active(self) -> bool:
        return self._in_force.index is not None

    def index(self) -> FleetIndex:
        """The index in force. It changes under the service's lock: read it without the lock only where nothing
        else changes the fleet meanwhile (tests, tools)."""
        index = self._in_force.index
        if index is None:
            raise errors.Conflict("no placement policy is in force (ferryman policy apply)")
        return index

    # -- admission --------------------------------------------------------------------------------------------------

    def admit_creation(self, req: VMRequest, candidates: list[Host], principal: str) -> Host | None:
        """The allowed host among ``candidates`` with the best score (None: no policies, the fleet chooses)."""
        if not self.active:
            return None
        image = req.image or LAB_GUEST_IMAGE
        vm = VMFacts(
            id=f"new:{req.name}",
            name=req.name,
            tenant=req.tenant,
            profile=dict(req.profile),
            memory_mb=req.memory_mb,
            host=None,
            image=image,
            **_image_facts(self._image(image)),
        )
        names = {h.name: h for h in candidates}
        in_flight = self._in_flight()
        exclude = [h for h in self._index_hosts() if h not in names] if req.host is None else []
        with self._lock:
            index = self._in_force.index
            if index is None:
                return None
            with _arrived(index, in_flight):
                if req.host is not None:
                    reasons = [str(r.message) for r in index.admit(vm, req.host)]
                else:
                    decision = index.place(vm, exclude=exclude)
        if req.host is not None:
            if reasons:
                self._refuse_or_force(
                    f"creating {req.name} on {req.host}", reasons, req.force, req.role, principal, host=req.host
                )
            return names[req.host]
        if decision.host is None:
            reasons = [decision.summary(), *_image_reasons(decision)]
            raise errors.PolicyRefused(f"no host may take {req.name}: " + "; ".join(reasons), reasons)
        return names[decision.host]

    def admit_migration(
        self, vm: VM, destination: str, *, force: bool, role: str, principal: str, automatic: bool = False
    ) -> None:
        """Raise :class:`PolicyRefused` when a hard rule forbids moving ``vm`` to ``destination``."""
        if not self.active:
            return
        placement = self.repo.current_placement(vm.id)
        facts = self._facts_of(vm, placement.host if placement else None)
        in_flight = self._in_flight(excluding=vm.id)
        with self._lock:
            index = self._in_force.index
            if index is None:
                return
            with _arrived(index, in_flight):
                reasons = [str(r.message) for r in index.admit(facts, destination)]
            auto_balance = index.migration_rules(vm.id).auto_balance if automatic else True
        if not auto_balance:
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
        if not self.active:
            return allowed[0] if allowed else None
        placement = self.repo.current_placement(vm.id)
        exclude = [h for h in self._index_hosts() if h not in allowed]
        facts = self._facts_of(vm, placement.host if placement else None)
        in_flight = {**self._in_flight(excluding=vm.id), **(planned or {})}
        with self._lock:
            index = self._in_force.index
            if index is None:
                return allowed[0] if allowed else None
            with _arrived(index, in_flight):
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

    def place(
        self, tenant: str, profile: dict[str, str], memory_mb: int, name: str = "(new)", image: str | None = None
    ) -> Any:
        """Where a new VM ``name`` of ``tenant`` with ``profile``, booting ``image`` (None: the lab guest image), would
        go now, with every rejected host's reasons."""
        image = image or LAB_GUEST_IMAGE
        vm = VMFacts(
            id="new:placement",
            name=name,
            tenant=tenant,
            profile=profile,
            memory_mb=memory_mb,
            host=None,
            image=image,
            **_image_facts(self._image(image)),
        )
        with self._lock:
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
        """Update the index for one CMDB change and re-check only the VMs it affects (without policies in force, the
        VMs whose image findings it may change). The change is numbered and kept, for indexes being built
        meanwhile."""
        with self._lock:
            self._last_change += 1
            self._changes.append((self._last_change, change))
            index = self._in_force.index
            if index is None:
                affected = self._registry_scope(change)
            else:
                affected = self._apply_change(index, change)
                if change.vm_id is not None:
                    affected.add(change.vm_id)  # its findings resolve when it is gone, even if the index never saw it
            if not affected:
                return
            opened, resolved = self._store_violations(affected)
        self._announce(opened, resolved)

    def _apply_change(self, index: FleetIndex, change: Change) -> set[str]:
        """Bring ``index`` in line with the CMDB for what ``change`` names; the VMs to re-check."""
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
                    affected |= set(index.add_vm(self._facts_of(vm, placement.host)))
                else:
                    affected |= set(index.move_vm(vm.id, placement.host))
        if change.host is not None:
            host = self.repo.get_host(change.host)
            level = {s.name: s.security_level for s in self.repo.list_sites()}.get(host.site, 0)
            affected |= set(index.update_host(_host_facts(host, level)))
        if change.image is not None:
            record = self._image(change.image)
            for vm_id in index.vm_ids():
                facts = index.vm(vm_id)
                if facts.image != change.image:
                    continue
                affected.add(vm_id)
                fresh = dataclasses.replace(facts, **_image_facts(record))
                if fresh != facts:
                    affected |= set(index.update_vm(fresh))
        return affected

    def _registry_scope(self, change: Change) -> set[str]:
        """Without an index in force: the VMs whose image registry findings ``change`` may open or resolve (none
        while no image is revoked)."""
        if change.vm_id is None and change.image is None:
            return set()
        if not any(image.revoked for image in self.repo.list_images()):
            return set()
        scope = {change.vm_id} if change.vm_id is not None else set()
        if change.image is not None:
            scope |= {vm.id for vm in self.repo.list_vms() if vm.image == change.image}
        return scope

    def check(self, scope: set[str] | None = None) -> tuple[list[Any], list[Any]]:
        """Store the violations of ``scope`` (None: every VM) as found now; record an event per change."""
        with self._lock:
            opened, resolved = self._store_violations(scope)
        self._announce(opened, resolved)
        return opened, resolved

    def _store_violations(self, scope: set[str] | None) -> tuple[list[Any], list[Any]]:
        """Find the violations of ``scope`` (the index in force's and the image registry's) and store them, in one
        go under the lock."""
        index = self._in_force.index
        findings = [] if index is None else [_finding(v) for v in index.violations(scope)]
        findings += self._revoked_images(index, scope)
        return self.repo.sync_violations(findings, self.fleet.clock.now(), scope=scope)

    def _revoked_images(self, index: FleetIndex | None, scope: set[str] | None) -> list[Finding]:
        """A finding for each VM of ``scope`` (None: every VM) placed on a host and running from a revoked image. The
        index in force knows where each VM is; without one, the CMDB is read."""
        revoked = {image.name: image for image in self.repo.list_images() if image.revoked}
        if not revoked:
            return []
        placed: list[tuple[str, str, str, str]] = []  # (vm id, VM name, host, image)
        if index is not None:
            for vm_id in index.vm_ids() if scope is None else sorted(scope):
                try:
                    facts = index.vm(vm_id)
                except errors.NotFound:
                    continue
                if facts.host is not None and facts.image in revoked:
                    placed.append((facts.id, facts.name, facts.host, facts.image))
        else:
            for vm in self.repo.list_vms() if scope is None else self._vms(scope):
                placement = self.repo.current_placement(vm.id) if vm.image in revoked else None
                if placement is not None:
                    placed.append((vm.id, vm.name, placement.host, vm.image))
        return [_revoked_finding(vm_id, name, host, revoked[image]) for vm_id, name, host, image in placed]

    def _vms(self, ids: Iterable[str]) -> Iterator[VM]:
        """The VMs of ``ids`` that exist and are not deleted."""
        for vm_id in sorted(ids):
            try:
                vm = self.repo.get_vm(vm_id)
            except errors.NotFound:
                continue
            if vm.state is not VMState.DELETED:
                yield vm

    def _announce(self, opened: list[Any], resolved: list[Any]) -> None:
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

    def audit_all(self) -> tuple[list[Any], list[Any]]:
        """A full audit: rebuild the index from the CMDB (the policies stay compiled) and check every VM. A version
        applied meanwhile (by another controller on the same database) is loaded first."""
        current = self.repo.current_policy_version()
        state = self._in_force
        if _number(current) != _number(state.version):
            self.load()
        elif state.index is not None:
            since, hosts, vms = self._fleet_facts()
            self._put_in_force(dataclasses.replace(state, index=FleetIndex(state.index.compiled, hosts, vms)), since)
        return self.check(None)

    # -- policy versions ---------------------------------------------------------------------------------------------

    def prepare(self, documents: Mapping[str, str]) -> Candidate:
        """Parse ``documents`` and compile them, once each, into a candidate for :meth:`preview` and
        :meth:`install`. PolicyErrors lists every mistake, and so does a policy no host can ever satisfy, alone or
        together with others."""
        if not documents:
            raise errors.InvalidInput("no policy files given")
        policy_set = self._parse(documents)
        since, hosts, vms = self._fleet_facts()
        problems = unsatisfiable(policy_set, hosts)
        if problems:
            raise PolicyErrors(problems)
        index = FleetIndex(self._compile(policy_set), hosts, vms)
        problems = _joint_conflicts(policy_set, index, vms)
        if problems:
            raise PolicyErrors(problems)
        return Candidate(dict(documents), policy_set, index, since)

    def validate(self, documents: Mapping[str, str]) -> PolicySet:
        """Parse ``documents`` and check them against the fleet (see :meth:`prepare`)."""
        return self.prepare(documents).policies

    def preview(self, policies: Candidate | PolicySet) -> Preview:
        """The violations applying ``policies`` would open and resolve (a candidate is previewed on its own index)."""
        if isinstance(policies, Candidate):
            index = policies.index
        else:
            _, hosts, vms = self._fleet_facts()
            index = FleetIndex(self._compile(policies), hosts, vms)
        shared = index is self._in_force.index  # a candidate is its request's own until it is installed
        with self._lock if shared else contextlib.nullcontext():
            after = {f.key: f for f in (_finding(v) for v in index.violations(None))}
        registry = (IMAGE_REGISTRY, IMAGE_REVOKED)  # policies neither open nor resolve these
        before = {v.key: v for v in self.repo.list_violations() if (v.policy, v.rule) != registry}
        return Preview(
            would_violate=[f for k, f in after.items() if k not in before],
            would_resolve=[
                Finding(v.vm_id, v.policy, v.rule, v.host, v.message) for k, v in before.items() if k not in after
            ],
        )

    def install(self, candidate: Candidate, principal: str) -> PolicyVersion:
        """Store the candidate's files as the next version, put its index in force (brought up to date with the
        changes since it was built) and audit the fleet against it."""
        version = self.repo.add_policy_version(dict(candidate.documents), principal, self.fleet.clock.now())
        self._put_in_force(_InForce(version, candidate.policies, candidate.index), candidate.since)
        self.fleet.audit(
            "policy.applied",
            f"policy version {version.version}: {', '.join(sorted(candidate.documents))}",
            principal,
            version=version.version,
            policies=list(candidate.policies.names),
        )
        self.check(None)
        return version

    def apply(self, documents: Mapping[str, str], principal: str) -> PolicyVersion:
        """:meth:`prepare` then :meth:`install`."""
        return self.install(self.prepare(documents), principal)

    def clear(self, principal: str) -> PolicyVersion:
        """A new, empty version: nothing is enforced any more; every open violation resolves."""
        version = self.repo.add_policy_version({}, principal, self.fleet.clock.now())
        self._put_in_force(_InForce(version, None, None), since=0)
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
        cooldowns; VMs migrating now, cooling down, or whose policies forbid automatic moves stay put. The planner
        simulates its moves on a copy of the index in force, taken under the lock and built without it."""
        with self._lock:
            in_force = self.index()
            compiled, (hosts, vms) = in_force.compiled, in_force.facts()
        index = FleetIndex(compiled, hosts, vms)
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
            try:
                rules = index.migration_rules(vm.id)
            except errors.NotFound:  # created after the copy was taken: the plan does not know it
                continue
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


@contextlib.contextmanager
def _arrived(index: FleetIndex, moves: Mapping[str, str]) -> Iterator[None]:
    """Within the block ``index`` also holds each VM of ``moves`` on its destination (a stand-in of the same tenant,
    profile and size); afterwards the stand-ins are gone."""
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


def _image_reasons(decision: PlacementDecision) -> list[str]:
    """The image rules that refuse every host, spelled out: they read the VM alone, so a summary counting the hosts
    would hide the image and the minimum at fault."""
    first = next(iter(decision.rejections), None)
    if first is None:
        return []
    return [r.message for r in decision.rejections[first] if r.rule == IMAGE_RULE]


def _joint_conflicts(policy_set: PolicySet, index: FleetIndex, vms: list[VMFacts]) -> list[PolicyError]:
    """Policies that each leave some host but together leave none for a VM of the fleet they all select."""
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


def _vm_facts(vm: VM, host: str | None, image: ImageRecord | None) -> VMFacts:
    """``image``: the registry's record of the VM's image (None: the registry does not know it)."""
    return VMFacts(
        id=vm.id,
        name=vm.name,
        tenant=vm.tenant,
        profile=dict(vm.profile),
        memory_mb=vm.memory_mb,
        host=host,
        image=vm.image,
        **_image_facts(image),
    )


def _image_facts(image: ImageRecord | None) -> dict[str, Any]:
    """The image fields of :class:`VMFacts` for a VM booting ``image`` (None: not in the registry)."""
    if image is None:
        return {"image_os": None, "image_version": None, "image_revoked": False}
    return {"image_os": image.os, "image_version": image.version, "image_revoked": image.revoked}


def _revoked_finding(vm_id: str, vm_name: str, host: str, image: ImageRecord) -> Finding:
    reason = image.revoked_reason or "no reason given"
    message = f"{vm_name} runs from image {image.name}, revoked by {image.revoked_by}: {reason}"
    return Finding(vm_id=vm_id, policy=IMAGE_REGISTRY, rule=IMAGE_REVOKED, host=host, message=message)
