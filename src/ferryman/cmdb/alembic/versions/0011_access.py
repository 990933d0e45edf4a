"""Who may do what: principals (one role, at most one tenant), operators' Cedar policies, and two-person approvals.

Every API token so far belonged to a principal of its own name: each becomes a principal with the token's role, the
old all-powerful ``admin`` role being the ``fleet-admin`` role of the built-in Cedar roles.

Written by hand to match :mod:`ferryman.cmdb.schema` as of this revision; later revisions change the schema, this one
never does. Types are spelled out here rather than imported, so the revision keeps meaning what it meant.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06 16:00:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | Sequence[str] | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NAME = 63


def _time() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    principals = op.create_table(
        "principals",
        sa.Column("name", sa.String(NAME), nullable=False),
        sa.Column("role", sa.String(64), nullable=False),
        sa.Column("tenant", sa.String(NAME), nullable=True),
        sa.Column("created_at", _time(), nullable=False),
        sa.Column("created_by", sa.String(255), nullable=False),
        sa.Column("disabled_at", _time(), nullable=True),
        sa.Column("disabled_by", sa.String(255), nullable=True),
        sa.PrimaryKeyConstraint("name", name="pk_principals"),
    )
    op.create_table(
        "access_policies",
        sa.Column("name", sa.String(NAME), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("created_at", _time(), nullable=False),
        sa.Column("created_by", sa.String(255), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_access_policies"),
    )
    op.create_table(
        "approvals",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("resource", sa.String(255), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("requested_by", sa.String(NAME), nullable=False),
        sa.Column("approver_role", sa.String(64), nullable=True),
        sa.Column("single_use", sa.Boolean(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("requested_at", _time(), nullable=False),
        sa.Column("expires_at", _time(), nullable=False),
        sa.Column("decided_by", sa.String(NAME), nullable=True),
        sa.Column("decided_at", _time(), nullable=True),
        sa.Column("used_at", _time(), nullable=True),
        sa.CheckConstraint("state IN ('pending', 'approved', 'denied', 'used')", name="ck_approvals_state_kind"),
        sa.PrimaryKeyConstraint("id", name="pk_approvals"),
    )
    op.create_index("ix_approvals_state", "approvals", ["state"])
    tokens = sa.table(
        "api_tokens",
        sa.column("name", sa.String()),
        sa.column("role", sa.String()),
        sa.column("created_at", _time()),
    )
    conn = op.get_bind()
    conn.execute(sa.update(tokens).where(tokens.c.role == "admin").values(role="fleet-admin"))
    owners = conn.execute(
        sa.select(tokens.c.name, sa.func.min(tokens.c.role), sa.func.min(tokens.c.created_at)).group_by(tokens.c.name)
    ).all()
    for name, role, created_at in owners:
        conn.execute(sa.insert(principals).values(name=name, role=role, created_at=created_at, created_by="system"))


def downgrade() -> None:
    op.drop_index("ix_approvals_state", table_name="approvals")
    op.drop_table("approvals")
    op.drop_table("access_policies")
    op.drop_table("principals")
