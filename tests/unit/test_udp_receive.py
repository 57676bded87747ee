"""udp data path, receive side (wire -> TUN) and a worker driven in-process."""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loden.udp.csum import BytesLike, residue
from loden.udp.gro import Decapsulator, decapsulate
from loden.udp.packet import header_length
from loden.udp.peers import PeerTable
from loden.udp.tun import VNET_F_NEEDS_CSUM, VNET_GSO_TCPV4, VNET_HDR, VNET_PLAIN
from loden.udp.worker import Worker
from tests.fixtures.frames import TCP_ACK, TCP_PSH, check_packet, tcp_packet, udp_packet

SRC = bytes([10, 9, 1, 2])
DST = bytes([10, 9, 2, 2])
MSS = 1420


def flow(n: int, *, start: int = 5000, size: int = MSS) -> list[bytes]:
    return [
        tcp_packet(SRC, DST, os.urandom(size), seq=start + i * size, ident=i, ttl=62)
        for i in range(n)
    ]


def join(iov: list[BytesLike]) -> bytes:
    return b"".join(bytes(b) for b in iov)


def test_segments_of_one_flow_become_one_super_packet() -> None:
    pkts = flow(10) + [
        tcp_packet(
            SRC, DST, b"tail", seq=5000 + 10 * MSS, ttl=62, flags=TCP_ACK | TCP_PSH, ident=10
        )
    ]
    writes = decapsulate(b"".join(pkts[:10]), len(pkts[0]))
    writes += decapsulate(pkts[10])
    assert len(writes) == 2
    vnet = VNET_HDR.unpack(bytes(writes[0][0]))
    assert vnet == (VNET_F_NEEDS_CSUM, VNET_GSO_TCPV4, 52, MSS, 20, 16)
    sup = join(writes[0][1:])
    assert header_length(sup) == 20 and len(sup) == 52 + 10 * MSS
    assert sup[8] == 61  # TTL decremented once
    # The TCP checksum field holds the pseudo-header sum the kernel completes.
    pseudo = (residue(SRC) + residue(DST) + 6 + len(sup) - 20) % 0xFFFF
    assert int.from_bytes(sup[36:38], "big") % 0xFFFF == pseudo
    assert sup[52:] == b"".join(p[52:] for p in pkts[:10])
    # The lone PSH segment after the batch is a plain write.
    assert writes[1][0] == VNET_PLAIN and check_packet(join(writes[1][1:])).ttl == 61


def test_run_breaks_on_gap_flow_change_and_short_segment() -> None:
    a = flow(3)
    gap = flow(2, start=5000 + 4 * MSS)
    other = [tcp_packet(SRC, DST, os.urandom(MSS), sport=1, seq=9, ttl=62)]
    short = flow(1, start=5000 + 6 * MSS, size=100)
    after = flow(1, start=5000 + 6 * MSS + 100)
    dec = Decapsulator(vnet=True)
    for p in a + gap + other + short + after:
        dec.feed(memoryview(p), 0)
    writes = dec.flush()
    kinds = [VNET_HDR.unpack(bytes(w[0]))[1] for w in writes]
    sizes = [len(join(w[1:])) for w in writes]
    # The other flow ends the second run; a short segment cannot start a run that
    # full-size segments then join (gso_size is the first segment's size).
    assert kinds == [1, 1, 0, 0, 0]
    assert sizes == [52 + 3 * MSS, 52 + 2 * MSS, 52 + MSS, 52 + 100, 52 + MSS]


def test_psh_closes_run_and_is_kept() -> None:
    pkts = flow(3)
    last = bytearray(pkts[2])
    pkts[2] = tcp_packet(
        SRC, DST, bytes(last[52:]), seq=5000 + 2 * MSS, ident=2, ttl=62, flags=TCP_ACK | TCP_PSH
    )
    writes = decapsulate(b"".join(pkts), len(pkts[0]))
    assert len(writes) == 1
    assert join(writes[0][1:])[33] == TCP_ACK | TCP_PSH


