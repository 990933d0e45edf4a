"""Principals, operators' access policies and two-person approvals in the CMDB, on SQLite and PostgreSQL: one name
per principal, disabling revokes every token, an approval is decided once and never by its requester, a single-use
approval is used once (also when two callers race), and nothing is decided or used after it expired."""

from __future__ import annotations

import datetime as dt
from concurrent.futures import ThreadPoolExecutor

import pytest
from alembic import command

from ferryman.cmdb.access import AccessPolicyRecord, ApprovalRecord, PrincipalRecord
from ferryman.cmdb.engine import alembic_config
from ferryman.cmdb.sql import SqlRepository
from ferryman.core.errors import Conflict, NotFound

T0 = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)


def request(requester: str = "alice", minutes: int = 60) -> ApprovalRecord:
    return ApprovalRecord(
        id=0,
        action="evidence:export",
        resource="Incident::7",
        fingerprint="f" * 64,
        reason="export incident 7",
        requested_by=requester,
        approver_role=None,
        single_use=True,
        state="pending",
        requested_at=T0,
        expires_at=T0 + dt.timedelta(minutes=minutes),
    )


def test_a_principal_has_one_name_and_disabling_it_revokes_every_token(repo: SqlRepository) -> None:
    alice = repo.add_principal(PrincipalRecord("alice", "tenant-admin", "acme", T0, "token:admin"))
    with pytest.raises(Conflict):
        repo.add_principal(PrincipalRecord("alice", "auditor", None, T0, "token:admin"))
    for n in range(2):
        repo.add_api_token(f"tok{n}", "alice", "tenant-admin", "hash", T0)
    repo.add_api_token("other", "bob", "auditor", "hash", T0)
    assert repo.get_principal("alice") == alice and repo.active_principals("tenant-admin") == ["alice"]
    disabled = repo.disable_principal("alice", T0 + dt.timedelta(minutes=1), "token:admin")
    assert not disabled.active and disabled.disabled_by == "token:admin"
    again = repo.disable_principal("alice", T0 + dt.timedelta(minutes=5), "token:eve")
    assert again.disabled_at == disabled.disabled_at and again.disabled_by == "token:admin"  # the first time stays
    revoked = {t.id: t.revoked_at for t in repo.list_api_tokens()}
    assert revoked["tok0"] and revoked["tok1"] and revoked["other"] is None
    assert repo.active_principals("tenant-admin") == []
    with pytest.raises(NotFound):
        repo.get_principal("nobody")


def test_access_policies_are_replaced_by_name_and_removed(repo: SqlRepository) -> None:
    repo.put_access_policy(AccessPolicyRecord("p", "forbid(principal, action, resource);", T0, "token:admin"))
    repo.put_access_policy(AccessPolicyRecord("p", "permit(principal, action, resource);", T0, "token:sec"))
    assert [(p.name, p.text, p.created_by) for p in repo.list_access_policies()] == [
        ("p", "permit(principal, action, resource);", "token:sec")
    ]
    repo.delete_access_policy("p")
    with pytest.raises(NotFound):
        repo.delete_access_policy("p")


def test_an_approval_is_decided_once_never_by_its_requester_and_used_once(repo: SqlRepository) -> None:
    approval = repo.add_approval(request())
    assert approval.id > 0 and repo.get_approval(approval.id).state == "pending"
    assert not repo.decide_approval(approval.id, "approved", "alice", T0)  # the requester
    assert not repo.use_approval(approval.id, T0)  # not approved yet
    assert repo.decide_approval(approval.id, "approved", "bob", T0)
    assert not repo.decide_approval(approval.id, "denied", "carol", T0)  # decided already
    with ThreadPoolExecutor(4) as pool:
        used = list(pool.map(lambda _: repo.use_approval(approval.id, T0 + dt.timedelta(minutes=1)), range(8)))
    assert used.count(True) == 1
    final = repo.get_approval(approval.id)
    assert (final.state, final.decided_by) == ("used", "bob") and final.used_at is not None
    assert [a.id for a in repo.list_approvals(state="used")] == [approval.id]


def test_a_used_approval_is_returned_only_by_the_use_that_spent_it(repo: SqlRepository) -> None:
    approval = repo.add_approval(request())
    assert repo.decide_approval(approval.id, "approved", "bob", T0)
    first = T0 + dt.timedelta(minutes=1)
    assert not repo.return_approval(approval.id, first)  # not used yet: nothing to give back
    assert repo.use_approval(approval.id, first)
    assert not repo.return_approval(approval.id, first + dt.timedelta(seconds=1))  # another use's time
    assert repo.return_approval(approval.id, first)
    assert not repo.return_approval(approval.id, first)  # once
    back = repo.get_approval(approval.id)
    assert (back.state, back.used_at, back.decided_by) == ("approved", None, "bob")
    assert repo.use_approval(approval.id, first + dt.timedelta(minutes=1))


def test_nothing_is_decided_or_used_after_it_expired(repo: SqlRepository) -> None:
    late = repo.add_approval(request(minutes=5))
    assert not repo.decide_approval(late.id, "approved", "bob", T0 + dt.timedelta(minutes=5))
    approved = repo.add_approval(request(minutes=5))
    assert repo.decide_approval(approved.id, "approved", "bob", T0)
    assert not repo.use_approval(approved.id, T0 + dt.timedelta(minutes=6))


def test_revision_0011_makes_every_existing_token_a_principal(repo: SqlRepository) -> None:
    """A CMDB from before access control: its admin token's principal appears, with the fleet-admin role."""
    config = alembic_config()
    with repo.engine.begin() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, "0010")
    repo.add_api_token("old", "admin", "admin", "hash", T0)
    repo.add_api_token("old2", "ops", "admin", "hash", T0)
    with repo.engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "head")
    assert [(p.name, p.role, p.tenant) for p in repo.list_principals()] == [
        ("admin", "fleet-admin", None),
        ("ops", "fleet-admin", None),
    ]
    assert {t.role for t in repo.list_api_tokens()} == {"fleet-admin"}
