"""``ferryman principal|token|role|approval …``: who may use the API, with which role, and the two-person rule.

A principal's token is printed once, when the principal is created or its token rotated: store it then (the
controller keeps only a hash). A dangerous command answers with an approval id; a second principal approves it with
``ferryman approval approve <id>``, and the first repeats the command as ``ferryman --approval <id> …``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from ferryman.cli.context import Json, api, segment, vm_path
from ferryman.cli.output import emit_json, fields, short_time, table
from ferryman.client import CliError

principal_app = typer.Typer(no_args_is_help=True, help="Principals (people and tools) and their API tokens.")
token_app = typer.Typer(no_args_is_help=True, help="A principal's API token.")
role_app = typer.Typer(no_args_is_help=True, help="The built-in roles (Cedar policies) and operators' own policies.")
role_policy_app = typer.Typer(no_args_is_help=True, help="Operators' own Cedar policies, added to the roles.")
approval_app = typer.Typer(no_args_is_help=True, help="Two-person rule: requests waiting for a second principal.")


def _print_principal(p: dict[str, Any]) -> None:
    live = [t for t in p["tokens"] if t["revoked_at"] is None]
    fields(
        [
            ("name", p["name"]),
            ("role", p["role"]),
            ("tenant", p["tenant"] or "-"),
            ("state", "active" if p["active"] else f"disabled {short_time(p['disabled_at'])} by {p['disabled_by']}"),
            ("created", f"{short_time(p['created_at'])} by {p['created_by']}"),
            ("tokens", f"{len(live)} live, {len(p['tokens']) - len(live)} revoked"),
        ]
    )


def _print_token(out: dict[str, Any]) -> None:
    print(out["token"])
    typer.echo(f"the API token of {out['name']}: shown this once, store it now", err=True)


@principal_app.command("create")
def principal_create(
    name: str,
    role: Annotated[str, typer.Option(help="fleet-admin, host-operator, tenant-admin, tenant-viewer, ...")],
    tenant: Annotated[str | None, typer.Option(help="the tenant of a tenant-admin or tenant-viewer")] = None,
    json_: Json = False,
) -> None:
    """Create a principal and print its API token (once)."""
    out = api().post("/api/v1/principals", {"name": name, "role": role, "tenant": tenant})
    if json_:
        emit_json(out)
    else:
        _print_token(out)


@principal_app.command("list")
def principal_list(json_: Json = False) -> None:
    """Every principal, its role and tenant, and whether it is active."""
    out = api().get("/api/v1/principals")
    if json_:
        emit_json(out)
        return
    rows = [
        [
            p["name"],
            p["role"],
            p["tenant"] or "-",
            "active" if p["active"] else "disabled",
            sum(1 for t in p["tokens"] if t["revoked_at"] is None),
            short_time(p["created_at"]),
        ]
        for p in out
    ]
    table("principals", ["name", "role", "tenant", "state", "tokens", "created"], rows)


@principal_app.command("show")
def principal_show(name: str, json_: Json = False) -> None:
    """One principal: role, tenant, state and its tokens (ids only)."""
    out = api().get(f"/api/v1/principals/{segment(name)}")
    if json_:
        emit_json(out)
    else:
        _print_principal(out)


@principal_app.command("disable")
def principal_disable(name: str, json_: Json = False) -> None:
    """Disable a principal: its tokens stop working at once (the last fleet-admin needs a second person)."""
    out = api().post(f"/api/v1/principals/{segment(name)}/disable")
    if json_:
        emit_json(out)
    else:
        print(f"{name} disabled; its tokens are revoked")


@token_app.command("rotate")
def token_rotate(name: str, json_: Json = False) -> None:
    """Revoke the principal's tokens and print a new one (once)."""
    out = api().post(f"/api/v1/principals/{segment(name)}/tokens")
    if json_:
        emit_json(out)
    else:
        _print_token(out)


@role_app.command("list")
def role_list(json_: Json = False) -> None:
    """The built-in roles."""
    out = api().get("/api/v1/roles")
    if json_:
        emit_json(out)
        return
    rows = [[r["name"], "yes" if r["tenant_scoped"] else "no", r["description"]] for r in out]
    table("roles", ["role", "one tenant", "what it may do"], rows)


@role_app.command("show")
def role_show(name: str, json_: Json = False) -> None:
    """A role and the Cedar policy behind it."""
    out = api().get(f"/api/v1/roles/{segment(name)}")
    if json_:
        emit_json(out)
        return
    print(f"{out['name']}: {out['description']}")
    print()
    print(out["cedar"].rstrip())