def test_non_tcp_and_ttl() -> None:
    u = udp_packet(SRC, DST, b"x" * 64, ttl=2)
    dying = udp_packet(SRC, DST, b"x" * 64, ttl=1)
    dead = udp_packet(SRC, DST, b"x" * 64, ttl=0)
    dec = Decapsulator(vnet=True)
    for p in (u, dying, dead, b"\x45\x00\x00", b""):
        dec.feed(memoryview(p), 0)
    writes = dec.flush()
    assert len(writes) == 1 and check_packet(join(writes[0][1:])).ttl == 1
    assert dec.dropped == 4
    plain = decapsulate(b"".join(flow(3)), 52 + MSS, vnet=False)
    assert len(plain) == 3 and all(check_packet(join(w)).ttl == 61 for w in plain)


def assert_writes_valid(writes: list[list[BytesLike]]) -> None:
    """Every write is a virtio header plus one well-formed IPv4 packet with TTL >= 1."""
    for iov in writes:
        hdr = VNET_HDR.unpack(bytes(iov[0]))
        pkt = join(iov[1:])
        assert header_length(pkt) >= 20, pkt[:20].hex()
        assert pkt[8] >= 1
        assert (pkt[2] << 8 | pkt[3]) == len(pkt)
        if hdr[1] == VNET_GSO_TCPV4:
            assert pkt[9] == 6 and hdr[2] == 20 + (pkt[32] >> 4) * 4 and hdr[3] > 0
        else:
            assert hdr == (0, 0, 0, 0, 0, 0)


@settings(max_examples=300)
@given(st.binary(max_size=3000), st.integers(0, 1600))
def test_arbitrary_bytes_never_raise_or_leak(data: bytes, seg: int) -> None:
    dec = Decapsulator(vnet=True)
    dec.feed(memoryview(data), seg)
    writes = dec.flush()
    assert_writes_valid(writes)


@st.composite
def mixed_batches(draw: st.DrawFn) -> tuple[bytes, int]:
    """Valid segments of a flow, some corrupted, cut at a fixed datagram size."""
    n = draw(st.integers(1, 12))
    size = draw(st.sampled_from([8, 100, 500]))
    pkts = [bytearray(p) for p in flow(n, size=size)]
    for p in pkts:
        action = draw(st.integers(0, 9))
        if action == 0:
            p[draw(st.integers(0, len(p) - 1))] ^= 1 << draw(st.integers(0, 7))
        elif action == 1:
            p[8] = draw(st.integers(0, 2))
    return b"".join(bytes(p) for p in pkts), 52 + size


@settings(max_examples=200)
@given(mixed_batches())
def test_corrupted_segments_never_produce_invalid_writes(batch: tuple[bytes, int]) -> None:
    data, seg = batch
    writes = decapsulate(data, seg)
    assert_writes_valid(writes)
    for iov in writes:
        pkt = join(iov[1:])
        if VNET_HDR.unpack(bytes(iov[0]))[1] == 0:
            assert pkt[8] >= 1


# -- a worker in-process: a SOCK_SEQPACKET pair stands in for the TUN ------------------


@pytest.fixture(params=[True, False], ids=["c-loops", "python-loops"])
def rig(request: pytest.FixtureRequest) -> Iterator[tuple[Worker, socket.socket, socket.socket]]:
    tun_kernel, tun_worker = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    wsock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    wsock.bind(("127.0.0.1", 0))
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    peer.settimeout(2)
    tun_kernel.settimeout(2)
    worker = Worker(
        tun=os.dup(tun_worker.fileno()),
        sock=wsock,
        vnet=True,
        tun_addr=IPv4Address("10.9.1.0"),
        port=peer.getsockname()[1],
        fast=request.param,
    )
    assert worker.fast == request.param
    os.set_blocking(worker.tun or 0, False)
    worker.set_table(
        PeerTable.build(
            [(IPv4Network("10.9.2.0/24"), IPv4Address("127.0.0.1"))], peer.getsockname()[1]
        )
    )
    try:
        yield worker, tun_kernel, peer
    finally:
        for s in (tun_kernel, tun_worker, wsock, peer):
            s.close()
        if worker.tun is not None:
            os.close(worker.tun)


def test_worker_tun_to_wire_batches_equal_sizes(
    rig: tuple[Worker, socket.socket, socket.socket],
) -> None:
    worker, tun, peer = rig
    pkts = [udp_packet(SRC, DST, os.urandom(64), ident=i) for i in range(5)]
    for p in pkts:
        tun.send(VNET_PLAIN + p)
    worker.from_tun()
    got = [peer.recv(2000) for _ in pkts]
    assert [check_packet(g).ttl for g in got] == [63] * 5
    assert [g[20:] for g in got] == [p[20:] for p in pkts]
    assert worker.stats["tx_sends"] == 1 and worker.stats["tx_datagrams"] == 5


