"""Impact analysis on SQL: :class:`SqlImpact` reads the temporal placements, VMs and the image registry of the CMDB
to answer who an incident may have touched (:mod:`ferryman.cmdb.impact` assembles the answer).

Why it exists apart from :class:`~ferryman.cmdb.sql.SqlRepository`: impact analysis reads across the whole history
and is used by incident response only, so it stays out of the repository protocol; build it on the repository's
engine, ``SqlImpact(repo.engine)``. It only reads (every method is one read transaction; the reports read all their
parts in one, so they see one state of the CMDB), decides nothing and does not read the clock.

The queries select the placements that overlap the window and each other with strict comparisons on half-open
intervals (touching placements never match); the exact, clipped overlap is computed by the pure functions of
:mod:`ferryman.cmdb.impact`. Deleted VMs count wherever placements do: they ran there.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Iterator

import sqlalchemy as sa

from ferryman.cmdb.engine import db_errors
from ferryman.cmdb.impact import (
    CoResidence,
    HostResidence,
    ImageMatch,
    ImpactReport,
    IncidentVM,
    Span,
    Window,
    co_residences,
    host_impact,
    residences,
    vm_impact,
)
from ferryman.cmdb.schema import VM_DELETED, images, placements, vms
from ferryman.cmdb.sql_base import SqlBase, require_host, vm_row
from ferryman.core.clock import Clock

_SPAN_COLUMNS = (
    placements.c.vm_id,
    vms.c.name,
    vms.c.tenant,
    vms.c.state,
    placements.c.host,
    placements.c.valid_from,
    placements.c.valid_to,
)


def _spans(conn: sa.Connection, *conditions: sa.ColumnElement[bool]) -> list[Span]:
    query = sa.select(*_SPAN_COLUMNS).join(vms, vms.c.id == placements.c.vm_id).where(*conditions)
    return [Span(r[0], r[1], r[2], r[3] == VM_DELETED, r[4], r[5], r[6]) for r in conn.execute(query)]


def _spans_of_vm(conn: sa.Connection, vm_id: str, window: Window) -> list[Span]:
    """The VM's non-empty placements that overlap the window, oldest first."""
    c = placements.c
    conditions = [
        c.vm_id == vm_id,
        sa.or_(c.valid_to.is_(None), sa.and_(c.valid_to > window.since, c.valid_to > c.valid_from)),
    ]
    if window.until is not None:
        conditions.append(c.valid_from < window.until)
    return sorted(_spans(conn, *conditions), key=lambda s: s.valid_from)


def _spans_on_host(conn: sa.Connection, host: str, window: Window, *, besides: str | None = None) -> list[Span]:
    """The non-empty placements on ``host`` (of VMs other than ``besides``) that overlap the window.

    Two statements, the open placements and those that end after ``since``, so that each is one range of the index
    ``ix_placements_host_valid_to`` (host, valid_to, valid_from, vm_id), read without touching the table: the work
    grows with the answer, not with the host's whole history (``valid_to IS NULL OR valid_to > :since`` is not one
    range on either backend).
    """
    c = placements.c
    common = [c.host == host]
    if besides is not None:
        common.append(c.vm_id != besides)
    if window.until is not None:
        common.append(c.valid_from < window.until)
    still_open = _spans(conn, *common, c.valid_to.is_(None))
    ended = _spans(conn, *common, c.valid_to > window.since, c.valid_to > c.valid_from)
    return still_open + ended


def _co_resident_spans(conn: sa.Connection, subject: list[Span], window: Window) -> list[Span]:
    """The placements of other VMs that overlap one of ``subject``'s placements inside the window, found host by
    host within the part of each subject placement that lies in the window."""
    found: list[Span] = []
    for s in subject:
        clipped = window.clip(s.valid_from, s.valid_to)
        if clipped is not None:
            found.extend(_spans_on_host(conn, s.host, Window(*clipped), besides=s.vm_id))
    return found


def _incident_vm(conn: sa.Connection, vm_id: str) -> IncidentVM:
    row = vm_row(conn, vm_id)
    return IncidentVM(row.id, row.name, row.tenant, row.image, deleted=row.state == VM_DELETED)


def _vms_of_images(conn: sa.Connection, names: list[str], besides: str) -> list[ImageMatch]:
    """The live VMs other than ``besides`` booted from one of the images ``names`` (index ``ix_vms_image``)."""
    query = (
        sa.select(vms.c.id, vms.c.name, vms.c.tenant, vms.c.image, images.c.os, images.c.version)
        .select_from(vms.outerjoin(images, images.c.name == vms.c.image))
        .where(vms.c.image.in_(names), vms.c.state != VM_DELETED, vms.c.id != besides)
        .order_by(vms.c.tenant, vms.c.name, vms.c.id)
    )
    return [ImageMatch(*r) for r in conn.execute(query)]


