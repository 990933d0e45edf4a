"""Secure live migration on a running lab, end to end through the CLI: the VM keeps running, its disk records arrive
without a gap, the source is gone and scrubbed, hooks can veto, cancel rolls back, tickets cannot be replayed."""

from __future__ import annotations

import dataclasses
import json
import re
import ssl
import time

import httpx
import pytest

from ferryman.agent.storage.images import is_encrypted_image
from ferryman.cmdb.sql import open_repository
from ferryman.controller.keys import Copy, DiskKeys
from ferryman.core.clock import SystemClock
from ferryman.core.errors import HypervisorError, NotFound, StorageError
from ferryman.lab.records import missing_seqs, read_last_seq, read_records
from ferryman.testing.labhandle import one_line_error
from ferryman.testing.wait import wait_for

pytestmark = [pytest.mark.lab, pytest.mark.qemu]


def controller_ctx(lab) -> ssl.SSLContext:
    """The controller's client TLS context, as an attacker holding the controller's key would use it."""
    pki = lab.dir / "controller" / "pki"
    ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    ctx.load_cert_chain(str(pki / "controller.pem"), str(pki / "controller.key"))
    return ctx


def install_hook(lab, host: str, point: str, name: str, script: str):
    """An executable hook ``name`` for ``point`` on ``host``; returns its path (the caller removes it)."""
    hook = lab.lab.host_dir(host) / "hooks" / f"{point}.d" / name
    hook.parent.mkdir(parents=True, exist_ok=True)
    hook.write_text(f"#!/bin/sh\n{script}\n")
    hook.chmod(0o755)
    return hook


def vm_disk(lab, host: str, vm_id: str):
    return lab.lab.host_dir(host) / "vms" / vm_id / "disk0.qcow2"


def booted(lab, vm: dict, host: str) -> None:
    """Wait for the guest's first record: these tests migrate a booted guest, whose records the validation on the
    destination follows."""
    wait_for(lambda: read_last_seq(vm_disk(lab, host, vm["id"])), 60, f"{vm['name']}'s first records")


def create(lab, name: str, host: str, *extra: str) -> dict:
    return lab.cli_json(
        "vm",
        "create",
        name,
        *extra,
        "--tenant",
        "acme",
        "--memory",
        "128",
        "--host",
        host,
        "--record-ms",
        "250",
        "--profile",
        "environment=production",
    )


def migrate(lab, *args: str) -> tuple[int, dict]:
    proc = lab.cli("vm", "migrate", *args, "--json", check=False, timeout=600)
    return proc.returncode, json.loads(proc.stdout) if proc.stdout.strip() else {"stderr": proc.stderr}