def test_worker_no_route_answers_icmp(rig: tuple[Worker, socket.socket, socket.socket]) -> None:
    worker, tun, _ = rig
    tun.send(VNET_PLAIN + udp_packet(SRC, bytes([10, 9, 7, 7]), b"x"))
    worker.from_tun()
    reply = tun.recv(2000)
    icmp = check_packet(reply[10:])
    assert icmp.proto == 1 and icmp.dst == SRC and icmp.src == bytes([10, 9, 1, 0])


def test_worker_wire_to_tun(rig: tuple[Worker, socket.socket, socket.socket]) -> None:
    worker, tun, peer = rig
    pkts = flow(4)
    for p in pkts:
        peer.sendto(p, worker.sock.getsockname())
    peer.sendto(b"\x00" * 10, worker.sock.getsockname())
    worker.from_wire()
    frame = tun.recv(70000)
    hdr = VNET_HDR.unpack(frame[:10])
    assert hdr[1] == VNET_GSO_TCPV4 and len(frame) == 10 + 52 + 4 * MSS
    assert worker.stats["rx_dropped"] == 1 and worker.stats["tun_writes"] == 1


def test_worker_control_swaps_table_and_reports() -> None:
    ctl_agent, ctl_worker = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    worker = Worker(
        tun=None, sock=sock, vnet=True, tun_addr=IPv4Address("10.9.1.0"), port=8285, ctl=ctl_worker
    )
    try:
        from loden.udp import peers as codec

        table = PeerTable.build([(IPv4Network("10.9.3.0/24"), IPv4Address("192.0.2.3"))], 8285)
        for msg in codec.encode(table):
            ctl_agent.send(msg)
        assert worker.control()
        assert worker.table.lookup(int(IPv4Address("10.9.3.9"))) == ("192.0.2.3", 8285)
        ctl_agent.send(b"S")
        assert worker.control()
        assert ctl_agent.recv(65536).startswith(b"S{")
        r, w = os.pipe()
        socket.send_fds(ctl_agent, [b"T"], [r])
        assert worker.control() and worker.tun is not None
        os.close(w)
        ctl_agent.close()
        assert not worker.control()
    finally:
        for s in (ctl_agent, ctl_worker, sock):
            s.close()
        if worker.tun is not None:
            os.close(worker.tun)


def test_struct_sizes() -> None:
    assert struct.calcsize("<BBHHHH") == len(VNET_PLAIN) == 10


def drain(sock: socket.socket) -> list[bytes]:
    out = []
    sock.settimeout(0.2)
    try:
        while True:
            out.append(sock.recv(70000))
    except TimeoutError:
        return out


def test_worker_mixed_traffic_both_ways(
    rig: tuple[Worker, socket.socket, socket.socket],
) -> None:
    """Plain packets, TTL 1, no route and a TCP flow, through the C or the Python loops:
    the same datagrams and TUN writes, in order, with the same counters."""
    worker, tun, peer = rig
    far = bytes([10, 9, 7, 7])
    frames = [
        udp_packet(SRC, DST, b"a" * 64, ident=1),
        udp_packet(SRC, DST, b"b" * 64, ident=2),
        udp_packet(SRC, DST, b"c" * 30, ident=3),  # shorter: closes the run
        udp_packet(SRC, DST, b"d" * 64, ident=4, ttl=1),  # dropped
        udp_packet(SRC, far, b"e" * 8, ident=5),  # no route: ICMP back to the TUN
        udp_packet(SRC, DST, b"f" * 64, ident=6),
    ]
    for f in frames:
        tun.send(VNET_PLAIN + f)
    worker.from_tun()
    sent = drain(peer)
    assert [g[20:] for g in sent] == [frames[i][20:] for i in (0, 1, 2, 5)]
    assert all(check_packet(g).ttl == 63 for g in sent)
    icmp = check_packet(drain(tun)[0][10:])
    assert icmp.proto == 1 and icmp.dst == SRC
    stats = worker.stats
    assert (stats["ttl_drops"], stats["no_route"], stats["tx_datagrams"]) == (1, 1, 4)
    # Wire -> TUN: a UDP packet, a pure ACK, a flow of 3 segments, a PSH segment, garbage.
    ack = tcp_packet(DST, SRC, b"", seq=1, ident=9, ttl=62)
    wire = [
        udp_packet(DST, SRC, b"u" * 64, ident=7, ttl=62),
        ack,
        *flow(3),
        tcp_packet(SRC, DST, b"p" * 100, seq=5000 + 3 * MSS, flags=TCP_ACK | TCP_PSH, ttl=62),
        b"\x45" + b"\x00" * 30,
    ]
    for w in wire:
        peer.sendto(w, worker.sock.getsockname())
    worker.from_wire()
    got = drain(tun)
    assert check_packet(got[0][10:]).ttl == 61 and got[0][10 + 20 :] == wire[0][20:]
    assert got[1][10 + 20 :] == ack[20:]
    hdr = VNET_HDR.unpack(got[2][:10])
    assert hdr[1] == VNET_GSO_TCPV4 and len(got[2]) == 10 + 52 + 3 * MSS + 100
    assert len(got) == 3
    assert worker.stats["rx_dropped"] == 1


