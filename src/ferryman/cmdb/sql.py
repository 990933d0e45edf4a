"""The CMDB on SQL: :class:`SqlRepository` implements :class:`~ferryman.cmdb.repository.Repository` and
:class:`~ferryman.cmdb.journal.JournalRepository` on SQLite and PostgreSQL, and :func:`open_repository` connects to
one and brings its schema up to date.

The repository is composed of one mixin per protocol, each over the transactions of
:class:`~ferryman.cmdb.sql_base.SqlBase`:

- :class:`~ferryman.cmdb.inventory_sql.SqlInventoryMixin`: sites, hosts, tenants, VMs, placements, temporal queries;
- :class:`~ferryman.cmdb.event_sql.SqlEventMixin`: the event log and alarms;
- :class:`~ferryman.cmdb.credential_sql.SqlCredentialMixin`: API and enrolment tokens, certificates, settings;
- :class:`~ferryman.cmdb.journal_sql.SqlJournalMixin`: the migration journal and its commit;
- :class:`~ferryman.cmdb.policy_sql.SqlPolicyMixin` and :class:`~ferryman.cmdb.key_sql.SqlKeyMixin`: policy versions,
  violations and disk keys;
- :class:`~ferryman.cmdb.image_sql.SqlImageMixin`: the image registry and its trusted signing keys;
- :class:`~ferryman.cmdb.network_sql.SqlNetworkMixin`: tenant networks and the VMs' NICs;
- :class:`~ferryman.cmdb.incident_sql.SqlIncidentMixin`: incidents, their timelines, evidence and manifests.

Engines, the schema upgrade and the wrapping of database errors live in :mod:`ferryman.cmdb.engine`. Nothing here
decides anything (no policy, no scheduling), and nothing creates or alters tables except the Alembic revisions that
:func:`open_repository` runs.
"""

from __future__ import annotations

from ferryman.cmdb.access_sql import SqlAccessMixin
from ferryman.cmdb.credential_sql import SqlCredentialMixin
from ferryman.cmdb.engine import create_engine, migrate
from ferryman.cmdb.event_sql import SqlEventMixin
from ferryman.cmdb.image_sql import SqlImageMixin
from ferryman.cmdb.incident_sql import SqlIncidentMixin
from ferryman.cmdb.inventory_sql import SqlInventoryMixin
from ferryman.cmdb.journal_sql import SqlJournalMixin
from ferryman.cmdb.key_sql import SqlKeyMixin
from ferryman.cmdb.network_sql import SqlNetworkMixin
from ferryman.cmdb.policy_sql import SqlPolicyMixin
from ferryman.core.clock import Clock

# create_engine is imported from here by callers that build a repository on an engine of their own.
__all__ = ["SqlRepository", "open_repository"]


class SqlRepository(
    SqlInventoryMixin,
    SqlEventMixin,
    SqlCredentialMixin,
    SqlJournalMixin,
    SqlPolicyMixin,
    SqlKeyMixin,
    SqlImageMixin,
    SqlNetworkMixin,
    SqlIncidentMixin,
    SqlAccessMixin,
):
    """Every CMDB protocol over one SQLAlchemy engine, the migration journal included. Each public method is one
    transaction."""

    def close(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()

    def __enter__(self) -> SqlRepository:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def open_repository(url: str, *, clock: Clock | None = None, echo: bool = False) -> SqlRepository:
    """Connect to ``url``, bring the schema to the newest revision and return the repository."""
    engine = create_engine(url, echo=echo)
    try:
        migrate(engine)
    except BaseException:
        engine.dispose()
        raise
    return SqlRepository(engine, clock=clock)
