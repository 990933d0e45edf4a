"""Alembic environment for the CMDB.

:func:`ferryman.cmdb.engine.migrate` builds the Alembic configuration in code and hands over an open connection in
``config.attributes["connection"]``, already inside a transaction (and, on PostgreSQL, holding the migration lock), so
the whole upgrade commits or rolls back as one. Without a connection, ``sqlalchemy.url`` from the configuration is used;
offline mode renders SQL for that URL's dialect.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context

from ferryman.cmdb.schema import metadata

config = context.config


def run_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def run_with(connection: sa.Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        run_with(connection)
        return
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no connection in config.attributes and no sqlalchemy.url in the Alembic configuration")
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.begin() as conn:
            run_with(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
