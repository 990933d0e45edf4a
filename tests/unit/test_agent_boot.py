"""The boot image an agent is handed: command-line templates, per-VM boot parameters, the QEMU command line."""

from __future__ import annotations

from pathlib import Path

import pytest

from ferryman.agent.hypervisor.boot import BootImage, qemu_argv
from ferryman.core.bootparams import DEFAULT_CMDLINE
from ferryman.core.errors import InvalidInput
from ferryman.core.models import DiskSpec, VMSpec
from ferryman.lab.guest import GuestImage

VM_ID = "5f1e6c1e-8d0a-4a57-9a55-0f1c2b3d4e5f"
SPEC = VMSpec(
    vm_id=VM_ID,
    name="web-1",
    vcpus=2,
    memory_mb=256,
    disks=(DiskSpec(64 << 20),),
    canary="canary-1",
    dirty_kib_per_s=512,
    record_interval_ms=250,
    resident_mib=32,
)


def test_the_lab_guest_renders_the_command_line_its_init_reads() -> None:
    """The lab's template fills in each VM's workload exactly as the guest's init parses it."""
    image = GuestImage(Path("/k"), Path("/i"))
    assert image.render_cmdline(SPEC) == (
        "console=ttyS0 quiet panic=-1 i8042.noaux i8042.nokbd i8042.nopnp no_timer_check"
        f" ferryman.vm={VM_ID} ferryman.canary=canary-1 ferryman.dirty_kib=512"
        " ferryman.interval_ms=250 ferryman.resident_mib=32"
    )
    assert image.ready_marker == "FERRYMAN-GUEST-READY"


def test_a_plain_boot_image_knows_no_guest_workload() -> None:
    """Without a template the command line is only the serial console; no readiness marker is assumed."""
    image = BootImage(Path("/k"), Path("/i"))
    assert image.render_cmdline(SPEC) == DEFAULT_CMDLINE
    assert image.ready_marker is None
    named = BootImage(Path("/k"), Path("/i"), "root=/dev/vda name=${name}")
    assert named.render_cmdline(SPEC) == "root=/dev/vda name=web-1"


@pytest.mark.parametrize("template", ["console=ttyS0 x=${memory}", "x=$", "x=${vm_id"])
def test_a_template_naming_anything_but_boot_parameters_is_refused(template: str) -> None:
    """A template may name only the boot parameters, and must be well formed."""
    with pytest.raises(InvalidInput, match="command line template"):
        BootImage(Path("/k"), Path("/i"), template)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"canary": "two words"}, "bad canary"),
        ({"canary": ""}, "bad canary"),
        ({"dirty_kib_per_s": -1}, "guest workload"),
        ({"record_interval_ms": 0}, "guest workload"),
        ({"resident_mib": -1}, "guest workload"),
    ],
)
def test_a_value_the_command_line_cannot_carry_is_refused(override: dict[str, object], message: str) -> None:
    """Spaces, empty values and negative workload numbers never reach QEMU's -append."""
    spec = VMSpec(**{**SPEC.__dict__, **override})  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match=message):
        BootImage(Path("/k"), Path("/i")).render_cmdline(spec)


def test_the_qemu_command_line_boots_the_image_with_the_vms_values() -> None:
    """The handed-over kernel, initrd and rendered command line go to QEMU; a key comes from an inherited pipe only."""
    image = GuestImage(Path("/boot/vmlinuz"), Path("/boot/initrd.img"))
    argv = qemu_argv(
        image,
        SPEC,
        qemu_binary="qemu-system-x86_64",
        accel="tcg",
        console=Path("/vm/console.log"),
        disks=[Path("/vm/disk0.qcow2")],
        qmp_socket="/vm/qmp.sock",
        pidfile=Path("/vm/qemu.pid"),
        incoming=True,
        key=("disk-key", 7),
    )
    option = {argv[i]: argv[i + 1] for i in range(1, len(argv) - 1) if argv[i].startswith("-")}
    assert (option["-kernel"], option["-initrd"]) == ("/boot/vmlinuz", "/boot/initrd.img")
    assert option["-append"] == image.render_cmdline(SPEC)
    assert (option["-m"], option["-smp"], option["-uuid"]) == ("256", "2", VM_ID)
    assert option["-object"] == "secret,id=disk-key,file=/proc/self/fd/7,format=raw"
    assert "encrypt.key-secret=disk-key" in option["-blockdev"]
    assert argv[-1] == "-daemonize" and "-incoming" in argv and "-S" in argv
