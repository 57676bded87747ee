"""udp data path micro-benchmark: Loden's worker vs a naive per-packet loop, in-process.

No namespaces: a ``SOCK_SEQPACKET`` socket pair stands in for the TUN (one message per
packet, like a TUN fd) and UDP sockets on 127.0.0.1 for the wire. Each case runs the
Loden worker code and a naive reference (one read/sendto or recvfrom/write per packet,
TTL patched in Python, as flannel's C proxy does it) on the same packets, alternating,
and prints the best of the rounds for each plus their ratio:

* ``tun->wire small``: 92-byte UDP packets read from the "TUN" and sent (packets/s);
* ``wire->tun small``: the same packets received and written (packets/s);
* ``wire->tun tcp``: full-size TCP segments of one flow, sent with UDP_SEGMENT so
  they arrive as GRO batches, coalesced into super-packet writes (MB/s);
* ``tun->wire tso``: 64 KB TCP super-packets segmented and checksummed in Python
  (the ``tso`` option) vs the same bytes as per-segment reads (MB/s).

Run: ``.venv/bin/python bench/udp_datapath.py [--packets 4000] [--rounds 5]``.
"""

from __future__ import annotations

import argparse
import os
import socket
import struct
import sys
import time
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.fixtures.frames import tcp_packet, udp_packet

from loden.udp.peers import PeerTable
from loden.udp.sockets import SOL_UDP, UDP_GRO, UDP_SEGMENT
from loden.udp.tun import VNET_GSO_TCPV4, VNET_HDR, VNET_PLAIN
from loden.udp.worker import Worker

SRC, DST = bytes([10, 9, 1, 2]), bytes([10, 9, 2, 2])
MSS = 1420
BUF = 64 << 20


class Rig:
    """A worker wired to a fake TUN and two loopback UDP sockets."""

    def __init__(self) -> None:
        self.tun_kernel, self.tun_worker = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for s in (self.tun_kernel, self.tun_worker):
            self._bufs(s)
        self.wsock = self._udp()
        self.wsock.setsockopt(SOL_UDP, UDP_GRO, 1)
        self.peer = self._udp()
        port = self.peer.getsockname()[1]
        self.worker = Worker(
            tun=self.tun_worker.fileno(),
            sock=self.wsock,
            vnet=True,
            tun_addr=IPv4Address("10.9.1.0"),
            port=port,
        )
        self.worker.set_table(
            PeerTable.build([(IPv4Network("10.9.2.0/24"), IPv4Address("127.0.0.1"))], port)
        )
        self.tun_worker.setblocking(False)

    @staticmethod
    def _bufs(s: socket.socket) -> None:
        for force, plain in ((33, socket.SO_RCVBUF), (32, socket.SO_SNDBUF)):
            try:
                s.setsockopt(socket.SOL_SOCKET, force, BUF)
            except PermissionError:
                s.setsockopt(socket.SOL_SOCKET, plain, BUF)

    @classmethod
    def _udp(cls) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        cls._bufs(s)
        s.bind(("127.0.0.1", 0))
        return s

    def drain(self, sock: socket.socket) -> int:
        n = 0
        while True:
            try:
                sock.recv(70000, socket.MSG_DONTWAIT)
                n += 1
            except BlockingIOError:
                return n

    def close(self) -> None:
        for s in (self.tun_kernel, self.tun_worker, self.wsock, self.peer):
            s.close()


def naive_ttl(buf: bytearray) -> None:
    buf[8] -= 1
    c = ((buf[10] << 8) | buf[11]) + 0x100
    c = (c & 0xFFFF) + (c >> 16)
    buf[10], buf[11] = c >> 8, c & 0xFF


def timed(fn: Callable[[], int]) -> tuple[float, int]:
    start = time.perf_counter()
    units = fn()
    return time.perf_counter() - start, units


#: A unix datagram socket queues at most net.unix.max_dgram_qlen (512) messages.
CHUNK = 400


def chunked(
    case: Callable[[Rig, list[bytes], bool], tuple[float, int]],
) -> Callable[[Rig, list[bytes], bool], tuple[float, int]]:
    def run(rig: Rig, items: list[bytes], naive: bool) -> tuple[float, int]:
        seconds = 0.0
        units = 0
        for i in range(0, len(items), CHUNK):
            t, u = case(rig, items[i : i + CHUNK], naive)
            seconds += t
            units += u
        return seconds, units

    return run


