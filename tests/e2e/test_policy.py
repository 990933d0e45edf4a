"""Placement policies on a running lab, through the CLI: validation errors that point at the file and line,
versioned apply with a preview, admission of creations and manual migrations, continuous compliance after a policy or
host change, a remediation plan executed through real migrations, and a per-tenant report that names no other tenant.

The lab's hosts: host-a (dc-vault, level 4, patch 5), host-b (dc-vault, level 4, patch 3), host-c (dc-edge, level 2,
patch 1). The policies select only the VMs this test creates, and are cleared at the end, so that other tests of the
shared lab are not constrained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ferryman.lab.records import read_last_seq
from ferryman.testing.wait import wait_for

pytestmark = [pytest.mark.lab, pytest.mark.qemu]

POLICY = """\
name: acme-pol
description: acme production stays in the vault, on patched hosts
select:
  tenants: [acme]
  vms: [pol-1]
require:
  min_site_security_level: 3
  min_patch_level: {patch}
prefer:
  - weight: 10
    zones: [zone-2]
"""

BAD = """\
name: acme-bad
select:
  tenants: [acme]
require:
  max_vm_per_host: 2
"""


def write(directory: Path, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "acme.yaml").write_text(text)
    return directory


def test_policies_admit_check_and_remediate(lab, tmp_path):
    """A hard rule refuses a migration with its reason; raising the patch floor turns the VM into a violation at once;
    the plan's real migration fixes it; the tenant report shows neighbours only under pseudonyms."""
    bad = write(tmp_path / "bad", BAD)
    refused = lab.cli("policy", "validate", str(bad), check=False)
    assert refused.returncode == 1
    assert f"{bad / 'acme.yaml'}:5: require.max_vm_per_host: unknown field" in refused.stdout, refused.stdout
    assert "max_vms_per_host" in refused.stdout

    policies = write(tmp_path / "v1", POLICY.format(patch=3))
    assert lab.cli("policy", "validate", str(policies)).returncode == 0
    try:
        applied = json.loads(lab.cli("policy", "apply", str(policies), "--yes", "--json").stdout)
        assert applied["applied"] and applied["policies"] == ["acme-pol"]
        assert [p["name"] for p in lab.cli_json("policy", "list")] == ["acme-pol"]

        # creation: the engine picks an allowed host (vault, patch >= 3), preferring zone-2: host-b
        vm = lab.cli_json(
            "vm", "create", "pol-1", "--tenant", "acme", "--memory", "128", "--profile", "environment=production"
        )
        assert vm["host"] == "host-b", vm
        # booted before it migrates (see tests/e2e/test_migration.py: booted)
        boot_disk = lab.lab.host_dir("host-b") / "vms" / vm["id"] / "disk0.qcow2"
        wait_for(lambda: read_last_seq(boot_disk), 60, "pol-1's first records")
        placed = lab.cli_json("place", "--tenant", "acme", "--name", "pol-1", "--profile", "environment=production")
        assert placed["host"] == "host-b"
        assert {r["rule"] for r in placed["rejections"]["host-c"]} >= {"min_site_security_level"}, placed

        # a manual migration to the edge site is refused with the reason, and audited
        proc = lab.cli("vm", "migrate", "pol-1", "--to", "host-c", "--json", check=False)
        assert proc.returncode == 1 and "security level" in proc.stderr, proc.stderr
        assert lab.cli_json("events", "--vm", "pol-1", "--kind", "policy.refused")

        # raising the required patch level: pol-1 on host-b (patch 3) violates at once
        preview = json.loads(
            lab.cli(
                "policy", "apply", str(write(tmp_path / "v2", POLICY.format(patch=4))), "--dry-run", "--json"
            ).stdout
        )
        assert [(v["vm"], v["rule"]) for v in preview["would_violate"]] == [("pol-1", "min_patch_level")]
        lab.cli("policy", "apply", str(tmp_path / "v2"), "--yes")
        violations = lab.cli_json("compliance", "check")
        assert [(v["vm"], v["host"], v["rule"]) for v in violations] == [("pol-1", "host-b", "min_patch_level")]
        assert violations[0]["first_seen"] and violations[0]["resolved_at"] is None
        assert lab.cli_json("events", "--vm", "pol-1", "--kind", "compliance.violation")

        # the plan moves it to the only allowed host, through the secure migration path
        plan = lab.cli_json("compliance", "plan")
        assert [(m["vm"], m["source"], m["target"]) for m in plan["moves"]] == [("pol-1", "host-b", "host-a")]
        done = json.loads(lab.cli("compliance", "plan", "--execute", "--yes", "--json", timeout=900).stdout)
        assert done["remaining"] == 0 and done["executed"][0]["error"] is None, done
        shown = lab.cli_json("vm", "show", "pol-1")
        assert (shown["host"], shown["generation"]) == ("host-a", 2)
        disk = lab.lab.host_dir("host-a") / "vms" / shown["id"] / "disk0.qcow2"
        last = read_last_seq(disk)
        wait_for(lambda: read_last_seq(disk) > last, 30, "records to continue on host-a")
        assert lab.cli_json("compliance", "check", "--all")[0]["resolved_at"] is not None

        # a host change is re-checked at once: host-a falls below the floor
        lab.cli("host", "set", "host-a", "--patch-level", "2")
        try:
            assert [(v["vm"], v["host"]) for v in lab.cli_json("compliance", "check")] == [("pol-1", "host-a")]
        finally:
            lab.cli("host", "set", "host-a", "--patch-level", "5")

        # the tenant's report: its own names, never another tenant's
        report = lab.cli("compliance", "report", "--tenant", "acme", "--json").stdout
        html = tmp_path / "acme.html"
        lab.cli("compliance", "report", "--tenant", "acme", "--html", str(html))
        others = [v for v in lab.cli_json("vm", "list") if v["tenant"] != "acme"]
        assert others, "the lab has VMs of another tenant"
        for text in (report, html.read_text()):
            assert "pol-1" in text
            for v in others:
                assert v["tenant"] not in text and v["name"] not in text and v["id"] not in text
    finally:
        lab.cli("policy", "clear", "--yes")
        lab.cli("vm", "delete", "pol-1", check=False)
    assert lab.cli_json("policy", "list") == []
