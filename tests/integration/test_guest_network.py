"""The lab guest on a network: one real guest (the bootable disk, SeaBIOS, TCG, 1 vCPU, 256 MiB) with a virtio-net NIC
on a tap in a namespace of its own, configured from its SMBIOS serial, checked from the inside through the guest agent
(:mod:`ferryman.testing.guest_exec`); and the guest-exec client against a fake agent.

The tap is opened inside the namespace from a short-lived thread (``setns``), the way a host opens a NIC's tap; the
namespace holds a bridge with the tap and a stand-in peer (a veth with an address in the guest's subnet), no nftables.
Every QEMU, descriptor and namespace the test makes is removed in ``finally``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import json
import os
import re
import signal
import struct
import subprocess
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ferryman.core.bootparams import smbios_serial
from ferryman.core.models import DiskSpec, NicSpec, VMSpec
from ferryman.lab import netlab
from ferryman.lab.disk_image import DiskLayout
from ferryman.testing.guest_exec import ExecResult, GuestExecError, guest_exec, wait_for_agent

QEMU = "qemu-system-x86_64"
BOOT_TIMEOUT = 150.0
GUEST_MAC = "52:54:00:77:00:20"
GUEST_IP, PEER_IP, CIDR = "10.77.0.20", "10.77.0.1", "10.77.0.0/24"
GUEST_IP6, PEER_IP6, CIDR6 = "fd00:77::20", "fd00:77::1", "fd00:77::/64"

CLONE_NEWNET, TUNSETIFF = 0x40000000, 0x400454CA
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000
_libc = ctypes.CDLL(None, use_errno=True)


# -- helpers -------------------------------------------------------------------------------------------------------


def open_tap_in_netns(netns: str, ifname: str) -> int:
    """A non-persistent tap created in ``netns``: /dev/net/tun is opened from a fresh thread that joined the
    namespace and then exits, so nothing else ever runs in it (Python 3.11 has no os.setns)."""
    result: dict[str, object] = {}

    def worker() -> None:
        try:
            nsfd = os.open(f"/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(nsfd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, os.strerror(err))
            finally:
                os.close(nsfd)
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)  # the tap's namespace is fixed here
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", ifname.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
            result["fd"] = fd
        except BaseException as exc:
            result["exc"] = exc

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    if "exc" in result:
        raise result["exc"]  # type: ignore[misc]
    return result["fd"]  # type: ignore[return-value]


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=15)


def in_ns(netns: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", netns, *argv], capture_output=True, text=True, timeout=30)


async def until(check: Callable[[], Awaitable[ExecResult]], within: float) -> ExecResult:
    """The first successful result of ``check`` within ``within`` seconds, else the last one."""
    deadline = time.monotonic() + within
    while True:
        result = await check()
        if result.ok or time.monotonic() > deadline:
            return result
        await asyncio.sleep(0.5)


def spec_with_nic() -> VMSpec:
    nic = NicSpec(
        id="gn0", network="test-net", vni=77, mac=GUEST_MAC, ipv4=GUEST_IP, cidr=CIDR, ipv6=GUEST_IP6, cidr6=CIDR6
    )
    return VMSpec(
        vm_id=str(uuid.uuid4()),
        name="net-1",
        vcpus=1,
        memory_mb=256,
        disks=(DiskSpec(64 << 20),),
        canary="CANARY-NET",
        dirty_kib_per_s=0,  # nothing to migrate here: leave the shared cores to others
        nics=(nic,),
    )


# -- fixtures ------------------------------------------------------------------------------------------------------


@pytest.fixture
def segment() -> Iterator[str]:
    """A namespace with a bridge ``br0`` and a stand-in peer ``peer0`` (PEER_IP, PEER_IP6) on it; deleted after."""
    reason = netlab.unavailable()
    if reason is not None:
        pytest.skip(f"namespaces: {reason}")
    netns = f"fmgn{os.getpid()}"
    ip("netns", "add", netns)
    try:
        ip("-n", netns, "link", "set", "lo", "up")
        ip("-n", netns, "link", "add", "br0", "type", "bridge")
        ip("-n", netns, "link", "set", "br0", "up")
        ip("-n", netns, "link", "add", "peer0", "type", "veth", "peer", "name", "peerbr")
        ip("-n", netns, "link", "set", "peerbr", "master", "br0", "up")
        ip("-n", netns, "addr", "add", f"{PEER_IP}/24", "dev", "peer0")
        ip("-n", netns, "-6", "addr", "add", f"{PEER_IP6}/64", "dev", "peer0", "nodad")
        ip("-n", netns, "link", "set", "peer0", "up")
        yield netns
    finally:
        subprocess.run(["ip", "netns", "del", netns], capture_output=True, timeout=15)


@pytest.fixture
def started(layout: DiskLayout, segment: str, tmp_path: Path) -> Iterator[tuple[Path, Path, subprocess.Popen[bytes]]]:
    """The guest started with its NIC on ``segment``'s bridge: (guest agent socket, serial log, QEMU)."""
    overlay = tmp_path / "overlay.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(layout.path), str(overlay)],
        check=True,
        timeout=30,
    )
    socket, log = tmp_path / "qga.sock", tmp_path / "serial.log"
    tap = open_tap_in_netns(segment, "fmt-gn0")
    qemu: subprocess.Popen[bytes] | None = None
    try:
        ip("-n", segment, "link", "set", "fmt-gn0", "master", "br0", "up")
        argv = [
            QEMU, "-machine", "q35,accel=tcg", "-m", "256", "-smp", "1", "-nodefaults", "-no-user-config",
            "-display", "none", "-serial", f"file:{log}",
            "-drive", f"if=none,id=d0,file={overlay},format=qcow2", "-device", "virtio-blk-pci,drive=d0",
            "-smbios", f"type=1,serial={smbios_serial(spec_with_nic())}",
            "-netdev", f"tap,id=net0,fd={tap}", "-device", f"virtio-net-pci,netdev=net0,mac={GUEST_MAC}",
            "-chardev", f"socket,id=qga0,path={socket},server=on,wait=off",
            "-device", "virtio-serial-pci,id=vs0",
            "-device", "virtserialport,bus=vs0.0,chardev=qga0,name=org.qemu.guest_agent.0",
        ]  # fmt: skip
        with (tmp_path / "qemu.out").open("wb") as out:
            qemu = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, pass_fds=(tap,)
            )
        os.close(tap)  # QEMU holds the tap now: it goes away when QEMU exits
        tap = -1
        yield socket, log, qemu
    finally:
        if tap >= 0:
            os.close(tap)
        if qemu is not None:
            if qemu.poll() is None:
                qemu.send_signal(signal.SIGKILL)
            qemu.wait(timeout=30)


