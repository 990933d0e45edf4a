"""The CMDB on SQL: :class:`SqlRepository` implements :class:`~ferryman.cmdb.repository.Repository` and, through
:class:`~ferryman.cmdb.journal_sql.SqlJournalMixin`, :class:`~ferryman.cmdb.journal.JournalRepository` on SQLite and
PostgreSQL.

It exists so that the controller's durable state, above all the temporal relation *VM runs on host*, is changed only in
short transactions that keep the CMDB's invariants: a VM has at most one open placement, a move closes the old
placement, opens the new one and bumps the VM's generation in one transaction (the migration commit point), and a
placement row is never edited except to set ``valid_to`` once. It does not decide anything (no policy, no scheduling),
does not read the system clock for facts (callers pass ``at``; the injected clock only stamps ``created_at`` defaults)
and does not create or alter tables itself: :func:`open_repository` runs the Alembic revisions shipped in this package.

Foreign errors are wrapped here: integrity violations become :class:`Conflict`, lost connections and lock timeouts
:class:`TransientError`, unusable values :class:`InvalidInput`.

SQLite runs with foreign keys on, WAL and a busy timeout; writes start with ``BEGIN IMMEDIATE`` so two writers queue
instead of failing on lock upgrade. On PostgreSQL, writes lock the VM row and use guarded updates (``WHERE valid_to IS
NULL``, ``WHERE generation = n``) so concurrent controllers cannot both move a VM.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import sqlalchemy as sa
import structlog
from alembic import command
from alembic.config import Config
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.pool import StaticPool

from ferryman.cmdb.journal_sql import SqlJournalMixin
from ferryman.cmdb.key_sql import SqlKeyMixin
from ferryman.cmdb.policy_sql import SqlPolicyMixin
from ferryman.cmdb.repository import Alarm, ApiToken, HostCertificate, Neighbour
from ferryman.cmdb.schema import (
    alarms,
    api_tokens,
    certificates,
    enrol_tokens,
    events,
    hosts,
    placements,
    settings,
    sites,
    tenants,
    vms,
)
from ferryman.cmdb.values import as_json as _json
from ferryman.cmdb.values import utc as _utc
from ferryman.core.clock import Clock, SystemClock
from ferryman.core.errors import Conflict, InvalidInput, NotFound, TransientError
from ferryman.core.models import VM, Event, Host, HostState, Placement, Severity, Site, Tenant, VMState

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

log = structlog.get_logger(__name__)

ALEMBIC_DIR = Path(__file__).with_name("alembic")
SQLITE_BUSY_TIMEOUT_MS = 10_000
_WRITE = "ferryman_write"  # execution option: this transaction writes (SQLite: BEGIN IMMEDIATE)
_MIGRATION_LOCK = 0x46_45_52_52_59  # PostgreSQL advisory lock key held while migrating ("FERRY")
_SEVERITY_RANK = {Severity.INFO: 0, Severity.WARNING: 1, Severity.ALARM: 2}

AlarmKey = tuple[str, str | None, str | None]
_D = TypeVar("_D", bound="DataclassInstance")


# -- engine and schema -------------------------------------------------------------------------------------------------


def create_engine(url: str, *, echo: bool = False) -> sa.Engine:
    """An engine for ``sqlite:///path`` or ``postgresql+psycopg://...`` with the connection settings the CMDB needs."""
    try:
        sa_url = sa.make_url(url)
    except sa_exc.ArgumentError as err:
        raise InvalidInput(f"bad database URL: {err}") from err
    backend = sa_url.get_backend_name()
    if backend == "sqlite":
        kwargs: dict[str, Any] = {}
        if sa_url.database in (None, "", ":memory:"):
            # One shared connection, or every checkout would see a different empty database.
            kwargs = {"poolclass": StaticPool, "connect_args": {"check_same_thread": False}}
        engine = sa.create_engine(sa_url, echo=echo, **kwargs)
        sa.event.listen(engine, "connect", _sqlite_on_connect)
        sa.event.listen(engine, "begin", _sqlite_on_begin)
        return engine
    if backend == "postgresql":
        if sa_url.drivername == "postgresql":
            sa_url = sa_url.set(drivername="postgresql+psycopg")
        return sa.create_engine(sa_url, echo=echo, pool_pre_ping=True)
    raise InvalidInput(f"unsupported database {backend!r}: use sqlite:///PATH or postgresql+psycopg://USER@HOST/DB")


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # Take BEGIN away from the sqlite3 module so _sqlite_on_begin decides how each transaction starts.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA foreign_keys=ON")
        # freed pages are zeroed: a destroyed disk key's wrapping does not linger in the file's free space
        cursor.execute("PRAGMA secure_delete=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode=WAL")
    finally:
        cursor.close()


