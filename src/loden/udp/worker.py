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

The loop is an ``epoll`` over the three fds. TUN -> wire and wire -> TUN each drain
their fd up to a budget per wake-up, batching: reads from the TUN become runs of
``UDP_SEGMENT`` sends (:mod:`loden.udp.gso`), receives from the socket are coalesced
into super-packet writes (:mod:`loden.udp.gro`).
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
import struct
import sys
from ipaddress import IPv4Address, IPv4Network
from typing import TYPE_CHECKING

from loden.errors import ParseError
from loden.udp import peers as peer_codec
from loden.udp.csum import BytesLike
from loden.udp.gro import Decapsulator
from loden.udp.gso import (
    MAX_SEGMENTS,
    MAX_SEND_BYTES,
    Addr,
    DatagramBatch,
    prepare_single,
    segment_tcp4,
)
from loden.udp.native import native
from loden.udp.packet import net_unreachable
from loden.udp.peers import PeerTable
from loden.udp.sockets import SOL_UDP, UDP_GRO, UDP_SEGMENT
from loden.udp.tun import VNET_GSO_TCPV4, VNET_HDR, VNET_HDR_LEN, VNET_PLAIN

if TYPE_CHECKING:
    from loden.udp._fastpath import Counters

log = logging.getLogger(__name__)

#: Packets (TUN reads or socket receives) handled per wake-up before polling again.
BUDGET = 64
#: Stop draining the socket after this many bytes to bound a batch's memory.
RX_BATCH_BYTES = 1 << 19
READ_SIZE = 65536 + VNET_HDR_LEN
_ANC_SPACE = socket.CMSG_SPACE(4)

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


