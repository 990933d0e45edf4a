"""The audit chain: each event carries the previous entry's hash and its own (``prev_hash``, ``hash``, at most one entry
per predecessor), the one-row chain head every writer locks, and the controller's signed checkpoints.

The events already in the log are chained here, in id order from the genesis hash, so a database that holds events
before this revision verifies after it; the head is left on the last of them.

Written by hand to match :mod:`ferryman.cmdb.schema` as of this revision; later revisions change the schema, this one
never does. The link hash is imported from :mod:`ferryman.cmdb.audit_chain` rather than copied: it is the chain's
format, which may never change for existing entries (a new format gets a new domain prefix and keeps this one
verifiable), so it means here what it will always mean.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06 15:00:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from ferryman.cmdb.audit_chain import GENESIS, link_hash

revision: str = "0010"
down_revision: str | Sequence[str] | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

HASH = 64
BATCH = 10_000


def _time() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def _json() -> Any:
    return sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


_events = sa.table(
    "events",
    sa.column("id", sa.Integer()),
    sa.column("time", _time()),
    sa.column("kind", sa.String()),
    sa.column("severity", sa.String()),
    sa.column("principal", sa.String()),
    sa.column("vm", sa.String()),
    sa.column("host", sa.String()),
    sa.column("message", sa.Text()),
    sa.column("data", _json()),
    sa.column("prev_hash", sa.String()),
    sa.column("hash", sa.String()),
)


def _chain_existing(conn: sa.Connection) -> tuple[int, str]:
    """Chain the events already stored, BATCH at a time in id order; the (id, hash) of the last, or (0, genesis)."""
    link = sa.update(_events).where(_events.c.id == sa.bindparam("b_id"))
    link = link.values(prev_hash=sa.bindparam("b_prev"), hash=sa.bindparam("b_hash"))
    last_id, prev = 0, GENESIS
    while True:
        query = sa.select(_events).where(_events.c.id > last_id).order_by(_events.c.id).limit(BATCH)
        rows = conn.execute(query).all()
        if not rows:
            return last_id, prev
        params = []
        for row in rows:
            digest = link_hash(prev, row)
            params.append({"b_id": row.id, "b_prev": prev, "b_hash": digest})
            prev = digest
        conn.execute(link, params)
        last_id = rows[-1].id


def upgrade() -> None:
    op.add_column("events", sa.Column("prev_hash", sa.String(HASH), nullable=True))
    op.add_column("events", sa.Column("hash", sa.String(HASH), nullable=True))
    head_id, head_hash = _chain_existing(op.get_bind())
    with op.batch_alter_table("events") as batch:
        batch.alter_column("prev_hash", existing_type=sa.String(HASH), nullable=False)
        batch.alter_column("hash", existing_type=sa.String(HASH), nullable=False)
    op.create_index("uq_events_prev_hash", "events", ["prev_hash"], unique=True)
    head = op.create_table(
        "audit_chain_head",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("event_id", sa.Integer(), nullable=False),
        sa.Column("hash", sa.String(HASH), nullable=False),
        sa.CheckConstraint("id = 1", name="ck_audit_chain_head_one_row"),
        sa.PrimaryKeyConstraint("id", name="pk_audit_chain_head"),
    )
    op.bulk_insert(head, [{"id": 1, "event_id": head_id, "hash": head_hash}])
    op.create_table(
        "audit_checkpoints",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("event_id", sa.Integer(), nullable=False),
        sa.Column("hash", sa.String(HASH), nullable=False),
        sa.Column("at", _time(), nullable=False),
        sa.Column("signature", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_audit_checkpoints"),
    )


def downgrade() -> None:
    op.drop_table("audit_checkpoints")
    op.drop_table("audit_chain_head")
    op.drop_index("uq_events_prev_hash", table_name="events")
    with op.batch_alter_table("events") as batch:
        batch.drop_column("hash")
        batch.drop_column("prev_hash")