def _sqlite_on_begin(conn: sa.Connection) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(_WRITE) else "BEGIN")


def alembic_config() -> Config:
    """The Alembic configuration, built in code from the revisions shipped inside this package (no alembic.ini)."""
    config = Config()
    config.set_main_option("script_location", str(ALEMBIC_DIR))
    config.set_main_option("path_separator", "os")
    return config


def migrate(engine: sa.Engine, revision: str = "head") -> None:
    """Upgrade the schema to ``revision`` in one transaction; on PostgreSQL, concurrent callers wait for each other."""
    with _db_errors(), engine.execution_options(**{_WRITE: True}).begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_MIGRATION_LOCK)))
        config = alembic_config()
        config.attributes["connection"] = conn
        command.upgrade(config, revision)
    log.debug("cmdb schema upgraded", revision=revision, backend=engine.dialect.name)


def open_repository(url: str, *, clock: Clock | None = None, echo: bool = False) -> SqlRepository:
    """Connect to ``url``, bring the schema to the newest revision and return the repository."""
    engine = create_engine(url, echo=echo)
    try:
        migrate(engine)
    except BaseException:
        engine.dispose()
        raise
    return SqlRepository(engine, clock=clock)


@contextlib.contextmanager
def _db_errors() -> Iterator[None]:
    try:
        yield
    except sa_exc.IntegrityError as err:
        raise Conflict(f"the CMDB refused the change: {_reason(err)}") from err
    except (sa_exc.OperationalError, sa_exc.InterfaceError) as err:
        raise TransientError(f"the CMDB is unavailable: {_reason(err)}", delay=1.0) from err
    except sa_exc.DataError as err:
        raise InvalidInput(f"the CMDB cannot store a value: {_reason(err)}") from err
    except sa_exc.StatementError as err:
        if isinstance(err.orig, ValueError | TypeError):
            raise InvalidInput(f"the CMDB cannot store a value: {err.orig}") from err
        raise


def _reason(err: sa_exc.StatementError) -> str:
    return str(err.orig).strip().splitlines()[0] if err.orig is not None else str(err)


# -- value helpers -----------------------------------------------------------------------------------------------------


def _window(start: dt.datetime, end: dt.datetime | None) -> tuple[dt.datetime, dt.datetime | None]:
    start = _utc(start, "start")
    if end is None:
        return start, None
    end = _utc(end, "end")
    if end <= start:
        raise InvalidInput(f"empty window: end {end.isoformat()} is not after start {start.isoformat()}")
    return start, end


def _eq_or_null(column: sa.ColumnElement[Any], value: Any) -> sa.ColumnElement[bool]:
    return column.is_(None) if value is None else column == value


def _valid_in(p: sa.FromClause, start: dt.datetime, end: dt.datetime | None) -> sa.ColumnElement[bool]:
    """Placement ``p`` is non-empty and overlaps the instant ``start`` (end None) or the window [start, end)."""
    c = p.c
    open_or_after = sa.or_(c.valid_to.is_(None), c.valid_to > start)
    non_empty = sa.or_(c.valid_to.is_(None), c.valid_to > c.valid_from)
    began = c.valid_from <= start if end is None else c.valid_from < end
    return sa.and_(began, open_or_after, non_empty)


def _insert_for(conn: sa.Connection, table: sa.Table) -> postgresql.Insert | sqlite.Insert:
    """An INSERT that supports ON CONFLICT on either backend."""
    return postgresql.insert(table) if conn.dialect.name == "postgresql" else sqlite.insert(table)


def _new_id(result: sa.CursorResult[Any]) -> int:
    key = result.inserted_primary_key
    assert key is not None
    return int(key[0])


def _from_row(cls: type[_D], row: sa.Row[Any], **converted: Any) -> _D:
    """Build dataclass ``cls`` from the row's same-named columns, with ``converted`` overriding some of them."""
    columns = row._mapping
    return cls(**{f.name: columns[f.name] for f in dataclasses.fields(cls) if f.name not in converted}, **converted)


HOST_MUTABLE = frozenset(
    {"zone", "subnet", "virt_type", "hypervisor", "hypervisor_version", "patch_level", "role", "memory_mb"}
)


def _host(row: sa.Row[Any]) -> Host:
    return _from_row(Host, row, state=HostState(row.state))


def _vm(row: sa.Row[Any]) -> VM:
    return _from_row(VM, row, state=VMState(row.state), profile=dict(row.profile))