def test_local_storage_migration_keeps_every_record_and_leaves_nothing(lab):
    """web traffic keeps flowing: records continue on the destination with no gap; the source is gone and scrubbed."""
    vm = create(lab, "mig-1", "host-a")
    source_disk = vm_disk(lab, "host-a", vm["id"])
    before = wait_for(lambda: read_last_seq(source_disk), 30, "records on the source")
    code, m = migrate(lab, "mig-1", "--to", "host-b")
    assert code == 0, m
    assert (m["outcome"], m["source"], m["destination"]) == ("done", "host-a", "host-b")
    assert m["downtime_ms"] is not None and m["bytes_transferred"] > 0
    # the governor's cooldown (5 s in the lab) refuses moving it straight back, with the reason
    code, refused = migrate(lab, "mig-1", "--to", "host-a")
    assert code == 1 and "cooldown" in refused["stderr"]
    # the validation counted from the record read at activation, and saw a newer one written on the destination
    facts = m["data"]["facts"]
    seen = re.fullmatch(r"running=True, disk records (\d+) -> (\d+)", facts["validation"])
    assert seen is not None, facts
    assert int(seen[1]) == facts["activation_seq"] >= before and int(seen[2]) > int(seen[1])

    shown = lab.cli_json("vm", "show", "mig-1")
    assert (shown["host"], shown["generation"], shown["state"]) == ("host-b", 2, "running")
    chain = lab.cli_json("vm", "history", "mig-1")
    assert [(p["host"], p["generation"]) for p in chain] == [("host-a", 1), ("host-b", 2)]
    assert chain[0]["valid_to"] == chain[1]["valid_from"]

    dest_disk = vm_disk(lab, "host-b", vm["id"])
    wait_for(lambda: read_last_seq(dest_disk) > before + 4, 30, "records to continue on the destination")
    records = read_records(dest_disk)
    assert missing_seqs(records) == [] and {r.canary for r in records} == {
        lab.cli_json("vm", "show", "mig-1")["canary"]
    }
    assert not (lab.lab.host_dir("host-a") / "vms" / vm["id"]).exists()
    assert not (lab.lab.host_dir("host-a") / "snapshots" / vm["id"]).exists()

    detail = lab.cli_json("migration", "show", m["id"])
    phases = [s["phase"] for s in detail["steps"]]
    assert phases.index("switched_over") < phases.index("committed") < phases.index("activated")
    assert phases.index("activated") < phases.index("source_retired") < phases.index("scrubbed")
    scrubbed = {r["path"].rsplit("/", 1)[-1] for r in detail["scrub_receipts"] if r["host"] == "host-a"}
    assert {"disk0.qcow2", "spec.json", "console.log"} <= scrubbed
    assert all(r["mode"] == "zero" and len(r["sample_hash"]) == 64 for r in detail["scrub_receipts"])
    assert [a for a in lab.cli_json("alarms") if a["vm"] == vm["id"]] == []
    events = lab.cli_json("events", "--vm", "mig-1", "--kind", "migration.", "--limit", "50")
    assert {"migration.requested", "migration.phase", "migration.committed", "migration.done"} <= {
        e["kind"] for e in events
    }
    assert all(e["principal"] == "token:admin" for e in events if e["kind"] == "migration.phase")
    lab.cli("vm", "delete", "mig-1")


def lab_keys(lab):
    """The controller's disk-key vault, read straight from its CMDB and KEK directory (white-box checks only)."""
    repo = open_repository(f"sqlite:///{lab.dir / 'controller' / 'cmdb.sqlite'}")
    return DiskKeys(repo, lab.dir / "controller" / "keys", SystemClock())


