"""Inventory on SQL: :class:`SqlInventoryMixin` implements :class:`~ferryman.cmdb.repository.InventoryRepository`,
:class:`~ferryman.cmdb.repository.VMRepository` and :class:`~ferryman.cmdb.repository.TemporalQueries` for
:class:`~ferryman.cmdb.sql.SqlRepository`: sites, hosts, tenants, VMs and the temporal relation *VM runs on host*.

It exists so that placements change only in short transactions that keep the CMDB's invariants: a VM has at most one
open placement, a move closes the old placement, opens the new one and bumps the VM's generation in one transaction
(the migration commit point, shared with :meth:`~ferryman.cmdb.journal_sql.SqlJournalMixin.commit_migration` through
:func:`move_vm_in`), and a placement row is never edited except to set ``valid_to`` once. On PostgreSQL, writes lock
the VM row and use guarded updates (``WHERE valid_to IS NULL``, ``WHERE generation = n``) so concurrent controllers
cannot both move a VM.

It decides nothing (no policy, no scheduling) and does not read the system clock for facts: callers pass ``at``; the
injected clock only stamps ``created_at`` defaults.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

import sqlalchemy as sa

from ferryman.cmdb.repository import Neighbour
from ferryman.cmdb.schema import hosts, placements, sites, tenants, vms
from ferryman.cmdb.sql_base import SqlBase, from_row, insert_for, require_host, vm_row
from ferryman.cmdb.values import as_json as _json
from ferryman.cmdb.values import utc as _utc
from ferryman.core.errors import Conflict, InvalidInput, NotFound
from ferryman.core.models import VM, Host, HostState, Placement, Site, Tenant, VMState

HOST_MUTABLE = frozenset(
    {"zone", "subnet", "virt_type", "hypervisor", "hypervisor_version", "patch_level", "role", "memory_mb", "underlay"}
)
_PLACEMENT_ORDER = (placements.c.valid_from, placements.c.generation, placements.c.vm_id)


def _window(start: dt.datetime, end: dt.datetime | None) -> tuple[dt.datetime, dt.datetime | None]:
    start = _utc(start, "start")
    if end is None:
        return start, None
    end = _utc(end, "end")
    if end <= start:
        raise InvalidInput(f"empty window: end {end.isoformat()} is not after start {start.isoformat()}")
    return start, end


def _valid_in(p: sa.FromClause, start: dt.datetime, end: dt.datetime | None) -> sa.ColumnElement[bool]:
    """Placement ``p`` is non-empty and overlaps the instant ``start`` (end None) or the window [start, end)."""
    c = p.c
    open_or_after = sa.or_(c.valid_to.is_(None), c.valid_to > start)
    non_empty = sa.or_(c.valid_to.is_(None), c.valid_to > c.valid_from)
    began = c.valid_from <= start if end is None else c.valid_from < end
    return sa.and_(began, open_or_after, non_empty)


def _host(row: sa.Row[Any]) -> Host:
    return from_row(Host, row, state=HostState(row.state))


def _vm(row: sa.Row[Any]) -> VM:
    return from_row(VM, row, state=VMState(row.state), profile=dict(row.profile))


def _placement(row: sa.Row[Any]) -> Placement:
    return from_row(Placement, row)


# -- statements used inside transactions ------------------------------------------------------------------------------


def _open_placement(conn: sa.Connection, vm_id: str) -> sa.Row[Any] | None:
    query = sa.select(placements).where(placements.c.vm_id == vm_id, placements.c.valid_to.is_(None))
    return conn.execute(query).first()


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


def move_vm_in(
    conn: sa.Connection,
    vm_id: str,
    to_host: str,
    at: dt.datetime,
    *,
    expected_generation: int | None,
    from_host: str | None = None,
) -> tuple[VM, Placement]:
    """:meth:`SqlInventoryMixin.move_vm` inside the caller's transaction ``conn`` (``at`` already UTC), so the
    migration commit moves the VM in the same transaction as it updates the journal. With ``from_host``, also Conflict
    unless the open placement is on that host. Every check runs before the first write; a Conflict from a guarded
    write leaves the caller's transaction to roll back what was written."""
    row = vm_row(conn, vm_id, lock=True)
    if row.state == VMState.DELETED.value:
        raise Conflict(f"VM {vm_id!r} is deleted and cannot move")
    if expected_generation is not None and row.generation != expected_generation:
        raise Conflict(f"VM {vm_id!r} is at generation {row.generation}, not {expected_generation}: it moved meanwhile")
    require_host(conn, to_host)
    current = _open_placement(conn, vm_id)
    if current is None:
        raise Conflict(f"VM {vm_id!r} has no open placement to move from")
    if from_host is not None and current.host != from_host:
        raise Conflict(f"VM {vm_id!r} is on {current.host!r}, not on {from_host!r}")
    if current.host == to_host:
        raise Conflict(f"VM {vm_id!r} is already on {to_host!r}")
    _close_placement(conn, current, at)
    generation = row.generation + 1
    bumped = conn.execute(
        sa.update(vms).where(vms.c.id == vm_id, vms.c.generation == row.generation).values(generation=generation)
    )
    if bumped.rowcount != 1:
        raise Conflict(f"VM {vm_id!r} changed generation concurrently")
    placement = Placement(vm_id=vm_id, host=to_host, generation=generation, valid_from=at)
    conn.execute(sa.insert(placements).values(**dataclasses.asdict(placement)))
    return dataclasses.replace(_vm(row), generation=generation), placement


