"""udp data path, pure packet logic: checksums, TTL, ICMP, segmentation, peers."""

from __future__ import annotations

import os
import struct
from ipaddress import IPv4Address, IPv4Network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loden.errors import ParseError
from loden.udp import peers as peer_codec
from loden.udp.csum import checksum, fold, fold_chain, residue
from loden.udp.gso import MAX_SEGMENTS, DatagramBatch, prepare_single, segment_tcp4
from loden.udp.packet import (
    dec_ttl,
    finish_partial_checksum,
    header_length,
    ip_header,
    net_unreachable,
)
from loden.udp.peers import PeerTable
from tests.fixtures.frames import (
    TCP_ACK,
    TCP_PSH,
    TS_OPTION,
    check_packet,
    tcp_packet,
    udp_packet,
)

SRC = bytes([10, 9, 1, 2])
DST = bytes([10, 9, 2, 2])
TUN = bytes([10, 9, 1, 0])


def reference_sum(data: bytes) -> int:
    """RFC 1071, the slow obvious way."""
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


@given(st.binary(max_size=4000))
def test_residue_matches_rfc1071(data: bytes) -> None:
    assert residue(data) == reference_sum(data) % 0xFFFF
    assert residue(memoryview(data)) == residue(data)


@pytest.mark.parametrize("n", [0, 1, 2, 119, 120, 121, 1432, 1433, 9000, 65000])
def test_residue_sizes_and_all_ones(n: int) -> None:
    for data in (b"\xff" * n, os.urandom(n)):
        assert residue(data) == reference_sum(data) % 0xFFFF
    assert all(width % 240 == 0 for width, _ in fold_chain(n))


def test_checksum_canonical_and_fold() -> None:
    assert checksum(0) == 0  # a sum of 0xFFFF: store 0, as a full computation does
    assert checksum(0x1234) == 0xFFFF - 0x1234
    assert fold(0) == 0xFFFF and fold(0x10000) == 1


ttl_headers = st.builds(
    lambda ttl, ident, tos, frag, proto, src, dst, plen: ip_header(
        src=src,
        dst=dst,
        proto=proto,
        payload_len=plen,
        ttl=ttl,
        ident=ident,
        flags_frag=frag,
        tos=tos,
    ),
    st.integers(0, 255),
    st.integers(0, 0xFFFF),
    st.integers(0, 255),
    st.integers(0, 0xFFFF),
    st.integers(0, 255),
    st.binary(min_size=4, max_size=4),
    st.binary(min_size=4, max_size=4),
    st.integers(0, 1400),
)


@given(ttl_headers)
def test_dec_ttl_is_rfc1624_exact(hdr: bytes) -> None:
    buf = bytearray(hdr)
    ok = dec_ttl(buf)
    if hdr[8] <= 1:
        assert not ok and buf == bytearray(hdr)
        return
    assert ok and buf[8] == hdr[8] - 1
    full = bytearray(buf)
    full[10:12] = b"\0\0"
    assert int.from_bytes(buf[10:12], "big") == checksum(residue(full))
    assert residue(buf) == 0


def test_header_length_rejects_malformed() -> None:
    good = udp_packet(SRC, DST, b"hello")
    assert header_length(good) == 20
    bad_sum = bytearray(good)
    bad_sum[11] ^= 1
    assert header_length(bytes(bad_sum)) == 0
    assert header_length(good[:19]) == 0
    assert header_length(b"\x65" + good[1:]) == 0  # version 6
    assert header_length(good[:-1]) == 0  # total length beyond the buffer


def test_net_unreachable_like_flannel() -> None:
    offender = tcp_packet(SRC, DST, os.urandom(100))
    reply = net_unreachable(offender, TUN)
    assert reply is not None
    parsed = check_packet(reply)
    assert parsed.proto == 1 and parsed.ttl == 8 and parsed.ident == 0
    assert parsed.src == TUN and parsed.dst == SRC
    assert parsed.l4[:2] == b"\x03\x00"  # Destination Unreachable, Net Unreachable
    assert parsed.l4[8:] == offender[: 20 + 8]
    assert residue(parsed.l4) == 0  # ICMP checksum
    assert len(reply) == 20 + 8 + 20 + 8