def test_encrypted_vm_migrates_and_each_losing_copy_is_crypto_erased(lab):
    """An encrypted VM's images are ciphertext at rest on every host; a migration gives the destination a key of
    its own; the source's key is destroyed and its image headers crypto-erased; a vetoed migration destroys the
    destination's key; stop and start need the key; deleting the VM destroys the last one."""
    vm = create(lab, "enc-1", "host-a", "--encrypted")
    assert lab.cli_json("vm", "show", "enc-1")["encrypted"] is True
    keys = lab_keys(lab)
    key_a = keys.get(Copy(vm["id"], "host-a", 1))
    source_disk = vm_disk(lab, "host-a", vm["id"])
    assert is_encrypted_image(source_disk)
    before = wait_for(lambda: read_last_seq(source_disk, key=key_a), 30, "records on the source")
    canary = lab.cli_json("vm", "show", "enc-1")["canary"].encode()
    assert canary not in source_disk.read_bytes()

    code, m = migrate(lab, "enc-1", "--to", "host-b")
    assert code == 0 and m["outcome"] == "done", m
    listed = {(k["host"], k["generation"]): k for k in lab.cli_json("vm", "keys", "enc-1")}
    assert listed[("host-a", 1)]["live"] is False and "source copy lost" in listed[("host-a", 1)]["destroyed_reason"]
    assert listed[("host-b", 2)]["live"] is True
    with pytest.raises(NotFound):
        keys.get(Copy(vm["id"], "host-a", 1))
    key_b = keys.get(Copy(vm["id"], "host-b", 2))
    assert key_b != key_a
    dest_disk = vm_disk(lab, "host-b", vm["id"])
    assert is_encrypted_image(dest_disk) and canary not in dest_disk.read_bytes()
    wait_for(lambda: read_last_seq(dest_disk, key=key_b) > before + 4, 30, "records to continue on the destination")
    assert missing_seqs(read_records(dest_disk, key=key_b)) == []
    assert not (lab.lab.host_dir("host-a") / "vms" / vm["id"]).exists()
    detail = lab.cli_json("migration", "show", m["id"])
    modes = {r["path"].rsplit("/", 1)[-1]: r["mode"] for r in detail["scrub_receipts"] if r["host"] == "host-a"}
    assert modes["disk0.qcow2"] == "crypto" and modes["spec.json"] == "zero", modes
    assert detail["data"]["facts"]["source_keys_destroyed"] == listed[("host-a", 1)]["id"]
    assert any(e["kind"] == "key.destroyed" for e in lab.cli_json("events", "--vm", "enc-1", "--limit", "50"))

    # stop and start: the destination host gets the key again for the new boot
    lab.cli("vm", "stop", "enc-1")
    lab.cli("vm", "start", "enc-1")
    last = read_last_seq(dest_disk, key=key_b)
    wait_for(lambda: read_last_seq(dest_disk, key=key_b) > last, 60, "records after the restart")

    # a vetoed migration: the destination's own key is destroyed, the source's stays
    other = create(lab, "enc-2", "host-a", "--encrypted")
    hook = install_hook(lab, "host-c", "pre-migrate-destination", "10-no", "exit 1")
    try:
        code, m = migrate(lab, "enc-2", "--to", "host-c")
    finally:
        hook.unlink()
    assert code == 1 and m["outcome"] == "rolled_back", m
    listed = {(k["host"], k["generation"]): k for k in lab.cli_json("vm", "keys", "enc-2")}
    lost = listed[("host-c", 2)]
    assert lost["live"] is False and "destination copy lost" in lost["destroyed_reason"]
    assert listed[("host-a", 1)]["live"] is True
    assert not (lab.lab.host_dir("host-c") / "vms" / other["id"]).exists()
    # its pre-migration snapshot is encrypted too, and restoring it boots the VM with its key
    snapshots = list((lab.lab.host_dir("host-a") / "snapshots" / other["id"]).glob("*.qcow2"))
    assert len(snapshots) == 1 and is_encrypted_image(snapshots[0])
    restored = json.loads(lab.cli("vm", "restore", "enc-2", "--yes", "--json", timeout=300).stdout)
    assert (restored["host"], restored["state"]) == ("host-a", "running")
    key_2 = keys.get(Copy(other["id"], "host-a", 1))
    wait_for(lambda: read_last_seq(vm_disk(lab, "host-a", other["id"]), key=key_2) > 0, 60, "the restored guest")

    for name in ("enc-1", "enc-2"):
        lab.cli("vm", "delete", name)
        assert [k for k in lab.cli_json("vm", "keys", name) if k["live"]] == []


