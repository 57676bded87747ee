"""Receiver side: turn wire datagrams back into TUN writes, coalescing TCP segments.

Every datagram carries one inner IPv4 packet. The socket has ``UDP_GRO`` on, so one
``recvmsg`` may return many datagrams glued together, each ``gso_size`` bytes except
the last; peers that never batch (Go flannel, the C proxy) give one per call, and the
worker then feeds several calls' worth into one :class:`Decapsulator` pass.

Writing each inner packet to the TUN separately costs one system call per packet,
which is what limits every per-packet proxy. Here consecutive packets that are
in-order segments of one TCP flow are glued back into one super-packet and written
with one ``writev`` and a virtio-net header saying ``GSO_TCPV4`` + ``NEEDS_CSUM``:
the kernel treats it exactly like a packet its own GRO built (and re-segments it if
it must forward it further). The rules mirror ``tcp_gro_receive``/``inet_gro_receive``:
no IP options, no fragments, same addresses, ports, TOS, TTL, DF, ACK number, window,
data offset and TCP options; consecutive sequence numbers; flags ACK (PSH allowed on
the segment that closes the run); every payload ``mss`` bytes except a shorter last
one. The TCP checksum field of the super-packet carries the pseudo-header sum, the
kernel finishing it. Integrity: the inner TCP checksums are not re-verified when
segments are glued; the outer UDP checksum, which the kernel verified, covers them.

Anything else (ICMP, UDP, SYN/FIN, lone segments) is written as it came, with its TTL
decremented and a plain virtio header. Nothing is written unless it is a well-formed
IPv4 packet with TTL > 1 (see :func:`loden.udp.packet.header_length`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from loden.udp.csum import BytesLike, fold, residue
from loden.udp.native import native
from loden.udp.packet import dec_ttl
from loden.udp.tun import VNET_F_NEEDS_CSUM, VNET_GSO_TCPV4, VNET_HDR, VNET_PLAIN

ScanFn = Callable[..., tuple[int, int, int, int, int, int]]


#: The C loop when it was built; None makes :class:`Decapsulator` use its Python loop.
GRO_SCAN: ScanFn | None = native.gro_scan if native is not None else None

#: Coalesced super-packets stay below the 16-bit IP total length.
MAX_SUPER = 65535 - 1500

_ACK = 0x10
_PSH = 0x08


@functools.lru_cache(maxsize=16)
def _run_mask(hl: int) -> int:
    """Mask of the header bytes that must be equal for a segment to join a run.

    Everything but total length, IP ID, IP checksum, sequence number, the PSH flag and
    the TCP checksum, as one integer over the ``hl`` header bytes.
    """
    mask = bytearray(b"\xff" * hl)
    for start, stop in ((2, 6), (10, 12), (24, 28), (36, 38)):
        mask[start:stop] = bytes(stop - start)
    mask[33] = 0xFF & ~_PSH
    return int.from_bytes(mask, "big")


@functools.lru_cache(maxsize=16)
def _shifts(hl: int) -> tuple[int, int, int, int]:
    """Shifts that bring seq, total length, the IP header and TCP flags to bit 0."""
    return (hl - 28) << 3, (hl - 4) << 3, (hl - 20) << 3, (hl - 34) << 3


class Decapsulator:
    """Validates and coalesces inner packets; collects the TUN writes as iov lists.

    Usage: :meth:`feed` each datagram (or GRO batch), then :meth:`flush` and write
    every list in :attr:`writes` with one ``writev``. Payload views point into the
    buffers fed, which must stay alive and unchanged until the writes are done.

    Speed: a segment that continues the open run costs one ``int.from_bytes`` of its
    headers and a handful of integer operations (compare under :func:`_run_mask`,
    sequence number, length, IP header checksum); everything else takes the general
    path in :meth:`_one`.
    """

    __slots__ = (
        "vnet",
        "writes",
        "dropped",
        "packets",
        "segments",
        "_key",
        "_mask",
        "_first",
        "_next_seq",
        "_mss",
        "_payloads",
        "_total",
        "_hl",
        "_psh",
        "_scan",
    )

    def __init__(self, *, vnet: bool, scan: Any = GRO_SCAN) -> None:
        #: The TUN carries virtio-net headers (then coalescing is possible).
        self.vnet = vnet
        self.writes: list[list[BytesLike]] = []
        #: Counters: inner packets dropped, inner packets accepted, packets glued.
        self.dropped = 0
        self.packets = 0
        self.segments = 0
        self._key = -1
        self._mask = 0
        self._first: memoryview | None = None
        self._next_seq = 0
        self._mss = 0
        self._payloads: list[BytesLike] = []
        self._total = 0
        self._hl = 0
        self._psh = False
        #: The C loop for segments that continue the open run (None: the Python one).
        self._scan: ScanFn | None = scan

    def feed(self, data: bytes | bytearray | memoryview, seg: int) -> None:
        """Process ``data``: inner packets of ``seg`` bytes each (the last may be shorter)."""
        n = len(data)
        if not n:
            self.dropped += 1
            return
        if seg <= 0 or seg > n:
            seg = n
        mv = memoryview(data)
        raw = data if isinstance(data, bytes) else mv
        # The open run's state lives in locals inside the loop (attribute access is
        # what a Python hot loop pays most for) and is written back around _one().
        key, mask, hl, nseq, mss = self._key, self._mask, self._hl, self._next_seq, self._mss
        payloads, total, joined = self._payloads, self._total, 0
        append = payloads.append
        frombytes = int.from_bytes
        # Bit positions, in the header read as one integer, of the sequence number,
        # total length, IP header and TCP flags (counted from the end of the header).
        s_seq, s_tot, s_ip, s_flags = _shifts(hl)
        scan = self._scan
        off = 0
        while off < n:
            if key >= 0 and scan is not None:
                # The C loop takes every segment that continues the run, then stops at
                # the first one that does not (handled below by _one) or at the end.
                first = self._first
                assert first is not None
                off, nseq, total, count, closed, psh = scan(
                    raw, mv, off, n, seg, first, hl, nseq, mss, total, MAX_SUPER, payloads
                )
                joined += count
                if closed:
                    self._total = total
                    self._psh = bool(psh)
                    self._close()
                    key = -1
                    continue
                if off >= n:
                    break
            end = off + seg
            if end > n:
                end = n
            if key >= 0 and scan is None and end - off >= hl:
                # Fast path: does this segment continue the open run?
                x = frombytes(raw[off : off + hl], "big")
                if x & mask == key and (x >> s_seq) & 0xFFFFFFFF == nseq:
                    tot = (x >> s_tot) & 0xFFFF
                    plen = tot - hl
                    if (
                        0 < plen <= mss
                        and off + tot <= end
                        and (x >> s_ip) % 0xFFFF == 0
                        and total + plen <= MAX_SUPER
                    ):
                        append(mv[off + hl : off + tot])
                        total += plen
                        nseq = (nseq + plen) & 0xFFFFFFFF
                        joined += 1
                        psh = (x >> s_flags) & _PSH
                        if plen < mss or psh:
                            self._total = total
                            self._psh = bool(psh)
                            self._close()
                            key = -1
                        off = end
                        continue
            self._total, self._next_seq = total, nseq
            self._one(mv[off:end])
            key, mask, hl, nseq, mss = self._key, self._mask, self._hl, self._next_seq, self._mss
            if key >= 0:  # _one opened a run: its header length may differ
                payloads, total = self._payloads, self._total
                append = payloads.append
                s_seq, s_tot, s_ip, s_flags = _shifts(hl)
            off = end
        self._total, self._next_seq = total, nseq
        self.packets += joined

    def _one(self, pkt: memoryview) -> None:
        n = len(pkt)
        if n < 20:
            self.dropped += 1
            return
        b0 = pkt[0]
        ihl = (b0 & 0x0F) << 2
        if b0 >> 4 != 4 or ihl < 20 or ihl > n:
            self.dropped += 1
            return
        tot = (pkt[2] << 8) | pkt[3]
        if tot < ihl or tot > n or pkt[8] <= 1:
            self.dropped += 1
            return
        hdr = bytearray(pkt[:ihl])
        if int.from_bytes(hdr, "big") % 0xFFFF if ihl == 20 else residue(hdr):
            self.dropped += 1
            return
        if tot < n:
            pkt = pkt[:tot]
        self.packets += 1
        if self._first is not None:
            self._close()
        if self.vnet and ihl == 20 and pkt[9] == 6 and not (pkt[6] & 0x3F or pkt[7]):
            thl = (pkt[32] >> 4) << 2
            hl = 20 + thl
            plen = tot - hl
            # Only pure ACK segments with payload open a run (PSH would close it at once).
            if thl >= 20 and plen > 0 and pkt[33] == _ACK and not pkt[32] & 0x0F:
                mask = _run_mask(hl)
                x = int.from_bytes(pkt[:hl], "big")
                self._key = x & mask
                self._mask = mask
                self._first = pkt
                self._next_seq = (((x >> ((hl - 28) << 3)) & 0xFFFFFFFF) + plen) & 0xFFFFFFFF
                self._mss = plen
                self._payloads = [pkt[hl:]]
                self._total = plen
                self._hl = hl
                self._psh = False
                return
        # A lone packet: TTL - 1 (RFC 1624, as dec_ttl) on a copy of the header only.
        hdr[8] -= 1
        check = ((hdr[10] << 8) | hdr[11]) + 0x0100
        check = (check & 0xFFFF) + (check >> 16)
        if check == 0xFFFF:
            check = 0
        hdr[10] = check >> 8
        hdr[11] = check & 0xFF
        if self.vnet:
            self.writes.append([VNET_PLAIN, hdr, pkt[ihl:]])
        else:
            self.writes.append([hdr, pkt[ihl:]])

    def _single(self, pkt: memoryview, ihl: int) -> None:
        hdr = bytearray(pkt[:ihl])
        dec_ttl(hdr)
        if self.vnet:
            self.writes.append([VNET_PLAIN, hdr, pkt[ihl:]])
        else:
            self.writes.append([hdr, pkt[ihl:]])

    def _close(self) -> None:
        first = self._first
        if first is None:
            return
        self._first = None
        self._key = -1
        payloads = self._payloads
        if len(payloads) == 1:
            self._single(first, 20)
            return
        hl = self._hl
        total = self._total
        ip = bytearray(first[:20])
        ip[2:4] = (hl + total).to_bytes(2, "big")
        ip[8] -= 1
        ip[10:12] = b"\0\0"
        ip[10:12] = ((0xFFFF - residue(ip)) % 0xFFFF).to_bytes(2, "big")
        tcp = bytearray(first[20:hl])
        if self._psh:
            tcp[13] |= _PSH
        tcp_len = hl - 20 + total
        pseudo = int.from_bytes(ip[12:16], "big") + int.from_bytes(ip[16:20], "big") + 6 + tcp_len
        tcp[16:18] = fold(pseudo).to_bytes(2, "big")
        vnet = VNET_HDR.pack(VNET_F_NEEDS_CSUM, VNET_GSO_TCPV4, hl, self._mss, 20, 16)
        self.writes.append([vnet, ip, tcp, *payloads])
        self.segments += len(payloads)

    def flush(self) -> list[list[BytesLike]]:
        """Close the open run; return and forget the writes collected so far."""
        self._close()
        writes = self.writes
        self.writes = []
        return writes


def decapsulate(
    data: BytesLike, seg: int = 0, *, vnet: bool = True, scan: Any = GRO_SCAN
) -> list[list[BytesLike]]:
    """One-shot :class:`Decapsulator` pass over ``data`` (tests and the benchmark)."""
    dec = Decapsulator(vnet=vnet, scan=scan)
    dec.feed(memoryview(data), seg)
    return dec.flush()
