"""Fixtures for the CMDB tests: a fresh repository per test on SQLite and on a private PostgreSQL 15.

The PostgreSQL server starts once per session (about a second). Before each test its database gets an empty
``public`` schema, and :func:`open_repository` runs the Alembic revisions into it, as on SQLite with a new file: every
test starts from a freshly migrated schema (a new database per test costs 0.1-0.3 s more on PostgreSQL 15). Without
PostgreSQL binaries the postgresql cases skip, except under ``CI=true`` where they fail.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from ferryman.cmdb.sql import SqlRepository, open_repository
from ferryman.core.models import Host, Site
from ferryman.testing.postgres import PostgresServer, unavailable_reason

T0 = dt.datetime(2026, 11, 23, 10, 0, tzinfo=dt.UTC)

BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgresql", id="postgresql", marks=pytest.mark.postgres),
]


class FixedClock:
    """A clock that always says ``T0`` (only ``created_at`` defaults read it)."""

    def now(self) -> dt.datetime:
        return T0


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    reason = unavailable_reason()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL is required under CI=true: {reason}")
        pytest.skip(reason)
    with PostgresServer() as server:
        yield server


@pytest.fixture(params=BACKENDS)
def repo_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """URL of an empty, migrated CMDB on the parametrised backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'cmdb.sqlite'}"
        return
    server: PostgresServer = request.getfixturevalue("postgres_server")
    server.reset_schema()
    yield server.url


@pytest.fixture
def repo(repo_url: str) -> Iterator[SqlRepository]:
    repository = open_repository(repo_url, clock=FixedClock())
    yield repository
    repository.close()


def make_host(name: str, site: str = "s1") -> Host:
    return Host(
        name=name,
        address="127.0.0.1",
        agent_port=7070,
        site=site,
        zone="z1",
        subnet="10.0.0.0/24",
        virt_type="kvm",
        hypervisor="qemu",
        hypervisor_version="8.2.2",
        patch_level=3,
    )


@pytest.fixture
def fleet(repo: SqlRepository) -> SqlRepository:
    """The repository with site s1, hosts h1-h3 and tenants acme and globex."""
    repo.add_site(Site("s1", security_level=3))
    for name in ("h1", "h2", "h3"):
        repo.add_host(make_host(name))
    repo.ensure_tenant("acme")
    repo.ensure_tenant("globex")
    return repo