def _same_image(conn: sa.Connection, vm: IncidentVM) -> list[ImageMatch]:
    return _vms_of_images(conn, [vm.image], vm.id)


def _same_baseline(conn: sa.Connection, vm: IncidentVM) -> list[ImageMatch]:
    """A registry image's baseline is its (os, version); an image outside the registry is only its own name."""
    baseline = conn.execute(sa.select(images.c.os, images.c.version).where(images.c.name == vm.image)).first()
    names = {vm.image}
    if baseline is not None:
        same = sa.select(images.c.name).where(images.c.os == baseline.os, images.c.version == baseline.version)
        names.update(conn.scalars(same))
    return _vms_of_images(conn, sorted(names), vm.id)


class SqlImpact(SqlBase):
    """Impact analysis queries over one CMDB engine (``SqlImpact(repo.engine)``). Raises NotFound for an unknown
    VM or host, InvalidInput for a naive time or an empty window."""

    def __init__(self, engine: sa.Engine, *, clock: Clock | None = None) -> None:
        super().__init__(engine, clock=clock)
        # A method reads with several statements. SQLite's read transaction already sees one snapshot throughout
        # (WAL); PostgreSQL's default, READ COMMITTED, would give each statement its own, so a migration committed
        # in between could make the subject's placements and its neighbours' disagree.
        if engine.dialect.name == "postgresql":
            self._snapshot: sa.Engine = engine.execution_options(
                isolation_level="REPEATABLE READ", postgresql_readonly=True
            )
        else:
            self._snapshot = engine

    @contextlib.contextmanager
    def _read(self) -> Iterator[sa.Connection]:
        with db_errors(), self._snapshot.begin() as conn:
            yield conn

    def co_residents(self, vm_id: str, since: dt.datetime, until: dt.datetime | None = None) -> list[CoResidence]:
        """Every other VM that shared a host with ``vm_id`` in ``[since, until)``: one row per uninterrupted overlap
        per host, clipped to the window, ordered by start, VM name, host."""
        window = Window(since, until)
        with self._read() as conn:
            vm_row(conn, vm_id)
            subject = _spans_of_vm(conn, vm_id, window)
            return co_residences(subject, _co_resident_spans(conn, subject, window), window)

    def vms_on_host_since(self, host: str, since: dt.datetime, until: dt.datetime | None = None) -> list[HostResidence]:
        """Every VM whose host chain includes ``host`` in ``[since, until)``: one row per stay, clipped to the window,
        ordered by start, VM name."""
        window = Window(since, until)
        with self._read() as conn:
            require_host(conn, host)
            return residences(_spans_on_host(conn, host, window), window)

    def host_chain(self, vm_id: str, since: dt.datetime, until: dt.datetime | None = None) -> list[HostResidence]:
        """The incident VM's own stays in ``[since, until)``, oldest first, clipped to the window."""
        window = Window(since, until)
        with self._read() as conn:
            vm_row(conn, vm_id)
            return residences(_spans_of_vm(conn, vm_id, window), window)

    def same_image(self, vm_id: str) -> list[ImageMatch]:
        """The live VMs other than ``vm_id`` booted from the same image (by name), by tenant and name."""
        with self._read() as conn:
            return _same_image(conn, _incident_vm(conn, vm_id))

    def same_baseline(self, vm_id: str) -> list[ImageMatch]:
        """The live VMs other than ``vm_id`` whose registry image has the same os and version as ``vm_id``'s, and
        those of the same image (a superset of :meth:`same_image`). If ``vm_id``'s image is not in the registry,
        only the image name identifies the baseline, and this equals :meth:`same_image`."""
        with self._read() as conn:
            return _same_baseline(conn, _incident_vm(conn, vm_id))

    def vm_report(self, vm_id: str, since: dt.datetime, until: dt.datetime | None = None) -> ImpactReport:
        """The whole impact of an incident at ``vm_id``, read in one transaction."""
        window = Window(since, until)
        with self._read() as conn:
            vm = _incident_vm(conn, vm_id)
            subject = _spans_of_vm(conn, vm_id, window)
            others = _co_resident_spans(conn, subject, window)
            image, baseline = _same_image(conn, vm), _same_baseline(conn, vm)
        return vm_impact(
            vm,
            window,
            co_residents=co_residences(subject, others, window),
            host_chain=residences(subject, window),
            same_image=image,
            same_baseline=baseline,
        )

    def host_report(self, host: str, since: dt.datetime, until: dt.datetime | None = None) -> ImpactReport:
        """The impact of an incident at ``host``, read in one transaction."""
        window = Window(since, until)
        with self._read() as conn:
            require_host(conn, host)
            spans = _spans_on_host(conn, host, window)
        return host_impact(host, window, residents=residences(spans, window))