class SqlInventoryMixin(SqlBase):
    """Inventory, VMs, placements and the questions over time, for :class:`~ferryman.cmdb.sql.SqlRepository`."""

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
            conn.execute(insert_for(conn, tenants).values(name=name).on_conflict_do_nothing(index_elements=["name"]))
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
            require_host(conn, host)
            if conn.scalar(sa.select(tenants.c.name).where(tenants.c.name == vm.tenant)) is None:
                raise NotFound(f"tenant {vm.tenant!r} not found")
            if conn.scalar(sa.select(vms.c.id).where(vms.c.id == vm.id)) is not None:
                raise Conflict(f"a VM with id {vm.id!r} already exists")
            live = vms.c.state != VMState.DELETED.value
            taken = conn.scalar(sa.select(vms.c.id).where(vms.c.tenant == vm.tenant, vms.c.name == vm.name, live))
            if taken is not None:
                raise Conflict(f"tenant {vm.tenant!r} has a VM named {vm.name!r} already ({taken})")
            values = {f.name: getattr(created, f.name) for f in dataclasses.fields(VM)} | {"state": created.state.value}
            conn.execute(sa.insert(vms).values(**values))
            conn.execute(
                sa.insert(placements).values(vm_id=vm.id, host=host, generation=created.generation, valid_from=at)
            )
        return created

    def get_vm(self, name_or_id: str, *, tenant: str | None = None) -> VM:
        """The VM with this id; else the live VM with this name; else the most recently deleted one of this name.

        Names are unique within a tenant only: ``tenant`` resolves a name (and admits an id) in that tenant alone, so
        another tenant's VM is not found; without it, a name that live VMs of several tenants carry is ambiguous
        (InvalidInput naming each by tenant and id). ``tenant/name`` names that tenant's VM of that name."""
        asked = name_or_id
        scope, slash, name = name_or_id.partition("/")
        if slash:  # ``tenant/name``: that tenant's VM of that name
            if tenant is not None and scope != tenant:
                raise NotFound(f"VM {asked!r} not found")
            tenant, name_or_id = scope, name
        own = [] if tenant is None else [vms.c.tenant == tenant]
        with self._read() as conn:
            row = conn.execute(sa.select(vms).where(vms.c.id == name_or_id, *own)).first()
            if row is None:
                named = sa.select(vms).where(vms.c.name == name_or_id, *own)
                live = conn.execute(named.where(vms.c.state != VMState.DELETED.value).order_by(vms.c.tenant)).all()
                if len(live) > 1:
                    which = ", ".join(f"{r.tenant} ({r.id})" for r in live)
                    raise InvalidInput(
                        f"VM name {name_or_id!r} is used in several tenants: {which}; name it as tenant/name or by id"
                    )
                row = live[0] if live else None
            if row is None:
                row = conn.execute(named.order_by(vms.c.deleted_at.desc(), vms.c.created_at.desc()).limit(1)).first()
        if row is None:
            raise NotFound(f"VM {asked!r} not found")
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
            row = vm_row(conn, vm_id, lock=True)
            if row.state == VMState.DELETED.value:
                raise Conflict(f"VM {vm_id!r} is deleted")
            conn.execute(sa.update(vms).where(vms.c.id == vm_id).values(state=state.value))
        return dataclasses.replace(_vm(row), state=state)

    def delete_vm(self, vm_id: str, at: dt.datetime) -> VM:
        """Mark the VM deleted and close its open placement at ``at``, in one transaction."""
        at = _utc(at)
        with self._write() as conn:
            row = vm_row(conn, vm_id, lock=True)
            if row.state == VMState.DELETED.value:
                raise Conflict(f"VM {vm_id!r} is already deleted")
            current = _open_placement(conn, vm_id)
            if current is not None:
                _close_placement(conn, current, at)
            conn.execute(sa.update(vms).where(vms.c.id == vm_id).values(state=VMState.DELETED.value, deleted_at=at))
        return dataclasses.replace(_vm(row), state=VMState.DELETED)

    def current_placement(self, vm_id: str) -> Placement | None:
        with self._read() as conn:
            vm_row(conn, vm_id)
            row = _open_placement(conn, vm_id)
        return None if row is None else _placement(row)

    def open_placements(self) -> dict[str, Placement]:
        """Every VM's current placement, by VM id, in one query (a listing of the fleet)."""
        query = sa.select(placements).where(placements.c.valid_to.is_(None))
        with self._read() as conn:
            return {r.vm_id: _placement(r) for r in conn.execute(query)}

    def placements_on(self, host: str, at: dt.datetime | None = None) -> list[Placement]:
        """Open placements on ``host`` (``at`` None), or those valid at the instant ``at``."""
        query = sa.select(placements).where(placements.c.host == host).order_by(*_PLACEMENT_ORDER)
        if at is None:
            query = query.where(placements.c.valid_to.is_(None))
        else:
            query = query.where(_valid_in(placements, _utc(at, "at"), None))
        with self._read() as conn:
            require_host(conn, host)
            return [_placement(r) for r in conn.execute(query)]

    def host_chain(self, vm_id: str) -> list[Placement]:
        """Every placement of the VM, oldest first: the hosts that make up its trusted computing base."""
        query = sa.select(placements).where(placements.c.vm_id == vm_id).order_by(*_PLACEMENT_ORDER)
        with self._read() as conn:
            vm_row(conn, vm_id)
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
            return move_vm_in(conn, vm_id, to_host, at, expected_generation=expected_generation)

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
            vm_row(conn, vm_id)
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
            require_host(conn, host)
            rows = conn.execute(query).all()
        return [Neighbour(r.vm_id, r.name, r.tenant, r.host, r.valid_from, r.valid_to) for r in rows]

    def vms_ever_on_host(self, host: str) -> list[Placement]:
        """Every placement ever made on ``host``, oldest first (a VM that came back appears once per stay)."""
        query = sa.select(placements).where(placements.c.host == host).order_by(*_PLACEMENT_ORDER)
        with self._read() as conn:
            require_host(conn, host)
            return [_placement(r) for r in conn.execute(query)]
