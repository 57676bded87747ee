"""The C loops of the udp data path (src/loden/udp/_fastpath.c) against the Python ones.

Differential: the same inputs through both must give byte-identical results, so every
wire-format test written against one holds for the other.
"""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loden.udp import gro, gso
from loden.udp.csum import BytesLike
from loden.udp.native import native
from tests.fixtures.frames import TCP_ACK, TCP_PSH, tcp_packet, udp_packet

SRC = bytes([10, 9, 1, 2])
DST = bytes([10, 9, 2, 2])


def test_extension_is_built() -> None:
    """scripts/install-deps.sh installs a compiler, so the C loops must be in use; a
    silent fallback to Python would cost ~2x udp throughput."""
    assert gso.segment_tcp4 is not gso.segment_tcp4_py
    assert gro.GRO_SCAN is not None


def flat(writes: list[list[BytesLike]]) -> list[bytes]:
    return [b"".join(bytes(b) for b in iov) for iov in writes]


@settings(max_examples=150, deadline=None)
@given(
    mss=st.integers(min_value=1, max_value=1500),
    plen=st.integers(min_value=1, max_value=9000),
    seq=st.integers(min_value=0, max_value=0xFFFFFFFF),
    ident=st.integers(min_value=0, max_value=0xFFFF),
    flags=st.sampled_from([TCP_ACK, TCP_ACK | TCP_PSH, TCP_ACK | TCP_PSH | 0x81, 0xFF]),
    topts=st.sampled_from([b"", b"\x01\x01\x01\x01", b"\x01" * 12]),
    ttl=st.integers(min_value=2, max_value=255),
)
def test_segment_same_bytes_as_python(
    mss: int, plen: int, seq: int, ident: int, flags: int, topts: bytes, ttl: int
) -> None:
    sup = tcp_packet(
        SRC, DST, os.urandom(plen), seq=seq, ident=ident, flags=flags, options=topts, ttl=ttl
    )
    want = gso.segment_tcp4_py(memoryview(sup), mss)
    got = gso.segment_tcp4(memoryview(sup), mss)
    assert want is not None and got is not None
    assert got[1:] == want[1:]
    assert [bytes(b) for b in got[0]] == [bytes(b) for b in want[0]]


@settings(max_examples=200)
@given(st.binary(max_size=200), st.integers(0, 100))
def test_segment_rejects_what_python_rejects(data: bytes, mss: int) -> None:
    want = gso.segment_tcp4_py(memoryview(data), mss)
    got = gso.segment_tcp4(memoryview(data), mss)
    assert (got is None) == (want is None)
    if got is not None and want is not None:
        assert [bytes(b) for b in got[0]] == [bytes(b) for b in want[0]]


@st.composite
def batches(draw: st.DrawFn) -> tuple[bytes, int]:
    """Segments of one or two flows with gaps, PSH, short tails and corruption."""
    size = draw(st.sampled_from([8, 100, 1420]))
    out: list[bytearray] = []
    seq = draw(st.integers(0, 0xFFFFFFFF))
    for i in range(draw(st.integers(1, 30))):
        plen = size if draw(st.integers(0, 7)) else draw(st.integers(1, size))
        flags = TCP_ACK | (TCP_PSH if not draw(st.integers(0, 9)) else 0)
        sport = 40000 if draw(st.integers(0, 5)) else 40001
        pkt = bytearray(
            tcp_packet(SRC, DST, bytes(plen), seq=seq, ident=i, flags=flags, sport=sport, ttl=62)
        )
        seq = (seq + plen + (0 if draw(st.integers(0, 9)) else 1)) & 0xFFFFFFFF
        action = draw(st.integers(0, 12))
        if action == 0:
            pkt[draw(st.integers(0, len(pkt) - 1))] ^= 1 << draw(st.integers(0, 7))
        elif action == 1:
            pkt[8] = draw(st.integers(0, 2))
        out.append(pkt + bytes(52 + size - len(pkt)))  # pad to the datagram size
    return b"".join(bytes(p) for p in out), 52 + size


@settings(max_examples=300, deadline=None)
@given(batches())
def test_gro_scan_same_writes_as_python(batch: tuple[bytes, int]) -> None:
    data, seg = batch
    want = gro.decapsulate(data, seg, scan=None)
    got = gro.decapsulate(data, seg)
    assert flat(got) == flat(want)


@settings(max_examples=300)
@given(st.binary(max_size=3000), st.integers(0, 1600))
def test_gro_scan_arbitrary_bytes(data: bytes, seg: int) -> None:
    assert flat(gro.decapsulate(data, seg)) == flat(gro.decapsulate(data, seg, scan=None))


