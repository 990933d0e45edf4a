"""Run the real ``ferryman`` command many times without paying Python's start-up and the CLI's imports each time.

A test that drives a lab through the CLI runs it hundreds of times; most of each run is importing the CLI. A *zygote*
process imports ``ferryman.cli.main`` once and forks a child per command. Each child is a process of its own, as
``python -m ferryman.cli`` would be: the environment and working directory the caller gives, stdin ``/dev/null``,
stdout and stderr to the caller's pipes, its own exit code (Python's rules: ``SystemExit``, or 1 and a traceback), and
it is killed when it runs over its time limit. Only the imported modules are shared, and a fork shares them copy-on-
write: nothing one command does is seen by the next.

The zygote is single-threaded (forking is safe there), serves one connection per command on a UNIX socket, reports
each child's exit status when it reaps it, and exits when the process that started it goes away. Test tooling only.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path

_MAX_REQUEST = 1 << 20


class ZygoteUnavailable(RuntimeError):
    """The zygote could not be started or took no request: the command has not run, the caller runs it the usual
    way."""


class ZygoteLost(RuntimeError):
    """The zygote went away while a command ran: whether the command did its work is unknown (it is not run
    again)."""


class CliZygote:
    """A client of one zygote process (started on first use, stopped by :meth:`close` or with this process)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._path: Path | None = None

    def _ensure(self) -> Path:
        with self._lock:
            if self._proc is not None and self._proc.poll() is None and self._path is not None:
                return self._path
            self._close_locked()
            self._dir = tempfile.TemporaryDirectory(prefix="ferryman-cli-")
            path = Path(self._dir.name) / "zygote.sock"
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "ferryman.testing.cliserver", str(path)],
                stdin=subprocess.PIPE,  # the lifeline: the zygote exits on its EOF
                stdout=subprocess.DEVNULL,
                stderr=None,
            )
            deadline = time.monotonic() + 30
            while not path.exists():
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    self._close_locked()
                    raise ZygoteUnavailable("the CLI zygote did not start")
                time.sleep(0.01)
            self._path = path
            return path

    def run(
        self, args: Sequence[str], env: Mapping[str, str], *, timeout: float, cwd: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """What ``subprocess.run([python, -m, ferryman.cli, *args], env=env, capture_output=True, text=True,
        stdin=DEVNULL, timeout=timeout)`` returns, or raises (``subprocess.TimeoutExpired``)."""
        path = self._ensure()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        devnull = os.open(os.devnull, os.O_RDONLY)
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            try:
                conn.connect(str(path))
                request = json.dumps({"args": list(args), "env": dict(env), "cwd": cwd or os.getcwd()}).encode()
                socket.send_fds(conn, [request + b"\n"], [devnull, out_w, err_w])
            except OSError as err:
                raise ZygoteUnavailable(f"the CLI zygote does not answer: {err}") from err
        finally:
            for fd in (devnull, out_w, err_w):
                os.close(fd)
        try:
            return self._collect(conn, out_r, err_r, list(args), timeout)
        finally:
            conn.close()
            for fd in (out_r, err_r):
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _collect(
        self, conn: socket.socket, out_r: int, err_r: int, args: list[str], timeout: float
    ) -> subprocess.CompletedProcess[str]:
        chunks: dict[int, list[bytes]] = {out_r: [], err_r: []}
        answer = b""
        pid: int | None = None
        status: int | None = None
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(out_r, selectors.EVENT_READ)
            sel.register(err_r, selectors.EVENT_READ)
            sel.register(conn, selectors.EVENT_READ)
            while sel.get_map():
                left = deadline - time.monotonic()
                if left <= 0:
                    if pid is not None:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                    raise subprocess.TimeoutExpired(args, timeout)
                for key, _ in sel.select(min(left, 1.0)):
                    if key.fileobj is conn:
                        data = conn.recv(4096)
                        if not data:
                            sel.unregister(conn)
                            continue
                        answer += data
                        *lines, answer = answer.split(b"\n")
                        for line in lines:
                            message = json.loads(line)
                            pid = message.get("pid", pid)
                            if "status" in message:
                                status = int(message["status"])
                    else:
                        fd = int(key.fd)
                        data = os.read(fd, 65536)
                        if data:
                            chunks[fd].append(data)
                        else:
                            sel.unregister(fd)
        if status is None:
            raise ZygoteLost(f"the CLI zygote went away while `ferryman {' '.join(args)}` ran")
        return subprocess.CompletedProcess(
            args,
            status,
            b"".join(chunks[out_r]).decode(errors="replace"),
            b"".join(chunks[err_r]).decode(errors="replace"),
        )

    def _close_locked(self) -> None:
        if self._proc is not None:
            if self._proc.stdin is not None:
                self._proc.stdin.close()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None
        self._path = None

    def close(self) -> None:
        with self._lock:
            self._close_locked()


# -- the zygote --------------------------------------------------------------------------------------------------------


def _child(request: dict[str, object], fds: list[int], closing: list[int]) -> None:
    """In the forked child: become the command, run it, exit with its code. Never returns."""
    code = 1
    try:
        for fd in closing:
            os.close(fd)
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        env = request["env"]
        assert isinstance(env, dict)
        os.environ.clear()
        os.environ.update({str(k): str(v) for k, v in env.items()})
        os.chdir(str(request["cwd"]))
        args = request["args"]
        assert isinstance(args, list)
        sys.argv = [sys.argv[0], *map(str, args)]
        from ferryman.cli.main import main

        try:
            main()
            code = 0
        except SystemExit as exit_:
            if exit_.code is None:
                code = 0
            elif isinstance(exit_.code, int):
                code = exit_.code
            else:
                print(exit_.code, file=sys.stderr)
                code = 1
        except BaseException:  # as the interpreter does: a traceback and status 1
            traceback.print_exc()
            code = 1
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os._exit(code & 0xFF)


class _Zygote:
    """The zygote's loop: accept a connection, read its request and descriptors, fork the command, report its pid
    and, once reaped, its exit status (negative signal number when a signal ended it)."""

    def __init__(self, path: Path) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path) + ".new")
        self.listener.listen(64)
        os.rename(str(path) + ".new", path)
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)
        os.set_blocking(self.wake_r, False)
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        self.lifeline = sys.stdin.fileno()
        self.waiting: dict[int, socket.socket] = {}

    def serve(self) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(self.listener, selectors.EVENT_READ)
            sel.register(self.wake_r, selectors.EVENT_READ)
            sel.register(self.lifeline, selectors.EVENT_READ)
            while True:
                for key, _ in sel.select(1.0):
                    if key.fd == self.lifeline:
                        if not os.read(self.lifeline, 4096):
                            self._stop()
                            return
                    elif key.fd == self.wake_r:
                        with contextlib.suppress(BlockingIOError):
                            os.read(self.wake_r, 4096)
                    else:
                        self._accept()
                self._reap()

    def _accept(self) -> None:
        conn, _ = self.listener.accept()
        try:
            conn.settimeout(10)
            message, fds, _, _ = socket.recv_fds(conn, _MAX_REQUEST, 3)
            while not message.endswith(b"\n"):
                more = conn.recv(_MAX_REQUEST)
                if not more:
                    raise ConnectionError("request cut short")
                message += more
            request = json.loads(message)
            if len(fds) != 3:
                raise ConnectionError("a request carries stdin, stdout and stderr")
        except (OSError, ValueError):
            conn.close()
            return
        pid = os.fork()
        if pid == 0:
            _child(request, fds, [self.listener.fileno(), self.wake_r, self.wake_w, self.lifeline, conn.fileno()])
        for fd in fds:
            os.close(fd)
        self.waiting[pid] = conn
        with contextlib.suppress(OSError):
            conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")

    def _reap(self) -> None:
        while self.waiting:
            try:
                pid, raw = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn = self.waiting.pop(pid, None)
            if conn is not None:
                with contextlib.suppress(OSError):
                    conn.sendall(json.dumps({"status": os.waitstatus_to_exitcode(raw)}).encode() + b"\n")
                conn.close()

    def _stop(self) -> None:
        for pid in self.waiting:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def serve(path: Path) -> None:
    import ferryman.cli.main  # noqa: F401 - the point of the zygote: imported once, before any fork

    _Zygote(path).serve()


_SHARED = CliZygote()


def run_cli(args: Sequence[str], env: Mapping[str, str], *, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``ferryman *args`` through this process's zygote, or the usual way if the zygote is unavailable or
    turned off (``FERRYMAN_CLI_ZYGOTE=0``)."""
    if os.environ.get("FERRYMAN_CLI_ZYGOTE", "1") != "0":
        try:
            return _SHARED.run(args, env, timeout=timeout)
        except ZygoteUnavailable:
            pass
    return subprocess.run(
        [sys.executable, "-m", "ferryman.cli", *args],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


if __name__ == "__main__":
    serve(Path(sys.argv[1]))
