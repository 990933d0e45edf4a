"""Network names are unique within their tenant, like VM names.

``networks`` is keyed by ``(tenant, name)``; a NIC carries its VM's tenant, which is its network's, and references
the network by both, and an address is unique per live NIC of one tenant's network. A name another tenant uses is no
longer a refused create (an existence oracle).

The NICs' indexes are dropped before and created after the table rebuilds SQLite needs for the key changes, so their
``WHERE`` clauses are written here rather than left to reflection.

Written by hand to match :mod:`ferryman.cmdb.schema` as of this revision; later revisions change the schema, this one
never does.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-06 22:30:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | Sequence[str] | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NAME = 63


def _live() -> dict[str, Any]:
    predicate = "released_at IS NULL"
    return {"sqlite_where": sa.text(predicate), "postgresql_where": sa.text(predicate)}


def _drop_nic_indexes() -> None:
    for index in ("uq_nics_live_ipv4", "uq_nics_live_mac", "ix_nics_vm_id"):
        op.drop_index(index, table_name="nics")


def _create_nic_indexes(*address_key: str) -> None:
    op.create_index("ix_nics_vm_id", "nics", ["vm_id"])
    op.create_index("uq_nics_live_mac", "nics", ["mac"], unique=True, **_live())
    op.create_index("uq_nics_live_ipv4", "nics", [*address_key, "ipv4"], unique=True, **_live())


def upgrade() -> None:
    _drop_nic_indexes()
    op.add_column("nics", sa.Column("tenant", sa.String(NAME), nullable=True))
    op.execute("UPDATE nics SET tenant = (SELECT vms.tenant FROM vms WHERE vms.id = nics.vm_id)")
    with op.batch_alter_table("nics") as batch:
        batch.drop_constraint("fk_nics_network_networks", type_="foreignkey")
        batch.alter_column("tenant", existing_type=sa.String(NAME), nullable=False)
    with op.batch_alter_table("networks") as batch:
        batch.drop_constraint("pk_networks", type_="primary")
        batch.create_primary_key("pk_networks", ["tenant", "name"])
    with op.batch_alter_table("nics") as batch:
        batch.create_foreign_key("fk_nics_tenant_networks", "networks", ["tenant", "network"], ["tenant", "name"])
    _create_nic_indexes("tenant", "network")


def downgrade() -> None:
    # fails, as it must, when two tenants have networks of one name
    _drop_nic_indexes()
    with op.batch_alter_table("nics") as batch:
        batch.drop_constraint("fk_nics_tenant_networks", type_="foreignkey")
    with op.batch_alter_table("networks") as batch:
        batch.drop_constraint("pk_networks", type_="primary")
        batch.create_primary_key("pk_networks", ["name"])
    with op.batch_alter_table("nics") as batch:
        batch.drop_column("tenant")
        batch.create_foreign_key("fk_nics_network_networks", "networks", ["network"], ["name"])
    _create_nic_indexes("network")
