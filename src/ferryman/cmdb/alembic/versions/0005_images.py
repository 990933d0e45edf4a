"""The image registry: imported images (by digest, with their publisher's signature and baseline), the trusted
signing keys, and ``vms.image_copy`` (a VM's first disk is a full copy of its image rather than an overlay).

Written by hand to match :mod:`ferryman.cmdb.schema` as of this revision; later revisions change the schema, this one
never does. Types are spelled out here rather than imported, so the revision keeps meaning what it meant.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06 00:00:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NAME = 63
DIGEST = 71


def _time() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("vms") as batch:
        batch.add_column(sa.Column("image_copy", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.create_table(
        "signing_keys",
        sa.Column("name", sa.String(NAME), nullable=False),
        sa.Column("public_key", sa.Text(), nullable=False),
        sa.Column("fingerprint", sa.String(DIGEST), nullable=False),
        sa.Column("added_at", _time(), nullable=False),
        sa.Column("added_by", sa.String(255), nullable=False),
        sa.Column("removed_at", _time(), nullable=True),
        sa.Column("removed_by", sa.String(255), nullable=True),
        sa.PrimaryKeyConstraint("name", name="pk_signing_keys"),
    )
    op.create_table(
        "images",
        sa.Column("name", sa.String(NAME), nullable=False),
        sa.Column("disk_digest", sa.String(DIGEST), nullable=False),
        sa.Column("disk_size", sa.BigInteger(), nullable=False),
        sa.Column("format", sa.String(16), nullable=False),
        sa.Column("virtual_size", sa.BigInteger(), nullable=False),
        sa.Column("os", sa.String(NAME), nullable=False),
        sa.Column("version", sa.String(NAME), nullable=False),
        sa.Column("publisher", sa.String(NAME), nullable=False),
        sa.Column("signature", sa.String(128), nullable=False),
        sa.Column("boot", sa.String(16), nullable=False),
        sa.Column("imported_at", _time(), nullable=False),
        sa.Column("imported_by", sa.String(255), nullable=False),
        sa.Column("kernel_digest", sa.String(DIGEST), nullable=True),
        sa.Column("kernel_size", sa.BigInteger(), nullable=True),
        sa.Column("initrd_digest", sa.String(DIGEST), nullable=True),
        sa.Column("initrd_size", sa.BigInteger(), nullable=True),
        sa.Column("cmdline", sa.Text(), nullable=True),
        sa.Column("firmware", sa.String(16), nullable=False),
        sa.Column("guest_agent", sa.Boolean(), nullable=False),
        sa.Column("revoked_at", _time(), nullable=True),
        sa.Column("revoked_by", sa.String(255), nullable=True),
        sa.Column("revoked_reason", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("name", name="pk_images"),
        sa.ForeignKeyConstraint(["publisher"], ["signing_keys.name"], name="fk_images_publisher_signing_keys"),
        sa.CheckConstraint("boot IN ('firmware', 'kernel')", name=op.f("ck_images_boot_kind")),
        sa.CheckConstraint(
            "(boot = 'kernel') = (kernel_digest IS NOT NULL AND initrd_digest IS NOT NULL)",
            name=op.f("ck_images_kernel_boot_artefacts"),
        ),
    )
    op.create_index("ix_images_disk_digest", "images", ["disk_digest"])


def downgrade() -> None:
    op.drop_table("images")
    op.drop_table("signing_keys")
    with op.batch_alter_table("vms") as batch:
        batch.drop_column("image_copy")
