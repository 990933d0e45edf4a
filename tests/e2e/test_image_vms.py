"""VMs booted from a registry image on a running lab: an overlay migrates with only what the guest wrote (the
destination receives and verifies the image first), a full copy migrates whole, both without a record gap; once the
image is revoked, nothing creates, boots, migrates or restores from it, each refusal one line."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from ferryman.images.signing import Artefact, new_private_key, sign
from ferryman.images.store import sha256_file
from ferryman.lab.disk_image import ensure_guest_disk
from ferryman.lab.records import missing_seqs, read_last_seq, read_records
from ferryman.testing.labhandle import one_line_error
from ferryman.testing.wait import wait_for

pytestmark = [pytest.mark.lab, pytest.mark.qemu]

IMAGE = "e2e-boot"


@pytest.fixture(scope="module")
def image(lab, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The lab guest's disk with its last sector marked (bytes of its own: revoking it must not revoke the lab's
    default image, whose files a revocation would otherwise cover), under another name and another trusted key."""
    disk = tmp_path_factory.mktemp("e2e-boot") / "disk.raw"
    shutil.copyfile(ensure_guest_disk().path, disk)
    disk.chmod(0o644)
    with disk.open("r+b") as fh:  # the end of the records partition: the guest reaches it after hours
        fh.seek(-512, 2)
        fh.write(b"e2e-boot".ljust(512, b"\0"))
    private, public = new_private_key()
    api = lab.api()
    api.post("/api/v1/image-keys", {"name": "e2e-boot-pub", "public_key": public})
    artefact = Artefact("disk", sha256_file(disk), disk.stat().st_size)
    api.put_file(f"/api/v1/blobs/{artefact.digest}", disk)
    signature = base64.b64encode(sign(private, [artefact])).decode()
    api.post(
        "/api/v1/images",
        {
            "name": IMAGE,
            "disk": artefact.digest,
            "os": "ferryman-lab",
            "version": "1.0",
            "signature": signature,
            "key": "e2e-boot-pub",
        },
    )
    return IMAGE


def vm_disk(lab, host: str, vm_id: str) -> Path:
    return lab.lab.host_dir(host) / "vms" / vm_id / "disk0.qcow2"


def backing(disk: Path) -> str | None:
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "-U", "--output=json", str(disk)], check=True, capture_output=True, text=True
        ).stdout
    )
    return info.get("backing-filename")


def create(lab, name: str, host: str, *extra: str) -> dict:
    return lab.cli_json(
        "vm",
        "create",
        name,
        "--tenant",
        "acme",
        "--memory",
        "128",
        "--host",
        host,
        "--record-ms",
        "250",
        "--image",
        IMAGE,
        *extra,
    )


def migrate_keeps_every_record(lab, vm: dict, source: str, destination: str) -> Path:
    before = wait_for(lambda: read_last_seq(vm_disk(lab, source, vm["id"])), 60, "records on the source")
    proc = lab.cli("vm", "migrate", vm["name"], "--to", destination, "--json", timeout=600)
    assert json.loads(proc.stdout)["outcome"] == "done"
    disk = vm_disk(lab, destination, vm["id"])
    wait_for(lambda: read_last_seq(disk) > before + 4, 60, "records to continue on the destination")
    records = read_records(disk)
    assert missing_seqs(records) == [] and {r.vm for r in records} == {vm["id"]}
    return disk


def test_an_overlay_vm_migrates_onto_the_image_the_destination_verified(lab, image: str) -> None:
    vm = create(lab, "img-ov", "host-a")
    assert (vm["image"], vm["full_copy"]) == (IMAGE, False)
    source_disk = vm_disk(lab, "host-a", vm["id"])
    assert backing(source_disk) is not None and "/images/sha256/" in str(backing(source_disk))
    disk = migrate_keeps_every_record(lab, vm, "host-a", "host-b")
    assert backing(disk) is not None and Path(str(backing(disk))).is_relative_to(lab.lab.host_dir("host-b"))
    digest = lab.cli_json("image", "show", IMAGE)["digest"]
    assert Path(str(backing(disk))).name == digest.removeprefix("sha256:")
    lab.cli("vm", "delete", "img-ov")


def test_a_full_copy_vm_migrates_whole(lab, image: str) -> None:
    vm = create(lab, "img-fc", "host-a", "--full-copy")
    assert vm["full_copy"] and backing(vm_disk(lab, "host-a", vm["id"])) is None
    disk = migrate_keeps_every_record(lab, vm, "host-a", "host-b")
    assert backing(disk) is None
    lab.cli("vm", "delete", "img-fc")


def test_a_revoked_image_creates_boots_migrates_and_restores_nothing(lab, image: str) -> None:
    vm = create(lab, "img-rv", "host-a")
    wait_for(lambda: read_last_seq(vm_disk(lab, "host-a", vm["id"])), 60, "the guest's first records")
    lab.cli("image", "revoke", IMAGE, "--reason", "CVE-2026-4242")
    refusals = [
        ("vm", "migrate", "img-rv", "--to", "host-b"),
        ("vm", "restore", "img-rv", "--yes"),
        ("vm", "create", "img-rv2", "--tenant", "acme", "--memory", "128", "--image", IMAGE),
    ]
    for args in refusals:
        assert "revoked: CVE-2026-4242" in one_line_error(lab.cli(*args, check=False)), args
    lab.cli("vm", "stop", "img-rv")
    assert "revoked: CVE-2026-4242" in one_line_error(lab.cli("vm", "start", "img-rv", check=False))
    shown = lab.cli_json("vm", "show", "img-rv")
    assert (shown["state"], shown["host"], shown["generation"]) == ("stopped", "host-a", 1)
    assert "img-rv2" not in {v["name"] for v in lab.cli_json("vm", "list")}
    found = [v for v in lab.cli_json("compliance", "check") if v["vm"] == "img-rv"]
    assert [(v["policy"], v["rule"]) for v in found] == [("image-registry", "image_revoked")]
    lab.cli("vm", "delete", "img-rv")
