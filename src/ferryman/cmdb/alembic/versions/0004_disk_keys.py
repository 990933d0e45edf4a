"""Encrypted VMs: the ``vms.encrypted`` flag and the wrapped per-copy disk keys the controller holds.

Written by hand to match :mod:`ferryman.cmdb.schema` as of this revision; later revisions change the schema, this one
never does. Types are spelled out here rather than imported, so the revision keeps meaning what it meant.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23 00:00:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NAME = 63


def _time() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("vms") as batch:
        batch.add_column(sa.Column("encrypted", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.create_table(
        "disk_keys",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("vm_id", sa.String(64), nullable=False),
        sa.Column("host", sa.String(NAME), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("kek_id", sa.Integer(), nullable=True),
        sa.Column("wrapped", sa.LargeBinary(), nullable=True),
        sa.Column("created_at", _time(), nullable=False),
        sa.Column("destroyed_at", _time(), nullable=True),
        sa.Column("destroyed_reason", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_disk_keys"),
        sa.ForeignKeyConstraint(["vm_id"], ["vms.id"], name="fk_disk_keys_vm_id_vms"),
        sa.ForeignKeyConstraint(["host"], ["hosts.name"], name="fk_disk_keys_host_hosts"),
        sa.CheckConstraint(
            "(destroyed_at IS NULL) = (wrapped IS NOT NULL)", name=op.f("ck_disk_keys_destroyed_means_no_key")
        ),
    )
    op.create_index("ix_disk_keys_vm_id", "disk_keys", ["vm_id"])
    predicate = sa.text("destroyed_at IS NULL")
    op.create_index(
        "uq_disk_keys_live_copy",
        "disk_keys",
        ["vm_id", "host", "generation"],
        unique=True,
        sqlite_where=predicate,
        postgresql_where=predicate,
    )


def downgrade() -> None:
    op.drop_table("disk_keys")
    with op.batch_alter_table("vms") as batch:
        batch.drop_column("encrypted")
