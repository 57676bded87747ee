"""A udp worker's wire -> TUN half: receive (with ``UDP_GRO``), check, coalesce, write.

Datagrams from the peers are validated and their TCP segments coalesced into
super-packet writes to the TUN (:mod:`loden.udp.gro`). The C loop
(``_fastpath.wire_to_tun``) writes plain packets itself and hands back the rest of a
batch at the first TCP segment with payload. Part of :class:`loden.udp.worker.Worker`.
"""

from __future__ import annotations

import errno
import os
import socket
import struct

from loden.udp.gro import Decapsulator
from loden.udp.native import native
from loden.udp.parts import BUDGET, WorkerState
from loden.udp.sockets import SOL_UDP, UDP_GRO
from loden.udp.tun import VNET_HDR_LEN

#: Stop draining the socket after this many bytes to bound a batch's memory.
RX_BATCH_BYTES = 1 << 19
_ANC_SPACE = socket.CMSG_SPACE(4)


class WireToTun(WorkerState):
    """Packets from the peers (the socket) to the pods (the TUN)."""

    dec: Decapsulator

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
