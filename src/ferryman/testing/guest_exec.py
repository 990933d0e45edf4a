"""Run a command inside a lab guest through its QEMU guest agent (``guest-exec``), for tests that look at a guest
from the inside: its addresses, whether it reaches a peer, what it sees of a spoofing attempt.

The guest agent speaks line-delimited JSON on the VM's virtio-serial port, which QEMU exposes as a UNIX socket
(``<agent state dir>/vms/<vm-id>/qga.sock``). One call opens a connection, sends ``guest-sync`` with a random id and
discards what an earlier client left unread until that id comes back, then ``guest-exec`` with captured output, and
polls ``guest-exec-status`` until the process has exited. The guest controls every byte of the answers, so each read
is bounded in size and the whole call in time; anything unexpected is a :class:`GuestExecError`, never a hang.

A command still running when the time is up keeps running in the guest: the agent of QEMU 7.2 cannot kill it. Give
commands their own bound (``ping -c``/``-w``, ``timeout``) shorter than ``timeout``. QEMU serves one client at a time
on the port: while another (e.g. a host agent's probe) holds it, a call waits, within its bound.

This is test tooling: it must not be used by the agent or the controller, which have their own guest-agent probe
(:class:`ferryman.agent.probes.GuestAgentProbe`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import os
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ferryman.core.errors import FerrymanError

_MAX_LINE = 4 * 1024 * 1024  # a status answer carries the captured output, base64-encoded
_MAX_DISCARDED_LINES = 64  # answers to earlier clients' requests, read past before our sync's answer
_POLL_S = 0.1


class GuestExecError(FerrymanError):
    """The guest agent did not run the command to its end: no answer in time, a closed port, malformed or
    unexpected JSON, or an error reply (e.g. no such program)."""


@dataclass(frozen=True)
class ExecResult:
    """A finished guest process: its exit code (minus the signal number if a signal ended it) and captured output."""

    exit_code: int
    stdout: bytes
    stderr: bytes

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    @property
    def text(self) -> str:
        """stdout as text, for assertions and messages."""
        return self.stdout.decode(errors="replace")


async def guest_exec(
    socket_path: Path,
    argv: list[str],
    *,
    # the bound covers connect, sync and every poll, and a caller cannot see those steps: hence a parameter
    timeout: float = 20,  # noqa: ASYNC109
    stdin: bytes | None = None,
) -> ExecResult:
    """Run ``argv`` in the guest (``argv[0]`` is looked up on the guest agent's PATH) and wait up to ``timeout``
    seconds, connection and sync included, for it to exit."""
    if not argv:
        raise ValueError("guest_exec needs a program to run")
    try:
        async with asyncio.timeout(timeout):
            async with _connect(socket_path) as channel:
                await channel.sync()
                arguments: dict[str, Any] = {"path": argv[0], "arg": argv[1:], "capture-output": True}
                if stdin is not None:
                    arguments["input-data"] = base64.b64encode(stdin).decode()
                started = await channel.command("guest-exec", arguments)
                pid = _field(started, "pid", int)
                while True:
                    status = await channel.command("guest-exec-status", {"pid": pid})
                    if _field(status, "exited", bool):
                        return _result(status)
                    await asyncio.sleep(_POLL_S)
    except TimeoutError:
        raise GuestExecError(f"{argv[0]} in the guest ({socket_path}) did not finish in {timeout:g}s") from None
    except OSError as err:
        raise GuestExecError(f"cannot talk to the guest agent at {socket_path}: {err}") from err


def guest_exec_sync(
    socket_path: Path, argv: list[str], *, timeout: float = 20, stdin: bytes | None = None
) -> ExecResult:
    """:func:`guest_exec` for synchronous code (not from inside a running event loop)."""
    return asyncio.run(guest_exec(socket_path, argv, timeout=timeout, stdin=stdin))


async def wait_for_agent(socket_path: Path, within: float = 60, *, attempt_s: float = 2.0) -> None:
    """Return once the guest agent answers ``guest-sync`` (it starts late in the guest's boot); GuestExecError if it
    does not within ``within`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    problem = "no answer"
    while True:
        try:
            async with asyncio.timeout(min(attempt_s, max(deadline - loop.time(), 0.01))):
                async with _connect(socket_path) as channel:
                    await channel.sync()
            return
        except (TimeoutError, OSError, GuestExecError) as err:
            problem = str(err) or type(err).__name__
        if loop.time() + _POLL_S >= deadline:
            raise GuestExecError(f"the guest agent at {socket_path} did not answer within {within:g}s ({problem})")
        await asyncio.sleep(_POLL_S)


class _Channel:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    async def sync(self) -> None:
        """``guest-sync``: afterwards the next answer on the line is to our next command."""
        token = secrets.randbelow(1 << 31)
        await self._send("guest-sync", {"id": token})
        for _ in range(_MAX_DISCARDED_LINES):
            if await self._line() == {"return": token}:
                return
        raise GuestExecError("the guest agent never answered guest-sync")

    async def command(self, execute: str, arguments: dict[str, Any]) -> Any:
        await self._send(execute, arguments)
        answer = await self._line()
        if not isinstance(answer, dict):
            raise GuestExecError(f"{execute}: the guest agent answered {str(answer)[:200]!r}")
        if "error" in answer:
            error = answer["error"]
            desc = error.get("desc") if isinstance(error, dict) else error
            raise GuestExecError(f"{execute}: {str(desc)[:500]}")
        if "return" not in answer:
            raise GuestExecError(f"{execute}: the guest agent answered {str(answer)[:200]!r}")
        return answer["return"]

    async def _send(self, execute: str, arguments: dict[str, Any]) -> None:
        self._writer.write(json.dumps({"execute": execute, "arguments": arguments}).encode() + b"\n")
        await self._writer.drain()

    async def _line(self) -> Any:
        try:
            line = await self._reader.readline()
        except (ValueError, asyncio.LimitOverrunError):
            raise GuestExecError("the guest agent sent an overlong line") from None
        if not line.endswith(b"\n"):
            raise GuestExecError("the guest agent closed its port")
        try:
            return json.loads(line)
        except (ValueError, RecursionError) as err:
            raise GuestExecError(f"the guest agent sent malformed JSON: {type(err).__name__}") from None


@contextlib.asynccontextmanager
async def _connect(socket_path: Path) -> AsyncIterator[_Channel]:
    """A connection to the agent's socket, reached through its directory's descriptor (a UNIX socket path has at
    most 107 bytes, and state dirs can be deeper)."""
    fd = os.open(socket_path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        reader, writer = await asyncio.open_unix_connection(f"/proc/self/fd/{fd}/{socket_path.name}", limit=_MAX_LINE)
    finally:
        os.close(fd)
    try:
        yield _Channel(reader, writer)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def _field(answer: Any, name: str, kind: type) -> Any:
    value = answer.get(name) if isinstance(answer, dict) else None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise GuestExecError(f"the guest agent's answer lacks {name}: {str(answer)[:200]!r}")
    return value


def _result(status: dict[str, Any]) -> ExecResult:
    if isinstance(status.get("exitcode"), int):
        code = status["exitcode"]
    elif isinstance(status.get("signal"), int):
        code = -status["signal"]
    else:
        raise GuestExecError(f"guest-exec-status names neither an exit code nor a signal: {str(status)[:200]!r}")
    return ExecResult(code, _decode(status, "out-data"), _decode(status, "err-data"))


def _decode(status: dict[str, Any], name: str) -> bytes:
    data = status.get(name, "")
    if not isinstance(data, str):
        raise GuestExecError(f"guest-exec-status: {name} is not a string")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as err:
        raise GuestExecError(f"guest-exec-status: {name} is not base64: {err}") from None
