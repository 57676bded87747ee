"""A udp worker's TUN -> wire half: read from the TUN queue, route, TTL - 1, send.

Plain packets go in runs of equal-size datagrams for one peer, sent with one
``UDP_SEGMENT`` ``sendmsg`` (:mod:`loden.udp.gso`); packets with offload work (partial
checksum, GSO super-packets) are finished or segmented first; a packet with no route is
answered with ICMP net unreachable. The C loop (``_fastpath.tun_to_wire``) does the
plain case when it is built. Part of :class:`loden.udp.worker.Worker`.
"""

from __future__ import annotations

import errno
import os
import struct

from loden.udp.csum import BytesLike
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
from loden.udp.parts import BUDGET, WorkerState
from loden.udp.sockets import SOL_UDP, UDP_SEGMENT
from loden.udp.tun import VNET_GSO_TCPV4, VNET_HDR, VNET_HDR_LEN, VNET_PLAIN

READ_SIZE = 65536 + VNET_HDR_LEN


class TunToWire(WorkerState):
    """Packets from the pods (the TUN) to the peers (the socket)."""

    tun_addr: bytes
    batch: DatagramBatch
    _cmsgs: dict[int, list[tuple[int, int, bytes]]]

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
            # packet.dec_ttl, inlined: this loop runs once per packet.
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
