"""Policy versions and compliance violations on SQL: :class:`SqlPolicyMixin` implements
:class:`~ferryman.cmdb.policy_store.PolicyRepository` for :class:`~ferryman.cmdb.sql.SqlRepository`, which inherits it;
the transactions come from :class:`~ferryman.cmdb.sql_base.SqlBase`. ``uq_violations_open_key`` keeps one open
violation per (VM, policy, rule)."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

import sqlalchemy as sa

from ferryman.cmdb.policy_store import Finding, PolicyVersion, ViolationRecord
from ferryman.cmdb.schema import policy_versions, violations
from ferryman.cmdb.sql_base import SqlBase, from_row
from ferryman.cmdb.values import as_json, utc


def _version(row: sa.Row[Any]) -> PolicyVersion:
    return PolicyVersion(row.version, row.applied_at, row.principal, dict(row.documents))


def _violation(row: sa.Row[Any]) -> ViolationRecord:
    return from_row(ViolationRecord, row)


class SqlPolicyMixin(SqlBase):
    """:class:`~ferryman.cmdb.policy_store.PolicyRepository` for :class:`~ferryman.cmdb.sql.SqlRepository`."""

    def add_policy_version(self, documents: dict[str, str], principal: str, at: dt.datetime) -> PolicyVersion:
        at = utc(at, "applied_at")
        docs = as_json({str(k): str(v) for k, v in documents.items()}, "policy documents")
        with self._write() as conn:
            last = conn.scalar(sa.select(sa.func.coalesce(sa.func.max(policy_versions.c.version), 0)))
            version = int(last or 0) + 1
            conn.execute(
                sa.insert(policy_versions).values(version=version, applied_at=at, principal=principal, documents=docs)
            )
        return PolicyVersion(version, at, principal, dict(docs))

    def current_policy_version(self) -> PolicyVersion | None:
        with self._read() as conn:
            row = conn.execute(sa.select(policy_versions).order_by(policy_versions.c.version.desc()).limit(1)).first()
        return _version(row) if row is not None else None

    def list_policy_versions(self) -> list[PolicyVersion]:
        with self._read() as conn:
            rows = conn.execute(sa.select(policy_versions).order_by(policy_versions.c.version.desc())).all()
        return [_version(r) for r in rows]

    def sync_violations(
        self, findings: list[Finding], at: dt.datetime, *, scope: set[str] | None = None
    ) -> tuple[list[ViolationRecord], list[ViolationRecord]]:
        at = utc(at, "at")
        found = {f.key: f for f in findings}
        opened: list[ViolationRecord] = []
        resolved: list[ViolationRecord] = []
        with self._write() as conn:
            query = sa.select(violations).where(violations.c.resolved_at.is_(None))
            if scope is not None:
                query = query.where(violations.c.vm_id.in_(sorted(scope)))
            existing = {(r.vm_id, r.policy, r.rule): r for r in conn.execute(query).all()}
            for key, row in existing.items():
                if key in found:
                    f = found[key]
                    conn.execute(
                        sa.update(violations)
                        .where(violations.c.id == row.id)
                        .values(last_seen=at, host=f.host, message=f.message)
                    )
                else:
                    conn.execute(sa.update(violations).where(violations.c.id == row.id).values(resolved_at=at))
                    resolved.append(dataclasses.replace(_violation(row), resolved_at=at))
            for key, f in found.items():
                if key in existing or (scope is not None and f.vm_id not in scope):
                    continue
                record = ViolationRecord(f.vm_id, f.policy, f.rule, f.host, f.message, first_seen=at, last_seen=at)
                values = {k: v for k, v in dataclasses.asdict(record).items() if k != "id"}
                new_id = conn.execute(sa.insert(violations).values(**values)).inserted_primary_key
                opened.append(dataclasses.replace(record, id=int(new_id[0]) if new_id else None))
        return opened, resolved

    def list_violations(self, *, open_only: bool = True, vm_id: str | None = None) -> list[ViolationRecord]:
        query = sa.select(violations).order_by(violations.c.first_seen, violations.c.id)
        if open_only:
            query = query.where(violations.c.resolved_at.is_(None))
        if vm_id is not None:
            query = query.where(violations.c.vm_id == vm_id)
        with self._read() as conn:
            return [_violation(r) for r in conn.execute(query).all()]
