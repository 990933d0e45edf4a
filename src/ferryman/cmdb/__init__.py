"""The CMDB: sites, hosts, tenants, VMs, the temporal relation *VM runs on host*, events, alarms and credentials.

- :mod:`ferryman.cmdb.repository`: the narrow protocols the controller programs against (no SQL);
- :mod:`ferryman.cmdb.sql`: :class:`~ferryman.cmdb.sql.SqlRepository` on SQLite or PostgreSQL, composed of one
  ``*_sql`` module per protocol, and :func:`~ferryman.cmdb.sql.open_repository`, which brings the schema up to date
  with the Alembic revisions shipped in ``ferryman/cmdb/alembic`` (no ``alembic.ini`` needed; see
  :mod:`ferryman.cmdb.engine`);
- :mod:`ferryman.cmdb.schema`: the tables.

Placements are half-open intervals ``[valid_from, valid_to)`` in aware UTC; a row is written once and closed once, so
the history answers "which VMs ever ran on host H" and "who were this VM's neighbours between t1 and t2". Nothing in
this package decides placement or policy.
"""