def test_a_stolen_image_and_cmdb_backup_stay_sealed_once_the_copy_lost(lab, tmp_path):
    """An attacker on the destination host copies the new, encrypted image while the migration is prepared, and a
    backup of the controller's CMDB is taken at the same moment. The migration is vetoed: the destination copy's key
    is destroyed and the KEK rotated. The backup's wrapped key then unwraps under none of the controller's KEKs,
    so the stolen image stays ciphertext. (Control: the same backup with the KEKs of that moment does open it.)"""
    vm = create(lab, "enc-3", "host-a", "--encrypted")
    controller = lab.dir / "controller"
    image = vm_disk(lab, "host-c", vm["id"])
    loot = tmp_path / "loot"
    loot.mkdir()
    hook = install_hook(
        lab,
        "host-c",
        "pre-migrate-destination",
        "10-steal",
        f"cp {image} {loot}/image.qcow2 && cp -r {controller}/keys {loot}/keys-then"
        f" && for f in {controller}/cmdb.sqlite*; do cp $f {loot}/; done; exit 1",
    )
    try:
        code, m = migrate(lab, "enc-3", "--to", "host-c")
    finally:
        hook.unlink()
    assert code == 1 and m["outcome"] == "rolled_back", m
    stolen_image = loot / "image.qcow2"
    assert stolen_image.exists() and is_encrypted_image(stolen_image)
    copy = Copy(vm["id"], "host-c", 2)
    backup = open_repository(f"sqlite:///{loot / 'cmdb.sqlite'}")
    wrapped = backup.live_disk_key(copy.vm_id, copy.host, copy.generation)
    assert wrapped is not None and wrapped.wrapped is not None  # the backup holds the destination's wrapped key

    # control: with the KEKs of that moment the backup's key opens the stolen image
    then = DiskKeys(backup, loot / "keys-then", SystemClock()).get(copy)
    assert read_last_seq(stolen_image, key=then) >= 0

    # now: the controller's KEKs, as an attacker who later breaks into the controller would find them
    now = DiskKeys(backup, controller / "keys", SystemClock())
    for kek in sorted((controller / "keys").glob("kek-*")):
        attempt = dataclasses.replace(wrapped, kek_id=int(kek.name.removeprefix("kek-")))
        with pytest.raises(StorageError):
            now._unwrap(attempt)
    with pytest.raises(HypervisorError):
        read_last_seq(stolen_image)  # and qemu-io cannot open the image without a key
    lost = next(k for k in lab.cli_json("vm", "keys", "enc-3") if (k["host"], k["generation"]) == ("host-c", 2))
    assert lost["live"] is False
    lab.cli("vm", "delete", "enc-3")


def test_shared_storage_migration_moves_ram_only(lab):
    """--shared-storage moves RAM only: the destination runs on the same image, records continue with no gap."""
    vm = create(lab, "mig-2", "host-a")
    disk = vm_disk(lab, "host-a", vm["id"])
    before = wait_for(lambda: read_last_seq(disk), 30, "records on the source")
    code, m = migrate(lab, "mig-2", "--to", "host-c", "--shared-storage")
    assert code == 0 and m["outcome"] == "done", m
    assert lab.cli_json("vm", "show", "mig-2")["host"] == "host-c"
    wait_for(lambda: read_last_seq(disk) > before + 4, 30, "records to continue on the shared image")
    assert missing_seqs(read_records(disk)) == []
    assert not (lab.lab.host_dir("host-a") / "vms" / vm["id"] / "spec.json").exists()
    time.sleep(7)  # reconciliation passes: host-a must not report host-c's VM as a copy of its own
    assert [a for a in lab.cli_json("alarms") if a["vm"] == vm["id"]] == []
    lab.cli("vm", "delete", "mig-2")


def test_pre_hook_veto_rolls_back_and_scrubs_the_destination(lab):
    """A failing pre-migrate-destination hook vetoes: rolled back, VM on the source, destination scrubbed."""
    vm = create(lab, "mig-3", "host-a")
    hook = install_hook(
        lab,
        "host-b",
        "pre-migrate-destination",
        "10-maintenance",
        "echo 'host-b is in a maintenance window' >&2; exit 1",
    )
    try:
        code, m = migrate(lab, "mig-3", "--to", "host-b")
    finally:
        hook.unlink()
    assert code == 1 and m["outcome"] == "rolled_back", m
    assert "maintenance window" in (m["error"] or "")
    shown = lab.cli_json("vm", "show", "mig-3")
    assert (shown["host"], shown["generation"], shown["state"]) == ("host-a", 1, "running")
    disk = vm_disk(lab, "host-a", vm["id"])
    last = read_last_seq(disk)
    wait_for(lambda: read_last_seq(disk) > last, 30, "the source to keep writing records")
    assert not (lab.lab.host_dir("host-b") / "vms" / vm["id"]).exists()
    detail = lab.cli_json("migration", "show", m["id"])
    assert any(r["host"] == "host-b" for r in detail["scrub_receipts"])
    lab.cli("vm", "delete", "mig-3")