def test_net_unreachable_exceptions() -> None:
    icmp = bytearray(tcp_packet(SRC, DST, b"x" * 20))
    icmp[9] = 1
    assert net_unreachable(bytes(icmp), TUN) is None
    frag = bytearray(tcp_packet(SRC, DST, b"x" * 20))
    frag[6:8] = (0x2000 | 10).to_bytes(2, "big")  # MF, offset 80 bytes
    assert net_unreachable(bytes(frag), TUN) is None
    first = bytearray(tcp_packet(SRC, DST, b"x" * 20))
    first[6:8] = (0x2000).to_bytes(2, "big")  # first fragment: answered
    assert net_unreachable(bytes(first), TUN) is not None
    longhdr = bytearray(tcp_packet(SRC, DST, b"x" * 80))
    longhdr[0] = 0x4F  # IHL 15 = 60 bytes
    assert net_unreachable(bytes(longhdr), TUN) is None
    assert net_unreachable(b"\x45" * 10, TUN) is None


def test_finish_partial_checksum_tcp_and_udp() -> None:
    for pkt, offset in (
        (tcp_packet(SRC, DST, os.urandom(301)), 16),
        (udp_packet(SRC, DST, os.urandom(77)), 6),
    ):
        buf = bytearray(pkt)
        plen = len(pkt) - 20
        pseudo = (residue(SRC) + residue(DST) + pkt[9] + plen) % 0xFFFF
        buf[20 + offset : 22 + offset] = fold(pseudo).to_bytes(2, "big")
        finish_partial_checksum(buf, 20, offset)
        check_packet(bytes(buf))


def test_prepare_single_decrements_ttl() -> None:
    pkt = udp_packet(SRC, DST, b"abc", ttl=7)
    out = prepare_single(memoryview(pkt), 0, 0, 0)
    assert check_packet(bytes(out)).ttl == 6


