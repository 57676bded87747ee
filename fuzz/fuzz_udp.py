#!/usr/bin/env python3
"""atheris harness: the udp backend's packet handling.

Receive path (wire -> pods): any datagram stream, cut at any segment size, goes through
the Decapsulator; everything it writes towards the TUN is a well-formed IPv4 packet
with TTL >= 1 behind a plain or TCPv4-GSO virtio header. Send path (pods -> wire):
the GSO segmenter and the checksum completion never raise on any packet that meets their
preconditions (full IPv4 header, TTL > 1: the worker drops everything else first).
Run: python fuzz/fuzz_udp.py -runs=100000
"""

from __future__ import annotations

from _harness import instrumented, run

with instrumented():
    from loden.udp.gro import Decapsulator
    from loden.udp.gso import prepare_single, segment_tcp4
    from loden.udp.packet import header_length
    from loden.udp.tun import VNET_HDR

from tests.fixtures.frames import tcp_packet, udp_packet  # seed material only

_SRC, _DST = bytes([10, 9, 1, 2]), bytes([10, 9, 2, 2])
_TCP = b"".join(tcp_packet(_SRC, _DST, bytes(100), seq=1 + 100 * i, ttl=62) for i in range(4))
SEEDS = [
    (140).to_bytes(2, "big") + b"\x10" + _TCP,
    b"\x00\x00\x05" + udp_packet(_SRC, _DST, b"hello", ttl=5),
]


def test_one_input(data: bytes) -> None:
    if len(data) < 3:
        return
    seg = int.from_bytes(data[:2], "big") % 1601
    payload = data[3:]
    for vnet in (True, False):
        dec = Decapsulator(vnet=vnet)
        dec.feed(memoryview(payload), seg)
        for iov in dec.flush():
            parts = [bytes(b) for b in iov]
            pkt = b"".join(parts[1:]) if vnet else b"".join(parts)
            assert header_length(pkt) >= 20, pkt[:24].hex()
            assert (pkt[2] << 8 | pkt[3]) == len(pkt) and pkt[8] >= 1
            if vnet:
                assert VNET_HDR.unpack(parts[0])[1] in (0, 1)
    # The send path's documented preconditions, checked by the worker before it calls
    # them: a full IPv4 header and a TTL above 1.
    if len(payload) < 20 or payload[8] <= 1:
        return
    segment_tcp4(memoryview(payload), (data[2] << 3) + 1)
    prepare_single(memoryview(payload), data[2] & 1, data[0] % 80, data[1] % 40)


if __name__ == "__main__":
    run(test_one_input, SEEDS)
