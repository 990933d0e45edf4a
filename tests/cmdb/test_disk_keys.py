"""Disk keys of encrypted VMs: the CMDB rows (SQLite and PostgreSQL) and the controller's wrapping, destruction and
KEK rotation (:mod:`ferryman.controller.keys`) on top of them."""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command

from ferryman.cmdb.engine import alembic_config
from ferryman.cmdb.key_store import DiskKeyRecord
from ferryman.cmdb.schema import disk_keys, metadata
from ferryman.cmdb.sql import SqlRepository
from ferryman.controller.keys import KEY_BYTES, Copy, DiskKeys
from ferryman.core.errors import Conflict, InvalidInput, NotFound, StorageError
from ferryman.core.models import VM

from .conftest import T0, FixedClock


def at(minutes: float) -> dt.datetime:
    return T0 + dt.timedelta(minutes=minutes)


@pytest.fixture
def web(fleet: SqlRepository) -> SqlRepository:
    vm = VM(
        id="id-web",
        name="web",
        tenant="acme",
        memory_mb=128,
        vcpus=1,
        disk_bytes=1 << 26,
        image="img",
        canary="c",
        encrypted=True,
    )
    fleet.add_vm(vm, "h1", at(0))
    return fleet


@pytest.fixture
def keys(web: SqlRepository, tmp_path: Path) -> DiskKeys:
    return DiskKeys(web, tmp_path / "keys", FixedClock())


def record(key_id: str, host: str = "h1", generation: int = 1) -> DiskKeyRecord:
    return DiskKeyRecord(key_id, "id-web", host, generation, kek_id=1, wrapped=b"w" * 60, created_at=at(1))


def test_encrypted_flag_round_trips(web: SqlRepository) -> None:
    assert web.get_vm("web").encrypted is True


def test_one_live_key_per_copy_and_destroyed_rows_keep_no_key(web: SqlRepository) -> None:
    """A copy has at most one live key; destroying keeps the history (when, why) and drops the wrapped key."""
    web.add_disk_key(record("k1"))
    web.add_disk_key(record("k2", host="h2", generation=2))
    with pytest.raises(Conflict, match="already has a key"):
        web.add_disk_key(record("k3"))
    with pytest.raises(InvalidInput):
        web.add_disk_key(dataclasses.replace(record("k4", generation=3), wrapped=None))
    with pytest.raises(NotFound):
        web.add_disk_key(dataclasses.replace(record("k5"), vm_id="nope"))
    live = web.live_disk_key("id-web", "h1", 1)
    assert live is not None and live.wrapped == b"w" * 60
    gone = web.destroy_disk_keys("id-web", at(2), "test", host="h1")
    assert [(k.id, k.wrapped, k.destroyed_reason) for k in gone] == [("k1", None, "test")]
    assert web.destroy_disk_keys("id-web", at(3), "again", host="h1") == []  # idempotent
    assert web.live_disk_key("id-web", "h1", 1) is None
    web.add_disk_key(record("k6"))  # the copy may be keyed again (the VM came back)
    rows = {k.id: k for k in web.list_disk_keys("id-web")}
    assert rows["k1"].wrapped is None and rows["k1"].kek_id is None and rows["k1"].destroyed_at == at(2)
    assert [k.id for k in web.list_disk_keys("id-web", live_only=True)] == ["k2", "k6"]
    with web.engine.connect() as conn:  # no row keeps key material once destroyed
        assert conn.scalar(sa.select(disk_keys.c.wrapped).where(disk_keys.c.id == "k1")) is None
    assert web.rewrap_disk_keys({"k2": (7, b"x" * 60)}) == 1
    assert web.live_disk_key("id-web", "h2", 2) == dataclasses.replace(rows["k2"], kek_id=7, wrapped=b"x" * 60)
    with pytest.raises(NotFound):
        web.rewrap_disk_keys({"k1": (7, b"x" * 60)})


def test_the_keys_revision_downgrades_and_upgrades(repo: SqlRepository) -> None:
    config = alembic_config()
    with repo.engine.begin() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, "0003")
        assert "disk_keys" not in sa.inspect(conn).get_table_names()
        assert "encrypted" not in {c["name"] for c in sa.inspect(conn).get_columns("vms")}
        command.upgrade(config, "head")
        assert set(sa.inspect(conn).get_table_names()) == {"alembic_version", *metadata.tables}


