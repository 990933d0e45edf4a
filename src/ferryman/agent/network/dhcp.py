"""A host's DHCP answers for its own NICs: one packet socket per tap, one thread for all of them.

Each NIC served has an ``AF_PACKET`` socket bound to its tap in the host's namespace (:func:`.netns.open_packet_socket`)
with a kernel filter that passes only IPv4 UDP to port 67, so the thread sees DHCP requests and nothing of the VM's
other traffic. Frames the host sends *to* the guest (another guest's flooded request) are skipped; a request from the
guest is answered by :func:`ferryman.network.dhcp.answer` from the NIC's spec, and the reply is written back on the
same socket, which delivers it to the guest alone. Replies are rate-limited per NIC (a guest flooding requests costs
the host a bounded amount of work and gets no more answers than the bucket allows).

The caller serves a NIC once its tap is open and its rules installed (a boot, a migration's destination: every new
tap gets a new socket), updates the spec when its rules change, and stops when its rules go (destroy, a retired
source, a rolled-back destination). A tap that went with its QEMU leaves a socket that hears nothing until then.
"""

from __future__ import annotations

import contextlib
import errno
import os
import selectors
import socket
import threading
import time
from dataclasses import dataclass

import structlog

from ferryman.agent.network.netns import Namespace, open_packet_socket
from ferryman.core.models import NicSpec
from ferryman.network.dhcp import answer, parse_request
from ferryman.network.rules import tap_name

__all__ = ["UDP_TO_SERVER_PORT", "DhcpResponder"]

log = structlog.get_logger(__name__)

# classic BPF: IPv4, UDP, not a fragment, destination port 67 (as `tcpdump -dd 'ip and udp dst port 67'` compiles it)
UDP_TO_SERVER_PORT = (
    (0x28, 0, 0, 12),  # ldh [12]                 ethertype
    (0x15, 0, 8, 0x0800),  # jeq #IPv4, else drop
    (0x30, 0, 0, 23),  # ldb [23]                 IP protocol
    (0x15, 0, 6, 17),  # jeq #UDP, else drop
    (0x28, 0, 0, 20),  # ldh [20]                 flags and fragment offset
    (0x45, 4, 0, 0x1FFF),  # jset #offset: a fragment, drop
    (0xB1, 0, 0, 14),  # ldxb 4*([14]&0xf)        IP header length
    (0x48, 0, 0, 16),  # ldh [x+16]               UDP destination port
    (0x15, 0, 1, 67),  # jeq #67, else drop
    (0x06, 0, 0, 0x40000),  # ret: the whole frame
    (0x06, 0, 0, 0),  # ret: drop
)
_PACKET_OUTGOING = 4  # sll_pkttype of a frame the host sent on the tap (towards the guest)
_BURST, _PER_SECOND = 20, 5.0  # replies per NIC
_READS_PER_WAKE = 64


@dataclass
class _Served:
    nic: NicSpec
    sock: socket.socket
    tokens: float = _BURST
    refilled: float = 0.0
    answered: int = 0
    limited: int = 0

    def allow(self, now: float) -> bool:
        self.tokens = min(_BURST, self.tokens + (now - self.refilled) * _PER_SECOND)
        self.refilled = now
        if self.tokens < 1.0:
            self.limited += 1
            return False
        self.tokens -= 1.0
        return True


class DhcpResponder:
    """Answers the DHCP requests of the NICs it serves in namespace ``ns``."""

    def __init__(self, ns: Namespace) -> None:
        self._ns = ns
        self._lock = threading.Lock()
        self._served: dict[str, _Served] = {}
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread: threading.Thread | None = None
        self._closed = False

    def serve(self, nic: NicSpec) -> None:
        """Answer the requests on ``nic``'s tap as it is now: a NIC served before (its tap gone with an earlier
        QEMU) gets a socket on the new tap."""
        sock = open_packet_socket(self._ns, tap_name(nic.id), UDP_TO_SERVER_PORT)
        self.stop(nic.id)
        with self._lock:
            if self._closed:
                sock.close()
                return
            self._served[nic.id] = _Served(nic, sock, refilled=time.monotonic())
            self._selector.register(sock, selectors.EVENT_READ, nic.id)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="dhcp-responder", daemon=True)
                self._thread.start()
        log.info("dhcp served", nic=nic.id, ipv4=nic.ipv4, netns=self._ns.name)

    def update(self, nic: NicSpec) -> None:
        """Answer with this spec from now on, if ``nic`` is served (its rules changed; its tap did not)."""
        with self._lock:
            served = self._served.get(nic.id)
            if served is not None:
                served.nic = nic

    def stop(self, nic_id: str) -> None:
        """No more answers for ``nic_id`` (no error if it was not served)."""
        with self._lock:
            served = self._served.pop(nic_id, None)
            if served is not None:
                with contextlib.suppress(KeyError, ValueError):
                    self._selector.unregister(served.sock)
        if served is not None:
            served.sock.close()
            log.info("dhcp stopped", nic=nic_id, answered=served.answered, limited=served.limited)

    def serving(self) -> dict[str, int]:
        """The NICs served, with how many replies each got."""
        with self._lock:
            return {nic_id: served.answered for nic_id, served in self._served.items()}

    def close(self) -> None:
        with self._lock:
            self._closed = True
            nic_ids = list(self._served)
        for nic_id in nic_ids:
            self.stop(nic_id)
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        self._selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    # --- the thread -------------------------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._closed:
            try:
                events = self._selector.select(timeout=1.0)
            except (OSError, ValueError):  # closed under us
                return
            for key, _ in events:
                if key.data is None:
                    with contextlib.suppress(OSError):
                        os.read(self._wake_r, 4096)
                    continue
                self._drain(key.data)

    def _drain(self, nic_id: str) -> None:
        with self._lock:
            served = self._served.get(nic_id)
        if served is None:
            return
        for _ in range(_READS_PER_WAKE):
            try:
                frame, address = served.sock.recvfrom(65535)
            except BlockingIOError:
                return
            except OSError as err:
                # ENETDOWN once when the tap goes down or away (with its QEMU): the socket hears nothing more until
                # the tap is up again, and serve() replaces it for a new tap; EBADF: stopped meanwhile
                if err.errno not in (errno.ENETDOWN, errno.EBADF):
                    log.warning("dhcp socket failed", nic=nic_id, error=str(err))
                return
            if address[2] == _PACKET_OUTGOING:
                continue
            self._reply(served, frame)

    def _reply(self, served: _Served, frame: bytes) -> None:
        request = parse_request(frame)
        if request is None:
            return
        reply = answer(request, served.nic)
        if reply is None:
            log.info("dhcp request ignored", nic=served.nic.id, kind=request.kind.name, xid=request.xid)
            return
        if not served.allow(time.monotonic()):
            return
        kind, out = reply
        try:
            served.sock.send(out)
        except OSError as err:
            log.warning("dhcp reply not sent", nic=served.nic.id, error=str(err))
            return
        served.answered += 1
        log.info("dhcp answered", nic=served.nic.id, kind=kind.name, ipv4=served.nic.ipv4, xid=request.xid)
