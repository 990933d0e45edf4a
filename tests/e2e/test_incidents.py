"""Incident response on a running lab: alerts from Suricata, Falco and the generic form open (and, repeated, update)
the incident of the VM or host they name; an alert flood is rate-limited; a forensic capture seals the guest's memory
and disk from the first byte (the canary is nowhere in the sealed files, and in the exported memory core), moves them
off the host, signs a manifest; one flipped byte fails verification; reads are custody events; impact lists the
neighbours; and the CLI's error paths are one line each."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest

from ferryman.client import CliError
from ferryman.incidents.playbooks import DEFAULT_PLAYBOOK_YAML
from ferryman.testing.labhandle import one_line_error

pytestmark = [pytest.mark.lab, pytest.mark.qemu]

DATA = Path(__file__).parent.parent / "data" / "alerts"
VM_IP = "10.70.0.10"


QUIET = "name: quiet\nseverities:\n  low: [record]\n  medium: [record]\n  high: [record]\n  critical: [record]\n"


@pytest.fixture(scope="module")
def suspect(lab: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A VM with a NIC; meanwhile the playbook only records (playbooks are tried in test_playbooks.py, on a lab of
    their own: here a critical alert must not pause the session's VMs), and the default is back afterwards."""
    files = tmp_path_factory.mktemp("playbooks")
    (files / "quiet.yaml").write_text(QUIET)
    (files / "default.yaml").write_text(DEFAULT_PLAYBOOK_YAML)
    lab.cli_json("incident", "playbook", "apply", str(files / "quiet.yaml"))
    lab.cli_json("network", "create", "inc-net", "--tenant", "acme", "--cidr", "10.70.0.0/24")
    vm = lab.cli_json(
        "vm",
        "create",
        "suspect",
        "--tenant",
        "acme",
        "--memory",
        "128",
        "--host",
        "host-a",
        "--dirty-kib",
        "16",
        "--network",
        "inc-net",
        "--ip",
        VM_IP,
    )
    try:
        yield lab.cli_json("vm", "show", vm["name"])
    finally:
        lab.cli("vm", "delete", "suspect", check=False)
        lab.cli_json("incident", "playbook", "apply", str(files / "default.yaml"))


def alert(lab: Any, source: str, body: Any) -> dict[str, Any]:
    result: dict[str, Any] = lab.api().post(f"/api/v1/alerts/{source}", body)
    return result


def suricata(signature: str = "ET SCAN Potential SSH Scan") -> dict[str, Any]:
    event = json.loads((DATA / "suricata_alert.json").read_text())
    event = copy.deepcopy(event)
    event["dest_ip"] = VM_IP
    event["flow"]["dest_ip"] = VM_IP
    event.pop("ether", None)
    event["alert"]["signature"] = signature
    return event


def test_alerts_open_and_update_the_right_incidents(lab: Any, suspect: dict[str, Any]) -> None:
    first = alert(lab, "suricata", suricata())
    assert first["received"] == 1 and len(first["opened"]) == 1 and first["unmatched"] == 0
    incident_id = first["opened"][0]
    again = alert(lab, "suricata", suricata())
    assert again["opened"] == [] and again["updated"] == [incident_id]
    shown = lab.cli_json("incident", "show", str(incident_id))
    assert shown["vm"] == "suspect" and shown["alerts"] == 2 and shown["tenant"] == "acme"
    own = [a["kind"] for a in shown["timeline"] if not a["kind"].startswith("playbook.")]
    assert shown["severity"] == "medium" and own[:2] == ["opened", "alert"]
    falco = json.loads((DATA / "falco_events.ndjson").read_text().splitlines()[0])
    falco["output_fields"]["vm.name"] = "suspect"
    opened = alert(lab, "falco", falco)
    assert len(opened["opened"]) == 1 and opened["opened"][0] != incident_id
    assert lab.cli_json("incident", "show", str(opened["opened"][0]))["severity"] == "critical"
    host = alert(lab, "generic", {"severity": "low", "rule": "bmc-login", "host": "host-c", "summary": "BMC login"})
    host_incident = lab.cli_json("incident", "show", str(host["opened"][0]))
    assert host_incident["host"] == "host-c" and host_incident["vm"] is None
    stranger = suricata()
    stranger["dest_ip"] = "198.51.100.7"
    assert alert(lab, "suricata", stranger)["unmatched"] == 1
    listed = lab.cli_json("incident", "list", "--open")
    assert {incident_id, opened["opened"][0], host["opened"][0]} <= {i["id"] for i in listed}


