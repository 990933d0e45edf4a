"""Agent command line: snapshot retention, the boot image and the guest probes are settings, from the options or
the environment, checked."""

from __future__ import annotations

from pathlib import Path

import pytest

from ferryman.agent.hypervisor.boot import BootImage
from ferryman.agent.main import load_boot_and_probes, parse_args
from ferryman.core.bootparams import DEFAULT_CMDLINE
from ferryman.core.errors import FerrymanError, InvalidInput
from ferryman.lab.lab import RECORDS_PROBE

BASE = ["--name", "host-a", "--state-dir", "/tmp/a", "--controller-ca", "/tmp/ca.pem"]


def test_snapshot_retention_from_option_environment_and_default(monkeypatch):
    """--snapshots-keep wins over FERRYMAN_SNAPSHOTS_KEEP, which wins over the default of 1."""
    monkeypatch.delenv("FERRYMAN_SNAPSHOTS_KEEP", raising=False)
    assert parse_args(BASE)[0].snapshots_keep == 1
    monkeypatch.setenv("FERRYMAN_SNAPSHOTS_KEEP", "3")
    assert parse_args(BASE)[0].snapshots_keep == 3
    assert parse_args([*BASE, "--snapshots-keep", "0"])[0].snapshots_keep == 0


@pytest.mark.parametrize("value", ["-1", "many"])
def test_bad_snapshot_retention_is_a_usage_error(value, capsys):
    """A negative or non-numeric retention ends with a usage error, not a traceback."""
    with pytest.raises(SystemExit) as exited:
        parse_args([*BASE, "--snapshots-keep", value])
    assert exited.value.code == 2 and "--snapshots-keep" in capsys.readouterr().err


BOOT_ENV = ("FERRYMAN_BOOT_KERNEL", "FERRYMAN_BOOT_INITRD", "FERRYMAN_BOOT_CMDLINE", "FERRYMAN_BOOT_READY_MARKER")


@pytest.fixture
def clean_env(monkeypatch):
    for name in (*BOOT_ENV, "FERRYMAN_GUEST_PROBES"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_boot_image_from_options(clean_env):
    """--boot-* name the image the agent boots guests from; without them it has none (and refuses to serve)."""
    assert parse_args(BASE)[0].boot is None
    args = [*BASE, "--boot-kernel", "/img/vmlinuz", "--boot-initrd", "/img/initrd.img"]
    args += ["--boot-cmdline", "console=ttyS0 vm=${vm_id}", "--boot-ready-marker", "READY"]
    boot = parse_args(args)[0].boot
    assert boot == BootImage(Path("/img/vmlinuz"), Path("/img/initrd.img"), "console=ttyS0 vm=${vm_id}", "READY")
    with pytest.raises(FerrymanError, match="no guest boot image"):
        load_boot_and_probes(parse_args(BASE)[0])


def test_boot_image_and_probes_from_the_environment(clean_env, tmp_path):
    """FERRYMAN_BOOT_* and FERRYMAN_GUEST_PROBES stand in for the options; the options win."""
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd.img"
    kernel.write_bytes(b"k")
    initrd.write_bytes(b"i")
    clean_env.setenv("FERRYMAN_BOOT_KERNEL", str(kernel))
    clean_env.setenv("FERRYMAN_BOOT_INITRD", str(initrd))
    clean_env.setenv("FERRYMAN_GUEST_PROBES", f"{RECORDS_PROBE}, ")
    settings = parse_args(BASE)[0]
    assert settings.boot == BootImage(kernel, initrd, DEFAULT_CMDLINE)
    assert settings.guest_probes == (RECORDS_PROBE,)
    boot, probes = load_boot_and_probes(settings)
    assert boot == settings.boot and [p.name for p in probes] == ["records"]
    assert parse_args([*BASE, "--boot-kernel", "/other/vmlinuz"])[0].boot.kernel == Path("/other/vmlinuz")
    other = parse_args([*BASE, "--guest-probe", "some.module:Probe"])[0]
    assert other.guest_probes == ("some.module:Probe",)
    with pytest.raises(InvalidInput, match="cannot load guest probe"):
        load_boot_and_probes(other)
    kernel.unlink()
    with pytest.raises(FerrymanError, match="incomplete"):
        load_boot_and_probes(settings)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--boot-kernel", "/k"], "--boot-kernel and --boot-initrd go together"),
        (["--boot-kernel", "/k", "--boot-initrd", "/i", "--boot-cmdline", "x=${memory}"], "command line template"),
    ],
)
def test_bad_boot_options_are_a_usage_error(clean_env, capsys, extra, message):
    """Half an image, or a template naming what the agent does not know, ends with a usage error."""
    with pytest.raises(SystemExit) as exited:
        parse_args([*BASE, *extra])
    assert exited.value.code == 2 and message in capsys.readouterr().err