def test_cancel_mid_transfer_rolls_back(lab):
    """Cancelling a slow migration before its commit leaves exactly one running copy, on the source."""
    vm = create(lab, "mig-4", "host-a")
    proc = lab.cli("vm", "migrate", "mig-4", "--to", "host-c", "--bandwidth", "1", "--no-wait", "--json")
    mid = json.loads(proc.stdout)["id"]
    wait_for(
        lambda: lab.cli_json("migration", "show", mid)["phase"] in {"mirroring", "transferring"},
        60,
        "the transfer to start",
    )
    lab.cli("migration", "cancel", mid, timeout=300)
    m = lab.cli_json("migration", "show", mid)
    assert m["outcome"] == "rolled_back" and m["cancel_requested"]
    assert lab.cli_json("vm", "show", "mig-4")["host"] == "host-a"
    disk = vm_disk(lab, "host-a", vm["id"])
    last = read_last_seq(disk)
    wait_for(lambda: read_last_seq(disk) > last, 30, "the source to keep running")
    assert not (lab.lab.host_dir("host-c") / "vms" / vm["id"]).exists()
    lab.cli("vm", "delete", "mig-4")


def test_used_ticket_cannot_be_replayed(lab):
    """A finished migration's ticket is refused by its destination (used) and by any other host (not named)."""
    done = [m for m in lab.cli_json("migration", "list") if m["outcome"] == "done"]
    assert done, "needs a completed migration from an earlier test"
    m = done[0]
    repo = open_repository(f"sqlite:///{lab.dir / 'controller' / 'cmdb.sqlite'}")
    ticket = repo.get_migration(m["id"]).data["ticket"]
    ctx = controller_ctx(lab)
    spec = {
        "vm_id": m["vm_id"],
        "name": "x",
        "vcpus": 1,
        "memory_mb": 128,
        "disks": [{"size_bytes": 1 << 26}],
        "canary": "c",
        "generation": 1,
    }
    body = {"ticket": ticket, "spec": spec, "source_dn": "O=Ferryman,OU=host,CN=host-a"}
    for host, expected in (
        (m["destination"], "already used"),
        ("host-c" if m["destination"] != "host-c" else "host-a", "not host-"),
    ):
        url = f"https://{lab.state.addresses[host]}:{lab.state.agent_port}/v1/migrations/{m['id']}/prepare"
        response = httpx.post(url, json=body, verify=ctx, timeout=30)
        assert response.status_code == 403 and expected in response.json()["detail"], response.text


def test_host_drain_moves_every_running_vm_away(lab):
    """host drain migrates each running VM off the host, through the same secure path."""
    vm = lab.cli_json("vm", "create", "drain-1", "--tenant", "acme", "--memory", "128", "--host", "host-c")
    booted(lab, vm, "host-c")
    result = json.loads(lab.cli("host", "drain", "host-c", "--json", timeout=600).stdout)
    moved = {m["vm"]: m for m in result["migrations"]}
    detail = {vm: lab.cli_json("migration", "show", m["id"]) for vm, m in moved.items() if m["outcome"] != "done"}
    assert moved["drain-1"]["outcome"] == "done" and moved["drain-1"]["destination"] != "host-c", detail
    assert result["refused"] == []
    assert [v["name"] for v in lab.cli_json("vm", "list", "--host", "host-c") if v["state"] == "running"] == []
    assert lab.cli_json("vm", "show", "drain-1")["generation"] == 2
    lab.cli("vm", "delete", "drain-1")