def test_an_alert_flood_is_rate_limited_and_bounded(lab: Any, suspect: dict[str, Any]) -> None:
    flood = [suricata(f"ET FLOOD {n}") for n in range(200)]
    result = alert(lab, "suricata", flood)
    acted = len(result["opened"]) + len(result["updated"])
    assert result["received"] == 200 and result["rate_limited"] >= 190 and acted <= 10, result
    limited = [e for e in lab.cli_json("events", "--kind", "alert.rate_limited", "--limit", "50")]
    assert len(limited) == 1  # one audit entry for the storm, not one per dropped alert


def test_capture_seals_evidence_that_verifies_and_exports(lab: Any, suspect: dict[str, Any], tmp_path: Path) -> None:
    opened = lab.cli_json("incident", "open", "--vm", "suspect", "--severity", "high", "--summary", "reverse shell")
    incident_id = str(opened["id"])
    out = lab.cli_json("incident", "capture", incident_id)
    artefacts = {a["artefact"]: a for a in out["manifest"]["artefacts"]}
    assert set(artefacts) == {"memory", "disk0"} and out["receipts"]
    assert out["manifest"]["vm"]["name"] == "suspect" and out["manifest"]["host"] == "host-a"
    store = Path(lab.lab.controller_dir) / "evidence" / out["capture"]
    canary = suspect["canary"].encode()
    for name in artefacts:
        sealed = (store / f"{name}.sealed").read_bytes()
        assert canary not in sealed and b"\x7fELF" not in sealed[:64]
    # the host's copy is gone
    assert not (Path(lab.lab.host_dir("host-a")) / "forensics" / out["capture"]).exists()
    verified = lab.cli_json("incident", "evidence", incident_id, "--verify")
    assert verified["verification"]["ok"] and len(verified["verification"]["artefacts"]) == 2
    export = tmp_path / "export"
    # an export of plaintext evidence waits for a second person (two-person rule), and only its requester uses it
    officer = lab.as_principal("officer", "security-officer")  # before the request: a later one could not approve it
    asked = lab.cli("incident", "evidence", incident_id, "--export", str(export), check=False)
    approval = lab.approved(asked, officer)
    stolen = officer.cli(
        "--approval", approval, "incident", "evidence", incident_id, "--export", str(tmp_path / "x"), check=False
    )
    assert "requested by another principal" in one_line_error(stolen)
    lab.cli("--approval", approval, "incident", "evidence", incident_id, "--export", str(export))
    core = (export / f"{out['capture']}.memory").read_bytes()
    assert core[:4] == b"\x7fELF" and struct.unpack_from("<H", core, 16)[0] == 4  # ET_CORE
    assert canary in core
    assert json.loads((export / f"{out['capture']}.manifest.json").read_text())["capture"] == out["capture"]
    checked_without_ferryman(export, out["capture"], tmp_path / "offline")
    # one flipped byte in the store fails verification, naming the artefact
    path = store / "disk0.sealed"
    path.chmod(0o600)
    with path.open("r+b") as fh:
        fh.seek(path.stat().st_size // 2)
        byte = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([byte[0] ^ 1]))
    proc = lab.cli("incident", "evidence", incident_id, "--verify", check=False)
    assert proc.returncode == 1 and "disk0: FAILED" in proc.stdout and "memory: ok" in proc.stdout
    custody = [a for a in lab.cli_json("incident", "show", incident_id)["timeline"] if a["kind"] == "custody"]
    assert len(custody) >= 4  # two verifications and two exports, each with its principal
    assert all(a["principal"].startswith("token:") for a in custody)


