"""Who may do what: Ferryman's roles as Cedar policies, and the authoriser every API route asks.

A principal is a Cedar entity ``Principal::"alice"`` that is a member of one ``Role`` entity and, for a tenant's
principals, carries that ``tenant``. A request names an action (``Action::"vm:read"``) and a resource whose type says
what it is (``Vm``, ``Host``, ``Network``, ...) and which carries its ``tenant`` when it belongs to one; a collection
(a listing, a create) is ``Fleet::"*"``, or ``Tenant::"acme"`` when the request names its tenant. Every read action is
also in the action group ``Action::"read"``.

The built-in roles (:data:`ROLES`) are Cedar text, shown by ``ferryman role show``; operators add policies of their own,
validated against :data:`SCHEMA` first (a policy that does not parse or does not type-check is refused with Cedar's
error). Cedar denies by default and a ``forbid`` wins over every ``permit``, so an operator's ``forbid`` narrows a
built-in role. The decision names the policies that allowed it, for the audit log.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import cedarpy

from ferryman.core import errors

FLEET = "*"
"""The id of the ``Fleet`` resource: the fleet as a whole (listings, creations that name no tenant)."""

RESOURCE_TYPES = (
    "Fleet",
    "Tenant",
    "Site",
    "Host",
    "Vm",
    "Network",
    "Image",
    "Incident",
    "Migration",
    "Policy",
    "Principal",
    "Approval",
)


@dataclass(frozen=True)
class Action:
    name: str
    read: bool
    description: str


ACTIONS: dict[str, Action] = {
    a.name: a
    for a in (
        Action("site:read", True, "list sites"),
        Action("site:write", False, "add sites"),
        Action("host:read", True, "list and show hosts, their neighbours and history"),
        Action("host:write", False, "add hosts, change their properties, issue enrolment tokens"),
        Action("host:revoke", False, "revoke a host's certificates"),
        Action("host:drain", False, "evacuate a host"),
        Action("host:compromise", False, "declare a host compromised (evacuate, revoke, quarantine)"),
        Action("vm:read", True, "list and show VMs, their history and NICs"),
        Action("vm:create", False, "create VMs"),
        Action("vm:operate", False, "start, stop, pause and resume VMs"),
        Action("vm:delete", False, "delete VMs"),
        Action("vm:migrate", False, "migrate VMs"),
        Action("vm:snapshot", False, "list a VM's snapshots"),
        Action("vm:restore", False, "restore a VM from a snapshot"),
        Action("vm:isolate", False, "isolate a VM's network and lift the isolation"),
        Action("vm:remediate", False, "mark a VM remediated after a restore below its baseline"),
        Action("placement:force", False, "place a VM against hard policy rules (break glass)"),
        Action("key:read", True, "see a VM's disk key records (never the keys)"),
        Action("key:destroy", False, "destroy a VM's disk keys by hand"),
        Action("network:read", True, "list and show networks"),
        Action("network:write", False, "create networks"),
        Action("image:read", True, "list, show and fetch images"),
        Action("image:write", False, "import and revoke images, change the trusted signing keys"),
        Action("image:push", False, "distribute an image to a host"),
        Action("migration:read", True, "list and show migrations"),
        Action("migration:cancel", False, "cancel a migration"),
        Action("event:read", True, "read events"),
        Action("alarm:read", True, "read alarms"),
        Action("policy:read", True, "list and show placement policies, validate policy files"),
        Action("policy:write", False, "apply (or preview an apply of) and clear placement policies"),
        Action("compliance:read", True, "read violations and the remediation plan, query a placement"),
        Action("compliance:write", False, "run a compliance check, execute the remediation plan"),
        Action("report:read", True, "read a tenant's co-location report"),
        Action("incident:read", True, "list and show incidents, their impact and playbooks"),
        Action("incident:write", False, "open, close and capture incidents, change the playbook"),
        Action("evidence:read", True, "read and verify evidence manifests"),
        Action("evidence:export", False, "export evidence artefacts (plaintext)"),
        Action("alert:ingest", False, "post alerts from detection tools"),
        Action("capacity:read", True, "read the quarantine capacity"),
        Action("audit:read", True, "verify and export the audit log"),
        Action("audit:sign", False, "sign an audit checkpoint"),
        Action("principal:read", True, "list and show principals, roles and access policies"),
        Action("principal:write", False, "create and disable principals, rotate tokens, change access policies"),
        Action("approval:read", True, "list approval requests"),
        Action("approval:decide", False, "approve or deny another principal's request"),
    )
}

_TENANT_READ = ["vm:read", "key:read", "network:read", "event:read", "report:read"]
_TENANT_WRITE = ["vm:create", "vm:operate", "vm:delete", "vm:snapshot", "vm:restore", "network:write"]
_HOST_OPERATOR = [
    "site:read",
    "site:write",
    "host:read",
    "host:write",
    "host:revoke",
    "host:drain",
    "vm:read",
    "vm:migrate",
    "migration:read",
    "migration:cancel",
    "event:read",
    "alarm:read",
    "image:read",
    "image:push",
    "network:read",
    "policy:read",
    "compliance:read",
    "capacity:read",
]
_SECURITY_OFFICER = [
    "site:read",
    "host:read",
    "host:revoke",
    "host:compromise",
    "vm:read",
    "vm:isolate",
    "vm:remediate",
    "placement:force",
    "key:read",
    "key:destroy",
    "network:read",
    "image:read",
    "image:write",
    "migration:read",
    "event:read",
    "alarm:read",
    "policy:read",
    "policy:write",
    "compliance:read",
    "compliance:write",
    "report:read",
    "incident:read",
    "incident:write",
    "evidence:read",
    "evidence:export",
    "alert:ingest",
    "capacity:read",
    "audit:read",
    "principal:read",
    "approval:read",
    "approval:decide",
]


def _actions(names: Sequence[str]) -> str:
    return ", ".join(f'Action::"{n}"' for n in names)


_OWN_TENANT = "principal has tenant && resource has tenant && resource.tenant == principal.tenant"

ROLES: dict[str, tuple[str, str]] = {
    "fleet-admin": (
        "everything, everywhere",
        'permit (principal in Role::"fleet-admin", action, resource);\n',
    ),
    "host-operator": (
        "hosts, sites, drains and maintenance migrations; no consoles, snapshots, evidence or keys",
        f'permit (\n  principal in Role::"host-operator",\n  action in [{_actions(_HOST_OPERATOR)}],\n  resource\n);\n',
    ),
    "tenant-admin": (
        "the VMs, networks and reports of the principal's own tenant, nothing of any other",
        f'permit (\n  principal in Role::"tenant-admin",\n  action in [{_actions(_TENANT_READ + _TENANT_WRITE)}],\n'
        f"  resource\n) when {{ {_OWN_TENANT} }};\n"
        f'permit (\n  principal in Role::"tenant-admin",\n  action in [{_actions(_TENANT_READ[:4])}],\n'
        "  resource is Fleet\n);\n"
        'permit (principal in Role::"tenant-admin", action == Action::"image:read", resource);\n',
    ),
    "tenant-viewer": (
        "read-only view of the principal's own tenant",
        f'permit (\n  principal in Role::"tenant-viewer",\n  action in [{_actions(_TENANT_READ)}],\n'
        f"  resource\n) when {{ {_OWN_TENANT} }};\n"
        f'permit (\n  principal in Role::"tenant-viewer",\n  action in [{_actions(_TENANT_READ[:4])}],\n'
        "  resource is Fleet\n);\n"
        'permit (principal in Role::"tenant-viewer", action == Action::"image:read", resource);\n',
    ),
    "security-officer": (
        "incidents, evidence, quarantine, isolation, policies, the audit log and approvals",
        f'permit (\n  principal in Role::"security-officer",\n  action in [{_actions(_SECURITY_OFFICER)}],\n'
        "  resource\n);\n",
    ),
    "auditor": (
        "read-only, everything including the audit log; no evidence export",
        'permit (principal in Role::"auditor", action in Action::"read", resource);\n',
    ),
    "alert-source": (
        "a detection tool (Suricata, Falco): posts alerts, nothing else",
        'permit (principal in Role::"alert-source", action == Action::"alert:ingest", resource);\n',
    ),
}

TENANT_ROLES = frozenset({"tenant-admin", "tenant-viewer"})
"""Roles whose principals belong to one tenant (and must name it)."""


def _schema_text() -> str:
    types = ", ".join(t for t in RESOURCE_TYPES if t != "Principal")
    resources = ", ".join(RESOURCE_TYPES)
    lines = [
        "entity Role;",
        "entity Principal in [Role] { tenant?: String };",
        f"entity {types} {{ tenant?: String }};",
        'action "read";',
    ]
    for a in ACTIONS.values():
        group = ' in ["read"]' if a.read else ""
        lines.append(
            f'action "{a.name}"{group} appliesTo {{ principal: [Principal], resource: [{resources}], context: {{}} }};'
        )
    return "\n".join(lines) + "\n"


SCHEMA = _schema_text()


@dataclass(frozen=True)
class Subject:
    """Who asks: a principal's name, its role and (for a tenant's principals) its tenant."""

    name: str
    role: str
    tenant: str | None = None


TENANT_NAMED = frozenset({"Vm", "Network"})
"""Resource types whose names are unique within their tenant only."""


@dataclass(frozen=True)
class Resource:
    """What is asked about: its Cedar type, its id and, when it belongs to one, its tenant."""

    kind: str
    id: str = FLEET
    tenant: str | None = None
    key: str | None = None  # its stable identity where the id is a name that may be reused (a VM's id)

    def __str__(self) -> str:
        return f"{self.kind}::{self.cedar_id}"

    @property
    def cedar_id(self) -> str:
        """Its id in Cedar: a VM's or network's name is its tenant's own, so Cedar knows them as ``tenant/name``
        (``Vm::"acme/web-1"``), one entity per VM or network."""
        if self.kind in TENANT_NAMED and self.tenant and self.id != FLEET:
            return f"{self.tenant}/{self.id}"
        return self.id

    @property
    def identity(self) -> str:
        """What an approval binds: the resource itself, not whatever bears its name later."""
        return f"{self.kind}::{self.key or self.cedar_id}"


@dataclass(frozen=True)
class Decision:
    allowed: bool
    policies: tuple[str, ...]  # the policies that permitted (or forbade) it, by source name
    errors: tuple[str, ...] = ()


@dataclass(frozen=True)
class PolicySource:
    name: str
    text: str


def _uid(kind: str, ident: str) -> dict[str, str]:
    return {"type": kind, "id": ident}


def _count(text: str) -> int:
    return len(json.loads(cedarpy.policies_to_json_str(text))["staticPolicies"])


def check_policy(text: str) -> None:
    """Refuse (:class:`InvalidInput`, with Cedar's error) a policy that does not parse or type-check."""
    if not text.strip():
        raise errors.InvalidInput("an access policy must not be empty")
    try:
        parsed = json.loads(cedarpy.policies_to_json_str(text))
    except ValueError as err:
        raise errors.InvalidInput(f"the policy does not parse: {err}") from None
    if parsed.get("templates"):
        raise errors.InvalidInput("policy templates (?principal, ?resource) are not supported: write static policies")
    result = cedarpy.validate_policies(text, _SCHEMA)
    if not result.validation_passed:
        found = "; ".join(str(e) for e in result.errors) or "invalid"
        raise errors.InvalidInput(f"the policy does not validate against Ferryman's schema: {found}")


_SCHEMA = cedarpy.Schema.from_str(SCHEMA)


class Authoriser:
    """The built-in roles plus the operators' policies, parsed once; :meth:`decide` evaluates one request."""

    def __init__(self, extra: Iterable[PolicySource] = ()) -> None:
        sources = [PolicySource(f"role:{name}", text) for name, (_, text) in ROLES.items()]
        sources += [PolicySource(f"custom:{p.name}", p.text) for p in extra]
        self._owners: list[str] = []
        for source in sources:
            self._owners += [source.name] * _count(source.text)
        self._policies = cedarpy.PolicySet.from_str("\n".join(s.text for s in sources))

    def decide(self, who: Subject, action: str, resource: Resource) -> Decision:
        if action not in ACTIONS:
            raise errors.InvalidInput(f"unknown action {action!r}")
        entities: list[dict[str, object]] = [
            {
                "uid": _uid("Principal", who.name),
                "attrs": {"tenant": who.tenant} if who.tenant else {},
                "parents": [_uid("Role", who.role)],
            },
            {"uid": _uid("Role", who.role), "attrs": {}, "parents": []},
        ]
        ident = resource.cedar_id
        if resource.kind != "Principal" or resource.id != who.name:
            attrs = {"tenant": resource.tenant} if resource.tenant else {}
            entities.append({"uid": _uid(resource.kind, ident), "attrs": attrs, "parents": []})
        request = {  # uids as JSON: any id, however odd its characters, stands for itself
            "principal": _uid("Principal", who.name),
            "action": _uid("Action", action),
            "resource": _uid(resource.kind, ident),
            "context": {},
        }
        result = cedarpy.is_authorized(request, self._policies, entities, _SCHEMA)
        return Decision(
            allowed=result.allowed,
            policies=tuple(sorted({self._owner(r) for r in result.diagnostics.reasons})),
            errors=tuple(str(e) for e in result.diagnostics.errors),
        )

    def _owner(self, reason: str) -> str:
        if reason.startswith("policy") and reason[6:].isdigit() and int(reason[6:]) < len(self._owners):
            return self._owners[int(reason[6:])]
        return reason
