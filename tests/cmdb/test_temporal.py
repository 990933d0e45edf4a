"""Temporal CMDB queries on SQLite and PostgreSQL, against a hand-drawn history of 3 hosts and 5 VMs.

Minutes after t0 (``[from, to)``, half-open; ``…`` still open)::

    h1 │ a g1 [0,30)   b g1 [10,50) (deleted at 50)   c g2 [20,40)   e g1 [45,…)
    h2 │ c g1 [0,20)   a g2 [30,…)
    h3 │ d g1 [5,…)    c g3 [40,…)

Tenants: a, c, e belong to acme; b, d to globex.
"""

from __future__ import annotations

import datetime as dt

import pytest

from ferryman.cmdb.repository import Neighbour
from ferryman.cmdb.sql import SqlRepository
from ferryman.core.errors import InvalidInput, NotFound
from ferryman.core.models import VM, Placement

T0 = dt.datetime(2026, 11, 23, 10, 0, tzinfo=dt.UTC)
OPEN = None


def at(minutes: float) -> dt.datetime:
    return T0 + dt.timedelta(minutes=minutes)


def make_vm(name: str, tenant: str) -> VM:
    return VM(
        id=f"id-{name}",
        name=name,
        tenant=tenant,
        memory_mb=512,
        vcpus=1,
        disk_bytes=2**30,
        image="debian-12",
        canary="c4n4ry",
    )


def brief(neighbours: list[Neighbour]) -> list[tuple[str, str, dt.datetime, dt.datetime | None]]:
    return [(n.vm_name, n.host, n.since, n.until) for n in neighbours]


@pytest.fixture
def history(fleet: SqlRepository) -> SqlRepository:
    """The history drawn in the module docstring, written in time order through the public API."""
    fleet.add_vm(make_vm("a", "acme"), "h1", at(0))
    fleet.add_vm(make_vm("c", "acme"), "h2", at(0))
    fleet.add_vm(make_vm("d", "globex"), "h3", at(5))
    fleet.add_vm(make_vm("b", "globex"), "h1", at(10))
    fleet.move_vm("id-c", "h1", at(20))
    fleet.move_vm("id-a", "h2", at(30))
    fleet.move_vm("id-c", "h3", at(40))
    fleet.add_vm(make_vm("e", "acme"), "h1", at(45))
    fleet.delete_vm("id-b", at(50))
    return fleet


def test_neighbours_of_vm_at_an_instant(history: SqlRepository) -> None:
    """At t0+25m, a (h1) shares h1 with b and c; since/until are the whole overlap of the two placements."""
    assert history.neighbours_of_vm("id-a", at(25)) == [
        Neighbour("id-b", "b", "globex", "h1", at(10), at(30)),
        Neighbour("id-c", "c", "acme", "h1", at(20), at(30)),
    ]


def test_vm_leaving_exactly_at_t_is_not_a_neighbour_at_t(history: SqlRepository) -> None:
    """a leaves h1 at t0+30m: at that instant b's only neighbour is c, and a itself (now on h2) has none."""
    assert brief(history.neighbours_of_vm("id-b", at(30))) == [("c", "h1", at(20), at(40))]
    assert history.neighbours_of_vm("id-a", at(30)) == []
    assert brief(history.neighbours_of_vm("id-b", at(29.99))) == [
        ("a", "h1", at(10), at(30)),
        ("c", "h1", at(20), at(40)),
    ]


def test_vm_that_left_before_t_is_not_a_neighbour_at_t(history: SqlRepository) -> None:
    """At t0+45m, a (left h1 at 30) and c (left at 40) are gone; b's only neighbour is e, until b's deletion at 50."""
    assert history.neighbours_of_vm("id-b", at(45)) == [Neighbour("id-e", "e", "acme", "h1", at(45), at(50))]


def test_neighbours_of_vm_over_an_interval(history: SqlRepository) -> None:
    """Over [0, 60), c met a and b on h1 and d on h3; never a on h2 (c left h2 at 20, a came at 30)."""
    assert brief(history.neighbours_of_vm("id-c", at(0), at(60))) == [
        ("a", "h1", at(20), at(30)),
        ("b", "h1", at(20), at(40)),
        ("d", "h3", at(40), OPEN),
    ]


def test_neighbours_of_vm_window_bounds(history: SqlRepository) -> None:
    """Over [35, 45), c's neighbours are b (h1) and d (h3, from 40); a, gone from h1 at 30, is not one."""
    assert brief(history.neighbours_of_vm("id-c", at(35), at(45))) == [
        ("b", "h1", at(20), at(40)),
        ("d", "h3", at(40), OPEN),
    ]
    # The window is half-open too: over [25, 40) c's h3 stay (from 40) does not count.
    assert brief(history.neighbours_of_vm("id-c", at(25), at(40))) == [
        ("a", "h1", at(20), at(30)),
        ("b", "h1", at(20), at(40)),
    ]


