"""Running things in a network namespace: commands (``ip -n``, ``nsenter --net``), taps, throw-away namespaces.

A host's VM networking lives in a named network namespace (``/run/netns/<name>``) that the lab or the operator
creates, or in the agent's own namespace (``None``). Commands reach a named namespace from outside: ``ip -n``,
``bridge -n`` and ``nsenter --net=/run/netns/<name>`` for the rest. A tap is different: the namespace of a tun
device is the namespace of the thread that opens ``/dev/net/tun``, so :func:`open_tap` opens it from a fresh
short-lived thread that first ``setns``-es into the namespace and then exits. It is never done on a pooled or
executor thread: that thread would stay in the namespace and run unrelated work there later. Python 3.11 has no
``os.setns``, hence ctypes. :func:`in_scratch_netns` does the same with ``unshare`` to run commands in a namespace
that exists only as long as the thread (nothing to clean up, even if the agent dies).

Every command has a timeout, none goes through a shell, and every failure becomes a
:class:`~ferryman.core.errors.NetworkError` that says what failed, where, and the tool's own message. This module does
not decide what to create; :mod:`.host` does.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import re
import socket
import struct
import subprocess
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar, cast

from ferryman.core.errors import InvalidInput, NetworkError

__all__ = [
    "COMMAND_TIMEOUT",
    "NETNS_DIR",
    "Namespace",
    "check_ifname",
    "in_scratch_netns",
    "open_packet_socket",
    "open_tap",
    "run_command",
]

NETNS_DIR = Path("/run/netns")
COMMAND_TIMEOUT = 10.0

_NETNS_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_IFNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,14}")  # IFNAMSIZ; never "." or "..", no "/" or spaces

_CLONE_NEWNET = 0x40000000
_TUNSETIFF = 0x400454CA
_TUNGETIFF = 0x800454D2
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_IFF_VNET_HDR = 0x4000
_IFF_PERSIST = 0x0800
_IFREQ = struct.Struct("16sH22x")  # struct ifreq: name, flags, padding to 40 bytes

T = TypeVar("T")


def check_ifname(name: str) -> str:
    """``name`` if it is a safe interface name (at most 15 of ``[A-Za-z0-9_.-]``), else InvalidInput."""
    if not isinstance(name, str) or not _IFNAME.fullmatch(name):
        raise InvalidInput(f"bad interface name {name!r}: 1 to 15 letters, digits, '_', '.' or '-'")
    return name


def run_command(
    argv: Sequence[str], *, what: str, where: str, input: str | None = None, timeout: float = COMMAND_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` (no shell) and return the finished process whatever its exit status; NetworkError only if it
    could not run or did not finish within ``timeout``."""
    try:
        return subprocess.run(
            list(argv),
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=None if input is not None else subprocess.DEVNULL,
            check=False,
        )
    except subprocess.TimeoutExpired as err:
        raise NetworkError(f"{what} in {where} did not finish within {timeout:g} s ({argv[0]})") from err
    except OSError as err:
        raise NetworkError(f"{what} in {where} could not run {argv[0]}: {err}") from err


