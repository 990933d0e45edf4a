"""Virtual networks: tenant networks (an overlay segment and its prefixes), the VMs' NICs with their addresses and
where their anti-spoofing rules were last verified, and ``hosts.underlay`` (a host's overlay endpoint).

Written by hand to match :mod:`ferryman.cmdb.schema` as of this revision; later revisions change the schema, this one
never does. Types are spelled out here rather than imported, so the revision keeps meaning what it meant.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06 12:30:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NAME = 63
DIGEST = 71


def _time() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def _partial(where: str) -> dict[str, Any]:
    return {"sqlite_where": sa.text(where), "postgresql_where": sa.text(where)}


def upgrade() -> None:
    with op.batch_alter_table("hosts") as batch:
        batch.add_column(sa.Column("underlay", sa.String(64), nullable=False, server_default=""))
    op.create_table(
        "networks",
        sa.Column("name", sa.String(NAME), nullable=False),
        sa.Column("tenant", sa.String(NAME), nullable=False),
        sa.Column("cidr", sa.String(64), nullable=False),
        sa.Column("cidr6", sa.String(64), nullable=True),
        sa.Column("vni", sa.Integer(), nullable=False),
        sa.Column("vlan", sa.Integer(), nullable=True),
        sa.Column("forensic_port", sa.Integer(), nullable=False),
        sa.Column("created_at", _time(), nullable=False),
        sa.CheckConstraint("vni BETWEEN 1 AND 16777215", name="ck_networks_vni_range"),
        sa.ForeignKeyConstraint(["tenant"], ["tenants.name"], name="fk_networks_tenant_tenants"),
        sa.PrimaryKeyConstraint("name", name="pk_networks"),
        sa.UniqueConstraint("vni", name="uq_networks_vni"),
    )
    op.create_table(
        "nics",
        sa.Column("id", sa.String(16), nullable=False),
        sa.Column("vm_id", sa.String(64), nullable=False),
        sa.Column("network", sa.String(NAME), nullable=False),
        sa.Column("index", sa.Integer(), nullable=False),
        sa.Column("mac", sa.String(17), nullable=False),
        sa.Column("ipv4", sa.String(64), nullable=False),
        sa.Column("ipv6", sa.String(64), nullable=True),
        sa.Column("isolated", sa.Boolean(), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("host", sa.String(NAME), nullable=True),
        sa.Column("rules_hash", sa.String(DIGEST), nullable=True),
        sa.Column("applied_at", _time(), nullable=True),
        sa.Column("released_at", _time(), nullable=True),
        sa.CheckConstraint("revision >= 1", name="ck_nics_revision_positive"),
        sa.ForeignKeyConstraint(["vm_id"], ["vms.id"], name="fk_nics_vm_id_vms"),
        sa.ForeignKeyConstraint(["network"], ["networks.name"], name="fk_nics_network_networks"),
        sa.PrimaryKeyConstraint("id", name="pk_nics"),
        sa.UniqueConstraint("vm_id", "index", name="uq_nics_vm_id_index"),
    )
    op.create_index("ix_nics_vm_id", "nics", ["vm_id"])
    live = "released_at IS NULL"
    op.create_index("uq_nics_live_mac", "nics", ["mac"], unique=True, **_partial(live))
    op.create_index("uq_nics_live_ipv4", "nics", ["network", "ipv4"], unique=True, **_partial(live))


def downgrade() -> None:
    op.drop_table("nics")
    op.drop_table("networks")
    with op.batch_alter_table("hosts") as batch:
        batch.drop_column("underlay")
