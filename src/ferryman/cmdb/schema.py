"""The CMDB tables, as SQLAlchemy Core metadata shared by the ``*_sql`` modules and the Alembic revisions.

The schema is created and changed only by Alembic revisions under ``ferryman/cmdb/alembic/versions``, never by
``metadata.create_all``; a test checks that the revisions and this module describe the same tables. Constraint names
follow :data:`NAMING_CONVENTION` so later revisions can address them on SQLite and PostgreSQL alike.

Invariants the database itself guards (the repository checks them too, to raise clear errors):

- at most one open placement (``valid_to IS NULL``) per VM: partial unique index ``uq_placements_open_vm``;
- a placement never ends before it starts, and a VM has one placement per generation;
- VM names are unique within their tenant among VMs that are not deleted: partial unique index
  ``uq_vms_live_tenant_name`` (two tenants may each have a ``web-1``);
- at most one open alarm per (kind, vm_id, host), NULLs compared as equal: ``uq_alarms_open_key``;
- at most one active migration (``outcome IS NULL``) per VM: partial unique index ``uq_migrations_active_vm``; a
  migration is finished exactly when it has an outcome; a step's ``seq`` is positive and unique per migration.

Times are stored as ``DateTime(timezone=True)`` through :class:`UtcDateTime`, which hands back aware UTC datetimes on
both backends (SQLite keeps no offset, so its naive values are UTC by construction). X.509 serial numbers are up to 160
bits, wider than any SQL integer, so :class:`SerialNumber` stores them as decimal text.

This module holds no queries and no behaviour beyond type conversion.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Dialect

NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)

NAME = 63  # DNS-label-like names (ferryman.core.models.NAME_RE)
VM_DELETED = "deleted"  # ferryman.core.models.VMState.DELETED, spelled out so the index predicate is a literal


class UtcDateTime(sa.types.TypeDecorator[dt.datetime]):
    """``DateTime(timezone=True)`` that accepts only aware datetimes and returns aware UTC datetimes."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value.isoformat()} given where an aware UTC time is required")
        return value.astimezone(dt.UTC)

    def process_result_value(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


class SerialNumber(sa.types.TypeDecorator[int]):
    """A non-negative integer of up to 160 bits (an X.509 serial), stored as decimal text."""

    impl = sa.String(64)
    cache_ok = True

    def process_bind_param(self, value: int | None, dialect: Dialect) -> str | None:
        if value is None:
            return None
        if value < 0:
            raise ValueError(f"certificate serial must be non-negative, got {value}")
        return str(value)

    def process_result_value(self, value: Any, dialect: Dialect) -> int | None:
        return None if value is None else int(value)


def json_type() -> sa.types.TypeEngine[Any]:
    """JSON on SQLite, JSONB on PostgreSQL."""
    return sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def _unique_where(name: str, *expressions: Any, where: str) -> sa.Index:
    """A unique index over the rows matching ``where`` only: a partial index on SQLite and PostgreSQL alike."""
    return sa.Index(name, *expressions, unique=True, sqlite_where=sa.text(where), postgresql_where=sa.text(where))


sites = sa.Table(
    "sites",
    metadata,
    sa.Column("name", sa.String(NAME), primary_key=True),
    sa.Column("security_level", sa.Integer, nullable=False),
    sa.Column("description", sa.Text, nullable=False),
)

hosts = sa.Table(
    "hosts",
    metadata,
    sa.Column("name", sa.String(NAME), primary_key=True),
    sa.Column("address", sa.String(255), nullable=False),
    sa.Column("agent_port", sa.Integer, nullable=False),
    sa.Column("site", sa.String(NAME), sa.ForeignKey("sites.name"), nullable=False),
    sa.Column("zone", sa.String(NAME), nullable=False),
    sa.Column("subnet", sa.String(64), nullable=False),
    sa.Column("virt_type", sa.String(32), nullable=False),
    sa.Column("hypervisor", sa.String(64), nullable=False),
    sa.Column("hypervisor_version", sa.String(64), nullable=False),
    sa.Column("patch_level", sa.Integer, nullable=False),
    sa.Column("role", sa.String(NAME), nullable=False),
    sa.Column("memory_mb", sa.Integer, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("underlay", sa.String(64), nullable=False, server_default=""),
)

tenants = sa.Table(
    "tenants",
    metadata,
    sa.Column("name", sa.String(NAME), primary_key=True),
)

vms = sa.Table(
    "vms",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(NAME), nullable=False),
    sa.Column("tenant", sa.String(NAME), sa.ForeignKey("tenants.name"), nullable=False),
    sa.Column("memory_mb", sa.Integer, nullable=False),
    sa.Column("vcpus", sa.Integer, nullable=False),
    sa.Column("disk_bytes", sa.BigInteger, nullable=False),
    sa.Column("image", sa.Text, nullable=False),
    sa.Column("canary", sa.Text, nullable=False),
    sa.Column("profile", json_type(), nullable=False),
    sa.Column("generation", sa.Integer, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("deleted_at", UtcDateTime, nullable=True),
    sa.Column("encrypted", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("image_copy", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.CheckConstraint("generation >= 1", name="generation_positive"),
    sa.Index("ix_vms_name", "name"),
    sa.Index("ix_vms_image", "image"),  # impact: VMs of the same image
    _unique_where("uq_vms_live_tenant_name", "tenant", "name", where=f"state <> '{VM_DELETED}'"),
)

placements = sa.Table(
    "placements",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("vm_id", sa.String(64), sa.ForeignKey("vms.id"), nullable=False),
    sa.Column("host", sa.String(NAME), sa.ForeignKey("hosts.name"), nullable=False),
    sa.Column("generation", sa.Integer, nullable=False),
    sa.Column("valid_from", UtcDateTime, nullable=False),
    sa.Column("valid_to", UtcDateTime, nullable=True),
    sa.UniqueConstraint("vm_id", "generation"),
    sa.CheckConstraint("valid_to IS NULL OR valid_to >= valid_from", name="interval_ordered"),
    sa.Index("ix_placements_host_valid_from", "host", "valid_from"),
    sa.Index("ix_placements_host_valid_to", "host", "valid_to", "valid_from", "vm_id"),  # impact: stays ending after T
    _unique_where("uq_placements_open_vm", "vm_id", where="valid_to IS NULL"),
)

events = sa.Table(
    "events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("time", UtcDateTime, nullable=False),
    sa.Column("kind", sa.String(128), nullable=False),
    sa.Column("severity", sa.String(16), nullable=False),
    sa.Column("principal", sa.String(255), nullable=False),
    sa.Column("vm", sa.String(64), nullable=True),
    sa.Column("host", sa.String(NAME), nullable=True),
    sa.Column("message", sa.Text, nullable=False),
    sa.Column("data", json_type(), nullable=False),
    # the hash chain (ferryman.cmdb.audit_chain): the previous entry's hash and this one's; one entry per predecessor
    sa.Column("prev_hash", sa.String(64), nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
    sa.Index("ix_events_time", "time"),
    sa.Index("ix_events_vm", "vm"),
    sa.Index("ix_events_host", "host"),
    sa.Index("uq_events_prev_hash", "prev_hash", unique=True),
)

# vm_id and host carry no foreign key: an alarm may name a VM or host the CMDB does not know (that is the drift).
alarms = sa.Table(
    "alarms",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("kind", sa.String(128), nullable=False),
    sa.Column("vm_id", sa.String(64), nullable=True),
    sa.Column("host", sa.String(NAME), nullable=True),
    sa.Column("message", sa.Text, nullable=False),
    sa.Column("first_seen", UtcDateTime, nullable=False),
    sa.Column("last_seen", UtcDateTime, nullable=False),
    sa.Column("resolved_at", UtcDateTime, nullable=True),
)
_unique_where(
    "uq_alarms_open_key",
    alarms.c.kind,
    sa.func.coalesce(alarms.c.vm_id, ""),
    sa.func.coalesce(alarms.c.host, ""),
    where="resolved_at IS NULL",
)

api_tokens = sa.Table(
    "api_tokens",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(255), nullable=False),
    sa.Column("role", sa.String(64), nullable=False),
    sa.Column("secret_hash", sa.String(255), nullable=False),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("revoked_at", UtcDateTime, nullable=True),
)

enrol_tokens = sa.Table(
    "enrol_tokens",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("host", sa.String(NAME), sa.ForeignKey("hosts.name"), nullable=False),
    sa.Column("secret_hash", sa.String(255), nullable=False),
    sa.Column("expires_at", UtcDateTime, nullable=False),
    sa.Column("used_at", UtcDateTime, nullable=True),
    sa.Index("ix_enrol_tokens_host", "host"),
)

certificates = sa.Table(
    "certificates",
    metadata,
    sa.Column("serial", SerialNumber, primary_key=True),
    sa.Column("host", sa.String(NAME), sa.ForeignKey("hosts.name"), nullable=False),
    sa.Column("not_after", UtcDateTime, nullable=False),
    sa.Column("issued_at", UtcDateTime, nullable=False),
    sa.Column("revoked_at", UtcDateTime, nullable=True),
    sa.Index("ix_certificates_host", "host"),
)

settings = sa.Table(
    "settings",
    metadata,
    sa.Column("key", sa.String(255), primary_key=True),
    sa.Column("value", json_type(), nullable=False),
)

# -- the migration journal (ferryman.cmdb.journal) ---------------------------------------------------------------------

migrations = sa.Table(
    "migrations",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("vm_id", sa.String(64), sa.ForeignKey("vms.id"), nullable=False),
    sa.Column("source", sa.String(NAME), sa.ForeignKey("hosts.name"), nullable=False),
    sa.Column("destination", sa.String(NAME), sa.ForeignKey("hosts.name"), nullable=False),
    sa.Column("shared_storage", sa.Boolean, nullable=False),
    sa.Column("phase", sa.String(32), nullable=False),
    sa.Column("principal", sa.String(255), nullable=False),
    sa.Column("generation", sa.Integer, nullable=False),
    sa.Column("requested_at", UtcDateTime, nullable=False),
    sa.Column("updated_at", UtcDateTime, nullable=False),
    sa.Column("finished_at", UtcDateTime, nullable=True),
    sa.Column("outcome", sa.String(32), nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("cancel_requested", sa.Boolean, nullable=False),
    sa.Column("bytes_transferred", sa.BigInteger, nullable=False),
    sa.Column("downtime_ms", sa.Integer, nullable=True),
    sa.Column("data", json_type(), nullable=False),
    sa.CheckConstraint("source <> destination", name="distinct_hosts"),
    sa.CheckConstraint("generation >= 1", name="generation_positive"),
    sa.CheckConstraint("bytes_transferred >= 0", name="bytes_non_negative"),
    sa.CheckConstraint("(outcome IS NULL) = (finished_at IS NULL)", name="finished_with_outcome"),
    sa.Index("ix_migrations_requested_at", "requested_at"),
    sa.Index("ix_migrations_vm_id_requested_at", "vm_id", "requested_at"),
    _unique_where("uq_migrations_active_vm", "vm_id", where="outcome IS NULL"),
)

# Append-only: a step is inserted once and never updated or deleted.
migration_steps = sa.Table(
    "migration_steps",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("migration_id", sa.String(64), sa.ForeignKey("migrations.id"), nullable=False),
    sa.Column("seq", sa.Integer, nullable=False),
    sa.Column("phase", sa.String(32), nullable=False),
    sa.Column("at", UtcDateTime, nullable=False),
    sa.Column("data", json_type(), nullable=False),
    sa.UniqueConstraint("migration_id", "seq"),
    sa.CheckConstraint("seq >= 1", name="seq_positive"),
)

# Append-only evidence that an artefact was destroyed (DESIGN.md invariant 5, "nothing left behind"). host carries no
# foreign key, as in alarms: a receipt may concern a host the CMDB does not know (residue found by reconciliation on
# an unenrolled machine), and the evidence must neither block a host's removal nor disappear with it. migration_id is
# NULL for scrubs that belong to no migration.
scrub_receipts = sa.Table(
    "scrub_receipts",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("migration_id", sa.String(64), sa.ForeignKey("migrations.id"), nullable=True),
    sa.Column("host", sa.String(NAME), nullable=False),
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("bytes", sa.BigInteger, nullable=False),
    sa.Column("mode", sa.String(32), nullable=False),
    sa.Column("duration_s", sa.Float, nullable=False),
    sa.Column("sample_hash", sa.String(255), nullable=False),
    sa.Column("at", UtcDateTime, nullable=False),
    sa.CheckConstraint("bytes >= 0", name="bytes_non_negative"),
    sa.CheckConstraint("duration_s >= 0", name="duration_non_negative"),
    sa.Index("ix_scrub_receipts_migration_id", "migration_id"),
    sa.Index("ix_scrub_receipts_host_at", "host", "at"),
)


# -- placement policies and compliance (ferryman.cmdb.policy_store) ----------------------------------------------------

# Append-only: each apply stores the whole set of policy files as a new version; the newest is in force.
policy_versions = sa.Table(
    "policy_versions",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("applied_at", UtcDateTime, nullable=False),
    sa.Column("principal", sa.String(255), nullable=False),
    sa.Column("documents", json_type(), nullable=False),
    sa.CheckConstraint("version >= 1", name="version_positive"),
)

# A hard-rule violation of one VM, open while resolved_at IS NULL; host has no foreign key, as in alarms.
violations = sa.Table(
    "violations",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("vm_id", sa.String(64), sa.ForeignKey("vms.id"), nullable=False),
    sa.Column("policy", sa.String(NAME), nullable=False),
    sa.Column("rule", sa.String(64), nullable=False),
    sa.Column("host", sa.String(NAME), nullable=True),
    sa.Column("message", sa.Text, nullable=False),
    sa.Column("first_seen", UtcDateTime, nullable=False),
    sa.Column("last_seen", UtcDateTime, nullable=False),
    sa.Column("resolved_at", UtcDateTime, nullable=True),
    sa.Index("ix_violations_vm_id", "vm_id"),
    _unique_where("uq_violations_open_key", "vm_id", "policy", "rule", where="resolved_at IS NULL"),
)

# -- disk keys of encrypted VMs (ferryman.cmdb.key_store) -------------------------------------------------------------

disk_keys = sa.Table(
    "disk_keys",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("vm_id", sa.String(64), sa.ForeignKey("vms.id"), nullable=False),
    sa.Column("host", sa.String(NAME), sa.ForeignKey("hosts.name"), nullable=False),
    sa.Column("generation", sa.Integer, nullable=False),
    sa.Column("kek_id", sa.Integer, nullable=True),
    sa.Column("wrapped", sa.LargeBinary, nullable=True),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("destroyed_at", UtcDateTime, nullable=True),
    sa.Column("destroyed_reason", sa.Text, nullable=True),
    sa.CheckConstraint("(destroyed_at IS NULL) = (wrapped IS NOT NULL)", name="destroyed_means_no_key"),
    sa.Index("ix_disk_keys_vm_id", "vm_id"),
    _unique_where("uq_disk_keys_live_copy", "vm_id", "host", "generation", where="destroyed_at IS NULL"),
)

# -- the image registry and its trust store (ferryman.cmdb.images) ----------------------------------------------------

DIGEST = 71  # sha256:<64 hex>

signing_keys = sa.Table(
    "signing_keys",
    metadata,
    sa.Column("name", sa.String(NAME), primary_key=True),
    sa.Column("public_key", sa.Text, nullable=False),
    sa.Column("fingerprint", sa.String(DIGEST), nullable=False),
    sa.Column("added_at", UtcDateTime, nullable=False),
    sa.Column("added_by", sa.String(255), nullable=False),
    sa.Column("removed_at", UtcDateTime, nullable=True),
    sa.Column("removed_by", sa.String(255), nullable=True),
)

images = sa.Table(
    "images",
    metadata,
    sa.Column("name", sa.String(NAME), primary_key=True),
    sa.Column("disk_digest", sa.String(DIGEST), nullable=False),
    sa.Column("disk_size", sa.BigInteger, nullable=False),
    sa.Column("format", sa.String(16), nullable=False),
    sa.Column("virtual_size", sa.BigInteger, nullable=False),
    sa.Column("os", sa.String(NAME), nullable=False),
    sa.Column("version", sa.String(NAME), nullable=False),
    sa.Column("publisher", sa.String(NAME), sa.ForeignKey("signing_keys.name"), nullable=False),
    sa.Column("signature", sa.String(128), nullable=False),
    sa.Column("boot", sa.String(16), nullable=False),
    sa.Column("imported_at", UtcDateTime, nullable=False),
    sa.Column("imported_by", sa.String(255), nullable=False),
    sa.Column("kernel_digest", sa.String(DIGEST), nullable=True),
    sa.Column("kernel_size", sa.BigInteger, nullable=True),
    sa.Column("initrd_digest", sa.String(DIGEST), nullable=True),
    sa.Column("initrd_size", sa.BigInteger, nullable=True),
    sa.Column("cmdline", sa.Text, nullable=True),
    sa.Column("firmware", sa.String(16), nullable=False),
    sa.Column("guest_agent", sa.Boolean, nullable=False),
    sa.Column("revoked_at", UtcDateTime, nullable=True),
    sa.Column("revoked_by", sa.String(255), nullable=True),
    sa.Column("revoked_reason", sa.Text, nullable=True),
    sa.CheckConstraint("boot IN ('firmware', 'kernel')", name="boot_kind"),
    sa.CheckConstraint(
        "(boot = 'kernel') = (kernel_digest IS NOT NULL AND initrd_digest IS NOT NULL)", name="kernel_boot_artefacts"
    ),
    sa.Index("ix_images_disk_digest", "disk_digest"),
)


# -- virtual networks and their NICs (ferryman.cmdb.networks) -----------------------------------------------------

# a network's name is its tenant's own: two tenants may each have a "prod"
networks = sa.Table(
    "networks",
    metadata,
    sa.Column("name", sa.String(NAME), nullable=False),
    sa.Column("tenant", sa.String(NAME), sa.ForeignKey("tenants.name"), nullable=False),
    sa.Column("cidr", sa.String(64), nullable=False),
    sa.Column("cidr6", sa.String(64), nullable=True),
    sa.Column("vni", sa.Integer, nullable=False),
    sa.Column("vlan", sa.Integer, nullable=True),
    sa.Column("forensic_port", sa.Integer, nullable=False),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.PrimaryKeyConstraint("tenant", "name"),
    sa.UniqueConstraint("vni"),
    sa.CheckConstraint("vni BETWEEN 1 AND 16777215", name="vni_range"),
)

nics = sa.Table(
    "nics",
    metadata,
    sa.Column("id", sa.String(16), primary_key=True),
    sa.Column("vm_id", sa.String(64), sa.ForeignKey("vms.id"), nullable=False),
    sa.Column("tenant", sa.String(NAME), nullable=False),  # the VM's, which is the network's
    sa.Column("network", sa.String(NAME), nullable=False),
    sa.Column("index", sa.Integer, nullable=False),
    sa.Column("mac", sa.String(17), nullable=False),
    sa.Column("ipv4", sa.String(64), nullable=False),
    sa.Column("ipv6", sa.String(64), nullable=True),
    sa.Column("isolated", sa.Boolean, nullable=False),
    sa.Column("revision", sa.Integer, nullable=False),
    sa.Column("host", sa.String(NAME), nullable=True),
    sa.Column("rules_hash", sa.String(DIGEST), nullable=True),
    sa.Column("applied_at", UtcDateTime, nullable=True),
    sa.Column("released_at", UtcDateTime, nullable=True),  # the VM was deleted: its addresses are free again
    sa.ForeignKeyConstraint(["tenant", "network"], ["networks.tenant", "networks.name"]),
    sa.UniqueConstraint("vm_id", "index"),
    sa.CheckConstraint("revision >= 1", name="revision_positive"),
    sa.Index("ix_nics_vm_id", "vm_id"),
    _unique_where("uq_nics_live_mac", "mac", where="released_at IS NULL"),
    _unique_where("uq_nics_live_ipv4", "tenant", "network", "ipv4", where="released_at IS NULL"),
)

# -- incidents, their timelines and evidence (ferryman.cmdb.incidents) ----------------------------------------------

# vm_id and host carry no foreign key: an incident may be opened for a host the CMDB no longer has; the VM's id is
# kept even after the VM is deleted (the incident outlives it)
incidents = sa.Table(
    "incidents",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("severity", sa.String(16), nullable=False),
    sa.Column("summary", sa.Text, nullable=False),
    sa.Column("vm_id", sa.String(64), nullable=True),
    sa.Column("host", sa.String(NAME), nullable=True),
    sa.Column("tenant", sa.String(NAME), nullable=True),
    sa.Column("source", sa.String(32), nullable=False),
    sa.Column("dedup_key", sa.String(255), nullable=True),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("opened_at", UtcDateTime, nullable=False),
    sa.Column("opened_by", sa.String(255), nullable=False),
    sa.Column("alerts", sa.Integer, nullable=False),
    sa.Column("last_alert_at", UtcDateTime, nullable=True),
    sa.Column("closed_at", UtcDateTime, nullable=True),
    sa.Column("closed_by", sa.String(255), nullable=True),
    sa.Column("resolution", sa.Text, nullable=True),
    sa.CheckConstraint("state IN ('open', 'closed')", name="state_kind"),
    sa.CheckConstraint("vm_id IS NOT NULL OR host IS NOT NULL", name="has_subject"),
    sa.Index("ix_incidents_vm_id", "vm_id"),
    _unique_where("uq_incidents_open_dedup", "dedup_key", where="state = 'open' AND dedup_key IS NOT NULL"),
)

incident_actions = sa.Table(
    "incident_actions",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("incident_id", sa.Integer, sa.ForeignKey("incidents.id"), nullable=False),
    sa.Column("at", UtcDateTime, nullable=False),
    sa.Column("principal", sa.String(255), nullable=False),
    sa.Column("kind", sa.String(64), nullable=False),
    sa.Column("message", sa.Text, nullable=False),
    sa.Column("data", json_type(), nullable=False),
    sa.Index("ix_incident_actions_incident_id", "incident_id"),
)

evidence = sa.Table(
    "evidence",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("incident_id", sa.Integer, sa.ForeignKey("incidents.id"), nullable=False),
    sa.Column("capture", sa.String(64), nullable=False),
    sa.Column("artefact", sa.String(64), nullable=False),
    sa.Column("vm_id", sa.String(64), nullable=False),
    sa.Column("generation", sa.Integer, nullable=False),
    sa.Column("host", sa.String(NAME), nullable=False),
    sa.Column("started_at", UtcDateTime, nullable=False),
    sa.Column("finished_at", UtcDateTime, nullable=False),
    sa.Column("plaintext_sha256", sa.String(DIGEST), nullable=False),
    sa.Column("plaintext_bytes", sa.BigInteger, nullable=False),
    sa.Column("sealed_sha256", sa.String(DIGEST), nullable=False),
    sa.Column("sealed_bytes", sa.BigInteger, nullable=False),
    sa.Column("wrapped_key", sa.Text, nullable=False),
    sa.Column("collector", sa.String(255), nullable=False),
    sa.UniqueConstraint("capture", "artefact"),
    sa.Index("ix_evidence_incident_id", "incident_id"),
)

manifests = sa.Table(
    "manifests",
    metadata,
    sa.Column("capture", sa.String(64), primary_key=True),
    sa.Column("incident_id", sa.Integer, sa.ForeignKey("incidents.id"), nullable=False),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("body", sa.Text, nullable=False),  # canonical JSON: exactly the bytes the signature covers
    sa.Column("signature", sa.Text, nullable=False),  # base64 of the controller CA's signature over body
)

# -- incident playbooks: versions and runs (ferryman.cmdb.incidents) ------------------------------------------------

playbook_versions = sa.Table(
    "playbook_versions",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("digest", sa.String(DIGEST), nullable=False),
    sa.Column("text", sa.Text, nullable=False),
    sa.Column("applied_at", UtcDateTime, nullable=False),
    sa.Column("applied_by", sa.String(255), nullable=False),
)

# one run per incident: its steps as planned when it started, the next one to do (persisted before each step's side
# effect, so a restarted controller resumes the step it was in)
playbook_runs = sa.Table(
    "playbook_runs",
    metadata,
    sa.Column("incident_id", sa.Integer, sa.ForeignKey("incidents.id"), primary_key=True),
    sa.Column("playbook", sa.String(DIGEST), nullable=False),
    sa.Column("steps", json_type(), nullable=False),
    sa.Column("next_step", sa.Integer, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("started_at", UtcDateTime, nullable=False),
    sa.Column("updated_at", UtcDateTime, nullable=False),
    sa.CheckConstraint("state IN ('running', 'done', 'failed')", name="state_kind"),
)

# -- the audit chain: its head and signed checkpoints (ferryman.cmdb.event_sql, ferryman.cmdb.audit_chain) ------------

# One row: the last entry of the chain. Every event insert locks it (FOR UPDATE), so concurrent writers extend one
# linear chain, and updates it in the same transaction.
audit_chain_head = sa.Table(
    "audit_chain_head",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("event_id", sa.Integer, nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
    sa.CheckConstraint("id = 1", name="one_row"),
)

# The controller CA's signature (base64, ECDSA-SHA256) over ferryman.cmdb.audit_chain.checkpoint_text(event_id, hash,
# at): the chain must still pass through every checkpointed hash.
audit_checkpoints = sa.Table(
    "audit_checkpoints",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("event_id", sa.Integer, nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
    sa.Column("at", UtcDateTime, nullable=False),
    sa.Column("signature", sa.Text, nullable=False),
)

# -- who may do what (ferryman.cmdb.access_sql, ferryman.controller.access) --------------------------------------------

# A principal is a person or a tool with one role and, for a tenant's roles, one tenant; its API tokens are rows of
# api_tokens whose name is the principal's. A disabled principal's tokens authenticate no more.
principals = sa.Table(
    "principals",
    metadata,
    sa.Column("name", sa.String(NAME), primary_key=True),
    sa.Column("role", sa.String(64), nullable=False),
    sa.Column("tenant", sa.String(NAME), nullable=True),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("created_by", sa.String(255), nullable=False),
    sa.Column("disabled_at", UtcDateTime, nullable=True),
    sa.Column("disabled_by", sa.String(255), nullable=True),
)

# Operators' own Cedar policies, added to the built-in roles (validated before they are stored).
access_policies = sa.Table(
    "access_policies",
    metadata,
    sa.Column("name", sa.String(NAME), primary_key=True),
    sa.Column("text", sa.Text, nullable=False),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("created_by", sa.String(255), nullable=False),
)

# Two-person rule: a dangerous request waits here for a second, different principal. ``fingerprint`` is the SHA-256 of
# what exactly was asked (action, resource, parameters): the approval is good for that request only.
approvals = sa.Table(
    "approvals",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("action", sa.String(64), nullable=False),
    sa.Column("resource", sa.String(255), nullable=False),
    sa.Column("fingerprint", sa.String(64), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("requested_by", sa.String(NAME), nullable=False),
    sa.Column("approver_role", sa.String(64), nullable=True),
    sa.Column("single_use", sa.Boolean, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("requested_at", UtcDateTime, nullable=False),
    sa.Column("expires_at", UtcDateTime, nullable=False),
    sa.Column("decided_by", sa.String(NAME), nullable=True),
    sa.Column("decided_at", UtcDateTime, nullable=True),
    sa.Column("used_at", UtcDateTime, nullable=True),
    sa.CheckConstraint("state IN ('pending', 'approved', 'denied', 'used')", name="state_kind"),
    sa.Index("ix_approvals_state", "state"),
)