def _tun_to_wire(rig: Rig, frames: list[bytes], naive: bool) -> tuple[float, int]:
    for f in frames:
        rig.tun_kernel.send(f)
    fd = rig.tun_worker.fileno()
    dst = ("127.0.0.1", rig.peer.getsockname()[1])

    def loden() -> int:
        before = rig.worker.stats["tun_bytes"]
        while True:
            n = rig.worker.stats["tun_reads"]
            rig.worker.from_tun()
            if rig.worker.stats["tun_reads"] == n:
                return rig.worker.stats["tun_bytes"] - before

    def reference() -> int:
        total = 0
        while True:
            try:
                frame = os.read(fd, 70000)
            except BlockingIOError:
                return total
            pkt = bytearray(frame[10:])
            naive_ttl(pkt)
            rig.wsock.sendto(pkt, dst)
            total += len(frame)

    res = timed(reference if naive else loden)
    rig.drain(rig.peer)
    return res


def _wire_to_tun(rig: Rig, packets: list[bytes], naive: bool) -> tuple[float, int]:
    dst = rig.wsock.getsockname()
    gso = len(packets[0]) if len(packets[0]) > 1000 else 0
    if gso:
        for i in range(0, len(packets), 40):
            rig.peer.sendmsg(
                packets[i : i + 40], [(SOL_UDP, UDP_SEGMENT, struct.pack("H", gso))], 0, dst
            )
    else:
        for p in packets:
            rig.peer.sendto(p, dst)
    fd = rig.tun_worker.fileno()

    def loden() -> int:
        before = rig.worker.stats["rx_bytes"]
        while True:
            n = rig.worker.stats["rx_calls"]
            rig.worker.from_wire()
            if rig.worker.stats["rx_calls"] == n:
                return rig.worker.stats["rx_bytes"] - before

    def reference() -> int:
        total = 0
        while True:
            try:
                data, anc, _f, _a = rig.wsock.recvmsg(70000, 64, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return total
            seg = len(data)
            for level, kind, value in anc:
                if level == SOL_UDP and kind == UDP_GRO:
                    seg = struct.unpack("i", value)[0]
            for off in range(0, len(data), seg):  # one write per packet
                pkt = bytearray(data[off : off + seg])
                naive_ttl(pkt)
                os.writev(fd, [VNET_PLAIN, pkt])
            total += len(data)

    res = timed(reference if naive else loden)
    rig.drain(rig.tun_kernel)
    return res


def run(packets: int, rounds: int) -> dict[str, tuple[float, float, str]]:
    """{case: (loden units/s, naive units/s, unit)} (best of ``rounds``)."""
    small = [udp_packet(SRC, DST, os.urandom(64), ident=i) for i in range(packets)]
    segs = [
        tcp_packet(SRC, DST, os.urandom(MSS), seq=1000 + i * MSS, ident=i, ttl=63)
        for i in range(packets)
    ]
    nsup = max(1, packets // 44)
    sup = [
        tcp_packet(SRC, DST, os.urandom(MSS * 44), seq=1000 + i * MSS * 44, ttl=64)
        for i in range(nsup)
    ]
    tso_frames = [VNET_HDR.pack(1, VNET_GSO_TCPV4, 52, MSS, 20, 16) + p for p in sup]
    split_frames = [
        VNET_PLAIN
        + tcp_packet(SRC, DST, p[52 + j * MSS : 52 + (j + 1) * MSS], seq=1000 + j * MSS, ttl=64)
        for p in sup
        for j in range(44)
    ]
    tun_to_wire, wire_to_tun = chunked(_tun_to_wire), chunked(_wire_to_tun)
    small_frames = [VNET_PLAIN + p for p in small]
    cases: dict[str, Callable[[Rig, bool], tuple[float, int]]] = {
        "tun->wire small": lambda r, n: tun_to_wire(r, small_frames, n),
        "wire->tun small": lambda r, n: wire_to_tun(r, small, n),
        "wire->tun tcp": lambda r, n: wire_to_tun(r, segs, n),
        "tun->wire tso": lambda r, n: tun_to_wire(r, split_frames if n else tso_frames, False),
    }
    units = {
        "tun->wire small": "pkt/s",
        "wire->tun small": "pkt/s",
        "wire->tun tcp": "MB/s",
        "tun->wire tso": "MB/s",
    }
    results: dict[str, tuple[float, float, str]] = {}
    rig = Rig()
    try:
        for name, case in cases.items():
            best = [0.0, 0.0]
            for _ in range(rounds):
                for i, naive in enumerate((False, True)):
                    seconds, nbytes = case(rig, naive)
                    rate = packets / seconds if units[name] == "pkt/s" else nbytes / seconds / 1e6
                    best[i] = max(best[i], rate)
            results[name] = (best[0], best[1], units[name])
    finally:
        rig.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--packets", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(f"{args.packets} packets per case, best of {args.rounds} rounds (alternating)")
    print("(tun->wire tso: 'naive' column = the same bytes read one segment per frame)")
    for name, (loden, naive, unit) in run(args.packets, args.rounds).items():
        print(
            f"  {name:16s} loden {loden:12,.0f} {unit:5s}  naive {naive:12,.0f} {unit:5s}"
            f"  ratio {loden / naive:5.2f}x"
        )


if __name__ == "__main__":
    main()
