"""Incidents: the incident record (subject, severity, alerts counted, closure), its timeline of actions, the sealed
evidence captured for it (hashes, sizes, the wrapped key) and the signed manifests of its captures.

Written by hand to match :mod:`ferryman.cmdb.schema` as of this revision; later revisions change the schema, this one
never does. Types are spelled out here rather than imported, so the revision keeps meaning what it meant.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06 13:00:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NAME = 63
DIGEST = 71


def _time() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def _json() -> Any:
    return sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "incidents",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("severity", sa.String(16), nullable=False),
        sa.Column("summary", sa.Text(), nullable=False),
        sa.Column("vm_id", sa.String(64), nullable=True),
        sa.Column("host", sa.String(NAME), nullable=True),
        sa.Column("tenant", sa.String(NAME), nullable=True),
        sa.Column("source", sa.String(32), nullable=False),
        sa.Column("dedup_key", sa.String(255), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("opened_at", _time(), nullable=False),
        sa.Column("opened_by", sa.String(255), nullable=False),
        sa.Column("alerts", sa.Integer(), nullable=False),
        sa.Column("last_alert_at", _time(), nullable=True),
        sa.Column("closed_at", _time(), nullable=True),
        sa.Column("closed_by", sa.String(255), nullable=True),
        sa.Column("resolution", sa.Text(), nullable=True),
        sa.CheckConstraint("state IN ('open', 'closed')", name="ck_incidents_state_kind"),
        sa.CheckConstraint("vm_id IS NOT NULL OR host IS NOT NULL", name="ck_incidents_has_subject"),
        sa.PrimaryKeyConstraint("id", name="pk_incidents"),
    )
    op.create_index("ix_incidents_vm_id", "incidents", ["vm_id"])
    where = "state = 'open' AND dedup_key IS NOT NULL"
    op.create_index(
        "uq_incidents_open_dedup",
        "incidents",
        ["dedup_key"],
        unique=True,
        sqlite_where=sa.text(where),
        postgresql_where=sa.text(where),
    )
    op.create_table(
        "incident_actions",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("incident_id", sa.Integer(), nullable=False),
        sa.Column("at", _time(), nullable=False),
        sa.Column("principal", sa.String(255), nullable=False),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("data", _json(), nullable=False),
        sa.ForeignKeyConstraint(["incident_id"], ["incidents.id"], name="fk_incident_actions_incident_id_incidents"),
        sa.PrimaryKeyConstraint("id", name="pk_incident_actions"),
    )
    op.create_index("ix_incident_actions_incident_id", "incident_actions", ["incident_id"])
    op.create_table(
        "evidence",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("incident_id", sa.Integer(), nullable=False),
        sa.Column("capture", sa.String(64), nullable=False),
        sa.Column("artefact", sa.String(64), nullable=False),
        sa.Column("vm_id", sa.String(64), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("host", sa.String(NAME), nullable=False),
        sa.Column("started_at", _time(), nullable=False),
        sa.Column("finished_at", _time(), nullable=False),
        sa.Column("plaintext_sha256", sa.String(DIGEST), nullable=False),
        sa.Column("plaintext_bytes", sa.BigInteger(), nullable=False),
        sa.Column("sealed_sha256", sa.String(DIGEST), nullable=False),
        sa.Column("sealed_bytes", sa.BigInteger(), nullable=False),
        sa.Column("wrapped_key", sa.Text(), nullable=False),
        sa.Column("collector", sa.String(255), nullable=False),
        sa.ForeignKeyConstraint(["incident_id"], ["incidents.id"], name="fk_evidence_incident_id_incidents"),
        sa.PrimaryKeyConstraint("id", name="pk_evidence"),
        sa.UniqueConstraint("capture", "artefact", name="uq_evidence_capture_artefact"),
    )
    op.create_index("ix_evidence_incident_id", "evidence", ["incident_id"])
    op.create_table(
        "manifests",
        sa.Column("capture", sa.String(64), nullable=False),
        sa.Column("incident_id", sa.Integer(), nullable=False),
        sa.Column("created_at", _time(), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("signature", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(["incident_id"], ["incidents.id"], name="fk_manifests_incident_id_incidents"),
        sa.PrimaryKeyConstraint("capture", name="pk_manifests"),
    )


def downgrade() -> None:
    op.drop_table("manifests")
    op.drop_table("evidence")
    op.drop_table("incident_actions")
    op.drop_index("uq_incidents_open_dedup", table_name="incidents")
    op.drop_index("ix_incidents_vm_id", table_name="incidents")
    op.drop_table("incidents")