@pytest.fixture
async def booted(
    started: tuple[Path, Path, subprocess.Popen[bytes]],
) -> tuple[Path, Path, subprocess.Popen[bytes]]:
    """``started``, once its guest agent answers."""
    socket, log, qemu = started
    try:
        await wait_for_agent(socket, BOOT_TIMEOUT)
    except GuestExecError:
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else "(no serial log)"
        pytest.fail(f"the guest agent did not answer (QEMU exit {qemu.poll()}):\n{tail}")
    return started


# -- the guest on its network --------------------------------------------------------------------------------------


@pytest.mark.qemu
async def test_the_guest_configures_its_nic_from_smbios_and_reaches_its_peer(
    booted: tuple[Path, Path, subprocess.Popen[bytes]], segment: str
) -> None:
    """eth0 carries the serial's IPv4 and IPv6 addresses; the guest pings the stand-in peer over both, the peer pings
    it back, and the console names the NIC."""
    socket, log, _qemu = booted
    shown = await guest_exec(socket, ["ip", "addr", "show", "dev", "eth0"])
    assert shown.ok, shown
    assert f"inet {GUEST_IP}/24" in shown.text and f"inet6 {GUEST_IP6}/64" in shown.text
    assert f"link/ether {GUEST_MAC}" in shown.text and "UP" in shown.text
    assert f"FERRYMAN-NET eth0 {GUEST_MAC} {GUEST_IP}/24" in log.read_text(errors="replace")

    pinged = await until(lambda: guest_exec(socket, ["ping", "-c", "2", "-W", "2", PEER_IP]), 10)
    assert pinged.ok and "0% packet loss" in pinged.text, pinged
    # IPv6: the guest's address is usable once its duplicate address detection is over (about a second)
    pinged6 = await until(lambda: guest_exec(socket, ["ping6", "-c", "2", "-W", "2", PEER_IP6]), 15)
    assert pinged6.ok, pinged6
    back = await asyncio.to_thread(in_ns, segment, "busybox", "ping", "-c", "2", "-W", "2", GUEST_IP)
    assert back.returncode == 0, back.stdout + back.stderr
    console = log.read_text(errors="replace")
    assert f"FERRYMAN-NET eth0 {GUEST_MAC} {GUEST_IP6}/64" in console
    assert "FERRYMAN-GUEST-ERROR" not in console


