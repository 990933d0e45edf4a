"""Placement policies (versioned sets of policy files) and compliance violations.

Written by hand to match :mod:`ferryman.cmdb.schema` as of this revision; later revisions change the schema, this one
never does. Types are spelled out here rather than imported, so the revision keeps meaning what it meant.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 00:00:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NAME = 63


def _time() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def _json() -> sa.types.TypeEngine[Any]:
    return sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "policy_versions",
        sa.Column("version", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("applied_at", _time(), nullable=False),
        sa.Column("principal", sa.String(255), nullable=False),
        sa.Column("documents", _json(), nullable=False),
        sa.PrimaryKeyConstraint("version", name="pk_policy_versions"),
        sa.CheckConstraint("version >= 1", name=op.f("ck_policy_versions_version_positive")),
    )
    op.create_table(
        "violations",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("vm_id", sa.String(64), nullable=False),
        sa.Column("policy", sa.String(NAME), nullable=False),
        sa.Column("rule", sa.String(64), nullable=False),
        sa.Column("host", sa.String(NAME), nullable=True),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("first_seen", _time(), nullable=False),
        sa.Column("last_seen", _time(), nullable=False),
        sa.Column("resolved_at", _time(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_violations"),
        sa.ForeignKeyConstraint(["vm_id"], ["vms.id"], name="fk_violations_vm_id_vms"),
    )
    op.create_index("ix_violations_vm_id", "violations", ["vm_id"])
    predicate = sa.text("resolved_at IS NULL")
    op.create_index(
        "uq_violations_open_key",
        "violations",
        ["vm_id", "policy", "rule"],
        unique=True,
        sqlite_where=predicate,
        postgresql_where=predicate,
    )


def downgrade() -> None:
    for table in ("violations", "policy_versions"):
        op.drop_table(table)