def test_worker_run_loop_serves_until_control_closes(
    rig: tuple[Worker, socket.socket, socket.socket],
) -> None:
    """The event loop (C ``serve`` or the Python one) forwards both ways, hands a no-route
    frame back for an ICMP reply, applies a control message, and exits on EOF."""
    import threading

    worker, tun, peer = rig
    ctl_agent, ctl_worker = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    worker.ctl = ctl_worker
    runner = threading.Thread(target=worker.run, daemon=True)
    runner.start()
    try:
        tun.send(VNET_PLAIN + udp_packet(SRC, DST, b"a" * 64, ident=1))
        assert peer.recv(2000)[20:] == udp_packet(SRC, DST, b"a" * 64, ident=1)[20:]
        tun.send(VNET_PLAIN + udp_packet(SRC, bytes([10, 9, 7, 7]), b"x"))
        assert check_packet(tun.recv(2000)[10:]).proto == 1
        peer.sendto(udp_packet(DST, SRC, b"b" * 64, ttl=9), worker.sock.getsockname())
        assert check_packet(tun.recv(2000)[10:]).ttl == 8
        peer.sendto(b"".join(flow(2)), worker.sock.getsockname())  # one datagram, 2 packets
        frame = tun.recv(70000)
        assert check_packet(frame[10:]).ttl == 61
        ctl_agent.send(b"S")
        assert ctl_agent.recv(65536).startswith(b"S{")
    finally:
        ctl_agent.close()
        runner.join(5)
        ctl_worker.close()
    assert not runner.is_alive()
    assert worker.stats["no_route"] == 1 and worker.stats["tx_datagrams"] >= 1


def test_worker_finishes_partial_checksums(
    rig: tuple[Worker, socket.socket, socket.socket],
) -> None:
    """A pod's UDP with checksum offload reaches the TUN as NEEDS_CSUM with the
    pseudo-header sum in the field: the datagram on the wire carries the full checksum."""
    from loden.udp.csum import fold, pseudo_header

    worker, tun, peer = rig
    sent = []
    for i, size in enumerate((64, 64, 31)):
        pkt = bytearray(udp_packet(SRC, DST, os.urandom(size), ident=i))
        pkt[26:28] = fold(pseudo_header(SRC, DST, 17, len(pkt) - 20)).to_bytes(2, "big")
        tun.send(VNET_HDR.pack(VNET_F_NEEDS_CSUM, 0, 0, 0, 20, 6) + bytes(pkt))
        sent.append(udp_packet(SRC, DST, bytes(pkt[28:]), ident=i))
    worker.from_tun()
    got = drain(peer)
    assert [check_packet(g).ttl for g in got] == [63, 63, 63]
    assert [g[20:] for g in got] == [s[20:] for s in sent]


def test_worker_big_plain_frames_never_overrun_a_run(
    rig: tuple[Worker, socket.socket, socket.socket],
) -> None:
    """Two 40 KB plain packets to one peer cannot share a 64 KB UDP_SEGMENT send."""
    worker, tun, peer = rig
    big = [udp_packet(SRC, DST, os.urandom(40000), ident=i) for i in range(3)]
    tun.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    for b in big:
        tun.send(VNET_PLAIN + b)
    worker.from_tun()
    got = drain(peer)
    assert [g[20:] for g in got] == [b[20:] for b in big]
    assert worker.stats["tx_sends"] == 3
