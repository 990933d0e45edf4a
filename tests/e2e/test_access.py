"""Access control through the CLI against the lab: principals, tokens, roles, operators' policies, approvals, and
what a tenant's principal sees; every refusal one line, never a traceback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ferryman.testing.labhandle import one_line_error


def test_principals_tokens_and_roles_through_the_cli(lab: Any, tmp_path: Path) -> None:
    for args, expected in [
        (("principal", "create", "x1", "--role", "emperor"), "unknown role 'emperor'"),
        (("principal", "create", "x2", "--role", "tenant-admin"), "needs --tenant"),
        (("principal", "create", "x3", "--role", "auditor", "--tenant", "acme"), "takes no --tenant"),
        (("principal", "create", "Bad_Name", "--role", "auditor"), "principal"),
        (("principal", "show", "nobody"), "principal 'nobody' not found"),
        (("role", "show", "emperor"), "role 'emperor' not found"),
        (("approval", "approve", "999999"), "approval 999999 not found"),
        (("role", "policy", "set", "p1", str(tmp_path / "missing.cedar")), "cannot read"),
    ]:
        assert expected in one_line_error(lab.cli(*args, check=False)), args
    bad = tmp_path / "bad.cedar"
    bad.write_text("permit(principal, action, resource) when { resource.owner == principal };\n")
    assert "does not validate" in one_line_error(lab.cli("role", "policy", "set", "p1", str(bad), check=False))
    viewer = lab.as_principal("acme-viewer", "tenant-viewer", "acme")
    listed = {p["name"]: p for p in lab.cli_json("principal", "list")}
    assert listed["acme-viewer"]["role"] == "tenant-viewer" and listed["acme-viewer"]["tenant"] == "acme"
    assert {r["name"] for r in lab.cli_json("role", "list")} >= {"fleet-admin", "tenant-admin", "auditor"}
    assert 'Role::"security-officer"' in lab.cli("role", "show", "security-officer").stdout
    # the tenant's viewer sees its tenant's VMs only, and may not change them nor look at hosts
    seen = viewer.cli_json("vm", "list")
    everything = lab.cli_json("vm", "list")
    assert {v["name"] for v in seen} == {v["name"] for v in everything if v["tenant"] == "acme"}
    others = [v for v in everything if v["tenant"] != "acme"]
    if others:
        assert "not found" in one_line_error(viewer.cli("vm", "show", others[0]["name"], check=False))
    assert "may not host:read" in one_line_error(viewer.cli("host", "list", check=False))
    if seen:
        assert "may not vm:operate" in one_line_error(viewer.cli("vm", "pause", seen[0]["name"], check=False))
    # a rotated token replaces the old one at once; a disabled principal's token stops working
    old = viewer.env["FERRYMAN_TOKEN"]
    new = lab.cli("token", "rotate", "acme-viewer").stdout.strip()
    assert new.startswith("fm_") and new != old
    assert "invalid API token" in one_line_error(viewer.cli("vm", "list", check=False))
    lab.cli("principal", "disable", "acme-viewer")
    assert not lab.cli_json("principal", "show", "acme-viewer")["active"]
    assert lab.cli_json("approval", "list", "--all") is not None
