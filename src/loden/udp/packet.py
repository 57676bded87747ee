"""IPv4 packet helpers for the udp data path: validation, TTL, partial checksums, ICMP.

These are the per-packet rules of flannel's C proxy (``proxy_amd64.c``), kept exact
where they are visible on the wire or to pods:

* a forwarded packet's TTL is decremented on each side (once before it is sent, once
  after it is received) and its header checksum patched incrementally (RFC 1624, eqn 3);
  a packet whose TTL would reach 0 is dropped;
* a packet for an address inside the Network that no lease covers gets an ICMP
  Destination Unreachable / Net Unreachable written back into the TUN: IP source = the
  TUN address, destination = the offender's source, TTL 8, ID 0, no options, payload =
  the offender's IP header plus its first 8 payload bytes. None is sent for ICMP
  offenders, non-first fragments, or offenders whose header is 60 bytes or longer.

Loden is stricter than flannel on input (flannel checks only "at least 20 bytes"):
what comes off the wire is written to the TUN only if it is a well-formed IPv4 packet
(version 4, IHL >= 5, total length inside the datagram, valid header checksum) with
TTL > 1. A header that fails these checks would be dropped by the kernel's ``ip_rcv``
anyway; checking first keeps garbage from ever turning into a super-packet.
"""

from __future__ import annotations

import struct

from loden.udp.csum import BytesLike, checksum, residue

IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17

#: ICMP type 3 (Destination Unreachable), code 0 (Net Unreachable).
ICMP_DEST_UNREACH = 3
ICMP_NET_UNREACH = 0
#: TTL of the ICMP errors the proxy generates (flannel's value).
ICMP_TTL = 8

_IP_HDR = struct.Struct("!BBHHHBBH4s4s")


def header_length(pkt: BytesLike) -> int:
    """The IPv4 header length of a well-formed packet, or 0 if ``pkt`` is not one.

    Well-formed: at least 20 bytes, version 4, IHL >= 5, header inside the buffer,
    total length between the header length and the buffer length, valid checksum.
    """
    n = len(pkt)
    if n < 20:
        return 0
    b0 = pkt[0]
    ihl = (b0 & 0x0F) << 2
    if b0 >> 4 != 4 or ihl < 20 or ihl > n:
        return 0
    total = (pkt[2] << 8) | pkt[3]
    if total < ihl or total > n:
        return 0
    if residue(pkt[:ihl]) != 0:
        return 0
    return ihl


def total_length(pkt: BytesLike) -> int:
    return (pkt[2] << 8) | pkt[3]


def dec_ttl(hdr: bytearray, off: int = 0) -> bool:
    """Decrement the TTL of the header at ``hdr[off:]`` and patch its checksum in place.

    RFC 1624 eqn 3 for a TTL going down by one reduces to adding 0x0100 to the
    checksum in ones'-complement arithmetic. A result of 0xFFFF is written as 0, the
    value a full recomputation gives (an IPv4 header never sums to zero).

    :returns: False (and leaves ``hdr`` alone) if the TTL is 0 or 1: drop the packet.
    """
    ttl = hdr[off + 8]
    if ttl <= 1:
        return False
    hdr[off + 8] = ttl - 1
    value = ((hdr[off + 10] << 8) | hdr[off + 11]) + 0x0100
    value = (value & 0xFFFF) + (value >> 16)
    if value == 0xFFFF:
        value = 0
    hdr[off + 10] = value >> 8
    hdr[off + 11] = value & 0xFF
    return True


def finish_partial_checksum(pkt: bytearray, start: int, offset: int) -> None:
    """Complete a ``CHECKSUM_PARTIAL`` packet (virtio ``NEEDS_CSUM``) in place.

    The field at ``start + offset`` holds the folded pseudo-header sum; the checksum is
    the complement of the sum over ``pkt[start:]``. UDP never transmits 0 (it means
    "no checksum"), so a zero result becomes 0xFFFF there.
    """
    where = start + offset
    if start >= len(pkt) or where + 2 > len(pkt):
        return
    value = checksum(residue(memoryview(pkt)[start:]))
    if value == 0 and offset == 6:
        value = 0xFFFF
    pkt[where] = value >> 8
    pkt[where + 1] = value & 0xFF


def net_unreachable(offender: BytesLike, tun_addr: bytes) -> bytes | None:
    """The ICMP Net Unreachable flannel writes back into the TUN for ``offender``.

    ``tun_addr`` is the TUN's IPv4 address (4 bytes, network order). Returns None where
    flannel sends nothing: ICMP offenders, non-first fragments, header length >= 60,
    or buffers too short to hold an IPv4 header. An offender shorter than its header
    plus 8 bytes is zero-padded (flannel copies whatever its buffer held).
    """
    if len(offender) < 20 or offender[0] >> 4 != 4:
        return None
    ihl = (offender[0] & 0x0F) << 2
    if ihl < 20 or ihl >= 60:
        return None
    if offender[9] == IPPROTO_ICMP:
        return None
    if ((offender[6] << 8) | offender[7]) & 0x1FFF:
        return None
    quoted = bytes(offender[: ihl + 8]).ljust(ihl + 8, b"\0")
    total = 20 + 8 + len(quoted)
    src = bytes(offender[12:16])
    ip = bytearray(_IP_HDR.pack(0x45, 0, total, 0, 0, ICMP_TTL, IPPROTO_ICMP, 0, tun_addr, src))
    ip[10:12] = checksum(residue(ip)).to_bytes(2, "big")
    icmp = bytearray(struct.pack("!BBHI", ICMP_DEST_UNREACH, ICMP_NET_UNREACH, 0, 0) + quoted)
    icmp[2:4] = checksum(residue(icmp)).to_bytes(2, "big")
    return bytes(ip + icmp)


def ip_header(
    *,
    src: bytes,
    dst: bytes,
    proto: int,
    payload_len: int,
    ttl: int = 64,
    ident: int = 0,
    flags_frag: int = 0x4000,
    tos: int = 0,
) -> bytes:
    """A 20-byte IPv4 header with a valid checksum (for tests, benchmarks and ICMP)."""
    hdr = bytearray(
        _IP_HDR.pack(0x45, tos, 20 + payload_len, ident, flags_frag, ttl, proto, 0, src, dst)
    )
    hdr[10:12] = checksum(residue(hdr)).to_bytes(2, "big")
    return bytes(hdr)
