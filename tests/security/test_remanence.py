"""Data remanence, tried as a forensic examiner would: each host's storage is its own loop-mounted filesystem image,
and the raw image is searched for the VM's canary after a successful migration (source) and a failed one
(destination)."""

from __future__ import annotations

import json
import os
import sys
import time

import pytest

from ferryman.lab.lab import Lab
from ferryman.lab.records import read_last_seq
from ferryman.testing.loopfs import loop_mount, scan_for
from ferryman.testing.wait import wait_for

pytestmark = [pytest.mark.lab, pytest.mark.qemu]

PORT, AGENT_PORT = 19443, 19444


def follow(api, mid: str) -> dict:
    return wait_for(lambda: (m := api.get(f"/api/v1/migrations/{mid}"))["outcome"] and m, 300, "the migration")


@pytest.mark.skipif(os.geteuid() != 0, reason="loop devices need root")
def test_no_canary_on_the_losing_side(tmp_path):
    """After a rolled-back migration the destination's raw storage, and after a successful one the source's, hold no
    copy of the VM's canary (while a control scan finds it on the side that runs the VM)."""
    # room for the cached lab image (81 MiB), the VM's overlay and its pre-migration snapshot (the whole chain)
    with loop_mount(tmp_path / "a.img", size_mib=448) as a, loop_mount(tmp_path / "b.img", size_mib=448) as b:
        lab = Lab(
            tmp_path / "lab",
            say=lambda msg: print(msg, file=sys.stderr),
            host_storage={"host-a": a / "host", "host-b": b / "host"},
        )
        try:
            lab.up(hosts=2, vms=0, port=PORT, agent_port=AGENT_PORT)
            api = lab.api()
            vm = api.post(
                "/api/v1/vms",
                {
                    "name": "secret-1",
                    "tenant": "acme",
                    "memory": "128",
                    "disk": "32M",
                    "host": "host-a",
                    "record_interval_ms": 250,
                },
            )
            canary = api.get("/api/v1/vms/secret-1")["canary"].encode()
            disk = lab.host_dir("host-a") / "vms" / vm["id"] / "disk0.qcow2"
            wait_for(lambda: read_last_seq(disk) > 2, 30, "records on host-a")
            os.sync()
            assert scan_for(tmp_path / "a.img", canary), "control: the scan must find the canary of the live disk"

            # 1. a migration to host-b cancelled after the disk mirror reached it: host-b keeps nothing
            m = api.post("/api/v1/vms/secret-1/migrate", {"to": "host-b", "bandwidth_mib_s": 1})
            wait_for(
                lambda: api.get(f"/api/v1/migrations/{m['id']}")["phase"] == "transferring",
                120,
                "the disk mirror to complete",
            )
            os.sync()
            assert scan_for(tmp_path / "b.img", canary), "control: the mirror put the canary on host-b"
            api.post(f"/api/v1/migrations/{m['id']}/cancel")
            assert follow(api, m["id"])["outcome"] == "rolled_back"
            os.sync()
            assert scan_for(tmp_path / "b.img", canary) == [], "the failed destination left the canary behind"

            # 2. a successful migration to host-b: host-a keeps nothing
            time.sleep(6)  # the governor's back-off after a rolled-back attempt (5 s in the lab)
            m = api.post("/api/v1/vms/secret-1/migrate", {"to": "host-b"})
            done = follow(api, m["id"])
            assert done["outcome"] == "done", json.dumps(done)
            os.sync()
            assert scan_for(tmp_path / "a.img", canary) == [], "the source left the canary behind"
            assert scan_for(tmp_path / "b.img", canary), "control: the VM's disk now lives on host-b"
        finally:
            lab.down(quiet=True)