def test_stale_copy_is_removed_and_scrubbed_only_with_proof(lab):
    """A copy of an older generation left on a host is killed and scrubbed by reconciliation; an agent refuses to
    discard a copy without a lease proving a later generation runs elsewhere."""
    from ferryman.pki.ca import CertificateAuthority
    from ferryman.pki.tickets import issue_lease

    vm = create(lab, "stale-1", "host-a")
    booted(lab, vm, "host-a")
    code, m = migrate(lab, "stale-1", "--to", "host-b")
    assert code == 0 and m["outcome"] == "done", m
    ca = CertificateAuthority.load_or_create(lab.dir / "controller" / "pki", SystemClock())
    ctx = controller_ctx(lab)

    def agent(host: str, path: str) -> str:
        return f"https://{lab.state.addresses[host]}:{lab.state.agent_port}{path}"

    # the copy of record cannot be discarded: a lease for itself, or for another host at the same generation, is
    # no proof that the VM moved on
    for host, generation in (("host-b", 2), ("host-a", 2)):
        _, lease = issue_lease(ca, vm_id=vm["id"], host=host, generation=generation)
        refused = httpx.post(
            agent("host-b", f"/v1/stale-copies/{vm['id']}/remove"), json={"successor": lease}, verify=ctx, timeout=30
        )
        assert refused.status_code == 403 and "does not supersede" in refused.json()["detail"], refused.text
    assert lab.cli_json("vm", "show", "stale-1")["state"] == "running"

    # a generation-1 copy comes back on host-a (as a host that missed the migration would run it)
    spec = {
        "vm_id": vm["id"],
        "name": "stale-1",
        "vcpus": 1,
        "memory_mb": 128,
        "disks": [{"size_bytes": vm["disk_bytes"]}],
        "canary": lab.cli_json("vm", "show", "stale-1")["canary"],
        "generation": 1,
    }
    _, old_lease = issue_lease(ca, vm_id=vm["id"], host="host-a", generation=1)
    created = httpx.post(agent("host-a", "/v1/vms"), json={"spec": spec, "lease": old_lease}, verify=ctx, timeout=60)
    assert created.status_code == 200, created.text
    stale_dir = lab.lab.host_dir("host-a") / "vms" / vm["id"]
    assert stale_dir.exists()

    wait_for(lambda: not stale_dir.exists(), 90, "reconciliation to remove the stale copy")
    events = lab.cli_json("events", "--vm", "stale-1", "--limit", "100")
    kinds = {e["kind"] for e in events}
    assert {"alarm.vm.stale_copy", "vm.stale_copy_removed"} <= kinds, kinds
    removed = next(e for e in events if e["kind"] == "vm.stale_copy_removed")
    assert any(r["path"].endswith("disk0.qcow2") for r in removed["data"]["receipts"])
    shown = lab.cli_json("vm", "show", "stale-1")
    assert (shown["host"], shown["generation"], shown["state"]) == ("host-b", 2, "running")
    dest_disk = vm_disk(lab, "host-b", vm["id"])
    last = read_last_seq(dest_disk)
    wait_for(lambda: read_last_seq(dest_disk) > last, 30, "the copy of record to keep writing records")
    lab.cli("vm", "delete", "stale-1")


