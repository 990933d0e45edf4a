"""``ferryman image …`` against a running lab: a publisher's key pair and signature made with the CLI, imports that
succeed and fail as an operator would see them (one line, exit 1), revocation, the trust store, and an image store
that survives a controller restart."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

pytestmark = [pytest.mark.lab, pytest.mark.qemu]


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("  ")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def publisher(lab, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A key pair made by ``image keygen`` and trusted as ``e2e-pub``."""
    keys = tmp_path_factory.mktemp("publisher")
    lab.cli("image", "keygen", "e2e-pub", "--dir", str(keys))
    assert (keys / "e2e-pub.key").stat().st_mode & 0o777 == 0o600
    trusted = lab.cli_json("image", "trust", "add", "e2e-pub", str(keys / "e2e-pub.pub"))
    assert trusted["trusted"] and trusted["fingerprint"].startswith("sha256:")
    return keys


def disk(path: Path, size: str = "32M") -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True)
    return path


def signed(lab, publisher: Path, image: Path) -> Path:
    sig = image.with_suffix(".sig")
    lab.cli("image", "sign", str(image), "--key", str(publisher / "e2e-pub.key"), "--out", str(sig))
    return sig


def test_import_list_show_verify_a_signed_image(lab, publisher: Path, tmp_path: Path) -> None:
    image = disk(tmp_path / "e2e.qcow2")
    sig = signed(lab, publisher, image)
    facts_args = ("--os", "debian", "--version", "12.8", "--signature", str(sig))
    proc = lab.cli("image", "import", "e2e-img", str(image), *facts_args, "--key", "e2e-pub")
    assert "imported e2e-img: debian 12.8" in proc.stdout and "uploading disk" in proc.stderr
    listed = {i["name"]: i for i in lab.cli_json("image", "list")}
    row = listed["e2e-img"]
    facts = (row["signature"], row["status"], row["format"], row["virtual_size"])
    assert facts == ("valid", "active", "qcow2", 32 << 20)
    assert row["publisher"] == "e2e-pub" and row["digest"].startswith("sha256:") and row["baseline"] == "debian 12.8"
    shown = lab.cli_json("image", "show", "e2e-img", "--verify")
    assert shown["verification"]["ok"] and shown["vm_names"] == []
    assert "e2e-img" in lab.cli("image", "list").stdout
    # the same file under another name: nothing is uploaded again
    again = lab.cli("image", "import", "e2e-img-2", str(image), *facts_args)
    assert "on the controller already" in again.stderr
    error = one_line_error(lab.cli("image", "import", "e2e-img", str(image), *facts_args, check=False))
    assert "exists already" in error
    # sent ahead of use: the host checks it on arrival and keeps it; a second push sends nothing
    pushed = lab.cli_json("image", "push", "e2e-img", "--host", "host-c")
    assert pushed["sent_bytes"] == {"host-c": image.stat().st_size}
    cached = lab.lab.host_dir("host-c") / "images" / "sha256" / row["digest"].removeprefix("sha256:")
    assert cached.read_bytes() == image.read_bytes()
    assert lab.cli_json("image", "push", "e2e-img", "--host", "host-c")["sent_bytes"] == {"host-c": 0}
    assert any("host-c" in e["message"] for e in lab.cli_json("events", "--kind", "image.distributed"))


def test_a_signature_of_other_bytes_an_unknown_key_or_a_bad_file_is_one_clear_error(lab, publisher, tmp_path):
    image, other = disk(tmp_path / "a.qcow2", "16M"), disk(tmp_path / "b.qcow2", "24M")
    sig = signed(lab, publisher, other)
    base = ["image", "import", "tampered", str(image), "--os", "debian", "--version", "12", "--signature"]
    assert "no trusted key" in one_line_error(lab.cli(*base, str(sig), check=False))
    assert "e2e-nobody" in one_line_error(lab.cli(*base, str(sig), "--key", "e2e-nobody", check=False))
    junk = tmp_path / "junk.sig"
    junk.write_text("definitely not a signature")
    assert "64 raw Ed25519 bytes" in one_line_error(lab.cli(*base, str(junk), check=False))
    assert "cannot read" in one_line_error(lab.cli(*base, str(tmp_path / "missing.sig"), check=False))
    assert "tampered" not in {i["name"] for i in lab.cli_json("image", "list")}
    refused = lab.cli_json("events", "--kind", "image.refused")
    assert any("tampered" in e["message"] for e in refused)


def test_revoke_then_the_image_is_listed_revoked_and_unusable(lab, publisher, tmp_path):
    image = disk(tmp_path / "old.qcow2", "8M")
    lab.cli(
        "image",
        "import",
        "e2e-old",
        str(image),
        "--os",
        "debian",
        "--version",
        "11.2",
        "--signature",
        str(signed(lab, publisher, image)),
    )
    revoked = lab.cli_json("image", "revoke", "e2e-old", "--reason", "CVE-2026-1234")
    assert revoked["status"] == "revoked" and revoked["revoked_reason"] == "CVE-2026-1234"
    check = lab.cli("image", "verify", "e2e-old", check=False)
    assert check.returncode == 1 and "revoked: CVE-2026-1234" in check.stdout
    assert "revoked already" in one_line_error(lab.cli("image", "revoke", "e2e-old", "--reason", "x", check=False))
    assert "not found" in one_line_error(lab.cli("image", "show", "e2e-none", check=False))


def test_the_image_store_survives_a_controller_restart(lab, publisher, tmp_path):
    image = disk(tmp_path / "keep.qcow2", "12M")  # its own bytes: "e2e-old" (8M) is revoked, and with it its file
    lab.cli(
        "image",
        "import",
        "e2e-keep",
        str(image),
        "--os",
        "debian",
        "--version",
        "12.1",
        "--signature",
        str(signed(lab, publisher, image)),
    )
    lab.lab.restart_controller()
    assert lab.cli_json("image", "verify", "e2e-keep")["ok"]
    assert [k["name"] for k in lab.cli_json("image", "trust", "list") if k["name"] == "e2e-pub"]