@role_policy_app.command("set")
def role_policy_set(
    name: str, file: Annotated[Path, typer.Argument(help="a Cedar policy file", exists=False)], json_: Json = False
) -> None:
    """Add or replace an operator's Cedar policy (refused with Cedar's error if it does not validate)."""
    try:
        text = file.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise CliError(f"cannot read {file}: {getattr(err, 'strerror', None) or err}") from None
    out = api().request("PUT", f"/api/v1/access-policies/{segment(name)}", json={"text": text})
    if json_:
        emit_json(out)
    else:
        print(f"access policy {name} in force")


@role_policy_app.command("list")
def role_policy_list(json_: Json = False) -> None:
    """Operators' own Cedar policies."""
    out = api().get("/api/v1/access-policies")
    if json_:
        emit_json(out)
        return
    for p in out:
        print(f"-- {p['name']} (set {short_time(p['created_at'])} by {p['created_by']})")
        print(p["text"].rstrip())
    if not out:
        print("no access policies of the operators'; the built-in roles only")


@role_policy_app.command("remove")
def role_policy_remove(name: str) -> None:
    """Remove an operator's Cedar policy."""
    api().delete(f"/api/v1/access-policies/{segment(name)}")
    print(f"access policy {name} removed")


@approval_app.command("list")
def approval_list(
    state: Annotated[str | None, typer.Option(help="pending, approved, denied or used")] = "pending",
    everything: Annotated[bool, typer.Option("--all", help="every state")] = False,
    json_: Json = False,
) -> None:
    """Approval requests (by default the pending ones)."""
    out = api().get("/api/v1/approvals", state=None if everything else state)
    if json_:
        emit_json(out)
        return
    rows = [
        [
            a["id"],
            a["state"],
            a["requested_by"],
            a["reason"],
            a["approver_role"] or "any",
            short_time(a["expires_at"]),
            a["decided_by"] or "-",
        ]
        for a in out
    ]
    table("approvals", ["id", "state", "requested by", "request", "approver", "expires", "decided by"], rows)


def _decide(approval_id: int, verb: str, json_: bool) -> None:
    out = api().post(f"/api/v1/approvals/{approval_id}/{verb}")
    if json_:
        emit_json(out)
    else:
        print(f"approval {out['id']} {out['state']}: {out['reason']} (requested by {out['requested_by']})")


@approval_app.command("approve")
def approval_approve(approval_id: int, json_: Json = False) -> None:
    """Approve another principal's request (never your own)."""
    _decide(approval_id, "approve", json_)


@approval_app.command("deny")
def approval_deny(approval_id: int, json_: Json = False) -> None:
    """Deny another principal's request."""
    _decide(approval_id, "deny", json_)


Reason = Annotated[str, typer.Option("--reason", help="what changed, for the audit log")]


def vm_baseline(name: str, reason: Reason, json_: Json = False) -> None:
    """Record a new security baseline (guest patched, credentials rotated): older snapshots need approval."""
    out = api().post(vm_path(name, "/baseline"), {"reason": reason})
    if json_:
        emit_json(out)
    else:
        print(
            f"{name}: new security baseline at {short_time(out['baseline'])}; older snapshots restore only if approved"
        )


def vm_remediated(name: str, reason: Reason, json_: Json = False) -> None:
    """Mark a VM remediated after a restore below its baseline (it leaves the compliance violations)."""
    out = api().post(vm_path(name, "/remediated"), {"reason": reason})
    if json_:
        emit_json(out)
    else:
        print(f"{name} remediated")


def vm_destroy_keys(
    name: str,
    reason: Reason,
    yes: Annotated[bool, typer.Option("--yes", help="do not ask for confirmation")] = False,
    json_: Json = False,
) -> None:
    """Destroy a stopped VM's disk keys by hand: its disks become unreadable for good (two-person rule)."""
    if not yes:
        if not sys.stdin.isatty():
            raise CliError("destroying the disk keys makes the VM's disks unreadable for good: pass --yes to confirm")
        typer.confirm(f"Destroy every disk key of {name}? Its disks become unreadable for good.", abort=True)
    out = api().post(vm_path(name, "/keys/destroy"), {"reason": reason})
    if json_:
        emit_json(out)
    else:
        print(f"{len(out['destroyed'])} disk key(s) of {name} destroyed")
