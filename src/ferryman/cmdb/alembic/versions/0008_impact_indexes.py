"""Indexes for impact analysis (:mod:`ferryman.cmdb.impact_sql`): the placements of a host by end time, carrying the
start and the VM so that "every stay on host h that ends after T, or has not ended" is read from the index alone,
in time proportional to the answer rather than to the host's whole history; and the VMs by image ("same image",
"same baseline").

Written by hand to match :mod:`ferryman.cmdb.schema` as of this revision; later revisions change the schema, this one
never does.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06 13:30:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_placements_host_valid_to", "placements", ["host", "valid_to", "valid_from", "vm_id"])
    op.create_index("ix_vms_image", "vms", ["image"])


def downgrade() -> None:
    op.drop_index("ix_vms_image", table_name="vms")
    op.drop_index("ix_placements_host_valid_to", table_name="placements")