@pytest.mark.qemu
async def test_guest_exec_runs_busybox_tools_from_the_agents_path(
    booted: tuple[Path, Path, subprocess.Popen[bytes]],
) -> None:
    """The network tools the spoofing tests need resolve on the agent's PATH; stdin, exit codes and stderr come
    back; a program that does not exist is a GuestExecError."""
    socket, _log, _qemu = booted
    tools = ["ping", "ping6", "arping", "ip", "sh", "udhcpd", "udhcpc", "nc", "cat", "sleep", "kill"]
    found = await guest_exec(socket, ["sh", "-c", 'for t in "$@"; do command -v "$t" || exit 1; done', "sh", *tools])
    assert found.ok and len(found.text.split()) == len(tools), found
    echoed = await guest_exec(socket, ["cat"], stdin=b"over the agent\n")
    assert echoed == ExecResult(0, b"over the agent\n", b"")
    failed = await guest_exec(socket, ["sh", "-c", "echo oops >&2; exit 3"])
    assert (failed.exit_code, failed.stdout, failed.stderr) == (3, b"", b"oops\n")
    with pytest.raises(GuestExecError, match="guest-exec"):
        await guest_exec(socket, ["/nonexistent/tool"])
    with pytest.raises(GuestExecError, match="did not finish in 1s"):
        await guest_exec(socket, ["sleep", "5"], timeout=1)
    assert (await guest_exec(socket, ["true"])).ok  # the agent still answers after an abandoned call


# -- guest_exec against a fake agent -------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def fake_agent(tmp_path: Path, answer: Callable[[dict[str, Any]], bytes | None]) -> AsyncIterator[Path]:
    """A UNIX socket that answers guest-sync like an agent with a stale answer left over from an earlier client, and
    every other request with ``answer(request)``: raw bytes (closing the connection after them if they do not end a
    line), or None for silence."""
    socket = tmp_path / "fake-qga.sock"

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while line := await reader.readline():
                request = json.loads(line)
                if request["execute"] == "guest-sync":
                    raw: bytes | None = (
                        b'{"return": {"pid": 1}}\n'
                        + json.dumps({"return": request["arguments"]["id"]}).encode()
                        + b"\n"
                    )
                else:
                    raw = answer(request)
                if raw is not None:
                    writer.write(raw)
                    await writer.drain()
                    if not raw.endswith(b"\n"):
                        break
        writer.close()

    server = await asyncio.start_unix_server(serve, path=str(socket))
    try:
        yield socket
    finally:
        server.close()
        await server.wait_closed()


async def test_guest_exec_decodes_output_and_polls_until_exit(tmp_path: Path) -> None:
    """guest-exec, then guest-exec-status until exited; base64 output decoded; a signal gives a negative code."""
    polls: list[int] = []

    def answer(request: dict[str, Any]) -> bytes:
        if request["execute"] == "guest-exec":
            assert request["arguments"] == {"path": "ping", "arg": ["-c1", "x"], "capture-output": True}
            return b'{"return": {"pid": 42}}\n'
        polls.append(request["arguments"]["pid"])
        if len(polls) < 3:
            return b'{"return": {"exited": false}}\n'
        return b'{"return": {"exited": true, "signal": 9, "out-data": "aGk=", "err-data": ""}}\n'

    async with fake_agent(tmp_path, answer) as socket:
        result = await guest_exec(socket, ["ping", "-c1", "x"], timeout=5)
    assert result == ExecResult(-9, b"hi", b"") and polls == [42, 42, 42]


@pytest.mark.parametrize(
    ("replies", "message"),
    [
        ([b"not json\n"], "malformed JSON"),
        ([b'{"return": {"pid": 1}'], "closed its port"),  # EOF in the middle of a line
        ([b'{"error": {"class": "GenericError", "desc": "no such file"}}\n'], "guest-exec: no such file"),
        ([b'{"return": {"pid": "x"}}\n'], "lacks pid"),
        ([b'{"return": {"pid": 1}}\n', b'{"return": {"exited": true, "exitcode": 0, "out-data": "!!"}}\n'], "base64"),
        ([], "did not finish in 0.5s"),  # silence
    ],
)
async def test_guest_exec_turns_a_bad_agent_into_guest_exec_error(
    tmp_path: Path, replies: list[bytes], message: str
) -> None:
    """Garbage, EOF, an error reply, a wrong type, bad base64 and silence all end in a GuestExecError, in time."""
    sent = iter(replies)

    async with fake_agent(tmp_path, lambda _request: next(sent, None)) as socket:
        started = time.monotonic()
        with pytest.raises(GuestExecError, match=re.escape(message)):
            await guest_exec(socket, ["true"], timeout=0.5)
        assert time.monotonic() - started < 2


async def test_waiting_for_an_agent_that_never_answers_is_bounded(tmp_path: Path) -> None:
    """No socket at all: wait_for_agent gives up after its bound with a GuestExecError."""
    with pytest.raises(GuestExecError, match=r"did not answer within 0\.5s"):
        await wait_for_agent(tmp_path / "absent.sock", 0.5, attempt_s=0.2)