def test_rolled_back_vm_can_be_restored_from_its_pre_migration_snapshot(lab):
    """After a rollback the pre-migration snapshot stays on the source: restore swaps the disk for it (the replaced
    disk scrubbed) and the guest boots again from that point."""
    vm = create(lab, "snap-1", "host-a")
    disk = vm_disk(lab, "host-a", vm["id"])
    wait_for(lambda: read_last_seq(disk) >= 3, 30, "records on the source")
    hook = install_hook(lab, "host-b", "pre-migrate-destination", "10-veto", "exit 1")
    try:
        code, m = migrate(lab, "snap-1", "--to", "host-b")
    finally:
        hook.unlink()
    assert code == 1 and m["outcome"] == "rolled_back", m
    snaps = lab.cli_json("vm", "snapshots", "snap-1")
    assert [(s["disk"], s["host"]) for s in snaps] == [("disk0", "host-a")]
    assert snaps[0]["tag"] == f"pre-{m['id'][:8]}"

    refused = lab.cli("vm", "restore", "snap-1", check=False)  # no tty, no --yes: nothing happens
    assert refused.returncode == 1 and "--yes" in refused.stderr
    at_snapshot = read_last_seq(disk)
    wait_for(lambda: read_last_seq(disk) > at_snapshot + 3, 30, "the guest to write past the snapshot")
    restored = json.loads(lab.cli("vm", "restore", "snap-1", "--yes", "--json", timeout=300).stdout)
    assert (restored["host"], restored["tag"], restored["state"]) == ("host-a", snaps[0]["tag"], "running")
    wait_for(lambda: read_last_seq(disk) > 0, 30, "the restored guest to write records")
    events = lab.cli_json("events", "--vm", "snap-1", "--kind", "vm.restore", "--limit", "10")
    done = next(e for e in events if e["kind"] == "vm.restored")
    assert any(r["path"].endswith("disk0.qcow2.replaced.partial") for r in done["data"]["receipts"]), done
    lab.cli("vm", "delete", "snap-1")
    assert not (lab.lab.host_dir("host-a") / "snapshots" / vm["id"]).exists()


def test_a_restore_below_the_security_baseline_needs_a_security_officer_then_remediation(lab):
    """Rollback guard: once the guest's baseline moved past the snapshot (patched, credentials rotated), a restore
    waits for a security officer's approval (not the requester's, not another admin's); the restored VM is listed in
    compliance until it is marked remediated."""
    vm = create(lab, "guard-1", "host-a")
    wait_for(lambda: read_last_seq(vm_disk(lab, "host-a", vm["id"])) >= 3, 30, "records on the source")
    hook = install_hook(lab, "host-b", "pre-migrate-destination", "10-veto", "exit 1")
    try:
        code, m = migrate(lab, "guard-1", "--to", "host-b")
    finally:
        hook.unlink()
    assert code == 1 and m["outcome"] == "rolled_back", m
    lab.cli("vm", "baseline", "guard-1", "--reason", "openssl patched, ssh host keys rotated")
    # the principals who may approve exist before the request (one created after it could not approve it)
    other_admin = lab.as_principal("admin-2", "fleet-admin")
    officer = lab.as_principal("officer", "security-officer")
    asked = lab.cli("vm", "restore", "guard-1", "--yes", check=False)
    assert "before its security baseline" in one_line_error(asked) and "vm.baseline" in asked.stderr
    approval = re.search(r"approval (\d+) requested", asked.stderr).group(1)
    assert "two-person rule" in one_line_error(lab.cli("approval", "approve", approval, check=False))
    assert "security-officer" in one_line_error(other_admin.cli("approval", "approve", approval, check=False))
    lab.approved(asked, officer)
    restored = json.loads(lab.cli("--approval", approval, "vm", "restore", "guard-1", "--yes", "--json").stdout)
    assert restored["state"] == "running"
    due = [v for v in lab.cli_json("compliance", "check") if v["vm"] == "guard-1"]
    assert [(v["policy"], v["rule"]) for v in due] == [("rollback-guard", "remediation_needed")], due
    lab.cli("vm", "remediated", "guard-1", "--reason", "patched again after the restore")
    assert not [v for v in lab.cli_json("compliance", "check") if v["vm"] == "guard-1"]
    lab.cli("vm", "delete", "guard-1")


