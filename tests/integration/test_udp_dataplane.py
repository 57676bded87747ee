"""udp backend on real namespaces: traffic, the wire format, interop, repair."""

from __future__ import annotations

import asyncio
import errno
import struct
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from loden.backend.udp import UdpNetwork
from loden.model.lease import EventKind, Lease, LeaseAttrs, LeaseEvent
from tests.fixtures.frames import check_packet
from tests.fixtures.topology import TopologyFactory
from tests.integration.dataplane_support import Cluster

pytestmark = pytest.mark.root

ClusterFactory = Callable[..., Awaitable[Cluster]]


@pytest.fixture
async def make_cluster(make_topology: TopologyFactory) -> AsyncIterator[ClusterFactory]:
    made: list[Cluster] = []

    async def factory(hosts: int = 2, *, start: int | None = None) -> Cluster:
        cluster = Cluster(make_topology(hosts), "udp")
        made.append(cluster)
        if start is None:
            await cluster.start()
        else:
            for i in range(start):
                node = await cluster.start_node(i)
                cluster.nodes.append(node)
                node.pods.append(cluster.topo.add_pod(node.host, node.subnet, mtu=node.network.mtu))
        return cluster

    try:
        yield factory
    finally:
        for cluster in made:
            await cluster.close()


def pcap_udp_payloads(path: Path) -> list[tuple[int, bytes]]:
    """(outer IP total length, UDP payload) of every IPv4/UDP frame in a pcap file."""
    data = path.read_bytes()
    out = []
    off = 24
    while off + 16 <= len(data):
        incl = struct.unpack_from("<I", data, off + 8)[0]
        frame = data[off + 16 : off + 16 + incl]
        off += 16 + incl
        if len(frame) < 42 or frame[12:14] != b"\x08\x00" or frame[23] != 17:
            continue
        ip = frame[14:]
        ihl = (ip[0] & 15) * 4
        total = struct.unpack_from("!H", ip, 2)[0]
        out.append((total, ip[ihl + 8 : total]))
    return out


SERVER = """
import hashlib, socket, sys
s = socket.socket(); s.bind(("0.0.0.0", 7777)); s.listen(1)
print("listening", flush=True)
c, _ = s.accept(); h = hashlib.sha256(); n = 0
while True:
    b = c.recv(1 << 16)
    if not b: break
    h.update(b); n += len(b)
print(n, h.hexdigest(), flush=True)
"""

CLIENT = """
import hashlib, random, socket, sys
data = random.Random(7).randbytes(20 << 20)
s = socket.create_connection((sys.argv[1], 7777), timeout=20); s.sendall(data); s.close()
print(len(data), hashlib.sha256(data).hexdigest())
"""


async def test_udp_traffic_and_wire_format(make_cluster: ClusterFactory) -> None:
    cluster = await make_cluster(2)
    n0, n1 = cluster.nodes
    p0, p1 = n0.pods[0], n1.pods[0]
    assert n0.network.mtu == 1472
    assert n0.host.ns.ip("-o", "link", "show", "flannel0").stdout.count("mtu 1472") == 1
    assert p0.ns.ping(p1.ip, count=2, wait=2) and p1.ns.ping(p0.ip, count=2, wait=2)
    assert n0.host.ns.ping(p1.ip, count=1, wait=2) and n1.host.ns.ping(p0.ip, count=1, wait=2)
    # pod -> the other host's flannel0 address, over the overlay
    assert p1.ns.ping(n0.subnet.network_address, count=1, wait=2)
    # Segment in software before the veth so the capture shows what a wire would carry.
    for node in (n0, n1):
        node.host.ns.run("ethtool", "-K", "eth0", "tx-udp-segmentation", "off")
    pcap = n0.host.state_dir / "udp.pcap"
    dump = n0.host.ns.spawn(
        "tcpdump",
        "-i",
        "eth0",
        "-n",
        "-s",
        "0",
        "-U",
        "-c",
        "3000",
        "-w",
        str(pcap),
        "udp",
        "port",
        "8285",
    )
    deadline = time.monotonic() + 5
    while "listening" not in dump.output() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    server = p1.ns.spawn(sys.executable, "-c", SERVER)
    while "listening" not in server.output() and time.monotonic() < deadline + 5:
        await asyncio.sleep(0.05)
    sent = p0.ns.run(sys.executable, "-c", CLIENT, str(p1.ip), timeout=60).stdout.split()
    server.wait(30)
    assert server.output().split()[-2:] == sent
    dump.wait(15)
    datagrams = pcap_udp_payloads(pcap)
    assert len(datagrams) >= 1000
    pods = {p0.ip.packed, p1.ip.packed}
    for total, payload in datagrams:
        assert total <= 1500 and payload[0] == 0x45
        inner = check_packet(payload)  # one IPv4 packet, valid IP and TCP checksums
        assert inner.proto == 6 and {inner.src, inner.dst} == pods
        assert inner.ttl == 62  # 64 in the pod, -1 host forwarding, -1 udp sender
    assert max(len(p) for _, p in datagrams) == 1472