@dataclass(frozen=True)
class Namespace:
    """A host's network namespace by name (``None``: the agent's own, or the calling thread's) and the command
    lines that reach it; ``label`` names a nameless one in messages."""

    name: str | None
    label: str = ""

    def __post_init__(self) -> None:
        if self.name is not None and (not isinstance(self.name, str) or not _NETNS_NAME.fullmatch(self.name)):
            raise InvalidInput(f"bad network namespace name {self.name!r}")

    @property
    def where(self) -> str:
        if self.name:
            return f"network namespace {self.name}"
        return self.label or "the agent's network namespace"

    @property
    def path(self) -> Path | None:
        return None if self.name is None else NETNS_DIR / self.name

    def ip(self, *args: str) -> list[str]:
        return ["ip", *(["-n", self.name] if self.name else []), *args]

    def bridge(self, *args: str) -> list[str]:
        return ["bridge", *(["-n", self.name] if self.name else []), *args]

    def enter(self, *argv: str) -> list[str]:
        """``argv`` run inside the namespace (for tools without a namespace option: nft, sysctl)."""
        return [*(["nsenter", f"--net={self.path}"] if self.path else []), *argv]

    def nft(self, *args: str) -> list[str]:
        return self.enter("nft", *args)

    def check_exists(self) -> None:
        """NetworkError unless the named namespace exists (a clearer message than nsenter's)."""
        if self.path is not None and not self.path.exists():
            raise NetworkError(f"{self.where} does not exist ({self.path})")

    def run(self, argv: Sequence[str], what: str, *, input: str | None = None, timeout: float = COMMAND_TIMEOUT) -> str:
        """stdout of ``argv``; NetworkError with its stderr if it fails."""
        done = run_command(argv, what=what, where=self.where, input=input, timeout=timeout)
        if done.returncode != 0:
            detail = done.stderr.strip() or done.stdout.strip() or f"exit status {done.returncode}"
            raise NetworkError(f"{what} in {self.where} failed: {detail}")
        return done.stdout

    def try_run(
        self, argv: Sequence[str], what: str, *, timeout: float = COMMAND_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        """The finished process of ``argv``, for callers that expect some failures (an absent table)."""
        return run_command(argv, what=what, where=self.where, timeout=timeout)


# --- threads in another namespace -------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


@dataclass
class _Outcome(Generic[T]):
    value: T | None = None
    error: BaseException | None = None
    done: bool = False


def _check_libc(result: int, call: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{call}: {os.strerror(code)}")


def _on_fresh_thread(name: str, enter: Callable[[], None], fn: Callable[[], T]) -> T:
    """``fn()`` on a new thread that first runs ``enter`` (setns/unshare) and then exits with it.

    The namespace change is per thread, so it touches neither the caller's thread nor any other; the thread is
    never reused, so nothing else can run in the namespace by accident.
    """
    outcome: _Outcome[T] = _Outcome()

    def worker() -> None:
        try:
            enter()
            outcome.value = fn()
            outcome.done = True
        except BaseException as exc:  # re-raised on the caller's thread below
            outcome.error = exc

    thread = threading.Thread(target=worker, name=name, daemon=True)
    thread.start()
    thread.join()
    if outcome.error is not None:
        raise outcome.error
    if not outcome.done:
        raise NetworkError(f"thread {name} ended without a result")
    return cast(T, outcome.value)


def _setns(path: Path) -> Callable[[], None]:
    def enter() -> None:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            _check_libc(_libc.setns(fd, _CLONE_NEWNET), f"setns({path})")
        finally:
            os.close(fd)

    return enter


def _unshare() -> None:
    _check_libc(_libc.unshare(_CLONE_NEWNET), "unshare(CLONE_NEWNET)")


def in_scratch_netns(fn: Callable[[], T], *, purpose: str = "scratch") -> T:
    """``fn()`` on a thread in a new, empty network namespace; subprocesses it starts run there too. The namespace
    goes away with the thread and its children: nothing to delete, nothing left if the agent dies meanwhile."""
    try:
        return _on_fresh_thread(f"netns-{purpose}", _unshare, fn)
    except OSError as err:
        raise NetworkError(f"could not create a throw-away network namespace ({purpose}): {err}") from err


def open_tap(ns: Namespace, ifname: str, *, vnet_hdr: bool = True) -> int:
    """Create the non-persistent tap ``ifname`` in ``ns`` and return its fd (close-on-exec; ``pass_fds`` clears
    that for a child). The tap exists as long as an fd of it is open, and is down, in no bridge and without IPv6.

    NetworkError if an interface of that name already exists there: a tap another process holds (a second QEMU
    for the same NIC), a persistent tap or another device. Attaching to someone else's tap is never right.
    """
    check_ifname(ifname)
    ns.check_exists()
    flags = _IFF_TAP | _IFF_NO_PI | (_IFF_VNET_HDR if vnet_hdr else 0)

    def create() -> int:
        if _interface_exists(ifname):
            raise NetworkError(f"tap {ifname} already exists in {ns.where}: another process holds it")
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        try:
            try:
                fcntl.ioctl(fd, _TUNSETIFF, _IFREQ.pack(ifname.encode(), flags))
            except OSError as err:
                raise _tunsetiff_error(err, ifname, ns) from err
            got_name, got_flags = _IFREQ.unpack(fcntl.ioctl(fd, _TUNGETIFF, bytes(_IFREQ.size)))
            if got_flags & _IFF_PERSIST or got_name.rstrip(b"\0").decode() != ifname:
                # created by someone else between the check and TUNSETIFF; let go of it untouched
                raise NetworkError(f"tap {ifname} already exists in {ns.where} (a persistent tap someone created)")
            _disable_ipv6(ifname)
        except BaseException:
            os.close(fd)
            raise
        return fd

    enter = _setns(ns.path) if ns.path is not None else (lambda: None)
    try:
        return _on_fresh_thread(f"tap-{ifname}", enter, create)
    except NetworkError:
        raise
    except OSError as err:
        raise NetworkError(f"opening tap {ifname} in {ns.where} failed: {err}") from err


_ETH_P_ALL = 0x0003
_SO_ATTACH_FILTER = 26


def _attach_filter(sock: socket.socket, program: Sequence[tuple[int, int, int, int]]) -> None:
    """Attach a classic BPF ``program`` (code, jt, jf, k) to ``sock``; the kernel copies it, so the buffer may go."""
    code = b"".join(struct.pack("HBBI", *insn) for insn in program)
    buffer = ctypes.create_string_buffer(code)
    fprog = struct.pack("HL", len(program), ctypes.addressof(buffer))  # struct sock_fprog: len, padding, pointer
    sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, fprog)


def open_packet_socket(ns: Namespace, ifname: str, program: Sequence[tuple[int, int, int, int]]) -> socket.socket:
    """A non-blocking ``AF_PACKET`` socket for the frames of ``ifname`` in ``ns``, filtered by the classic BPF
    ``program`` in the kernel (frames queued before the filter was attached are drained). It takes every protocol
    (``ETH_P_ALL``): only such a socket sees a frame before the device's ingress hooks and its bridge, which consume
    the frames of a bridge port. A packet socket belongs to the namespace it was created in, so it is created from a
    fresh thread in ``ns``, like a tap."""
    check_ifname(ifname)
    ns.check_exists()

    def create() -> socket.socket:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(_ETH_P_ALL))
        try:
            _attach_filter(sock, program)
            sock.bind((ifname, _ETH_P_ALL))
            sock.setblocking(False)
            while True:  # what arrived between socket() and the filter is not the filter's
                try:
                    sock.recv(65535)
                except BlockingIOError:
                    break
        except BaseException:
            sock.close()
            raise
        return sock

    enter = _setns(ns.path) if ns.path is not None else (lambda: None)
    try:
        return _on_fresh_thread(f"pkt-{ifname}", enter, create)
    except OSError as err:
        raise NetworkError(f"opening a packet socket on {ifname} in {ns.where} failed: {err}") from err


def _interface_exists(ifname: str) -> bool:
    """Whether ``ifname`` exists in the calling thread's namespace (the socket behind it is opened there)."""
    try:
        socket.if_nametoindex(ifname)
    except OSError:
        return False
    return True


def _tunsetiff_error(err: OSError, ifname: str, ns: Namespace) -> NetworkError:
    if err.errno == errno.EBUSY:
        return NetworkError(f"tap {ifname} already exists in {ns.where}: another process holds it ({err})")
    if err.errno == errno.EINVAL:
        return NetworkError(f"{ifname} already exists in {ns.where} and is not a tap of this kind ({err})")
    return NetworkError(f"creating tap {ifname} in {ns.where} failed: {err}")


def _disable_ipv6(ifname: str) -> None:
    """No IPv6 on the tap: the host must have no address a guest could reach. /proc/sys/net answers for the
    calling thread's namespace; a kernel without IPv6 has no such file, and then there is nothing to disable."""
    try:
        with open(f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6", "w") as knob:
            knob.write("1")
    except FileNotFoundError:
        pass