class Worker:
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

    # -- TUN -> wire ---------------------------------------------------------------

    def from_tun(self) -> None:
        """Drain up to :data:`BUDGET` packets from the TUN and send them.

        The common case (a plain packet, no partial checksum, no GSO) stays inline:
        copy, TTL - 1 with the RFC 1624 patch, and append to the current run of
        equal-size datagrams for one peer, sent with one ``UDP_SEGMENT`` ``sendmsg``.
        """
        tun = self.tun
        if tun is None:
            return
        if self.fast:
            self._from_tun_c(tun)
            return
        read = os.read
        groups = self.table.groups
        send = self._send
        off = VNET_HDR_LEN if self.vnet else 0
        minlen = off + 20
        stats = self.stats
        reads = nbytes = dropped = 0
        cur_peer: Addr | None = None
        cur_iov: list[BytesLike] = []
        cur_size = cur_n = 0
        for _ in range(BUDGET):
            try:
                frame = read(tun, READ_SIZE)
            except BlockingIOError:
                break
            except OSError as exc:
                self._tun_lost(exc)
                break
            n = len(frame)
            reads += 1
            nbytes += n
            if n < minlen or frame[off] >> 4 != 4:
                dropped += 1
                continue
            dst = int.from_bytes(frame[off + 16 : off + 20], "big")
            peer: Addr | None = None
            for mask, nets in groups:
                peer = nets.get(dst & mask)
                if peer is not None:
                    break
            if peer is None:
                self._unreachable(memoryview(frame)[off:])
                continue
            ttl = frame[off + 8]
            if ttl <= 1:
                stats["ttl_drops"] += 1
                continue
            if off and (frame[0] & 1 or frame[1]):
                # Partial checksum or a GSO super-packet: the general path.
                if cur_n:
                    send(cur_iov, cur_size if cur_n > 1 else 0, cur_peer)  # type: ignore[arg-type]
                    cur_n = 0
                self._from_tun_offloaded(frame, peer)
                continue
            buf = bytearray(frame)
            buf[off + 8] = ttl - 1
            check = ((frame[off + 10] << 8) | frame[off + 11]) + 0x0100
            check = (check & 0xFFFF) + (check >> 16)
            if check == 0xFFFF:
                check = 0
            buf[off + 10] = check >> 8
            buf[off + 11] = check & 0xFF
            size = n - off
            dgram = memoryview(buf)[off:] if off else buf
            if peer is cur_peer and cur_n < MAX_SEGMENTS and size <= cur_size:
                cur_iov.append(dgram)
                cur_n += 1
                if size < cur_size or (cur_n + 1) * cur_size > MAX_SEND_BYTES:
                    send(cur_iov, cur_size, peer)
                    cur_n = 0
                    cur_peer = None
                continue
            if cur_n:
                send(cur_iov, cur_size if cur_n > 1 else 0, cur_peer)  # type: ignore[arg-type]
            cur_peer = peer
            cur_iov = [dgram]
            cur_size = size
            cur_n = 1
        if cur_n:
            send(cur_iov, cur_size if cur_n > 1 else 0, cur_peer)  # type: ignore[arg-type]
        stats["tun_reads"] += reads
        stats["tun_bytes"] += nbytes
        stats["bad_from_tun"] += dropped

    def _add(self, counts: Counters) -> None:
        """Add what a C loop did; its fields are named like our counters."""
        stats = self.stats
        for name in counts.__match_args__:
            value = getattr(counts, name)
            if value:
                stats[name] += value

    def _from_tun_c(self, tun: int) -> None:
        """:meth:`from_tun` with the C loop; frames it hands back are done here."""
        assert native is not None
        budget = BUDGET
        vnet = VNET_HDR_LEN if self.vnet else 0
        while budget > 0:
            table = self.table
            counts, err, special = native.tun_to_wire(
                tun, self.sock.fileno(), vnet, table.cgroups, table.port, budget
            )
            self._add(counts)
            if err:
                self._tun_lost(OSError(err, os.strerror(err)))
                return
            if special is None:
                return
            budget -= counts.tun_reads
            self._special_from_tun(special, vnet)

    def _special_from_tun(self, frame: bytes, off: int) -> None:
        """A frame the C loop does not forward: no route, or work for the offload path."""
        peer = self.table.lookup(int.from_bytes(frame[off + 16 : off + 20], "big"))
        if peer is None:
            self._unreachable(memoryview(frame)[off:])
        elif frame[off + 8] <= 1:
            self.stats["ttl_drops"] += 1
        else:
            self._from_tun_offloaded(frame, peer)

    def _from_tun_offloaded(self, frame: bytes, peer: Addr) -> None:
        """A packet with a virtio header asking for work: finish or segment, then send."""
        flags, gso_type, _hl, gso_size, cstart, coff = VNET_HDR.unpack_from(frame)
        pkt = memoryview(frame)[VNET_HDR_LEN:]
        if gso_type:
            res = segment_tcp4(pkt, gso_size) if gso_type & 0x7F == VNET_GSO_TCPV4 else None
            if res is None:
                self.stats["bad_from_tun"] += 1
                return
            batch = self.batch
            iov, size, count = res
            batch.add(peer, iov, size, count, len(iov[-2]) + len(iov[-1]))
            batch.flush()
            return
        buf = prepare_single(pkt, flags, cstart, coff)
        self._send([buf], 0, peer)

    def _unreachable(self, pkt: memoryview) -> None:
        self.stats["no_route"] += 1
        reply = net_unreachable(pkt, self.tun_addr)
        if reply is None or self.tun is None:
            return
        try:
            os.write(self.tun, VNET_PLAIN + reply if self.vnet else reply)
            self.stats["icmp_sent"] += 1
        except OSError:
            self.stats["tun_write_errors"] += 1

    def _send(self, iov: list[BytesLike], seg: int, addr: Addr) -> None:
        stats = self.stats
        try:
            if seg:
                cmsg = self._cmsgs.get(seg)
                if cmsg is None:
                    cmsg = self._cmsgs[seg] = [(SOL_UDP, UDP_SEGMENT, struct.pack("H", seg))]
                sent = self.sock.sendmsg(iov, cmsg, 0, addr)
                stats["tx_datagrams"] += -(-sent // seg)
            else:
                self.sock.sendmsg(iov, (), 0, addr)
                stats["tx_datagrams"] += 1
            stats["tx_sends"] += 1
        except OSError as exc:
            if seg and exc.errno in (errno.EINVAL, errno.EMSGSIZE, errno.EIO):
                # The route's MTU is below the segment size (or GSO is refused):
                # send the datagrams one by one and let the kernel fragment.
                data = b"".join(iov)
                for start in range(0, len(data), seg):
                    self._send([data[start : start + seg]], 0, addr)
                return
            stats["tx_errors"] += 1

    # -- wire -> TUN ---------------------------------------------------------------

    def from_wire(self) -> None:
        """Drain the socket (bounded), coalesce, and write the result to the TUN."""
        if self.fast and self.tun is not None:
            assert native is not None
            counts, err, rest = native.wire_to_tun(
                self.sock.fileno(),
                self.tun,
                VNET_HDR_LEN if self.vnet else 0,
                BUDGET,
                RX_BATCH_BYTES,
            )
            self._add(counts)
            if err:
                self._tun_lost(OSError(err, os.strerror(err)))
                return
            if rest is None:
                return
            self._wire_rest(rest, BUDGET - counts.rx_calls)
            return
        self._from_wire_python(BUDGET)

    def _wire_rest(self, rest: tuple[bytes, int], budget: int) -> None:
        """A batch the C loop handed back at a TCP segment with payload: it, and what is
        left of this wake-up, go through the Decapsulator (which may glue segments)."""
        data, seg = rest
        self.dec.feed(memoryview(data), seg)
        self._from_wire_python(budget)

    def _from_wire_python(self, budget: int) -> None:
        recvmsg = self.sock.recvmsg
        dec = self.dec
        stats = self.stats
        calls = total = 0
        for _ in range(budget):
            try:
                data, anc, _flags, _addr = recvmsg(65536, _ANC_SPACE, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            except OSError:
                stats["rx_dropped"] += 1
                break
            calls += 1
            seg = 0
            for level, kind, value in anc:
                if level == SOL_UDP and kind == UDP_GRO:
                    seg = struct.unpack("i", value[:4])[0]
            dec.feed(memoryview(data), seg)
            total += len(data)
            if total >= RX_BATCH_BYTES:
                break
        writes = dec.flush()
        stats["rx_calls"] += calls
        stats["rx_bytes"] += total
        stats["rx_packets"] += dec.packets
        stats["rx_dropped"] += dec.dropped
        stats["tun_coalesced"] += dec.segments
        dec.packets = dec.dropped = dec.segments = 0
        tun = self.tun
        if tun is None:
            return
        writev = os.writev
        failed = 0
        for iov in writes:
            try:
                writev(tun, iov)
            except BlockingIOError:
                failed += 1
            except OSError as exc:
                if exc.errno in (errno.EBADFD, errno.ENODEV, errno.EIO):
                    self._tun_lost(exc)
                    return
                failed += 1
        stats["tun_writes"] += len(writes)
        stats["tun_write_errors"] += failed

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