def test_an_old_ticket_cannot_discard_another_migrations_destination(lab):
    """A rolled-back migration's ticket, replayed at its destination while a newer migration of the same VM holds a
    prepared destination there, kills and scrubs nothing of it: the newer migration completes."""
    vm = create(lab, "old-1", "host-a")
    booted(lab, vm, "host-a")
    veto = install_hook(lab, "host-a", "pre-migrate-source", "10-veto", "exit 1")
    try:
        code, first = migrate(lab, "old-1", "--to", "host-b")
    finally:
        veto.unlink()
    assert code == 1 and first["outcome"] == "rolled_back", first
    repo = open_repository(f"sqlite:///{lab.dir / 'controller' / 'cmdb.sqlite'}")
    old_ticket = repo.get_migration(first["id"]).data["ticket"]

    # the second migration waits here, its destination prepared on host-b, until the test lets it go (or 20 s pass:
    # hooks run at most 30 s)
    held = lab.dir / "hold-old-1"
    held.touch()
    hold = install_hook(
        lab,
        "host-a",
        "pre-migrate-source",
        "20-hold",
        f"i=0; while [ -e {held} ] && [ $i -lt 200 ]; do sleep 0.1; i=$((i + 1)); done",
    )
    try:

        def start() -> dict | None:  # the governor backs off a few seconds after the vetoed attempt
            proc = lab.cli("vm", "migrate", "old-1", "--to", "host-b", "--no-wait", "--json", check=False)
            return json.loads(proc.stdout) if proc.returncode == 0 else None

        second = wait_for(start, 30, "the governor to admit the second migration", interval_s=2)
        incoming = lab.lab.host_dir("host-b") / "vms" / vm["id"] / "incoming"
        prepared = incoming.parent / "disk0.qcow2"  # made once the image the VM boots from is verified there
        wait_for(lambda: incoming.exists() and prepared.exists(), 30, "the second migration's destination")
        ctx = controller_ctx(lab)
        base = f"https://{lab.state.addresses['host-b']}:{lab.state.agent_port}/v1/migrations/{first['id']}"
        for step, body in (("kill-destination", {}), ("scrub", {"side": "destination", "mode": "zero"})):
            response = httpx.post(f"{base}/{step}", json={"ticket": old_ticket, **body}, verify=ctx, timeout=60)
            assert response.status_code == 200, response.text
        assert incoming.exists() and prepared.exists()
    finally:
        held.unlink(missing_ok=True)
        hold.unlink()
    done = wait_for(
        lambda: (m := lab.cli_json("migration", "show", second["id"]))["outcome"] and m, 300, "the second migration"
    )
    assert done["outcome"] == "done", done
    assert lab.cli_json("vm", "show", "old-1")["host"] == "host-b"
    lab.cli("vm", "delete", "old-1")


def test_an_old_ticket_cannot_scrub_the_copy_that_came_back(lab):
    """After A → B → A, the first migration's ticket replayed at A (its source) cannot scrub the stopped copy of
    record there: it is a newer generation than the ticket's."""
    vm = create(lab, "back-1", "host-a")
    booted(lab, vm, "host-a")
    code, there = migrate(lab, "back-1", "--to", "host-b")
    assert code == 0 and there["outcome"] == "done", there

    def back() -> dict | None:  # the VM's cooldown (5 s in the lab) must pass first
        code, m = migrate(lab, "back-1", "--to", "host-a")
        return m if code == 0 else None

    assert wait_for(back, 60, "the migration back to host-a", interval_s=2)["outcome"] == "done"
    lab.cli("vm", "stop", "back-1")
    repo = open_repository(f"sqlite:///{lab.dir / 'controller' / 'cmdb.sqlite'}")
    old_ticket = repo.get_migration(there["id"]).data["ticket"]
    ctx = controller_ctx(lab)
    url = f"https://{lab.state.addresses['host-a']}:{lab.state.agent_port}/v1/migrations/{there['id']}/scrub"
    refused = httpx.post(url, json={"ticket": old_ticket, "side": "source"}, verify=ctx, timeout=60)
    assert refused.status_code == 409 and "not this migration's source" in refused.json()["detail"], refused.text
    assert vm_disk(lab, "host-a", vm["id"]).exists()
    lab.cli("vm", "start", "back-1")
    assert lab.cli_json("vm", "show", "back-1")["state"] == "running"
    lab.cli("vm", "delete", "back-1")