@pytest.mark.parametrize("flags", [TCP_ACK, TCP_ACK | TCP_PSH, TCP_ACK | TCP_PSH | 0x01 | 0x80])
@pytest.mark.parametrize("plen", [1, 1432, 1433, 20000, 64000])
def test_segment_tcp4_like_the_kernel(flags: int, plen: int) -> None:
    payload = os.urandom(plen)
    sup = tcp_packet(SRC, DST, payload, seq=0xFFFFF000, flags=flags, ttl=64, ident=0xFFFE)
    res = segment_tcp4(memoryview(sup), 1432)
    assert res is not None
    iov, size, count = res
    assert count == -(-plen // 1432) and len(iov) == 2 * count
    segs = [bytes(iov[i]) + bytes(iov[i + 1]) for i in range(0, len(iov), 2)]
    assert all(len(s) == size for s in segs[:-1]) and len(segs[-1]) <= size
    got = b""
    for i, seg in enumerate(segs):
        p = check_packet(seg)
        assert p.ttl == 63 and p.ident == (0xFFFE + i) & 0xFFFF
        assert p.seq == (0xFFFFF000 + 1432 * i) & 0xFFFFFFFF
        last = i == count - 1
        want = flags
        if not last:
            want &= ~(0x01 | TCP_PSH)
        if i:
            want &= ~0x80
        assert p.tcp_flags == want
        got += p.tcp_payload
    assert got == payload


@settings(max_examples=60, deadline=None)
@given(
    mss=st.integers(min_value=1, max_value=1500),
    plen=st.integers(min_value=1, max_value=9000),
    seq=st.integers(min_value=0, max_value=0xFFFFFFFF),
    ipopts=st.sampled_from([b"", b"\x01\x01\x01\x00"]),
    topts=st.sampled_from([b"", b"\x01\x01\x01\x01", TS_OPTION]),
    data=st.binary(min_size=16, max_size=16),
)
def test_segment_tcp4_any_mss_and_options(
    mss: int, plen: int, seq: int, ipopts: bytes, topts: bytes, data: bytes
) -> None:
    """Odd segment sizes, IP and TCP options, sequence wrap-around: every segment valid."""
    payload = (data * (plen // 16 + 1))[:plen]
    sup = tcp_packet(SRC, DST, payload, seq=seq, options=topts, ttl=9)
    if ipopts:  # insert IP options: IHL 6, header checksum recomputed
        ip = bytearray(sup[:20] + ipopts)
        ip[0] = 0x46
        ip[2:4] = (len(sup) + 4).to_bytes(2, "big")
        ip[10:12] = b"\0\0"
        ip[10:12] = checksum(residue(ip)).to_bytes(2, "big")
        sup = bytes(ip) + sup[20:]
    res = segment_tcp4(memoryview(sup), mss)
    assert res is not None
    iov, size, count = res
    assert count == -(-plen // mss)
    got = b""
    for i in range(0, len(iov), 2):
        p = check_packet(bytes(iov[i]) + bytes(iov[i + 1]))
        assert p.ttl == 8 and p.header_len == 20 + len(ipopts)
        assert p.seq == (seq + mss * (i // 2)) & 0xFFFFFFFF
        assert len(bytes(iov[i]) + bytes(iov[i + 1])) <= size
        got += p.tcp_payload
    assert got == payload


def test_segment_tcp4_rejects_non_tcp() -> None:
    assert segment_tcp4(memoryview(udp_packet(SRC, DST, b"x" * 100)), 50) is None
    assert segment_tcp4(memoryview(b"\x45" * 30), 10) is None


def test_datagram_batch_runs() -> None:
    sent: list[tuple[int, int, tuple[str, int]]] = []

    def send(iov: list[bytes | bytearray | memoryview], seg: int, addr: tuple[str, int]) -> None:
        sent.append((sum(len(b) for b in iov), seg, addr))

    a, b = ("192.0.2.1", 8285), ("192.0.2.2", 8285)
    batch = DatagramBatch(send)
    for _ in range(3):
        batch.add(a, [b"x" * 100], 100, 1, 100)
    batch.add(a, [b"x" * 60], 100, 1, 60)  # shorter: closes the run
    batch.add(a, [b"x" * 100], 100, 1, 100)
    batch.add(b, [b"x" * 100], 100, 1, 100)
    batch.flush()
    assert sent == [(360, 100, a), (100, 0, a), (100, 0, b)]
    sent.clear()
    for _ in range(MAX_SEGMENTS + 1):
        batch.add(a, [b"y" * 10], 10, 1, 10)
    batch.flush()
    assert sent == [(10 * MAX_SEGMENTS, 10, a), (10, 0, a)]
    sent.clear()
    big: list[bytes | bytearray | memoryview] = [
        b"z" * 1400,
        b"",
    ] * 60  # 60 segments of 1400: more than one send can carry
    batch.add(a, big, 1400, 60, 1400)
    batch.flush()
    assert sum(n for n, _, _ in sent) == 60 * 1400 and all(n <= 65507 for n, _, _ in sent)


def test_peer_table_lookup_and_codec() -> None:
    entries = [
        (IPv4Network("10.9.1.0/24"), IPv4Address("192.0.2.1")),
        (IPv4Network("10.9.2.0/24"), IPv4Address("192.0.2.2")),
        (IPv4Network("10.9.2.128/25"), IPv4Address("192.0.2.3")),
        (IPv4Network("10.9.1.0/24"), IPv4Address("192.0.2.9")),  # later wins
    ]
    table = PeerTable.build(entries, 8285)
    assert len(table) == 3
    assert table.lookup(int(IPv4Address("10.9.1.77"))) == ("192.0.2.9", 8285)
    assert table.lookup(int(IPv4Address("10.9.2.200"))) == ("192.0.2.3", 8285)
    assert table.lookup(int(IPv4Address("10.9.2.1"))) == ("192.0.2.2", 8285)
    assert table.lookup(int(IPv4Address("10.9.3.1"))) is None
    many = [(IPv4Network((0x0A000000 + (i << 8), 24)), IPv4Address(i + 1)) for i in range(9000)]
    messages = list(peer_codec.encode(PeerTable.build(many, 8285)))
    assert len(messages) == 3
    got = []
    for msg in messages:
        final, part = peer_codec.decode(msg)
        got += part
    assert final and got == sorted(many)
    assert peer_codec.decode(next(peer_codec.encode(PeerTable(port=1)))) == (True, [])
    with pytest.raises(ParseError):
        peer_codec.decode(b"P\x01abc")


@settings(max_examples=50)
@given(st.lists(st.tuples(st.integers(0, 0xFFFF), st.integers(16, 28)), max_size=40))
def test_peer_table_longest_prefix(nets: list[tuple[int, int]]) -> None:
    entries = [
        (IPv4Network(((0x0A000000 | (n << 8)) & (0xFFFFFFFF << (32 - p)), p)), IPv4Address(i + 1))
        for i, (n, p) in enumerate(nets)
    ]
    table = PeerTable.build(entries, 1)
    final = dict(entries)
    for net, _ in entries:
        addr = net.network_address
        best = max((n for n in final if addr in n), key=lambda n: n.prefixlen)
        assert table.lookup(int(addr)) == (str(final[best]), 1)
