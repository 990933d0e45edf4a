"""What the CMDB keeps of access control: principals, operators' Cedar policies and two-person approvals.

A principal's tokens are API tokens named after it (:class:`~ferryman.cmdb.repository.ApiToken`); only hashes of their
secrets are stored. An approval moves ``pending`` → ``approved`` | ``denied`` by one guarded update, and an approved
single-use approval → ``used`` by another, so two deciders or two uses cannot both win.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class PrincipalRecord:
    name: str
    role: str
    tenant: str | None
    created_at: dt.datetime
    created_by: str
    disabled_at: dt.datetime | None = None
    disabled_by: str | None = None

    @property
    def active(self) -> bool:
        return self.disabled_at is None


@dataclass(frozen=True)
class AccessPolicyRecord:
    name: str
    text: str
    created_at: dt.datetime
    created_by: str


@dataclass(frozen=True)
class ApprovalRecord:
    id: int
    action: str
    resource: str
    fingerprint: str
    reason: str
    requested_by: str
    approver_role: str | None
    single_use: bool
    state: str  # pending | approved | denied | used
    requested_at: dt.datetime
    expires_at: dt.datetime
    decided_by: str | None = None
    decided_at: dt.datetime | None = None
    used_at: dt.datetime | None = None


class AccessRepository(Protocol):
    def add_principal(self, principal: PrincipalRecord) -> PrincipalRecord:
        """Store a new principal; Conflict if the name is taken."""
        ...

    def get_principal(self, name: str) -> PrincipalRecord: ...  # NotFound
    def list_principals(self) -> list[PrincipalRecord]: ...

    def disable_principal(
        self, name: str, at: dt.datetime, by: str, *, keep_one_of: str | None = None
    ) -> PrincipalRecord:
        """Disable the principal and revoke its tokens in one transaction (again: keeps the first time). With
        ``keep_one_of``, Conflict instead if that would leave no active principal of that role."""
        ...

    def active_principals(self, role: str) -> list[str]: ...
    def revoke_tokens_of(self, name: str, at: dt.datetime) -> int: ...
    def put_access_policy(self, policy: AccessPolicyRecord) -> None: ...  # insert or replace
    def delete_access_policy(self, name: str) -> None: ...  # NotFound
    def list_access_policies(self) -> list[AccessPolicyRecord]: ...
    def add_approval(self, approval: ApprovalRecord) -> ApprovalRecord: ...  # the id is the database's
    def get_approval(self, approval_id: int) -> ApprovalRecord: ...  # NotFound
    def list_approvals(self, *, state: str | None = None, limit: int = 500) -> list[ApprovalRecord]: ...

    def decide_approval(self, approval_id: int, state: str, by: str, at: dt.datetime) -> bool:
        """``pending`` → ``state`` if unexpired at ``at`` and ``by`` is not its requester; False if none matched."""
        ...

    def use_approval(self, approval_id: int, at: dt.datetime) -> bool:
        """``approved`` → ``used`` if unexpired at ``at``; False if none matched."""
        ...

    def return_approval(self, approval_id: int, used_at: dt.datetime) -> bool:
        """``used`` at ``used_at`` → ``approved`` again (the request it was used for failed); False if none matched."""
        ...