PEER = """
import socket, struct, sys
sys.path.insert(0, sys.argv[5])
from tests.fixtures.frames import check_packet
from loden.udp.csum import checksum, residue
from loden.udp.packet import ip_header
me, target, fake_src, pod = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
icmp = bytearray(struct.pack("!BBHHH", 8, 0, 0, 77, 1) + b"flannel-go-peer!")
icmp[2:4] = checksum(residue(icmp)).to_bytes(2, "big")
src, dst = socket.inet_aton(fake_src), socket.inet_aton(pod)
pkt = ip_header(src=src, dst=dst, proto=1, payload_len=len(icmp), ttl=64) + bytes(icmp)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((me, 8285)); s.settimeout(5)
s.sendto(pkt, (target, 8285))
data, addr = s.recvfrom(2000)
p = check_packet(data)
print(addr[0], addr[1], socket.inet_ntoa(p.src), socket.inet_ntoa(p.dst), p.ttl, p.l4[0])
"""


async def test_udp_interop_with_one_packet_per_datagram_peer(
    make_cluster: ClusterFactory,
) -> None:
    # Host 2 plays a Go flannel node: no Loden, a lease, raw flannel-format datagrams.
    cluster = await make_cluster(3, start=2)
    n0, n1 = cluster.nodes
    peer_host = cluster.topo.hosts[2]
    peer_subnet = cluster.subnet(2)
    fake = Lease(peer_subnet, LeaseAttrs(peer_host.ip))
    for i in (0, 1):
        report = await cluster.reconcile(i, {fake.key: fake})
        assert not report.errors
    src = peer_subnet.network_address + 5
    out = peer_host.ns.run(
        sys.executable,
        "-c",
        PEER,
        str(peer_host.ip),
        str(n1.host.ip),
        str(src),
        str(n1.pods[0].ip),
        str(Path(__file__).resolve().parents[2] / "src"),
        timeout=20,
    ).stdout.split()
    # The echo reply came back from node 1's IfaceAddr:8285, pod -> fake source, TTL 62.
    assert out == [str(n1.host.ip), "8285", str(n1.pods[0].ip), str(src), "62", "0"]


PROBE = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], 80), timeout=3)
    print("connected")
except OSError as exc:
    print(exc.errno)
"""


async def test_udp_unreachable_and_peer_removal(make_cluster: ClusterFactory) -> None:
    cluster = await make_cluster(2)
    n0, n1 = cluster.nodes
    p0, p1 = n0.pods[0], n1.pods[0]
    # TCP to an address of the Network that no lease covers: the proxy answers ICMP Net
    # Unreachable (not for ICMP offenders, so no ping here), connect() fails at once.
    nowhere = IPv4Network(cluster.network).network_address + (99 << 8) + 1
    probe = p0.ns.run(sys.executable, "-c", PROBE, str(nowhere), timeout=10).stdout.split()
    assert probe == [str(errno.ENETUNREACH)]
    assert p0.ns.ping(p1.ip, count=1, wait=2)
    report = await n0.network.apply([LeaseEvent(EventKind.REMOVED, n1.lease)])
    assert report.removed == 1
    await asyncio.sleep(0.2)
    assert not p0.ns.ping(p1.ip, count=1, wait=1)
    probe = p0.ns.run(sys.executable, "-c", PROBE, str(p1.ip), timeout=10).stdout.split()
    assert probe == [str(errno.ENETUNREACH)]
    report = await n0.network.apply([LeaseEvent(EventKind.ADDED, n1.lease)])
    assert report.added == 1
    assert p0.ns.ping(p1.ip, count=3, wait=2)


async def test_udp_restart_and_device_repair(make_cluster: ClusterFactory) -> None:
    cluster = await make_cluster(2)
    n0, n1 = cluster.nodes
    p0, p1 = n0.pods[0], n1.pods[0]
    # The first packets may race the workers' first peer table: allow a retry.
    assert p0.ns.ping(p1.ip, count=3, wait=2)
    # Agent restart: the old Network goes away with its TUN, a new one takes over.
    node = await cluster.restart(0)
    assert not (await cluster.reconcile(0)).errors
    assert p0.ns.ping(p1.ip, count=3, wait=2) and p1.ns.ping(p0.ip, count=1, wait=2)
    network = node.network
    assert isinstance(network, UdpNetwork)
    pids = network.pool.pids()
    # flannel0 deleted by hand: traffic stops; reconcile recreates it, workers go on.
    node.host.ns.ip("link", "del", "flannel0")
    assert not p0.ns.ping(p1.ip, count=1, wait=1)
    report = await cluster.reconcile(0)
    assert not report.errors
    link = node.host.ns.ip("-o", "-4", "addr", "show", "dev", "flannel0").stdout
    assert f"{n0.subnet.network_address}/32" in link
    assert str(IPv4Network(cluster.network)) in node.host.ns.ip("route").stdout
    assert p0.ns.ping(p1.ip, count=3, wait=2) and p1.ns.ping(p0.ip, count=1, wait=2)
    assert network.pool.pids() == pids and not network.pool.dead()
    stats = await network.pool.stats()
    assert sum(s["tun_lost"] for s in stats) >= 1


async def test_udp_close_removes_device(make_cluster: ClusterFactory) -> None:
    cluster = await make_cluster(2)
    n0 = cluster.nodes[0]
    assert isinstance(n0.network, UdpNetwork)
    pids = n0.network.pool.pids()
    await n0.network.aclose()
    assert n0.host.ns.ip("link", "show", "flannel0", check=False).returncode != 0
    assert all(not Path(f"/proc/{pid}").exists() for pid in pids)
    cluster.nodes.remove(n0)
    assert IPv4Address(int(n0.subnet.network_address)) == n0.lease.subnet.network_address
