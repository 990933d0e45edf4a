"""The CLI zygote the lab tests run ``ferryman`` through: a forked command behaves as ``python -m ferryman.cli`` does
(output, errors, exit code), sees exactly the environment it is given, and is killed at its time limit."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from ferryman.testing.cliserver import CliZygote

SYSTEM_CAS = Path("/etc/ssl/certs/ca-certificates.crt")


@pytest.fixture
def zygote() -> Iterator[CliZygote]:
    zygote = CliZygote()  # its own, and called directly: no fallback to a plain subprocess can hide a failure
    try:
        yield zygote
    finally:
        zygote.close()


def real(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ferryman.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def test_a_forked_command_answers_as_the_real_one(zygote: CliZygote, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FERRYMAN_")}
    env["FERRYMAN_LAB_DIR"] = str(tmp_path / "nowhere")
    for args, code in ((["--help"], 0), (["vm", "list"], 1), (["no-such-command"], 2), (["vm", "show"], 2)):
        forked = zygote.run(args, env, timeout=60)
        expected = real(args, env)
        assert (forked.returncode, forked.stdout, forked.stderr) == (
            expected.returncode,
            expected.stdout,
            expected.stderr,
        ), args
        assert forked.returncode == code, (args, forked.stderr)


def test_each_command_sees_only_the_environment_it_is_given(zygote: CliZygote, tmp_path: Path) -> None:
    base = {k: v for k, v in os.environ.items() if not k.startswith("FERRYMAN_")}
    first = zygote.run(["vm", "list"], {**base, "FERRYMAN_LAB_DIR": str(tmp_path / "one")}, timeout=60)
    second = zygote.run(["vm", "list"], {**base, "FERRYMAN_LAB_DIR": str(tmp_path / "two")}, timeout=60)
    assert str(tmp_path / "one") in first.stderr and str(tmp_path / "two") not in first.stderr
    assert str(tmp_path / "two") in second.stderr and str(tmp_path / "one") not in second.stderr
    # a variable the first command was given is not there for the next one
    configured = {**base, "FERRYMAN_URL": "https://127.0.0.1:9", "FERRYMAN_CA": str(tmp_path / "no-ca.pem")}
    refused = zygote.run(["vm", "list"], {**configured, "FERRYMAN_TOKEN": "t"}, timeout=60)
    assert "no-ca.pem" in refused.stderr and refused.returncode == 1
    after = zygote.run(["vm", "list"], {**base, "FERRYMAN_LAB_DIR": str(tmp_path / "three")}, timeout=60)
    assert "no controller configured" in after.stderr, after.stderr


@pytest.mark.skipif(not SYSTEM_CAS.exists(), reason="needs a CA bundle for the client's TLS context")
def test_a_command_over_its_time_limit_is_killed(zygote: CliZygote) -> None:
    server = socket.socket()  # accepts, then never answers the TLS handshake
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    accepted: list[socket.socket] = []
    acceptor = threading.Thread(target=lambda: accepted.append(server.accept()[0]), daemon=True)
    acceptor.start()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("FERRYMAN_")},
        "FERRYMAN_URL": f"https://127.0.0.1:{server.getsockname()[1]}",
        "FERRYMAN_CA": str(SYSTEM_CAS),
        "FERRYMAN_TOKEN": "t",
    }
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            zygote.run(["vm", "list"], env, timeout=2)
        acceptor.join(10)
        assert accepted, "the command never connected"
        # the child was killed: the connection it held ends now (a live child would give up its TLS handshake only
        # at its own connect timeout, 5 s after it started, later than this read waits)
        accepted[0].settimeout(2)
        while accepted[0].recv(65536):
            pass
    finally:
        server.close()
        for conn in accepted:
            conn.close()