def test_one_neighbour_per_overlapping_pair_of_placements(fleet: SqlRepository) -> None:
    """y leaves x's host and comes back: x has two Neighbour entries for y, one per stay."""
    fleet.add_vm(make_vm("x", "acme"), "h1", at(0))
    fleet.add_vm(make_vm("y", "globex"), "h1", at(0))
    fleet.move_vm("id-y", "h2", at(10))
    fleet.move_vm("id-y", "h1", at(20))
    assert brief(fleet.neighbours_of_vm("id-x", at(0), at(30))) == [
        ("y", "h1", at(0), at(10)),
        ("y", "h1", at(20), OPEN),
    ]
    assert fleet.neighbours_of_vm("id-x", at(15)) == []


def test_neighbours_on_host(history: SqlRepository) -> None:
    """VMs on a host at an instant or during a window, each with its own placement interval."""
    assert brief(history.neighbours_on_host("h1", at(25))) == [
        ("a", "h1", at(0), at(30)),
        ("b", "h1", at(10), at(50)),
        ("c", "h1", at(20), at(40)),
    ]
    assert brief(history.neighbours_on_host("h1", at(40))) == [("b", "h1", at(10), at(50))]
    assert brief(history.neighbours_on_host("h1", at(40), at(46))) == [
        ("b", "h1", at(10), at(50)),
        ("e", "h1", at(45), OPEN),
    ]
    assert brief(history.neighbours_on_host("h2", at(0), at(60))) == [
        ("c", "h2", at(0), at(20)),
        ("a", "h2", at(30), OPEN),
    ]
    assert history.neighbours_on_host("h2", at(20), at(30)) == []


def test_vms_ever_on_host(history: SqlRepository) -> None:
    """Every placement ever made on h1 and h3, oldest first, including the deleted VM b."""
    assert history.vms_ever_on_host("h1") == [
        Placement("id-a", "h1", 1, at(0), at(30)),
        Placement("id-b", "h1", 1, at(10), at(50)),
        Placement("id-c", "h1", 2, at(20), at(40)),
        Placement("id-e", "h1", 1, at(45), OPEN),
    ]
    assert history.vms_ever_on_host("h3") == [
        Placement("id-d", "h3", 1, at(5), OPEN),
        Placement("id-c", "h3", 3, at(40), OPEN),
    ]


def test_host_chain(history: SqlRepository) -> None:
    """c's chain is h2 → h1 → h3 with generations 1, 2, 3 and no gaps."""
    assert history.host_chain("id-c") == [
        Placement("id-c", "h2", 1, at(0), at(20)),
        Placement("id-c", "h1", 2, at(20), at(40)),
        Placement("id-c", "h3", 3, at(40), OPEN),
    ]
    assert history.get_vm("id-c").generation == 3


def test_placements_on_now_and_at_an_instant(history: SqlRepository) -> None:
    """Open placements on h1 are e's only (b was deleted); at t0+20m, a, b and the just-arrived c."""
    assert history.placements_on("h1") == [Placement("id-e", "h1", 1, at(45), OPEN)]
    assert [p.vm_id for p in history.placements_on("h1", at=at(20))] == ["id-a", "id-b", "id-c"]
    assert [p.vm_id for p in history.placements_on("h1", at=at(50))] == ["id-e"]


def test_temporal_queries_reject_bad_input(history: SqlRepository) -> None:
    """An empty or reversed window is InvalidInput; an unknown VM or host is NotFound."""
    with pytest.raises(InvalidInput):
        history.neighbours_of_vm("id-a", at(10), at(10))
    with pytest.raises(InvalidInput):
        history.neighbours_on_host("h1", at(10), at(5))
    with pytest.raises(NotFound):
        history.neighbours_of_vm("id-nope", at(10))
    with pytest.raises(NotFound):
        history.neighbours_on_host("h9", at(10))
    with pytest.raises(NotFound):
        history.vms_ever_on_host("h9")
    with pytest.raises(NotFound):
        history.host_chain("id-nope")


def test_open_placements_are_each_vms_current_placement(history: SqlRepository) -> None:
    """The fleet listing's one query agrees with asking VM by VM; a deleted VM has none."""
    placed = history.open_placements()
    assert {vm_id: p.host for vm_id, p in placed.items()} == {"id-a": "h2", "id-c": "h3", "id-d": "h3", "id-e": "h1"}
    for vm_id, placement in placed.items():
        assert history.current_placement(vm_id) == placement
