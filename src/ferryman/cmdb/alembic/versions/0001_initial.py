"""Initial CMDB schema: inventory, VMs, temporal placements, events, alarms, credentials, settings.

Written by hand to match :mod:`ferryman.cmdb.schema` as of this revision; later revisions change the schema, this one
never does. Types are spelled out here rather than imported, so the revision keeps meaning what it meant.

Revision ID: 0001
Revises:
Create Date: 2026-11-23 00:00:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
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
        "sites",
        sa.Column("name", sa.String(NAME), nullable=False),
        sa.Column("security_level", sa.Integer(), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_sites"),
    )
    op.create_table(
        "tenants",
        sa.Column("name", sa.String(NAME), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_tenants"),
    )
    op.create_table(
        "hosts",
        sa.Column("name", sa.String(NAME), nullable=False),
        sa.Column("address", sa.String(255), nullable=False),
        sa.Column("agent_port", sa.Integer(), nullable=False),
        sa.Column("site", sa.String(NAME), nullable=False),
        sa.Column("zone", sa.String(NAME), nullable=False),
        sa.Column("subnet", sa.String(64), nullable=False),
        sa.Column("virt_type", sa.String(32), nullable=False),
        sa.Column("hypervisor", sa.String(64), nullable=False),
        sa.Column("hypervisor_version", sa.String(64), nullable=False),
        sa.Column("patch_level", sa.Integer(), nullable=False),
        sa.Column("role", sa.String(NAME), nullable=False),
        sa.Column("memory_mb", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("created_at", _time(), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_hosts"),
        sa.ForeignKeyConstraint(["site"], ["sites.name"], name="fk_hosts_site_sites"),
    )
    op.create_table(
        "vms",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("name", sa.String(NAME), nullable=False),
        sa.Column("tenant", sa.String(NAME), nullable=False),
        sa.Column("memory_mb", sa.Integer(), nullable=False),
        sa.Column("vcpus", sa.Integer(), nullable=False),
        sa.Column("disk_bytes", sa.BigInteger(), nullable=False),
        sa.Column("image", sa.Text(), nullable=False),
        sa.Column("canary", sa.Text(), nullable=False),
        sa.Column("profile", _json(), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("created_at", _time(), nullable=False),
        sa.Column("deleted_at", _time(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_vms"),
        sa.ForeignKeyConstraint(["tenant"], ["tenants.name"], name="fk_vms_tenant_tenants"),
        sa.CheckConstraint("generation >= 1", name=op.f("ck_vms_generation_positive")),
    )
    op.create_index("ix_vms_name", "vms", ["name"])
    op.create_index("uq_vms_live_name", "vms", ["name"], unique=True, **_partial("state <> 'deleted'"))

    op.create_table(
        "placements",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("vm_id", sa.String(64), nullable=False),
        sa.Column("host", sa.String(NAME), nullable=False),
        sa.Column("generation", sa.Integer(), nullable=False),
        sa.Column("valid_from", _time(), nullable=False),
        sa.Column("valid_to", _time(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_placements"),
        sa.ForeignKeyConstraint(["vm_id"], ["vms.id"], name="fk_placements_vm_id_vms"),
        sa.ForeignKeyConstraint(["host"], ["hosts.name"], name="fk_placements_host_hosts"),
        sa.UniqueConstraint("vm_id", "generation", name="uq_placements_vm_id_generation"),
        sa.CheckConstraint("valid_to IS NULL OR valid_to >= valid_from", name=op.f("ck_placements_interval_ordered")),
    )
    op.create_index("ix_placements_host_valid_from", "placements", ["host", "valid_from"])
    op.create_index("uq_placements_open_vm", "placements", ["vm_id"], unique=True, **_partial("valid_to IS NULL"))

    op.create_table(
        "events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("time", _time(), nullable=False),
        sa.Column("kind", sa.String(128), nullable=False),
        sa.Column("severity", sa.String(16), nullable=False),
        sa.Column("principal", sa.String(255), nullable=False),
        sa.Column("vm", sa.String(64), nullable=True),
        sa.Column("host", sa.String(NAME), nullable=True),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("data", _json(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_events"),
    )
    op.create_index("ix_events_time", "events", ["time"])
    op.create_index("ix_events_vm", "events", ["vm"])
    op.create_index("ix_events_host", "events", ["host"])

    op.create_table(
        "alarms",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("kind", sa.String(128), nullable=False),
        sa.Column("vm_id", sa.String(64), nullable=True),
        sa.Column("host", sa.String(NAME), nullable=True),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("first_seen", _time(), nullable=False),
        sa.Column("last_seen", _time(), nullable=False),
        sa.Column("resolved_at", _time(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_alarms"),
    )
    op.create_index(
        "uq_alarms_open_key",
        "alarms",
        ["kind", sa.text("coalesce(vm_id, '')"), sa.text("coalesce(host, '')")],
        unique=True,
        **_partial("resolved_at IS NULL"),
    )

    op.create_table(
        "api_tokens",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("role", sa.String(64), nullable=False),
        sa.Column("secret_hash", sa.String(255), nullable=False),
        sa.Column("created_at", _time(), nullable=False),
        sa.Column("revoked_at", _time(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_api_tokens"),
    )
    op.create_table(
        "enrol_tokens",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("host", sa.String(NAME), nullable=False),
        sa.Column("secret_hash", sa.String(255), nullable=False),
        sa.Column("expires_at", _time(), nullable=False),
        sa.Column("used_at", _time(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_enrol_tokens"),
        sa.ForeignKeyConstraint(["host"], ["hosts.name"], name="fk_enrol_tokens_host_hosts"),
    )
    op.create_index("ix_enrol_tokens_host", "enrol_tokens", ["host"])

    op.create_table(
        "certificates",
        sa.Column("serial", sa.String(64), nullable=False),
        sa.Column("host", sa.String(NAME), nullable=False),
        sa.Column("not_after", _time(), nullable=False),
        sa.Column("issued_at", _time(), nullable=False),
        sa.Column("revoked_at", _time(), nullable=True),
        sa.PrimaryKeyConstraint("serial", name="pk_certificates"),
        sa.ForeignKeyConstraint(["host"], ["hosts.name"], name="fk_certificates_host_hosts"),
    )
    op.create_index("ix_certificates_host", "certificates", ["host"])

    op.create_table(
        "settings",
        sa.Column("key", sa.String(255), nullable=False),
        sa.Column("value", _json(), nullable=False),
        sa.PrimaryKeyConstraint("key", name="pk_settings"),
    )


def downgrade() -> None:
    # Dependants first; dropping a table drops its indexes.
    for table in (
        "settings",
        "certificates",
        "enrol_tokens",
        "api_tokens",
        "alarms",
        "events",
        "placements",
        "vms",
        "hosts",
        "tenants",
        "sites",
    ):
        op.drop_table(table)
