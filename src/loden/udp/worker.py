"""One forwarder worker: a process that moves packets between a TUN queue and a socket.

Why processes: the data path is CPU-bound Python, and threads of one interpreter take
turns on the GIL (two threads measured 0.9x one thread here); two processes, each with
its own TUN queue (``IFF_MULTI_QUEUE``) and its own ``SO_REUSEPORT`` socket, run truly
in parallel and share nothing but the kernel objects.

The parent (:mod:`loden.udp.engine`) starts ``python -m loden.udp.worker`` with the
fds inherited and talks to it over an ``AF_UNIX``/``SOCK_SEQPACKET`` control socket:

* ``P<final><entries>``: a chunk of a new peer table; the table is swapped in whole
  when the final chunk arrives (see :mod:`loden.udp.peers`);
* ``T`` with one fd attached (``SCM_RIGHTS``): a new TUN queue (the device was
  recreated); the old fd is closed;
* ``S``: answer ``S`` + JSON counters;
* end of file: the agent is gone or closing; exit at once.

The loop is an ``epoll`` over the three fds (this module: the control channel, the
loop, the process entry point). TUN -> wire (:mod:`loden.udp.tx`) and wire -> TUN
(:mod:`loden.udp.rx`) each drain their fd up to a budget per wake-up, batching: reads
from the TUN become runs of ``UDP_SEGMENT`` sends (:mod:`loden.udp.gso`), receives from
the socket are coalesced into super-packet writes (:mod:`loden.udp.gro`).
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import select
import signal
import socket
import sys
from ipaddress import IPv4Address, IPv4Network
from typing import TYPE_CHECKING

from loden.errors import ParseError
from loden.udp import peers as peer_codec
from loden.udp.gro import Decapsulator
from loden.udp.gso import DatagramBatch
from loden.udp.native import native
from loden.udp.parts import BUDGET
from loden.udp.peers import PeerTable
from loden.udp.rx import RX_BATCH_BYTES, WireToTun
from loden.udp.tun import VNET_HDR_LEN
from loden.udp.tx import TunToWire

if TYPE_CHECKING:
    from loden.udp._fastpath import Counters

log = logging.getLogger(__name__)

SERVE_CONTROL, SERVE_SPECIAL, SERVE_REST, SERVE_TUN_LOST = range(4)

COUNTERS = (
    "tun_reads",
    "tun_bytes",
    "tx_datagrams",
    "tx_sends",
    "tx_errors",
    "no_route",
    "icmp_sent",
    "ttl_drops",
    "bad_from_tun",
    "rx_calls",
    "rx_bytes",
    "rx_packets",
    "rx_dropped",
    "tun_writes",
    "tun_coalesced",
    "tun_write_errors",
    "tun_lost",
)


class Worker(TunToWire, WireToTun):
    """The state and loops of one worker (also usable in-process by benchmarks)."""

    def __init__(
        self,
        *,
        tun: int | None,
        sock: socket.socket,
        vnet: bool,
        tun_addr: IPv4Address,
        port: int,
        ctl: socket.socket | None = None,
        fast: bool = True,
    ) -> None:
        self.tun = tun
        #: Use the C loops for plain packets (``fast=False``: the Python ones, for tests).
        self.fast = fast and native is not None
        self.sock = sock
        self.ctl = ctl
        self.vnet = vnet
        self.tun_addr = tun_addr.packed
        self.table = PeerTable(port=port)
        self.stats = dict.fromkeys(COUNTERS, 0)
        self.batch = DatagramBatch(self._send)
        self.dec = Decapsulator(vnet=vnet)
        self._pending: list[tuple[IPv4Network, IPv4Address]] = []
        self._cmsgs: dict[int, list[tuple[int, int, bytes]]] = {}
        self._epoll: select.epoll | None = None

    def _add(self, counts: Counters) -> None:
        """Add what a C loop did; its fields are named like our counters."""
        stats = self.stats
        for name in counts.__match_args__:
            value = getattr(counts, name)
            if value:
                stats[name] += value

    # -- control and loop ----------------------------------------------------------

    def set_table(self, table: PeerTable) -> None:
        self.table = table

    def _tun_lost(self, exc: OSError) -> None:
        log.warning(
            "udp worker %d: TUN queue failed (%s); waiting for a new one", os.getpid(), exc.strerror
        )
        self.stats["tun_lost"] += 1
        self._replace_tun(None)

    def _replace_tun(self, fd: int | None) -> None:
        old = self.tun
        if old is not None:
            if self._epoll is not None:
                self._epoll.unregister(old)
            os.close(old)
        self.tun = fd
        if fd is not None:
            os.set_blocking(fd, False)
            if self._epoll is not None:
                self._epoll.register(fd, select.EPOLLIN)

    def control(self) -> bool:
        """Handle one control message; False when the worker must exit."""
        assert self.ctl is not None
        try:
            msg, fds, _flags, _addr = socket.recv_fds(self.ctl, 1 << 17, 4)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False
        if not msg:
            for fd in fds:
                os.close(fd)
            return False
        kind = msg[:1]
        if kind == b"P":
            try:
                final, entries = peer_codec.decode(msg)
            except ParseError as exc:
                log.error("udp worker: %s", exc)
                return True
            self._pending.extend(entries)
            if final:
                self.set_table(PeerTable.build(self._pending, self.table.port))
                self._pending = []
        elif kind == b"T" and fds:
            for extra in fds[1:]:
                os.close(extra)
            self._replace_tun(fds[0])
        elif kind == b"S":
            body = json.dumps({"pid": os.getpid(), "tun": self.tun is not None, **self.stats})
            self.ctl.send(b"S" + body.encode())
        else:
            for fd in fds:
                os.close(fd)
        return True

    def run(self) -> None:
        """Serve until the control socket closes."""
        assert self.ctl is not None
        ep = self._epoll = select.epoll()
        ctl_fd = self.ctl.fileno()
        sock_fd = self.sock.fileno()
        ep.register(ctl_fd, select.EPOLLIN)
        ep.register(sock_fd, select.EPOLLIN)
        if self.tun is not None:
            ep.register(self.tun, select.EPOLLIN)
        self.ctl.setblocking(False)
        while True:
            if self.fast and self.tun is not None:
                if not self._serve_c(ep, ctl_fd, sock_fd, self.tun):
                    return
                continue
            try:
                events = ep.poll()
            except InterruptedError:
                continue
            # Control first, all of it: a peer table queued before these packets
            # arrived must be in place before they are routed.
            if any(fd == ctl_fd for fd, _ in events):
                if not self._control_all():
                    return
            for fd, mask in events:
                if fd == sock_fd:
                    self.from_wire()
                elif fd == self.tun:
                    if mask & (select.EPOLLERR | select.EPOLLHUP) and not mask & select.EPOLLIN:
                        self._tun_lost(OSError(errno.EBADFD, "TUN device gone"))
                    else:
                        self.from_tun()

    def _serve_c(self, ep: select.epoll, ctl_fd: int, sock_fd: int, tun: int) -> bool:
        """One return of the C event loop (plain traffic stays in C, with no Python per
        packet or per wake-up); False when the worker must exit."""
        assert native is not None
        vnet = VNET_HDR_LEN if self.vnet else 0
        table = self.table
        counts, kind, payload = native.serve(
            ep.fileno(),
            ctl_fd,
            tun,
            sock_fd,
            vnet,
            table.cgroups,
            table.port,
            BUDGET,
            RX_BATCH_BYTES,
        )
        self._add(counts)
        if kind == SERVE_CONTROL:
            return self._control_all()
        if kind == SERVE_SPECIAL:
            assert isinstance(payload, bytes)
            self._special_from_tun(payload, vnet)
        elif kind == SERVE_REST:
            assert isinstance(payload, tuple)
            self._wire_rest(payload, BUDGET)
        elif kind == SERVE_TUN_LOST:
            assert isinstance(payload, int)
            self._tun_lost(OSError(payload, os.strerror(payload)))
        return True

    def _control_all(self) -> bool:
        while self._ctl_pending():
            if not self.control():
                return False
        return True

    def _ctl_pending(self) -> bool:
        assert self.ctl is not None
        try:
            return bool(self.ctl.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)) or True
        except BlockingIOError:
            return False
        except OSError:
            return True  # let control() see the error and stop


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loden.udp.worker")
    parser.add_argument("--ctl", type=int, required=True)
    parser.add_argument("--sock", type=int, required=True)
    parser.add_argument("--tun", type=int, required=True)
    parser.add_argument("--vnet", type=int, choices=(0, 1), required=True)
    parser.add_argument("--tun-addr", type=IPv4Address, required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    # Ctrl-C in the agent's terminal must not kill the data path before the agent
    # has shut down in order; the worker exits when the control socket closes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="loden-udp-worker[%(process)d] %(message)s")
    ctl = socket.socket(fileno=args.ctl)
    ctl.setblocking(True)
    sock = socket.socket(fileno=args.sock)
    sock.setblocking(True)
    worker = Worker(
        tun=args.tun,
        sock=sock,
        vnet=bool(args.vnet),
        tun_addr=args.tun_addr,
        port=args.port,
        ctl=ctl,
    )
    os.set_blocking(args.tun, False)
    worker.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