def test_gro_scan_checks_its_arguments() -> None:
    scan = gro.GRO_SCAN
    assert scan is not None
    with pytest.raises(ValueError, match="shorter than stated"):
        scan(b"", memoryview(b""), 0, 10, 10, b"x" * 52, 52, 0, 1, 0, 100, [])
    with pytest.raises(ValueError, match="bad header length"):
        scan(b"", memoryview(b""), 0, 0, 0, b"x" * 52, 52, 0, 1, 0, 100, [])


# -- the forwarding loops: named counters, checked arguments, one caller at a time --------


@pytest.fixture
def tun_and_sock() -> Iterator[tuple[int, int, socket.socket]]:
    """A pipe standing in for the TUN (read end, write end) and a UDP socket."""
    rfd, wfd = os.pipe()
    os.set_blocking(rfd, False)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        yield rfd, wfd, sock
    finally:
        sock.close()
        os.close(rfd)
        os.close(wfd)


def test_counters_are_named(tun_and_sock: tuple[int, int, socket.socket]) -> None:
    rfd, wfd, sock = tun_and_sock
    os.write(wfd, b"\x60" + bytes(39))  # not IPv4: counted as bad_from_tun
    counts, err, special = native.tun_to_wire(rfd, sock.fileno(), 0, [], 8285, 4)
    assert isinstance(counts, native.Counters)
    assert (counts.tun_reads, counts.tun_bytes, counts.bad_from_tun) == (1, 40, 1)
    assert err == 0 and special is None
    assert counts.__match_args__[0] == "tun_reads" and len(counts.__match_args__) == 13


@pytest.mark.parametrize(
    ("groups", "error", "message"),
    [
        ({}, TypeError, "list of"),
        ([(0xFFFFFF00,)], TypeError, "list of"),
        ([("255.255.255.0", {})], TypeError, "list of"),
        ([(-1, {})], ValueError, "32-bit"),
        ([(1 << 32, {})], ValueError, "32-bit"),
        ([(1 << 70, {})], ValueError, "32-bit"),
        ([(0, {})] * 34, ValueError, "at most 33"),
    ],
)
def test_groups_are_checked(
    tun_and_sock: tuple[int, int, socket.socket], groups: object, error: type, message: str
) -> None:
    rfd, _wfd, sock = tun_and_sock
    with pytest.raises(error, match=message):
        native.tun_to_wire(rfd, sock.fileno(), 0, groups, 8285, 4)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("peer", "error", "message"),
    [
        ("10.0.0.2", TypeError, "IPv4 address"),
        (-1, ValueError, "32-bit"),
        (1 << 40, ValueError, "32-bit"),
    ],
)
def test_peer_values_are_checked(
    tun_and_sock: tuple[int, int, socket.socket], peer: object, error: type, message: str
) -> None:
    """A table value that is no IPv4 address raises; it was read as a garbage address
    (or -1, "no route", with an exception left pending) before."""
    rfd, wfd, sock = tun_and_sock
    os.write(wfd, udp_packet(SRC, DST, b"x", ttl=5))
    groups = [(0xFFFFFF00, {0x0A090200: peer})]
    with pytest.raises(error, match=message):
        native.tun_to_wire(rfd, sock.fileno(), 0, groups, 8285, 4)  # type: ignore[arg-type]


def test_port_is_checked(tun_and_sock: tuple[int, int, socket.socket]) -> None:
    rfd, _wfd, sock = tun_and_sock
    with pytest.raises(ValueError, match="port"):
        native.tun_to_wire(rfd, sock.fileno(), 0, [], 70000, 4)


def test_a_second_caller_is_refused_while_serve_runs(
    tun_and_sock: tuple[int, int, socket.socket],
) -> None:
    """serve() drops the GIL while it waits; another thread calling in meanwhile must get
    an error, not a share of the static buffers."""
    rfd, _wfd, sock = tun_and_sock
    ctl_r, ctl_w = os.pipe()
    ep = select.epoll()
    ep.register(ctl_r, select.EPOLLIN)
    result: list[tuple[object, int, object]] = []
    thread = threading.Thread(
        target=lambda: result.append(
            native.serve(ep.fileno(), ctl_r, rfd, sock.fileno(), 0, [], 8285, 4, 1 << 16)
        )
    )
    try:
        thread.start()
        deadline = time.monotonic() + 5
        refused = False
        while not refused and time.monotonic() < deadline:
            try:
                native.wire_to_tun(sock.fileno(), rfd, 0, 0, 0)
            except RuntimeError as exc:
                refused = "not reentrant" in str(exc)
            else:
                time.sleep(0.01)  # serve has not started yet
        assert refused
    finally:
        os.write(ctl_w, b"x")  # a control message ends serve()
        thread.join(5)
        ep.close()
        os.close(ctl_r)
        os.close(ctl_w)
    assert not thread.is_alive()
    counts, kind, _payload = result[0]
    assert kind == 0 and isinstance(counts, native.Counters)
    native.wire_to_tun(sock.fileno(), rfd, 0, 0, 0)  # free again once serve returned
