"""Access control of the controller's API: who the caller is, whether Cedar lets it do what the route does, and the
two-person rule for the dangerous requests.

Every route of ``/api/v1`` is in :data:`RULES` with the action it performs and where its resource comes from (a path
parameter, a query parameter, a field of the JSON body, or the fleet as a whole); a route missing from the table is
refused, so a new route cannot be open by omission. A tenant's principal that asks about a resource of another tenant
gets the same ``404`` as for one that does not exist, and the denial is audited with what it was. Listings are
filtered to the principal's tenant by the routes themselves.

Dangerous requests (a placement forced against policy, an evidence export, a disk key destroyed by hand; a restore
below the VM's baseline and disabling the last fleet-admin, decided by their routes) wait for a second principal:
the first try records an approval request and fails with :class:`~ferryman.core.errors.ApprovalRequired` naming it;
once another principal approved it, the same request repeated with the approval's id (header
``X-Ferryman-Approval``) goes through. An approval is bound to its requester and to exactly what was asked (a hash
of action, resource and parameters), expires, and is used once (an evidence export's serves every artefact of the
incident until it expires).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog
from pydantic import TypeAdapter, ValidationError

from ferryman.cmdb.access import AccessPolicyRecord, ApprovalRecord, PrincipalRecord
from ferryman.cmdb.repository import Repository
from ferryman.controller.spent import point_of_no_return
from ferryman.core import errors
from ferryman.core.clock import Clock
from ferryman.core.models import Severity, check_name
from ferryman.security.authz import (
    FLEET,
    ROLES,
    TENANT_NAMED,
    TENANT_ROLES,
    Authoriser,
    PolicySource,
    Resource,
    Subject,
    check_policy,
)
from ferryman.security.secrets import make_api_token, secret_matches, split_api_token

log = structlog.get_logger(__name__)
T = TypeVar("T")

APPROVAL_HEADER = "x-ferryman-approval"
NUMBER = re.compile(r"[0-9]{1,18}")  # an id of ours: digits only, within a 64-bit column
DENIALS_AUDITED = 30  # per principal and minute; more are counted in one summary entry
INT_ID = TypeAdapter(int)
APPROVAL_TTL = dt.timedelta(hours=1)
ADMIN_ROLE = "fleet-admin"


@dataclass(frozen=True)
class Principal:
    """The authenticated caller: ``name`` is how the audit log names it (``token:alice``)."""

    id: str
    role: str
    tenant: str | None = None
    approval: int | None = None  # the approval the request presents (X-Ferryman-Approval)
    token_id: str | None = None  # the API token it authenticated with
    # the single-use approvals this request used, with when: returned if the request fails
    spent: list[tuple[int, dt.datetime]] = field(default_factory=list, compare=False, repr=False)

    @property
    def name(self) -> str:
        return f"token:{self.id}"

    @property
    def subject(self) -> Subject:
        return Subject(self.id, self.role, self.tenant)


@dataclass(frozen=True)
class Rule:
    """What a route does: its Cedar action, the type of its resource and where the resource's id comes from
    (``path:<param>``, ``query:<param>``, ``body:<field>``; None for the fleet as a whole). ``force`` names a body
    field that, when true, also needs ``placement:force`` and a second principal; ``approval`` marks a route that
    always needs one (``multi`` when it may serve several requests until it expires)."""

    action: str
    kind: str = "Fleet"
    source: str | None = None
    force: str | None = None
    approval: str | None = None  # None | "once" | "multi"

    @property
    def needs_body(self) -> bool:
        return self.force is not None or (self.source or "").startswith("body:")


def _vm(action: str, param: str = "name", **kw: Any) -> Rule:
    return Rule(action, "Vm", f"path:{param}", **kw)


def _host(action: str) -> Rule:
    return Rule(action, "Host", "path:name")


def _incident(action: str, **kw: Any) -> Rule:
    return Rule(action, "Incident", "path:incident_id", **kw)


RULES: dict[tuple[str, str], Rule] = {
    # sites and hosts
    ("GET", "/api/v1/sites"): Rule("site:read"),
    ("POST", "/api/v1/sites"): Rule("site:write"),
    ("GET", "/api/v1/hosts"): Rule("host:read"),
    ("POST", "/api/v1/hosts"): Rule("host:write"),
    ("GET", "/api/v1/hosts/{name}"): _host("host:read"),
    ("PATCH", "/api/v1/hosts/{name}"): _host("host:write"),
    ("POST", "/api/v1/hosts/{name}/enrol-token"): _host("host:write"),
    ("POST", "/api/v1/hosts/{name}/revoke"): _host("host:revoke"),
    ("GET", "/api/v1/hosts/{name}/neighbours"): _host("host:read"),
    ("GET", "/api/v1/hosts/{name}/history"): _host("host:read"),
    ("POST", "/api/v1/hosts/{name}/drain"): _host("host:drain"),
    ("POST", "/api/v1/hosts/{name}/compromise"): _host("host:compromise"),
    # VMs
    ("GET", "/api/v1/vms"): Rule("vm:read"),
    ("POST", "/api/v1/vms"): Rule("vm:create", "Tenant", "body:tenant", force="force"),
    ("GET", "/api/v1/vms/{name}"): _vm("vm:read"),
    ("DELETE", "/api/v1/vms/{name}"): _vm("vm:delete"),
    ("GET", "/api/v1/vms/{name}/history"): _vm("vm:read"),
    ("GET", "/api/v1/vms/{name}/nics"): _vm("vm:read"),
    ("GET", "/api/v1/vms/{name}/keys"): _vm("key:read"),
    ("POST", "/api/v1/vms/{name}/keys/destroy"): _vm("key:destroy", approval="once"),
    ("POST", "/api/v1/vms/{name}/{action}"): _vm("vm:operate"),
    ("POST", "/api/v1/vms/{name}/migrate"): _vm("vm:migrate", force="force"),
    ("GET", "/api/v1/vms/{name}/snapshots"): _vm("vm:snapshot"),
    ("POST", "/api/v1/vms/{name}/restore"): _vm("vm:restore"),
    ("POST", "/api/v1/vms/{name}/isolate"): _vm("vm:isolate"),
    ("POST", "/api/v1/vms/{name}/unisolate"): _vm("vm:isolate"),
    ("POST", "/api/v1/vms/{name}/baseline"): _vm("vm:remediate"),
    ("POST", "/api/v1/vms/{name}/remediated"): _vm("vm:remediate"),
    # events, migrations
    ("GET", "/api/v1/events"): Rule("event:read"),
    ("GET", "/api/v1/alarms"): Rule("alarm:read"),
    ("GET", "/api/v1/migrations"): Rule("migration:read"),
    ("GET", "/api/v1/migrations/{migration_id}"): Rule("migration:read", "Migration", "path:migration_id"),
    ("POST", "/api/v1/migrations/{migration_id}/cancel"): Rule("migration:cancel", "Migration", "path:migration_id"),
    # images
    ("GET", "/api/v1/blobs/{digest}"): Rule("image:read"),
    ("PUT", "/api/v1/blobs/{digest}"): Rule("image:write"),
    ("GET", "/api/v1/images"): Rule("image:read"),
    ("POST", "/api/v1/images"): Rule("image:write"),
    ("GET", "/api/v1/images/{name}"): Rule("image:read", "Image", "path:name"),
    ("POST", "/api/v1/images/{name}/verify"): Rule("image:read", "Image", "path:name"),
    ("POST", "/api/v1/images/{name}/revoke"): Rule("image:write", "Image", "path:name"),
    ("POST", "/api/v1/images/{name}/push"): Rule("image:push", "Image", "path:name"),
    ("GET", "/api/v1/image-keys"): Rule("image:read"),
    ("POST", "/api/v1/image-keys"): Rule("image:write"),
    ("DELETE", "/api/v1/image-keys/{name}"): Rule("image:write"),
    # networks
    ("GET", "/api/v1/networks"): Rule("network:read"),
    ("POST", "/api/v1/networks"): Rule("network:write", "Tenant", "body:tenant"),
    ("GET", "/api/v1/networks/{name}"): Rule("network:read", "Network", "path:name"),
    # incidents, evidence, playbooks
    ("POST", "/api/v1/alerts/{source}"): Rule("alert:ingest"),
    ("GET", "/api/v1/incidents"): Rule("incident:read"),
    ("POST", "/api/v1/incidents"): Rule("incident:write"),
    ("GET", "/api/v1/incidents/{incident_id}"): _incident("incident:read"),
    ("POST", "/api/v1/incidents/{incident_id}/close"): _incident("incident:write"),
    ("POST", "/api/v1/incidents/{incident_id}/capture"): _incident("incident:write"),
    ("GET", "/api/v1/incidents/{incident_id}/evidence"): _incident("evidence:read"),
    ("GET", "/api/v1/incidents/{incident_id}/evidence/{capture}/{artefact}"): _incident(
        "evidence:export", approval="multi"
    ),
    ("GET", "/api/v1/incidents/{incident_id}/impact"): _incident("incident:read"),
    ("GET", "/api/v1/incidents/{incident_id}/playbook"): _incident("incident:read"),
    ("GET", "/api/v1/playbook"): Rule("incident:read"),
    ("PUT", "/api/v1/playbook"): Rule("incident:write"),
    ("GET", "/api/v1/capacity/quarantine"): Rule("capacity:read"),
    # placement policies and compliance
    ("POST", "/api/v1/policies/validate"): Rule("policy:read"),
    ("POST", "/api/v1/policies/preview"): Rule("policy:read"),
    ("POST", "/api/v1/policies/apply"): Rule("policy:write"),
    ("POST", "/api/v1/policies/clear"): Rule("policy:write"),
    ("GET", "/api/v1/policies"): Rule("policy:read"),
    ("GET", "/api/v1/policies/versions"): Rule("policy:read"),
    ("GET", "/api/v1/policies/{name}"): Rule("policy:read", "Policy", "path:name"),
    ("POST", "/api/v1/place"): Rule("compliance:read", "Tenant", "body:tenant"),
    ("GET", "/api/v1/compliance/violations"): Rule("compliance:read"),
    ("POST", "/api/v1/compliance/check"): Rule("compliance:write"),
    ("GET", "/api/v1/compliance/plan"): Rule("compliance:read"),
    ("POST", "/api/v1/compliance/plan/execute"): Rule("compliance:write"),
    ("GET", "/api/v1/compliance/report"): Rule("report:read", "Tenant", "query:tenant"),
    # the audit log
    ("GET", "/api/v1/audit/verify"): Rule("audit:read"),
    ("GET", "/api/v1/audit/export"): Rule("audit:read"),
    ("POST", "/api/v1/audit/checkpoints"): Rule("audit:sign"),
    # principals, roles, access policies, approvals
    ("GET", "/api/v1/principals"): Rule("principal:read"),
    ("POST", "/api/v1/principals"): Rule("principal:write"),
    ("GET", "/api/v1/principals/{name}"): Rule("principal:read", "Principal", "path:name"),
    ("POST", "/api/v1/principals/{name}/disable"): Rule("principal:write", "Principal", "path:name"),
    ("POST", "/api/v1/principals/{name}/tokens"): Rule("principal:write", "Principal", "path:name"),
    ("GET", "/api/v1/roles"): Rule("principal:read"),
    ("GET", "/api/v1/roles/{name}"): Rule("principal:read"),
    ("GET", "/api/v1/access-policies"): Rule("principal:read"),
    ("PUT", "/api/v1/access-policies/{name}"): Rule("principal:write"),
    ("DELETE", "/api/v1/access-policies/{name}"): Rule("principal:write"),
    ("GET", "/api/v1/approvals"): Rule("approval:read"),
    ("POST", "/api/v1/approvals/{approval_id}/approve"): Rule("approval:decide", "Approval", "path:approval_id"),
    ("POST", "/api/v1/approvals/{approval_id}/deny"): Rule("approval:decide", "Approval", "path:approval_id"),
}

TENANT_KINDS = frozenset({"Vm", "Network", "Incident", "Tenant"})
"""Resource types that belong to a tenant: a tenant's principal learns nothing of another tenant's."""


_NOUNS = {"Vm": "VM", "Network": "network", "Incident": "incident", "Tenant": "tenant"}


def not_found(kind: str, ident: str) -> errors.NotFound:
    """The one answer a tenant's principal gets for a resource that is not its tenant's or does not exist (worded as
    the CMDB words a missing one)."""
    what = f"incident {ident}" if kind == "Incident" else f"{_NOUNS.get(kind, kind.lower())} {ident!r}"
    return errors.NotFound(f"{what} not found")


def _waiting(record: ApprovalRecord, approver_role: str | None) -> str:
    by = f"a {approver_role}" if approver_role else "another principal"
    return (
        f"{record.reason} needs a second person: approval {record.id} requested (expires "
        f"{record.expires_at:%Y-%m-%d %H:%M:%S}Z); {by} runs `ferryman approval approve {record.id}`, "
        f"then repeat the command as `ferryman --approval {record.id} ...`"
    )


def _tenant_first(lookup: Callable[..., T], ident: str, tenant: str | None) -> T:
    """``lookup(ident)`` in ``tenant`` first; failing that, fleet-wide (what only another tenant has is then denied,
    and audited, by the caller)."""
    try:
        return lookup(ident, tenant=tenant)
    except errors.NotFound:
        if tenant is None:
            raise
        return lookup(ident)


def fingerprint(action: str, resource: str, params: dict[str, Any]) -> str:
    text = json.dumps({"action": action, "resource": resource, "params": params}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class AccessControl:
    """Authentication, Cedar authorisation and the two-person rule, over the CMDB's principals and approvals."""

    def __init__(
        self, repo: Repository, clock: Clock, audit: Callable[..., Any], *, approval_ttl: dt.timedelta = APPROVAL_TTL
    ) -> None:
        self.repo = repo
        self.clock = clock
        self.audit = audit
        self.approval_ttl = approval_ttl
        self._lock = threading.Lock()
        self._denials: dict[str, tuple[float, int, int]] = {}  # principal -> (minute start, denials, suppressed)
        self._authoriser = self._load()

    def _load(self) -> Authoriser:
        return Authoriser(PolicySource(p.name, p.text) for p in self.repo.list_access_policies())

    def reload(self) -> None:
        with self._lock:
            self._authoriser = self._load()

    # -- who -----------------------------------------------------------------------------------------------------------

    def authenticate(self, header: str, approval: str | None = None) -> Principal:
        if not header.lower().startswith("bearer "):
            raise errors.Unauthenticated("missing API token (Authorization: Bearer ...)")
        token_id, secret = split_api_token(header[7:].strip())
        found = self.repo.find_api_token(token_id)
        if found is None or found[0].revoked_at is not None or not secret_matches(secret, found[1]):
            raise errors.Unauthenticated("invalid API token")
        try:
            principal = self.repo.get_principal(found[0].name)
        except errors.NotFound:
            raise errors.Unauthenticated("invalid API token") from None
        if not principal.active:
            raise errors.Unauthenticated("invalid API token")
        presented = None
        if approval:
            if NUMBER.fullmatch(approval.strip()) is None:
                raise errors.InvalidInput("bad approval id (a number, as `ferryman approval list` shows it)")
            presented = int(approval.strip())
        return Principal(principal.name, principal.role, principal.tenant, presented, token_id)

    # -- may it ------------------------------------------------------------------------------------------------------

    def authorise(
        self, who: Principal, action: str, resource: Resource, *, hidden: bool = False, asked: str | None = None
    ) -> None:
        """Allow or raise: NotFound for a tenant principal's view of another tenant's resource (``hidden``), naming
        it as the request did (``asked``: an id must not come back as the name it has), Forbidden otherwise. Denials
        are audited."""
        with self._lock:
            authoriser = self._authoriser
        decision = authoriser.decide(who.subject, action, resource)
        if decision.allowed:
            return
        why = f"; forbidden by {', '.join(decision.policies)}" if decision.policies else ""
        self.denied(who, f"{who.id} ({who.role}) may not {action} on {resource}{why}", action, resource)
        foreign = who.tenant is not None and resource.kind in TENANT_KINDS and resource.tenant != who.tenant
        if hidden or (foreign and resource.id != FLEET):
            raise not_found(resource.kind, asked or resource.id)
        raise errors.Forbidden(f"{who.id} ({who.role}) may not {action} on {resource}")

    def denied(self, who: Principal, message: str, action: str, resource: Resource | None = None) -> None:
        """Audit a denial: each of a principal's first :data:`DENIALS_AUDITED` in a minute, then one summary entry
        counting the rest (a flood of refused requests must not flood the audit log)."""
        now = time.monotonic()
        with self._lock:
            start, count, suppressed = self._denials.get(who.id, (now, 0, 0))
            if now - start >= 60.0:
                start, count, summary, suppressed = now, 0, suppressed, 0
            else:
                summary = 0
            count += 1
            if count > DENIALS_AUDITED:
                suppressed += 1
            self._denials[who.id] = (start, count, suppressed)
        if summary:
            self.audit(
                "authz.denied_suppressed",
                f"{summary} more denials of {who.id} in the minute before, not audited one by one",
                who.name,
                severity=Severity.WARNING,
                count=summary,
            )
        if count <= DENIALS_AUDITED:
            where = {} if resource is None else {"resource": str(resource), "tenant": resource.tenant}
            self.audit("authz.denied", message, who.name, severity=Severity.WARNING, action=action, **where)

    def admit(self, who: Principal, rule: Rule, params: dict[str, str], query: dict[str, str], body: Any) -> Resource:
        """The route-level check: the rule's action on the resource the request names, then force and approvals.
        Returns the resource as it was decided on (a VM with its id as ``key``)."""
        resource = self.resource(who, rule, params, query, body)
        self.authorise(who, rule.action, resource)
        # anything but an absent or false force is a force (fail closed: the route refuses what is not a boolean)
        if rule.force and isinstance(body, dict) and body.get(rule.force) not in (None, False):
            self.authorise(who, "placement:force", resource)
            self.require_approval(
                who,
                rule.action,
                resource.identity,
                dict(body),
                f"{rule.action} on {resource} against placement policy (--force)",
            )
        if rule.approval:
            self.require_approval(
                who,
                rule.action,
                resource.identity,
                {},
                f"{rule.action} on {resource}",
                single_use=rule.approval == "once",
            )
        return resource

    def resource(
        self, who: Principal, rule: Rule, params: dict[str, str], query: dict[str, str], body: Any
    ) -> Resource:
        if rule.source is None:
            return Resource("Fleet")
        where, _, key = rule.source.partition(":")
        if where == "path":
            ident = params.get(key)
        elif where == "query":
            ident = query.get(key)
        else:
            ident = body.get(key) if isinstance(body, dict) else None
        if not isinstance(ident, str) or not ident:
            return Resource(rule.kind)  # the route's own validation says what is missing
        if rule.kind not in TENANT_KINDS:
            return Resource(rule.kind, ident)
        # a VM or network in the path may be named in a tenant the request names (``?tenant=``, what the CLI sends
        # for ``tenant/name``): looked up there alone; else in the caller's own tenant first
        named = query.get("tenant") if where == "path" and rule.kind in TENANT_NAMED else None
        asked = f"{named}/{ident}" if named else ident
        try:
            if named:
                resource = self._canonical(rule.kind, ident, named, strict=True)
            else:
                resource = self._canonical(rule.kind, ident, who.tenant)
        except (errors.NotFound, errors.InvalidInput):
            if who.tenant is not None or named:
                # the route would look the name up without the tenant, and might find another tenant's
                raise not_found(rule.kind, asked) from None
            return Resource(rule.kind, ident)  # the route says what is missing, in its own words
        if who.tenant is not None and resource.tenant != who.tenant:
            # audited, and a 404 unless a policy allows it
            self.authorise(who, rule.action, resource, hidden=True, asked=asked)
        return resource

    def _canonical(self, kind: str, ident: str, tenant: str | None, *, strict: bool = False) -> Resource:
        """The resource as the route will find it, however the request spelled it (a VM by its id or its name, an
        incident id with a sign or a fraction), named canonically, with its tenant: what Cedar decides on is what
        the route acts on. A VM's or network's name is looked up in the caller's tenant first (names are unique per
        tenant); a tenant's principal naming what only another tenant has reaches the audited denial below.
        ``strict`` looks in ``tenant`` alone."""
        if kind == "Tenant":
            return Resource(kind, ident, ident)
        if kind == "Vm":
            vm = self.repo.get_vm(ident, tenant=tenant) if strict else _tenant_first(self.repo.get_vm, ident, tenant)
            return Resource(kind, vm.name, vm.tenant, key=vm.id)
        if kind == "Network":
            get = self.repo.get_network
            network = get(ident, tenant=tenant) if strict else _tenant_first(get, ident, tenant)
            return Resource(kind, network.name, network.tenant)
        try:
            number = INT_ID.validate_python(ident)
        except ValidationError:
            raise errors.InvalidInput(f"bad incident id {ident!r}") from None
        if not 0 < number < 2**63:
            raise errors.InvalidInput(f"bad incident id {ident!r}")
        incident = self.repo.get_incident(number)
        return Resource(kind, str(incident.id), incident.tenant)

    # -- two-person rule -----------------------------------------------------------------------------------------------

    def require_approval(
        self,
        who: Principal,
        action: str,
        resource: str,
        params: dict[str, Any],
        reason: str,
        *,
        approver_role: str | None = None,
        single_use: bool = True,
    ) -> None:
        """Return if ``who`` presents an approval for exactly this request that a second principal granted (using
        it up when single-use); otherwise record a new approval request and raise ApprovalRequired naming it."""
        digest = fingerprint(action, resource, params)
        now = self.clock.now()
        if who.approval is not None:
            self._present(who, digest, now)
            return
        waiting = next(
            (
                a
                for a in self.repo.list_approvals(state="pending")
                if a.requested_by == who.id and a.fingerprint == digest and a.expires_at > now
            ),
            None,
        )
        if waiting is not None:  # asked again: the same request, not a new one
            raise errors.ApprovalRequired(_waiting(waiting, approver_role))
        record = self.repo.add_approval(
            ApprovalRecord(
                id=0,
                action=action,
                resource=resource,
                fingerprint=digest,
                reason=reason,
                requested_by=who.id,
                approver_role=approver_role,
                single_use=single_use,
                state="pending",
                requested_at=now,
                expires_at=now + self.approval_ttl,
            )
        )
        self.audit(
            "approval.requested",
            f"{who.id} asks for approval {record.id}: {reason}",
            who.name,
            severity=Severity.WARNING,
            approval=record.id,
            action=action,
            resource=resource,
        )
        raise errors.ApprovalRequired(_waiting(record, approver_role))

    def _present(self, who: Principal, digest: str, now: dt.datetime) -> None:
        try:
            record = self.repo.get_approval(who.approval or 0)
        except errors.NotFound:
            raise errors.Forbidden(f"approval {who.approval} does not exist") from None
        problem = None
        if record.requested_by != who.id:
            problem = f"approval {record.id} was requested by another principal"
        elif record.fingerprint != digest:
            problem = f"approval {record.id} is for another request ({record.action} on {record.resource})"
        elif record.state == "pending":
            problem = f"approval {record.id} still waits for a second principal"
        elif record.state == "denied":
            problem = f"approval {record.id} was denied by {record.decided_by}"
        elif record.state == "used":
            problem = f"approval {record.id} has been used already"
        elif record.expires_at <= now:
            problem = f"approval {record.id} expired at {record.expires_at:%Y-%m-%d %H:%M:%S}Z"
        elif not self._still_active(record.decided_by):
            problem = f"approval {record.id} was granted by {record.decided_by}, who is disabled since"
        elif record.single_use and not self.repo.use_approval(record.id, now):
            problem = f"approval {record.id} has been used already"
        elif record.single_use:
            who.spent.append((record.id, now))
        if problem is not None:
            self.audit("approval.refused", problem, who.name, severity=Severity.WARNING, approval=record.id)
            raise errors.Forbidden(problem)
        self.audit(
            "approval.used",
            f"{who.id} uses approval {record.id} ({record.action} on {record.resource}, approved by "
            f"{record.decided_by})",
            who.name,
            severity=Severity.WARNING,
            approval=record.id,
        )

    def return_spent(self, who: Principal, failure: BaseException) -> None:
        """Give back the single-use approvals a request used when the request failed: what was approved did not
        happen, and the requester may repeat it with the same approval while it lasts."""
        why = getattr(failure, "detail", None) or str(failure) or type(failure).__name__
        while who.spent:
            approval, used_at = who.spent.pop()
            try:
                if self.repo.return_approval(approval, used_at):
                    self.audit(
                        "approval.returned",
                        f"approval {approval} of {who.id} is usable again: the request it was used for failed ({why})",
                        who.name,
                        approval=approval,
                    )
            except Exception as err:  # the request's own failure is what its caller must see
                log.error("could not give an approval back", approval=approval, error=str(err))

    def _still_active(self, name: str | None) -> bool:
        try:
            return name is not None and self.repo.get_principal(name).active
        except errors.NotFound:
            return False

    def _newer_than(self, who: Principal, at: dt.datetime) -> bool:
        """Whether ``who`` (its principal or the token it uses) came into being after ``at``: such a principal could
        have been made, or had its token reset, by the requester to approve its own request."""
        if self.repo.get_principal(who.id).created_at >= at:
            return True
        found = self.repo.find_api_token(who.token_id) if who.token_id else None
        return found is None or found[0].created_at >= at

    def decide_approval(self, who: Principal, approval_id: int, approve: bool) -> ApprovalRecord:
        record = self.repo.get_approval(approval_id)
        if record.requested_by == who.id:
            self.audit(
                "approval.refused",
                f"{who.id} tried to decide its own approval request {approval_id}",
                who.name,
                severity=Severity.ALARM,
                approval=approval_id,
            )
            raise errors.Forbidden(
                f"approval {approval_id} was requested by {who.id}: the two-person rule needs a different principal"
            )
        if approve and record.approver_role and who.role != record.approver_role:
            problem = f"approval {approval_id} must be granted by a {record.approver_role}"
            self.denied(who, f"{who.id} ({who.role}): {problem}", "approval:decide")
            raise errors.Forbidden(problem)
        if approve and self._newer_than(who, record.requested_at):
            problem = (
                f"approval {approval_id} is older than {who.id}'s principal or token: a principal created, or given "
                "a new token, after a request cannot approve it"
            )
            self.denied(who, f"{who.id} ({who.role}): {problem}", "approval:decide")
            raise errors.Forbidden(problem)
        if record.state != "pending":
            raise errors.Conflict(f"approval {approval_id} is {record.state}, not pending")
        if record.expires_at <= self.clock.now():
            raise errors.Conflict(f"approval {approval_id} has expired")
        state = "approved" if approve else "denied"
        if not self.repo.decide_approval(approval_id, state, who.id, self.clock.now()):
            raise errors.Conflict(f"approval {approval_id} was decided or expired meanwhile")
        self.audit(
            f"approval.{state}",
            f"{who.id} {state} approval {approval_id} of {record.requested_by}: {record.reason}",
            who.name,
            severity=Severity.WARNING,
            approval=approval_id,
        )
        return self.repo.get_approval(approval_id)

    # -- principals ----------------------------------------------------------------------------------------------------

    def create_principal(self, name: str, role: str, tenant: str | None, by: Principal) -> tuple[PrincipalRecord, str]:
        check_name("principal", name)
        if role not in ROLES:
            raise errors.InvalidInput(f"unknown role {role!r} (use {', '.join(ROLES)})")
        if role in TENANT_ROLES and not tenant:
            raise errors.InvalidInput(f"the role {role} needs --tenant")
        if role not in TENANT_ROLES and tenant:
            raise errors.InvalidInput(f"the role {role} is fleet-wide: it takes no --tenant")
        if tenant:
            check_name("tenant", tenant)
        record = self.repo.add_principal(PrincipalRecord(name, role, tenant, self.clock.now(), by.name))
        token = self._issue(record)
        self.audit(
            "principal.created",
            f"principal {name} ({role}{', tenant ' + tenant if tenant else ''}) created",
            by.name,
            severity=Severity.WARNING,
            role=role,
            tenant=tenant,
        )
        return record, token

    def _issue(self, record: PrincipalRecord) -> str:
        token, token_id, secret_hash = make_api_token()
        self.repo.add_api_token(token_id, record.name, record.role, secret_hash, self.clock.now())
        return token

    def rotate_token(self, name: str, by: Principal) -> str:
        record = self.repo.get_principal(name)
        if not record.active:
            raise errors.Conflict(f"principal {name} is disabled")
        revoked = self.repo.revoke_tokens_of(name, self.clock.now())
        token = self._issue(record)
        self.audit(
            "principal.token_rotated", f"{name}: new token, {revoked} revoked", by.name, severity=Severity.WARNING
        )
        return token

    def disable_principal(self, name: str, by: Principal) -> PrincipalRecord:
        record = self.repo.get_principal(name)
        last = record.active and record.role == ADMIN_ROLE and self.repo.active_principals(ADMIN_ROLE) == [name]
        if last:
            self.require_approval(
                by, "principal:write", f"Principal::{name}", {"disable": name}, "disabling the last fleet-admin"
            )
        # checked again in the disabling transaction: two admins disabling each other at once leave one
        keep = None if last else ADMIN_ROLE
        point_of_no_return()
        disabled = self.repo.disable_principal(name, self.clock.now(), by.name, keep_one_of=keep)
        self.audit(
            "principal.disabled", f"principal {name} disabled, its tokens revoked", by.name, severity=Severity.WARNING
        )
        return disabled

    def principal_view(self, record: PrincipalRecord) -> dict[str, Any]:
        tokens = [t for t in self.repo.list_api_tokens() if t.name == record.name]
        return {
            **dataclasses.asdict(record),
            "active": record.active,
            "tokens": [{"id": t.id, "created_at": t.created_at, "revoked_at": t.revoked_at} for t in tokens],
        }

    # -- operators' policies -------------------------------------------------------------------------------------------

    def put_policy(self, name: str, text: str, by: Principal) -> None:
        check_name("access policy", name)
        check_policy(text)
        others = [PolicySource(p.name, p.text) for p in self.repo.list_access_policies() if p.name != name]
        candidate = Authoriser([*others, PolicySource(name, text)])  # parses with the built-in roles too
        admins = self.repo.active_principals(ADMIN_ROLE)
        if not any(
            candidate.decide(Subject(a, ADMIN_ROLE), "principal:write", Resource("Fleet")).allowed for a in admins
        ):
            raise errors.InvalidInput(
                "this policy would leave no active fleet-admin able to manage principals and access policies"
            )
        self.repo.put_access_policy(AccessPolicyRecord(name, text, self.clock.now(), by.name))
        self.reload()
        self.audit("authz.policy_set", f"access policy {name} set", by.name, severity=Severity.WARNING, text=text)

    def delete_policy(self, name: str, by: Principal) -> None:
        self.repo.delete_access_policy(name)
        self.reload()
        self.audit("authz.policy_deleted", f"access policy {name} deleted", by.name, severity=Severity.WARNING)
