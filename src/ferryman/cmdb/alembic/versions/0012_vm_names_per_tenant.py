"""VM names are unique within their tenant, no longer across the fleet.

A name taken fleet-wide told a tenant that another tenant had a VM of that name (a refused create was an existence
oracle). The partial unique index over live VMs now covers ``(tenant, name)``; a name used in several tenants is
resolved by the caller's tenant, or by id.

Written by hand to match :mod:`ferryman.cmdb.schema` as of this revision; later revisions change the schema, this one
never does.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06 22:00:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | Sequence[str] | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _live() -> dict[str, Any]:
    predicate = "state <> 'deleted'"
    return {"sqlite_where": sa.text(predicate), "postgresql_where": sa.text(predicate)}


def upgrade() -> None:
    op.drop_index("uq_vms_live_name", table_name="vms")
    op.create_index("uq_vms_live_tenant_name", "vms", ["tenant", "name"], unique=True, **_live())


def downgrade() -> None:
    # fails, as it must, when two tenants have live VMs of one name
    op.drop_index("uq_vms_live_tenant_name", table_name="vms")
    op.create_index("uq_vms_live_name", "vms", ["name"], unique=True, **_live())
