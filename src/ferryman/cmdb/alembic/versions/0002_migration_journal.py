"""The migration journal: migrations, their append-only steps, and scrub receipts.

Written by hand to match :mod:`ferryman.cmdb.schema` as of this revision; later revisions change the schema, this one
never does. Types are spelled out here rather than imported, so the revision keeps meaning what it meant.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30 00:00:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NAME = 63


def _time() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def _json() -> sa.types.TypeEngine[Any]:
    return sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def _partial(predicate: str) -> dict[str, Any]:
    return {"sqlite_where": sa.text(predicate), "postgresql_where": sa.text(predicate)}


def upgrade() -> None:
    op.create_table(
        "migrations",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("vm_id", sa.String(64), nullable=False),
        sa.Column("source", sa.String(NAME), nullable=False),
        sa.Column("destination", sa.String(NAME), nullable=False),
        sa.Column("shared_storage", sa.Boolean(), nullable=False),
        sa.Column("phase", sa.String(32), nullable=False),
        sa.Column("principal", sa.String(255), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("requested_at", _time(), nullable=False),
        sa.Column("updated_at", _time(), nullable=False),
        sa.Column("finished_at", _time(), nullable=True),
        sa.Column("outcome", sa.String(32), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("bytes_transferred", sa.BigInteger(), nullable=False),
        sa.Column("downtime_ms", sa.Integer(), nullable=True),
        sa.Column("data", _json(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_migrations"),
        sa.ForeignKeyConstraint(["vm_id"], ["vms.id"], name="fk_migrations_vm_id_vms"),
        sa.ForeignKeyConstraint(["source"], ["hosts.name"], name="fk_migrations_source_hosts"),
        sa.ForeignKeyConstraint(["destination"], ["hosts.name"], name="fk_migrations_destination_hosts"),
        sa.CheckConstraint("source <> destination", name=op.f("ck_migrations_distinct_hosts")),
        sa.CheckConstraint("generation >= 1", name=op.f("ck_migrations_generation_positive")),
        sa.CheckConstraint("bytes_transferred >= 0", name=op.f("ck_migrations_bytes_non_negative")),
        sa.CheckConstraint(
            "(outcome IS NULL) = (finished_at IS NULL)", name=op.f("ck_migrations_finished_with_outcome")
        ),
    )
    op.create_index("ix_migrations_requested_at", "migrations", ["requested_at"])
    op.create_index("ix_migrations_vm_id_requested_at", "migrations", ["vm_id", "requested_at"])
    op.create_index("uq_migrations_active_vm", "migrations", ["vm_id"], unique=True, **_partial("outcome IS NULL"))

    op.create_table(
        "migration_steps",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("migration_id", sa.String(64), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("phase", sa.String(32), nullable=False),
        sa.Column("at", _time(), nullable=False),
        sa.Column("data", _json(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_migration_steps"),
        sa.ForeignKeyConstraint(["migration_id"], ["migrations.id"], name="fk_migration_steps_migration_id_migrations"),
        sa.UniqueConstraint("migration_id", "seq", name="uq_migration_steps_migration_id_seq"),
        sa.CheckConstraint("seq >= 1", name=op.f("ck_migration_steps_seq_positive")),
    )

    op.create_table(
        "scrub_receipts",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("migration_id", sa.String(64), nullable=True),
        sa.Column("host", sa.String(NAME), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("mode", sa.String(32), nullable=False),
        sa.Column("duration_s", sa.Float(), nullable=False),
        sa.Column("sample_hash", sa.String(255), nullable=False),
        sa.Column("at", _time(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_scrub_receipts"),
        sa.ForeignKeyConstraint(["migration_id"], ["migrations.id"], name="fk_scrub_receipts_migration_id_migrations"),
        sa.CheckConstraint("bytes >= 0", name=op.f("ck_scrub_receipts_bytes_non_negative")),
        sa.CheckConstraint("duration_s >= 0", name=op.f("ck_scrub_receipts_duration_non_negative")),
    )
    op.create_index("ix_scrub_receipts_migration_id", "scrub_receipts", ["migration_id"])
    op.create_index("ix_scrub_receipts_host_at", "scrub_receipts", ["host", "at"])


def downgrade() -> None:
    # Dependants first; dropping a table drops its indexes.
    for table in ("scrub_receipts", "migration_steps", "migrations"):
        op.drop_table(table)
