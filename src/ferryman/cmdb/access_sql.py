""":class:`SqlAccessMixin` implements :class:`~ferryman.cmdb.access.AccessRepository` for
:class:`~ferryman.cmdb.sql.SqlRepository`: principals, access policies and approvals, each call one transaction."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

import sqlalchemy as sa

from ferryman.cmdb.access import AccessPolicyRecord, ApprovalRecord, PrincipalRecord
from ferryman.cmdb.schema import access_policies, api_tokens, approvals, principals
from ferryman.cmdb.sql_base import SqlBase, first_or_not_found, from_row, insert_for, new_id
from ferryman.cmdb.values import utc as _utc
from ferryman.core.errors import Conflict, NotFound


def _principal(row: sa.Row[Any]) -> PrincipalRecord:
    return from_row(PrincipalRecord, row)


def _approval(row: sa.Row[Any]) -> ApprovalRecord:
    return from_row(ApprovalRecord, row)


class SqlAccessMixin(SqlBase):
    """:class:`~ferryman.cmdb.access.AccessRepository` for :class:`~ferryman.cmdb.sql.SqlRepository`."""

    def add_principal(self, principal: PrincipalRecord) -> PrincipalRecord:
        with self._write() as conn:
            if conn.scalar(sa.select(principals.c.name).where(principals.c.name == principal.name)) is not None:
                raise Conflict(f"principal {principal.name!r} exists already")
            conn.execute(sa.insert(principals).values(**dataclasses.asdict(principal)))
        return principal

    def get_principal(self, name: str) -> PrincipalRecord:
        with self._read() as conn:
            query = sa.select(principals).where(principals.c.name == name)
            return _principal(first_or_not_found(conn, query, f"principal {name!r}"))

    def list_principals(self) -> list[PrincipalRecord]:
        with self._read() as conn:
            return [_principal(r) for r in conn.execute(sa.select(principals).order_by(principals.c.name))]

    def disable_principal(
        self, name: str, at: dt.datetime, by: str, *, keep_one_of: str | None = None
    ) -> PrincipalRecord:
        at = _utc(at)
        with self._write() as conn:
            query = sa.select(principals).where(principals.c.name == name)
            row = first_or_not_found(conn, query, f"principal {name!r}", lock=True)
            if row.disabled_at is None and keep_one_of is not None and row.role == keep_one_of:
                active = sa.select(principals.c.name).where(
                    principals.c.role == keep_one_of, principals.c.disabled_at.is_(None)
                )
                others = [n for n in conn.scalars(active.with_for_update()) if n != name]
                if not others:
                    raise Conflict(f"{name} is the last active {keep_one_of}: disabling it needs a second person")
            if row.disabled_at is None:
                conn.execute(
                    sa.update(principals).where(principals.c.name == name).values(disabled_at=at, disabled_by=by)
                )
            self._revoke_tokens(conn, name, at)
            return _principal(first_or_not_found(conn, query, f"principal {name!r}"))

    def active_principals(self, role: str) -> list[str]:
        with self._read() as conn:
            query = sa.select(principals.c.name).where(principals.c.role == role, principals.c.disabled_at.is_(None))
            return list(conn.scalars(query.order_by(principals.c.name)))

    def revoke_tokens_of(self, name: str, at: dt.datetime) -> int:
        with self._write() as conn:
            return self._revoke_tokens(conn, name, _utc(at))

    @staticmethod
    def _revoke_tokens(conn: sa.Connection, name: str, at: dt.datetime) -> int:
        live = sa.and_(api_tokens.c.name == name, api_tokens.c.revoked_at.is_(None))
        return conn.execute(sa.update(api_tokens).where(live).values(revoked_at=at)).rowcount

    def put_access_policy(self, policy: AccessPolicyRecord) -> None:
        with self._write() as conn:
            values = dataclasses.asdict(policy)
            stmt = insert_for(conn, access_policies).values(**values)
            conn.execute(stmt.on_conflict_do_update(index_elements=["name"], set_=values))

    def delete_access_policy(self, name: str) -> None:
        with self._write() as conn:
            if conn.execute(sa.delete(access_policies).where(access_policies.c.name == name)).rowcount == 0:
                raise NotFound(f"access policy {name!r} not found")

    def list_access_policies(self) -> list[AccessPolicyRecord]:
        with self._read() as conn:
            rows = conn.execute(sa.select(access_policies).order_by(access_policies.c.name))
            return [from_row(AccessPolicyRecord, r) for r in rows]

    def add_approval(self, approval: ApprovalRecord) -> ApprovalRecord:
        values = {k: v for k, v in dataclasses.asdict(approval).items() if k != "id"}
        with self._write() as conn:
            approval_id = new_id(conn.execute(sa.insert(approvals).values(**values)))
        return dataclasses.replace(approval, id=approval_id)

    def get_approval(self, approval_id: int) -> ApprovalRecord:
        with self._read() as conn:
            query = sa.select(approvals).where(approvals.c.id == approval_id)
            return _approval(first_or_not_found(conn, query, f"approval {approval_id}"))

    def list_approvals(self, *, state: str | None = None, limit: int = 500) -> list[ApprovalRecord]:
        query = sa.select(approvals).order_by(approvals.c.id.desc()).limit(limit)
        if state is not None:
            query = query.where(approvals.c.state == state)
        with self._read() as conn:
            return [_approval(r) for r in conn.execute(query)]

    def decide_approval(self, approval_id: int, state: str, by: str, at: dt.datetime) -> bool:
        at = _utc(at)
        with self._write() as conn:
            done = conn.execute(
                sa.update(approvals)
                .where(
                    approvals.c.id == approval_id,
                    approvals.c.state == "pending",
                    approvals.c.expires_at > at,
                    approvals.c.requested_by != by,
                )
                .values(state=state, decided_by=by, decided_at=at)
            )
        return done.rowcount > 0

    def use_approval(self, approval_id: int, at: dt.datetime) -> bool:
        at = _utc(at)
        with self._write() as conn:
            done = conn.execute(
                sa.update(approvals)
                .where(approvals.c.id == approval_id, approvals.c.state == "approved", approvals.c.expires_at > at)
                .values(state="used", used_at=at)
            )
        return done.rowcount > 0

    def return_approval(self, approval_id: int, used_at: dt.datetime) -> bool:
        used_at = _utc(used_at)
        with self._write() as conn:
            done = conn.execute(
                sa.update(approvals)
                .where(approvals.c.id == approval_id, approvals.c.state == "used", approvals.c.used_at == used_at)
                .values(state="approved", used_at=None)
            )
        return done.rowcount > 0