def checked_without_ferryman(export: Path, capture: str, work: Path) -> None:
    """An export checks with openssl and sha256 alone: the manifest's signature against the signer certificate it
    names, each artefact against the manifest's hash; one changed byte of the manifest fails."""
    work.mkdir()
    manifest_file = export / f"{capture}.manifest.json"
    manifest = json.loads(manifest_file.read_bytes())
    signer = export / "signer.pem"
    der = subprocess.run(["openssl", "x509", "-in", signer, "-outform", "DER"], capture_output=True, check=True)
    assert manifest["signer"]["certificate_sha256"] == "sha256:" + hashlib.sha256(der.stdout).hexdigest()
    pub = work / "signer.pub"
    pub.write_bytes(
        subprocess.run(["openssl", "x509", "-in", signer, "-pubkey", "-noout"], capture_output=True, check=True).stdout
    )
    signature = work / "manifest.sig.der"
    signature.write_bytes(base64.b64decode((export / f"{capture}.manifest.sig").read_text()))

    def openssl_verify(path: Path) -> subprocess.CompletedProcess[str]:
        argv = ["openssl", "dgst", "-sha256", "-verify", pub, "-signature", signature, path]
        return subprocess.run(argv, capture_output=True, text=True)

    good = openssl_verify(manifest_file)
    assert good.returncode == 0 and "Verified OK" in good.stdout, good
    forged = work / "forged.json"
    forged.write_bytes(manifest_file.read_bytes().replace(b'"host-a"', b'"host-b"', 1))
    assert forged.read_bytes() != manifest_file.read_bytes()
    assert openssl_verify(forged).returncode != 0
    for item in manifest["artefacts"]:
        data = (export / f"{capture}.{item['artefact']}").read_bytes()
        assert "sha256:" + hashlib.sha256(data).hexdigest() == item["plaintext_sha256"], item["artefact"]


def test_impact_names_neighbours_and_a_tenant_view_names_no_other_tenant(lab: Any, suspect: dict[str, Any]) -> None:
    opened = lab.cli_json("incident", "open", "--vm", "suspect", "--summary", "impact check")
    report = lab.cli_json("incident", "impact", str(opened["id"]), "--since", "-1h")
    text = json.dumps(report)
    neighbours = [v["name"] for v in lab.cli_json("vm", "list", "--host", "host-a") if v["name"] != "suspect"]
    assert neighbours and all(name in text for name in neighbours)
    table = lab.cli("incident", "impact", str(opened["id"]), "--since", "-1h").stdout
    assert "impact of an incident at VM suspect" in table and all(name in table for name in neighbours)
    others = {v["tenant"] for v in lab.cli_json("vm", "list")} - {"acme"}
    view = json.dumps(lab.cli_json("incident", "impact", str(opened["id"]), "--since", "-1h", "--tenant", "acme"))
    for vm in lab.cli_json("vm", "list"):
        if vm["tenant"] != "acme":
            assert vm["name"] not in view and vm["id"] not in view
    assert not any(tenant in view for tenant in others)


def test_incident_cli_error_paths(lab: Any, suspect: dict[str, Any]) -> None:
    opened = lab.cli_json("incident", "open", "--vm", "suspect", "--summary", "to close")
    incident_id = str(opened["id"])
    lab.cli("incident", "close", incident_id, "--resolution", "false positive")
    bad = [
        (["incident", "close", incident_id, "--resolution", "again"], "closed already"),
        (["incident", "open", "--summary", "nobody"], "needs a VM"),
        (["incident", "open", "--vm", "nope", "--summary", "x"], "not found"),
        (["incident", "open", "--vm", "suspect", "--severity", "dire", "--summary", "x"], "bad severity"),
        (["incident", "show", "999999"], "not found"),
        (["incident", "capture", "999999"], "not found"),
    ]
    for args, expected in bad:
        assert expected in one_line_error(lab.cli(*args, check=False)), args
    host = lab.cli_json("incident", "open", "--host", "host-c", "--summary", "host event")
    assert "capture its VMs" in one_line_error(lab.cli("incident", "capture", str(host["id"]), check=False))
    with pytest.raises(CliError, match=r"not an alert|event_type"):
        lab.api().post("/api/v1/alerts/suricata", {"event_type": "flow", "src_ip": "10.0.0.1"})


def test_the_audit_log_is_a_verified_chain_exported_for_a_siem(lab: Any, tmp_path: Path) -> None:
    checked = lab.cli_json("audit", "verify")
    assert checked["ok"] and checked["checked"] > 50 and checked["first_broken"] is None
    lab.cli("audit", "checkpoint")
    again = lab.cli_json("audit", "verify")
    assert again["ok"] and again["checkpoint"]["signature_ok"]
    cef = lab.cli("audit", "export", "--since", "-1h", "--format", "cef").stdout.splitlines()
    assert cef and all(line.startswith("CEF:0|") for line in cef)
    out = tmp_path / "audit.jsonl"
    lab.cli("audit", "export", "--since", "-1h", "--format", "jsonl", "--output", str(out))
    entries = [json.loads(line) for line in out.read_text().splitlines()]
    assert entries and all(len(e["hash"]) == 64 for e in entries)
