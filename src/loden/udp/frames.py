"""Builders and checkers of valid IPv4/TCP/UDP packets, for tests and benchmarks.

Not used by the data path itself; kept next to it so the test suite, the benchmarks and
anyone debugging a capture check packets with the same rules.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from loden.udp.csum import BytesLike, checksum, residue
from loden.udp.packet import IPPROTO_TCP, IPPROTO_UDP, header_length, ip_header

TCP_ACK = 0x10
TCP_PSH = 0x08
#: Timestamp option as Linux sends it (NOP, NOP, TS 10 bytes).
TS_OPTION = b"\x01\x01\x08\x0a\x00\x00\x10\x00\x00\x00\x20\x00"


def tcp_packet(
    src: bytes,
    dst: bytes,
    payload: bytes,
    *,
    seq: int = 1000,
    ack: int = 1,
    flags: int = TCP_ACK,
    sport: int = 40000,
    dport: int = 5201,
    window: int = 502,
    options: bytes = TS_OPTION,
    ttl: int = 64,
    ident: int = 1,
) -> bytes:
    """A TCP/IPv4 packet with valid IP and TCP checksums."""
    thl = 20 + len(options)
    tcp = bytearray(
        struct.pack("!HHIIBBHHH", sport, dport, seq, ack, (thl // 4) << 4, flags, window, 0, 0)
        + options
    )
    total = residue(src) + residue(dst) + IPPROTO_TCP + thl + len(payload)
    tcp[16:18] = checksum(total + residue(tcp) + residue(payload)).to_bytes(2, "big")
    ip = ip_header(
        src=src, dst=dst, proto=IPPROTO_TCP, payload_len=thl + len(payload), ttl=ttl, ident=ident
    )
    return ip + bytes(tcp) + payload


def udp_packet(
    src: bytes,
    dst: bytes,
    payload: bytes,
    *,
    sport: int = 40000,
    dport: int = 5201,
    ttl: int = 64,
    ident: int = 1,
) -> bytes:
    """A UDP/IPv4 packet with valid IP and UDP checksums."""
    length = 8 + len(payload)
    udp = bytearray(struct.pack("!HHHH", sport, dport, length, 0))
    value = checksum(
        residue(src) + residue(dst) + IPPROTO_UDP + length + residue(udp) + residue(payload)
    )
    udp[6:8] = (value or 0xFFFF).to_bytes(2, "big")
    ip = ip_header(src=src, dst=dst, proto=IPPROTO_UDP, payload_len=length, ttl=ttl, ident=ident)
    return ip + bytes(udp) + payload


@dataclass(frozen=True, slots=True)
class Parsed:
    """The fields tests look at, from a packet that passed :func:`check_packet`."""

    src: bytes
    dst: bytes
    proto: int
    ttl: int
    ident: int
    header_len: int
    l4: bytes

    @property
    def seq(self) -> int:
        return int(struct.unpack_from("!I", self.l4, 4)[0])

    @property
    def tcp_flags(self) -> int:
        return self.l4[13]

    @property
    def tcp_payload(self) -> bytes:
        return self.l4[(self.l4[12] >> 4) * 4 :]


def check_packet(pkt: BytesLike) -> Parsed:
    """Assert-style check: a well-formed IPv4 packet whose TCP/UDP checksum is valid.

    :raises ValueError: with the reason, when it is not.
    """
    ihl = header_length(pkt)
    if not ihl:
        raise ValueError("not a well-formed IPv4 packet (version, IHL, length, header checksum)")
    total = (pkt[2] << 8) | pkt[3]
    if total != len(pkt):
        raise ValueError(f"IP total length {total} != {len(pkt)} bytes")
    src, dst, proto = bytes(pkt[12:16]), bytes(pkt[16:20]), pkt[9]
    l4 = bytes(pkt[ihl:])
    if proto in (IPPROTO_TCP, IPPROTO_UDP):
        if proto == IPPROTO_UDP and l4[6:8] == b"\0\0":
            pass  # UDP without checksum
        elif (residue(src) + residue(dst) + proto + len(l4) + residue(l4)) % 0xFFFF:
            raise ValueError(f"bad {'TCP' if proto == IPPROTO_TCP else 'UDP'} checksum")
    return Parsed(src, dst, proto, pkt[8], (pkt[4] << 8) | pkt[5], ihl, l4)
