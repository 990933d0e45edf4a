"""Incident playbooks: the applied versions of the playbook document, and one run per incident (its planned steps
and the next one to do, written before each step's side effect so a restarted controller resumes it).

Written by hand to match :mod:`ferryman.cmdb.schema` as of this revision; later revisions change the schema, this one
never does. Types are spelled out here rather than imported, so the revision keeps meaning what it meant.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06 14:00:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DIGEST = 71


def _time() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def _json() -> Any:
    return sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "playbook_versions",
        sa.Column("version", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("digest", sa.String(DIGEST), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("applied_at", _time(), nullable=False),
        sa.Column("applied_by", sa.String(255), nullable=False),
        sa.PrimaryKeyConstraint("version", name="pk_playbook_versions"),
    )
    op.create_table(
        "playbook_runs",
        sa.Column("incident_id", sa.Integer(), nullable=False),
        sa.Column("playbook", sa.String(DIGEST), nullable=False),
        sa.Column("steps", _json(), nullable=False),
        sa.Column("next_step", sa.Integer(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("started_at", _time(), nullable=False),
        sa.Column("updated_at", _time(), nullable=False),
        sa.CheckConstraint("state IN ('running', 'done', 'failed')", name="ck_playbook_runs_state_kind"),
        sa.ForeignKeyConstraint(["incident_id"], ["incidents.id"], name="fk_playbook_runs_incident_id_incidents"),
        sa.PrimaryKeyConstraint("incident_id", name="pk_playbook_runs"),
    )


def downgrade() -> None:
    op.drop_table("playbook_runs")
    op.drop_table("playbook_versions")