def _placement(row: sa.Row[Any]) -> Placement:
    return _from_row(Placement, row)


def _event(row: sa.Row[Any]) -> Event:
    return _from_row(Event, row, severity=Severity(row.severity), data=dict(row.data))


def _alarm(row: sa.Row[Any]) -> Alarm:
    return _from_row(Alarm, row)


def _token(row: sa.Row[Any]) -> ApiToken:
    return _from_row(ApiToken, row)


def _certificate(row: sa.Row[Any]) -> HostCertificate:
    return _from_row(HostCertificate, row)


_PLACEMENT_ORDER = (placements.c.valid_from, placements.c.generation, placements.c.vm_id)


# -- the repository ----------------------------------------------------------------------------------------------------


class SqlRepository(SqlJournalMixin, SqlPolicyMixin, SqlKeyMixin):
    """Every CMDB protocol over one SQLAlchemy engine, the migration journal included (:class:`SqlJournalMixin`).
    Each public method is one transaction."""

    def __init__(self, engine: sa.Engine, *, clock: Clock | None = None) -> None:
        self.engine = engine
        self._writer = engine.execution_options(**{_WRITE: True})
        self._clock: Clock = clock if clock is not None else SystemClock()

    def close(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()

    def __enter__(self) -> SqlRepository:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sa.Connection]:
        with _db_errors(), self._writer.begin() as conn:
            yield conn

    @contextlib.contextmanager
    def _read(self) -> Iterator[sa.Connection]:
        with _db_errors(), self.engine.begin() as conn:
            yield conn

    # -- lookups used inside transactions ------------------------------------------------------------------------------

    @staticmethod
    def _require_host(conn: sa.Connection, name: str) -> None:
        if conn.scalar(sa.select(hosts.c.name).where(hosts.c.name == name)) is None:
            raise NotFound(f"host {name!r} not found")

    @staticmethod
    def _vm_row(conn: sa.Connection, vm_id: str, *, lock: bool = False) -> sa.Row[Any]:
        query = sa.select(vms).where(vms.c.id == vm_id)
        row = conn.execute(query.with_for_update() if lock else query).first()
        if row is None:
            raise NotFound(f"VM {vm_id!r} not found")
        return row

    @staticmethod
    def _open_placement(conn: sa.Connection, vm_id: str) -> sa.Row[Any] | None:
        query = sa.select(placements).where(placements.c.vm_id == vm_id, placements.c.valid_to.is_(None))
        return conn.execute(query).first()

    @staticmethod
    def _close_placement(conn: sa.Connection, row: sa.Row[Any], at: dt.datetime) -> None:
        if at < row.valid_from:
            raise Conflict(
                f"VM {row.vm_id!r} has been on {row.host!r} since {row.valid_from.isoformat()}; "
                f"cannot end that placement earlier, at {at.isoformat()}"
            )
        closed = conn.execute(
            sa.update(placements).where(placements.c.id == row.id, placements.c.valid_to.is_(None)).values(valid_to=at)
        )
        if closed.rowcount != 1:
            raise Conflict(f"the placement of VM {row.vm_id!r} on {row.host!r} was closed concurrently")

    # -- inventory -----------------------------------------------------------------------------------------------------

    def add_site(self, site: Site) -> Site:
        with self._write() as conn:
            if conn.scalar(sa.select(sites.c.name).where(sites.c.name == site.name)) is not None:
                raise Conflict(f"site {site.name!r} already exists")
            conn.execute(
                sa.insert(sites).values(
                    name=site.name, security_level=site.security_level, description=site.description
                )
            )
        return site

    def list_sites(self) -> list[Site]:
        with self._read() as conn:
            rows = conn.execute(sa.select(sites).order_by(sites.c.name)).all()
        return [Site(name=r.name, security_level=r.security_level, description=r.description) for r in rows]

    def add_host(self, host: Host) -> Host:
        created = dataclasses.replace(
            host,
            state=HostState(host.state),
            created_at=_utc(host.created_at, "created_at") if host.created_at else self._clock.now(),
        )
        values = {f.name: getattr(created, f.name) for f in dataclasses.fields(Host)} | {"state": created.state.value}
        with self._write() as conn:
            if conn.scalar(sa.select(sites.c.name).where(sites.c.name == host.site)) is None:
                raise NotFound(f"site {host.site!r} not found")
            if conn.scalar(sa.select(hosts.c.name).where(hosts.c.name == host.name)) is not None:
                raise Conflict(f"host {host.name!r} already exists")
            conn.execute(sa.insert(hosts).values(**values))
        return created

    def get_host(self, name: str) -> Host:
        with self._read() as conn:
            row = conn.execute(sa.select(hosts).where(hosts.c.name == name)).first()
        if row is None:
            raise NotFound(f"host {name!r} not found")
        return _host(row)

    def list_hosts(self) -> list[Host]:
        with self._read() as conn:
            return [_host(r) for r in conn.execute(sa.select(hosts).order_by(hosts.c.name))]

    def set_host_state(self, name: str, state: HostState) -> Host:
        with self._write() as conn:
            updated = conn.execute(sa.update(hosts).where(hosts.c.name == name).values(state=HostState(state).value))
            if updated.rowcount == 0:
                raise NotFound(f"host {name!r} not found")
            row = conn.execute(sa.select(hosts).where(hosts.c.name == name)).one()
        return _host(row)

    def update_host(self, name: str, **changes: Any) -> Host:
        """Change a host's descriptive attributes (zone, subnet, virt_type, hypervisor, hypervisor_version,
        patch_level, role, memory_mb); its name, address, site and state are not changed here."""
        unknown = set(changes) - HOST_MUTABLE
        if unknown:
            raise InvalidInput(f"host attributes {sorted(unknown)} cannot be changed (use {sorted(HOST_MUTABLE)})")
        with self._write() as conn:
            updated = conn.execute(sa.update(hosts).where(hosts.c.name == name).values(**changes))
            if updated.rowcount == 0:
                raise NotFound(f"host {name!r} not found")
            row = conn.execute(sa.select(hosts).where(hosts.c.name == name)).one()
        return _host(row)

    def ensure_tenant(self, name: str) -> Tenant:
        with self._write() as conn:
            conn.execute(_insert_for(conn, tenants).values(name=name).on_conflict_do_nothing(index_elements=["name"]))
        return Tenant(name=name)

    def list_tenants(self) -> list[Tenant]:
        with self._read() as conn:
            return [Tenant(name=n) for n in conn.scalars(sa.select(tenants.c.name).order_by(tenants.c.name))]

    # -- VMs and placements --------------------------------------------------------------------------------------------

    def add_vm(self, vm: VM, host: str, at: dt.datetime) -> VM:
        """Insert the VM and its first placement (generation ``vm.generation``, from ``at``) in one transaction."""
        at = _utc(at)
        if VMState(vm.state) is VMState.DELETED:
            raise InvalidInput(f"VM {vm.name!r}: cannot add a VM in state deleted")
        created = dataclasses.replace(
            vm,
            state=VMState(vm.state),
            profile=_json(dict(vm.profile), "VM profile"),
            created_at=_utc(vm.created_at, "created_at") if vm.created_at else at,
        )
        with self._write() as conn:
            self._require_host(conn, host)
            if conn.scalar(sa.select(tenants.c.name).where(tenants.c.name == vm.tenant)) is None:
                raise NotFound(f"tenant {vm.tenant!r} not found")
            if conn.scalar(sa.select(vms.c.id).where(vms.c.id == vm.id)) is not None:
                raise Conflict(f"a VM with id {vm.id!r} already exists")
            taken = conn.scalar(sa.select(vms.c.id).where(vms.c.name == vm.name, vms.c.state != VMState.DELETED.value))
            if taken is not None:
                raise Conflict(f"VM name {vm.name!r} is taken by VM {taken!r}")
            values = {f.name: getattr(created, f.name) for f in dataclasses.fields(VM)} | {"state": created.state.value}
            conn.execute(sa.insert(vms).values(**values))
            conn.execute(
                sa.insert(placements).values(vm_id=vm.id, host=host, generation=created.generation, valid_from=at)
            )
        return created

    def get_vm(self, name_or_id: str) -> VM:
        """The VM with this id; else the non-deleted VM with this name; else the most recently deleted one."""
        with self._read() as conn:
            row = conn.execute(sa.select(vms).where(vms.c.id == name_or_id)).first()
            if row is None:
                deleted_last = sa.case((vms.c.state == VMState.DELETED.value, 1), else_=0)
                row = conn.execute(
                    sa.select(vms)
                    .where(vms.c.name == name_or_id)
                    .order_by(deleted_last, vms.c.deleted_at.desc(), vms.c.created_at.desc())
                    .limit(1)
                ).first()
        if row is None:
            raise NotFound(f"VM {name_or_id!r} not found")
        return _vm(row)

    def list_vms(self, *, include_deleted: bool = False) -> list[VM]:
        query = sa.select(vms).order_by(vms.c.created_at, vms.c.name, vms.c.id)
        if not include_deleted:
            query = query.where(vms.c.state != VMState.DELETED.value)
        with self._read() as conn:
            return [_vm(r) for r in conn.execute(query)]

    def set_vm_state(self, vm_id: str, state: VMState) -> VM:
        """Record a lifecycle state; deletion goes through :meth:`delete_vm`, which also ends the placement."""
        state = VMState(state)
        if state is VMState.DELETED:
            raise InvalidInput("use delete_vm to delete a VM: it also closes the VM's placement")
        with self._write() as conn:
            row = self._vm_row(conn, vm_id, lock=True)
            if row.state == VMState.DELETED.value:
                raise Conflict(f"VM {vm_id!r} is deleted")
            conn.execute(sa.update(vms).where(vms.c.id == vm_id).values(state=state.value))
        return dataclasses.replace(_vm(row), state=state)

    def delete_vm(self, vm_id: str, at: dt.datetime) -> VM:
        """Mark the VM deleted and close its open placement at ``at``, in one transaction."""
        at = _utc(at)
        with self._write() as conn:
            row = self._vm_row(conn, vm_id, lock=True)
            if row.state == VMState.DELETED.value:
                raise Conflict(f"VM {vm_id!r} is already deleted")
            current = self._open_placement(conn, vm_id)
            if current is not None:
                self._close_placement(conn, current, at)
            conn.execute(sa.update(vms).where(vms.c.id == vm_id).values(state=VMState.DELETED.value, deleted_at=at))
        return dataclasses.replace(_vm(row), state=VMState.DELETED)

    def current_placement(self, vm_id: str) -> Placement | None:
        with self._read() as conn:
            self._vm_row(conn, vm_id)
            row = self._open_placement(conn, vm_id)
        return None if row is None else _placement(row)

    def placements_on(self, host: str, at: dt.datetime | None = None) -> list[Placement]:
        """Open placements on ``host`` (``at`` None), or those valid at the instant ``at``."""
        query = sa.select(placements).where(placements.c.host == host).order_by(*_PLACEMENT_ORDER)
        if at is None:
            query = query.where(placements.c.valid_to.is_(None))
        else:
            query = query.where(_valid_in(placements, _utc(at, "at"), None))
        with self._read() as conn:
            self._require_host(conn, host)
            return [_placement(r) for r in conn.execute(query)]

    def host_chain(self, vm_id: str) -> list[Placement]:
        """Every placement of the VM, oldest first: the hosts that make up its trusted computing base."""
        query = sa.select(placements).where(placements.c.vm_id == vm_id).order_by(*_PLACEMENT_ORDER)
        with self._read() as conn:
            self._vm_row(conn, vm_id)
            return [_placement(r) for r in conn.execute(query)]

    def move_vm(
        self, vm_id: str, to_host: str, at: dt.datetime, *, expected_generation: int | None = None
    ) -> tuple[VM, Placement]:
        """The migration commit: close the current placement, open one on ``to_host`` with generation+1, bump the VM.

        ``expected_generation`` makes the move a compare-and-set: a migration planned against generation n must not
        commit if someone else moved the VM meanwhile. Raises NotFound for an unknown VM or host; Conflict if the VM is
        deleted, has no open placement, is already on ``to_host``, is not at ``expected_generation``, or ``at``
        precedes the current placement. On any error nothing is changed.
        """
        at = _utc(at)
        with self._write() as conn:
            return self._move_vm(conn, vm_id, to_host, at, expected_generation=expected_generation)

    def _move_vm(
        self,
        conn: sa.Connection,
        vm_id: str,
        to_host: str,
        at: dt.datetime,
        *,
        expected_generation: int | None,
        from_host: str | None = None,
    ) -> tuple[VM, Placement]:
        """:meth:`move_vm` inside the caller's transaction ``conn`` (``at`` already UTC), so the migration commit moves
        the VM in the same transaction as it updates the journal. With ``from_host``, also Conflict unless the open
        placement is on that host. Every check runs before the first write; a Conflict from a guarded write leaves
        the caller's transaction to roll back what was written."""
        row = self._vm_row(conn, vm_id, lock=True)
        if row.state == VMState.DELETED.value:
            raise Conflict(f"VM {vm_id!r} is deleted and cannot move")
        if expected_generation is not None and row.generation != expected_generation:
            raise Conflict(
                f"VM {vm_id!r} is at generation {row.generation}, not {expected_generation}: it moved meanwhile"
            )
        self._require_host(conn, to_host)
        current = self._open_placement(conn, vm_id)
        if current is None:
            raise Conflict(f"VM {vm_id!r} has no open placement to move from")
        if from_host is not None and current.host != from_host:
            raise Conflict(f"VM {vm_id!r} is on {current.host!r}, not on {from_host!r}")
        if current.host == to_host:
            raise Conflict(f"VM {vm_id!r} is already on {to_host!r}")
        self._close_placement(conn, current, at)
        generation = row.generation + 1
        bumped = conn.execute(
            sa.update(vms).where(vms.c.id == vm_id, vms.c.generation == row.generation).values(generation=generation)
        )
        if bumped.rowcount != 1:
            raise Conflict(f"VM {vm_id!r} changed generation concurrently")
        placement = Placement(vm_id=vm_id, host=to_host, generation=generation, valid_from=at)
        conn.execute(sa.insert(placements).values(**dataclasses.asdict(placement)))
        return dataclasses.replace(_vm(row), generation=generation), placement

    # -- temporal queries ----------------------------------------------------------------------------------------------

    def neighbours_of_vm(self, vm_id: str, start: dt.datetime, end: dt.datetime | None = None) -> list[Neighbour]:
        """Every other VM that shared a host with ``vm_id`` at the instant ``start`` or during [start, end).

        One :class:`Neighbour` per overlapping pair of placements (subject's, other's) whose common interval meets the
        window. ``since``/``until`` are the whole overlap of the two placements, *not* clipped to the window:
        since = the later valid_from, until = the earlier valid_to (None if both are still open). So ``since`` may
        precede ``start``, and ``until`` may follow ``end``. Ordered by ``since``, then name.
        """
        start, end = _window(start, end)
        s, o = placements.alias("s"), placements.alias("o")
        query = (
            sa.select(
                o.c.vm_id,
                vms.c.name,
                vms.c.tenant,
                o.c.host,
                s.c.valid_from.label("s_from"),
                s.c.valid_to.label("s_to"),
                o.c.valid_from.label("o_from"),
                o.c.valid_to.label("o_to"),
            )
            .select_from(
                s.join(o, sa.and_(o.c.host == s.c.host, o.c.vm_id != s.c.vm_id)).join(vms, vms.c.id == o.c.vm_id)
            )
            .where(
                s.c.vm_id == vm_id,
                _valid_in(s, start, end),
                _valid_in(o, start, end),
                # The two placements overlap each other (with both overlapping the window, their overlap meets it too).
                sa.or_(o.c.valid_to.is_(None), s.c.valid_from < o.c.valid_to),
                sa.or_(s.c.valid_to.is_(None), o.c.valid_from < s.c.valid_to),
            )
        )
        with self._read() as conn:
            self._vm_row(conn, vm_id)
            rows = conn.execute(query).all()
        found = []
        for r in rows:
            ends = [t for t in (r.s_to, r.o_to) if t is not None]
            until = min(ends) if ends else None
            found.append(Neighbour(r.vm_id, r.name, r.tenant, r.host, max(r.s_from, r.o_from), until))
        return sorted(found, key=lambda n: (n.since, n.vm_name, n.vm_id))

    def neighbours_on_host(self, host: str, start: dt.datetime, end: dt.datetime | None = None) -> list[Neighbour]:
        """Every VM placed on ``host`` at the instant ``start`` or during [start, end).

        One :class:`Neighbour` per placement; ``since``/``until`` are that placement's valid_from/valid_to, not clipped
        to the window. Ordered by ``since``, then name.
        """
        start, end = _window(start, end)
        query = (
            sa.select(placements, vms.c.name, vms.c.tenant)
            .join(vms, vms.c.id == placements.c.vm_id)
            .where(placements.c.host == host, _valid_in(placements, start, end))
            .order_by(placements.c.valid_from, vms.c.name, placements.c.vm_id)
        )
        with self._read() as conn:
            self._require_host(conn, host)
            rows = conn.execute(query).all()
        return [Neighbour(r.vm_id, r.name, r.tenant, r.host, r.valid_from, r.valid_to) for r in rows]

    def vms_ever_on_host(self, host: str) -> list[Placement]:
        """Every placement ever made on ``host``, oldest first (a VM that came back appears once per stay)."""
        query = sa.select(placements).where(placements.c.host == host).order_by(*_PLACEMENT_ORDER)
        with self._read() as conn:
            self._require_host(conn, host)
            return [_placement(r) for r in conn.execute(query)]

    # -- events and alarms ---------------------------------------------------------------------------------------------

    def record_event(self, event: Event) -> Event:
        recorded = dataclasses.replace(
            event,
            time=_utc(event.time),
            severity=Severity(event.severity),
            data=_json(event.data, "event data"),
            id=None,
        )
        values = dataclasses.asdict(recorded) | {"severity": recorded.severity.value}
        del values["id"]
        with self._write() as conn:
            event_id = _new_id(conn.execute(sa.insert(events).values(**values)))
        return dataclasses.replace(recorded, id=event_id)

    def list_events(
        self,
        *,
        since: dt.datetime | None = None,
        kind_prefix: str | None = None,
        vm_id: str | None = None,
        host: str | None = None,
        min_severity: Severity | None = None,
        limit: int = 200,
        until: dt.datetime | None = None,
    ) -> list[Event]:
        """Events newest first; ``since`` is inclusive, ``until`` exclusive, ``kind_prefix`` matches literally."""
        if limit < 1:
            raise InvalidInput(f"limit must be at least 1, got {limit}")
        query = sa.select(events).order_by(events.c.time.desc(), events.c.id.desc()).limit(limit)
        if since is not None:
            query = query.where(events.c.time >= _utc(since, "since"))
        if until is not None:
            query = query.where(events.c.time < _utc(until, "until"))
        if kind_prefix:
            query = query.where(events.c.kind.startswith(kind_prefix, autoescape=True))
        if vm_id is not None:
            query = query.where(events.c.vm == vm_id)
        if host is not None:
            query = query.where(events.c.host == host)
        if min_severity is not None:
            floor = _SEVERITY_RANK[Severity(min_severity)]
            query = query.where(events.c.severity.in_([s.value for s, rank in _SEVERITY_RANK.items() if rank >= floor]))
        with self._read() as conn:
            return [_event(r) for r in conn.execute(query)]

    def open_alarm(self, kind: str, vm_id: str | None, host: str | None, message: str, at: dt.datetime) -> Alarm | None:
        """Open an alarm; if the same (kind, vm_id, host) is already open, bump last_seen and return None."""
        at = _utc(at)
        try:
            return self._open_alarm_once(kind, vm_id, host, message, at)
        except Conflict:
            # Another controller opened the same alarm between our check and our insert: it is open now.
            return self._open_alarm_once(kind, vm_id, host, message, at)

    def _open_alarm_once(
        self, kind: str, vm_id: str | None, host: str | None, message: str, at: dt.datetime
    ) -> Alarm | None:
        key = sa.and_(
            alarms.c.kind == kind,
            _eq_or_null(alarms.c.vm_id, vm_id),
            _eq_or_null(alarms.c.host, host),
            alarms.c.resolved_at.is_(None),
        )
        with self._write() as conn:
            bumped = conn.execute(sa.update(alarms).where(key).values(last_seen=at, message=message))
            if bumped.rowcount:
                return None
            values = {"kind": kind, "vm_id": vm_id, "host": host, "message": message, "first_seen": at, "last_seen": at}
            alarm_id = _new_id(conn.execute(sa.insert(alarms).values(**values)))
        return Alarm(id=alarm_id, kind=kind, vm_id=vm_id, host=host, message=message, first_seen=at, last_seen=at)

    def resolve_alarms(self, keep: Sequence[AlarmKey], at: dt.datetime, *, host: str | None = None) -> list[Alarm]:
        """Resolve every open alarm whose key is not in ``keep``; return those resolved.

        With ``host``, only alarms about that host are considered, so reconciling one host leaves the others' alarms
        alone.
        """
        at = _utc(at)
        keep_set = set(keep)
        query = sa.select(alarms).where(alarms.c.resolved_at.is_(None)).order_by(alarms.c.id)
        if host is not None:
            query = query.where(alarms.c.host == host)
        with self._write() as conn:
            open_rows = conn.execute(query)
            gone = [_alarm(r) for r in open_rows if (r.kind, r.vm_id, r.host) not in keep_set]
            if gone:
                conn.execute(
                    sa.update(alarms)
                    .where(alarms.c.id.in_([a.id for a in gone]), alarms.c.resolved_at.is_(None))
                    .values(resolved_at=at)
                )
        return [dataclasses.replace(a, resolved_at=at) for a in gone]

    def list_alarms(self, *, open_only: bool = True) -> list[Alarm]:
        query = sa.select(alarms).order_by(alarms.c.first_seen, alarms.c.id)
        if open_only:
            query = query.where(alarms.c.resolved_at.is_(None))
        with self._read() as conn:
            return [_alarm(r) for r in conn.execute(query)]

    # -- credentials and settings --------------------------------------------------------------------------------------

    def add_api_token(self, token_id: str, name: str, role: str, secret_hash: str, at: dt.datetime) -> ApiToken:
        """Store a token; only the hash of its secret is kept."""
        token = ApiToken(id=token_id, name=name, role=role, created_at=_utc(at))
        with self._write() as conn:
            if conn.scalar(sa.select(api_tokens.c.id).where(api_tokens.c.id == token_id)) is not None:
                raise Conflict(f"API token {token_id!r} already exists")
            conn.execute(sa.insert(api_tokens).values(**dataclasses.asdict(token), secret_hash=secret_hash))
        return token

    def find_api_token(self, token_id: str) -> tuple[ApiToken, str] | None:
        """The token and its secret hash, revoked or not (the caller decides what revocation means)."""
        with self._read() as conn:
            row = conn.execute(sa.select(api_tokens).where(api_tokens.c.id == token_id)).first()
        return None if row is None else (_token(row), row.secret_hash)

    def list_api_tokens(self) -> list[ApiToken]:
        with self._read() as conn:
            return [_token(r) for r in conn.execute(sa.select(api_tokens).order_by(api_tokens.c.created_at))]

    def revoke_api_token(self, token_id: str, at: dt.datetime) -> ApiToken:
        """Revoke the token at ``at``; revoking again keeps the first revocation time."""
        at = _utc(at)
        with self._write() as conn:
            conn.execute(
                sa.update(api_tokens)
                .where(api_tokens.c.id == token_id, api_tokens.c.revoked_at.is_(None))
                .values(revoked_at=at)
            )
            row = conn.execute(sa.select(api_tokens).where(api_tokens.c.id == token_id)).first()
        if row is None:
            raise NotFound(f"API token {token_id!r} not found")
        return _token(row)

    def add_enrol_token(self, host: str, secret_hash: str, expires_at: dt.datetime) -> None:
        expires_at = _utc(expires_at, "expires_at")
        with self._write() as conn:
            self._require_host(conn, host)
            conn.execute(sa.insert(enrol_tokens).values(host=host, secret_hash=secret_hash, expires_at=expires_at))

    def consume_enrol_token(self, host: str, secret_hash: str, at: dt.datetime) -> bool:
        """Atomically mark the host's unexpired (``at < expires_at``), unused token with this hash as used."""
        at = _utc(at)
        with self._write() as conn:
            used = conn.execute(
                sa.update(enrol_tokens)
                .where(
                    enrol_tokens.c.host == host,
                    enrol_tokens.c.secret_hash == secret_hash,
                    enrol_tokens.c.used_at.is_(None),
                    enrol_tokens.c.expires_at > at,
                )
                .values(used_at=at)
            )
        return used.rowcount > 0

    def add_certificate(self, cert: HostCertificate) -> None:
        values = dataclasses.asdict(cert)
        for name in ("not_after", "issued_at", "revoked_at"):
            if values[name] is not None:
                values[name] = _utc(values[name], name)
        with self._write() as conn:
            self._require_host(conn, cert.host)
            if conn.scalar(sa.select(certificates.c.serial).where(certificates.c.serial == cert.serial)) is not None:
                raise Conflict(f"a certificate with serial {cert.serial:x} already exists")
            conn.execute(sa.insert(certificates).values(**values))

    def get_certificate(self, serial: int) -> HostCertificate | None:
        with self._read() as conn:
            row = conn.execute(sa.select(certificates).where(certificates.c.serial == serial)).first()
        return None if row is None else _certificate(row)

    def list_certificates(self, host: str | None = None) -> list[HostCertificate]:
        query = sa.select(certificates).order_by(certificates.c.issued_at, certificates.c.serial)
        if host is not None:
            query = query.where(certificates.c.host == host)
        with self._read() as conn:
            return [_certificate(r) for r in conn.execute(query)]

    def revoke_certificate(self, serial: int, at: dt.datetime) -> HostCertificate:
        """Revoke at ``at``; revoking again keeps the first revocation time. NotFound for an unknown serial."""
        at = _utc(at)
        with self._write() as conn:
            conn.execute(
                sa.update(certificates)
                .where(certificates.c.serial == serial, certificates.c.revoked_at.is_(None))
                .values(revoked_at=at)
            )
            row = conn.execute(sa.select(certificates).where(certificates.c.serial == serial)).first()
        if row is None:
            raise NotFound(f"certificate with serial {serial:x} not found")
        return _certificate(row)

    def get_setting(self, key: str) -> Any | None:
        with self._read() as conn:
            return conn.scalar(sa.select(settings.c.value).where(settings.c.key == key))

    def put_setting(self, key: str, value: Any) -> None:
        """Store any JSON-serialisable value under ``key``, replacing what was there."""
        with self._write() as conn:
            insert = _insert_for(conn, settings).values(key=key, value=_json(value, f"setting {key!r}"))
            conn.execute(insert.on_conflict_do_update(index_elements=["key"], set_={"value": insert.excluded.value}))
