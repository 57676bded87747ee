"""Fuzzing a udp-backend worker through its real sockets (chaos issue, scenario 9).

The codec-level properties (any bytes into the Decapsulator give only well-formed
writes) are in test_udp_receive.py. Here a whole :class:`~loden.udp.worker.Worker`
runs in-process, with a SOCK_SEQPACKET pair standing in for the TUN and real UDP
sockets on 127.0.0.1: anyone on the underlay can send any datagram to port 8285, and
the worker must neither raise nor write anything but well-formed IPv4 packets with a
live TTL towards the pods; frames from the TUN side (what pods sent, after the host's
routing) may be anything too and only ever leave towards a known peer.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from ipaddress import IPv4Address, IPv4Network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loden.udp.packet import header_length
from loden.udp.peers import PeerTable
from loden.udp.tun import VNET_HDR, VNET_PLAIN
from loden.udp.worker import Worker
from tests.fixtures.frames import tcp_packet, udp_packet

SRC = bytes([10, 9, 1, 2])
DST = bytes([10, 9, 2, 2])
PEER_NET = IPv4Network("10.9.2.0/24")

VALID = st.one_of(
    st.binary(max_size=600).map(lambda p: udp_packet(SRC, DST, p, ttl=64)),
    st.binary(max_size=1400).map(lambda p: tcp_packet(SRC, DST, p, seq=1, ttl=64)),
)


def corrupt(data: bytes, flips: list[tuple[int, int]]) -> bytes:
    buf = bytearray(data)
    for index, bit in flips:
        if buf:
            buf[index % len(buf)] ^= 1 << bit
    return bytes(buf)


PACKETS = st.one_of(
    st.binary(max_size=1500),
    VALID,
    st.builds(
        corrupt, VALID, st.lists(st.tuples(st.integers(0, 1500), st.integers(0, 7)), max_size=3)
    ),
    VALID.map(lambda p: p[: len(p) // 2]),
)


@contextmanager
def worker_rig(fast: bool) -> Iterator[tuple[Worker, socket.socket, socket.socket]]:
    tun_kernel, tun_worker = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    wsock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    wsock.bind(("127.0.0.1", 0))
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    worker = Worker(
        tun=os.dup(tun_worker.fileno()),
        sock=wsock,
        vnet=True,
        tun_addr=IPv4Address("10.9.1.0"),
        port=peer.getsockname()[1],
        fast=fast,
    )
    os.set_blocking(worker.tun or 0, False)
    for s in (tun_kernel, peer, wsock):
        s.setblocking(False)
    worker.set_table(PeerTable.build([(PEER_NET, IPv4Address("127.0.0.1"))], peer.getsockname()[1]))
    try:
        yield worker, tun_kernel, peer
    finally:
        for s in (tun_kernel, tun_worker, wsock, peer):
            s.close()
        if worker.tun is not None:
            os.close(worker.tun)


def drain(sock: socket.socket) -> list[bytes]:
    out: list[bytes] = []
    for _ in range(1000):
        try:
            out.append(sock.recv(70000))
        except BlockingIOError:
            break
    return out


def well_formed(pkt: bytes) -> bool:
    return header_length(pkt) >= 20 and (pkt[2] << 8 | pkt[3]) == len(pkt) and pkt[8] >= 1


#: The C loops (when built) and the Python ones parse the same untrusted input.
LOOPS = pytest.mark.parametrize("fast", [True, False], ids=["c-loops", "python-loops"])


@LOOPS
@settings(max_examples=200, deadline=None)
@given(st.lists(PACKETS, min_size=1, max_size=12))
def test_any_datagram_from_the_underlay_reaches_pods_only_well_formed(
    fast: bool, datagrams: list[bytes]
) -> None:
    with worker_rig(fast) as (worker, tun, peer):
        target = worker.sock.getsockname()
        for data in datagrams:
            peer.sendto(data, target)
        worker.from_wire()
        for frame in drain(tun):
            hdr = VNET_HDR.unpack(frame[:10])
            pkt = frame[10:]
            assert well_formed(pkt), pkt[:24].hex()
            assert hdr[1] in (0, 1), hdr  # plain, or a TCPv4 super-packet


@LOOPS
@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([VNET_PLAIN]) | st.binary(min_size=10, max_size=10),
            PACKETS,
        ),
        min_size=1,
        max_size=12,
    )
)
def test_any_frame_from_the_tun_leaves_only_towards_a_known_peer(
    fast: bool, frames: list[tuple[bytes, bytes]]
) -> None:
    with worker_rig(fast) as (worker, tun, peer):
        for vnet, pkt in frames:
            tun.send(vnet + pkt)
        worker.from_tun()
        for datagram in drain(peer):  # only the peer's socket can receive anything
            assert datagram[:1] and datagram[0] >> 4 == 4, datagram[:20].hex()
            assert IPv4Address(datagram[16:20]) in PEER_NET
        for reply in drain(tun):  # ICMP errors back to the pods, well formed
            assert well_formed(reply[10:]), reply[:30].hex()
