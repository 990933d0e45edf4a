"""REST routes of access control: principals and their tokens, the built-in roles, operators' Cedar policies and the
approvals of the two-person rule. Who may call each is in :data:`ferryman.controller.access.RULES`, like every route.

A new principal's token is in the response once and never again (only its hash is stored).
"""

import dataclasses
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, Field

from ferryman.controller.access import AccessControl
from ferryman.core import errors
from ferryman.security.authz import ACTIONS, ROLES, TENANT_ROLES


class PrincipalIn(BaseModel):
    name: str = Field(min_length=1, max_length=63)
    role: str = Field(min_length=1, max_length=64)
    tenant: str | None = Field(default=None, max_length=63)


class AccessPolicyIn(BaseModel):
    text: str = Field(min_length=1, max_length=65536)


def _approval(record: Any) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(record).items() if k != "fingerprint"}


def access_routes(app: FastAPI, access: AccessControl, Person: Any) -> None:
    @app.get("/api/v1/principals")
    def list_principals(_: Person) -> list[dict[str, Any]]:
        return [access.principal_view(p) for p in access.repo.list_principals()]

    @app.post("/api/v1/principals", status_code=201)
    def create_principal(body: PrincipalIn, who: Person) -> dict[str, Any]:
        record, token = access.create_principal(body.name, body.role, body.tenant, who)
        return {**access.principal_view(record), "token": token}

    @app.get("/api/v1/principals/{name}")
    def show_principal(name: str, _: Person) -> dict[str, Any]:
        return access.principal_view(access.repo.get_principal(name))

    @app.post("/api/v1/principals/{name}/disable")
    def disable_principal(name: str, who: Person) -> dict[str, Any]:
        return access.principal_view(access.disable_principal(name, who))

    @app.post("/api/v1/principals/{name}/tokens", status_code=201)
    def rotate_token(name: str, who: Person) -> dict[str, Any]:
        token = access.rotate_token(name, who)
        return {**access.principal_view(access.repo.get_principal(name)), "token": token}

    @app.get("/api/v1/roles")
    def list_roles(_: Person) -> list[dict[str, Any]]:
        return [
            {"name": name, "description": what, "tenant_scoped": name in TENANT_ROLES}
            for name, (what, _text) in ROLES.items()
        ]

    @app.get("/api/v1/roles/{name}")
    def show_role(name: str, _: Person) -> dict[str, Any]:
        if name not in ROLES:
            raise errors.NotFound(f"role {name!r} not found (roles: {', '.join(ROLES)})")
        what, text = ROLES[name]
        return {
            "name": name,
            "description": what,
            "tenant_scoped": name in TENANT_ROLES,
            "cedar": text,
            "actions": {a.name: a.description for a in ACTIONS.values()},
        }

    @app.get("/api/v1/access-policies")
    def list_access_policies(_: Person) -> list[dict[str, Any]]:
        return [dataclasses.asdict(p) for p in access.repo.list_access_policies()]

    @app.put("/api/v1/access-policies/{name}")
    def put_access_policy(name: str, body: AccessPolicyIn, who: Person) -> dict[str, Any]:
        access.put_policy(name, body.text, who)
        return {"name": name, "applied": True}

    @app.delete("/api/v1/access-policies/{name}")
    def delete_access_policy(name: str, who: Person) -> dict[str, Any]:
        access.delete_policy(name, who)
        return {"name": name, "deleted": True}

    @app.get("/api/v1/approvals")
    def list_approvals(_: Person, state: str | None = None) -> list[dict[str, Any]]:
        if state is not None and state not in {"pending", "approved", "denied", "used"}:
            raise errors.InvalidInput(f"bad state {state!r} (use pending, approved, denied, used)")
        return [_approval(a) for a in access.repo.list_approvals(state=state)]

    @app.post("/api/v1/approvals/{approval_id}/approve")
    def approve(approval_id: int, who: Person) -> dict[str, Any]:
        return _approval(access.decide_approval(who, approval_id, True))

    @app.post("/api/v1/approvals/{approval_id}/deny")
    def deny(approval_id: int, who: Person) -> dict[str, Any]:
        return _approval(access.decide_approval(who, approval_id, False))