def test_keys_are_stored_wrapped_and_bound_to_their_copy(keys: DiskKeys, web: SqlRepository) -> None:
    """The CMDB never holds a key in the clear, and a wrapped key moved to another copy's row does not unwrap."""
    a, b = Copy("id-web", "h1", 1), Copy("id-web", "h2", 2)
    key_a = keys.create(a)
    key_b = keys.ensure(b)
    assert len(key_a) == KEY_BYTES and key_a != key_b
    assert keys.get(a) == key_a and keys.ensure(b) == key_b  # ensure finds the key it made
    rows = {(r.host, r.generation): r for r in web.list_disk_keys("id-web")}
    assert all(r.wrapped is not None and key_a not in r.wrapped and key_b not in r.wrapped for r in rows.values())
    with pytest.raises(Conflict):
        keys.create(a)
    # a tampered row: b's wrapped key copied into a's row
    web.rewrap_disk_keys({rows[("h1", 1)].id: (rows[("h2", 2)].kek_id or 0, rows[("h2", 2)].wrapped or b"")})
    with pytest.raises(StorageError, match="does not unwrap"):
        keys.get(a)


def test_destroying_a_key_rotates_the_kek_so_no_remnant_unwraps(keys: DiskKeys, web: SqlRepository) -> None:
    """After destruction the old KEK file is overwritten and gone, live keys still open under the new KEK, and a
    remnant of the destroyed row (as a database log or backup would keep it) unwraps under no KEK there is."""
    a, b = Copy("id-web", "h1", 1), Copy("id-web", "h2", 2)
    key_a, key_b = keys.create(a), keys.create(b)
    remnant = web.live_disk_key(a.vm_id, a.host, a.generation)
    assert remnant is not None and remnant.kek_id == 1
    old_kek = (keys.dir / "kek-1").read_bytes()
    assert keys.destroy("id-web", "test", host="h1") == [remnant.id]
    assert keys.destroy("id-web", "test", host="h1") == []
    assert sorted(p.name for p in keys.dir.iterdir()) == ["kek-2"]
    assert keys.get(b) == key_b
    with pytest.raises(NotFound, match="no live disk key"):
        keys.get(a)
    for kek_id in (1, 2):
        with pytest.raises((StorageError, NotFound)):
            keys._unwrap(dataclasses.replace(remnant, kek_id=kek_id))
    assert old_kek not in (keys.dir / "kek-2").read_bytes()
    assert oct(os.stat(keys.dir).st_mode & 0o777) == "0o700"
    assert oct(os.stat(keys.dir / "kek-2").st_mode & 0o777) == "0o600"
    assert key_a != key_b


def test_shared_storage_copies_share_the_key_in_rows_of_their_own(keys: DiskKeys) -> None:
    """The destination of a shared-storage migration opens the same images: same key, own row; destroying the
    source's row leaves the destination's access intact."""
    src, dst = Copy("id-web", "h1", 1), Copy("id-web", "h2", 2)
    key = keys.create(src)
    assert keys.share(src, dst) == key and keys.share(src, dst) == key
    keys.destroy("id-web", "source lost", host="h1", generation=1)
    assert keys.get(dst) == key
    with pytest.raises(NotFound):
        keys.share(src, Copy("id-web", "h3", 2))


def test_a_rotation_that_failed_after_the_destruction_happens_on_the_next_call(
    keys: DiskKeys, web: SqlRepository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rows go first, then the KEK rotates: if the rotation fails, the next destroy (nothing left to destroy)
    or the controller's next start still rotates, so the destroyed key's old KEK does not survive."""
    keys.create(Copy("id-web", "h1", 1))
    keys.create(Copy("id-web", "h2", 2))
    real = DiskKeys._new_kek

    def failing(self: DiskKeys, kek_id: int) -> int:
        raise StorageError("disk full")

    monkeypatch.setattr(DiskKeys, "_new_kek", failing)
    with pytest.raises(StorageError):
        keys.destroy("id-web", "test", host="h1")
    monkeypatch.setattr(DiskKeys, "_new_kek", real)
    assert (keys.dir / "kek-1").exists()  # not rotated yet
    restarted = DiskKeys(web, keys.dir, FixedClock())  # a controller start finishes it
    assert sorted(p.name for p in keys.dir.iterdir()) == ["kek-2"]
    assert restarted.get(Copy("id-web", "h2", 2))
    monkeypatch.setattr(DiskKeys, "_new_kek", failing)
    with pytest.raises(StorageError):
        restarted.destroy("id-web", "test", host="h2")
    monkeypatch.setattr(DiskKeys, "_new_kek", real)
    assert restarted.destroy("id-web", "again", host="h2") == []  # nothing left to destroy, but it rotates
    assert sorted(p.name for p in keys.dir.iterdir()) == ["kek-3"]
