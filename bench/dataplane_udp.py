"""udp backend end to end: raw underlay vs Loden udp vs a naive Python forwarder.

Two host namespaces on an underlay bridge, one pod each (tests/fixtures/topology.py).
For each data path: iperf3 TCP with 1 and 4 streams pod to pod, and 64-byte UDP at an
unlimited rate (packets/s received). The naive forwarder (written here) speaks the same
wire format the simplest way: one select loop, one read/sendto per packet, one
recvfrom/write per packet, TUN without offloads. Prints Gbit/s, ratios to the underlay
measured in the same run, and the forwarders' CPU seconds per GB moved.

For Loden it also prints, per host and per test, the workers' counters that show whether
batching works: inner packets per socket read (``UDP_GRO`` coalescing on the receiver),
segments per TUN write (super-packets built), datagrams per ``sendmsg`` (``UDP_SEGMENT``
runs) and bytes per TUN read (TSO super-packets with ``--tso 1``), plus the UDP
receive-buffer drops (``RcvbufErrors``) of both hosts.

Run as root: ``.venv/bin/python bench/dataplane_udp.py [--seconds 5] [--workers N]
[--tso 0|1] [--veth-gro] [--skip-naive] [--skip-udp64]``. ``--veth-gro`` turns on GRO on
each host's ``eth0`` and TSO off on its underlay bridge port (the veth setting with which
NAPI GRO coalesces UDP datagrams, closer to a real NIC than plain veth, which passes
``UDP_SEGMENT`` super-datagrams through unsplit).
(``--naive-forwarder`` is the entry point of the naive forwarder subprocess.)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import select
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.fixtures.topology import Host, Pod, Topology

from loden.backend import create_backend
from loden.backend.base import BackendContext, ExternalInterface, Network
from loden.kernel.netlink import RTPROT_BOOT, Netlink, Route
from loden.model.config import NetworkConfig
from loden.model.lease import EventKind, Lease, LeaseEvent
from loden.settings import BackendSettings
from loden.udp.tun import TunOptions, open_queue

PORT = 8285


# -- the naive forwarder (runs inside a host namespace) --------------------------------


async def _naive_device(tun_name: str, own: str, network: str) -> None:
    """Address, MTU, up and the route to the overlay, as flanneld's udp backend sets them."""
    nl = await Netlink.open()
    async with nl:
        link = await nl.link(tun_name)
        assert link is not None, f"{tun_name} vanished"
        await nl.add_address(link.index, IPv4Interface(f"{own}/32"))
        await nl.set_link(link.index, mtu=1472, up=True)
        await nl.replace(Route(dst=IPv4Network(network), oif=link.index, protocol=RTPROT_BOOT))


def naive_forwarder(tun_name: str, bind: str, own: str, network: str, peers: list[str]) -> None:
    """flannel's wire format, one packet per system call, single thread, no offloads."""
    # The device the project's way (flannel's flags: IFF_TUN | IFF_NO_PI, nothing else).
    fd, tun_name = open_queue(tun_name, TunOptions(vnet_hdr=False, multi_queue=False))
    asyncio.run(_naive_device(tun_name, own, network))
    table = {}
    for item in peers:
        subnet, ip = item.split("=")
        net = IPv4Network(subnet)
        table[int(net.network_address)] = (ip, PORT)
    mask = (0xFFFFFFFF << (32 - 24)) & 0xFFFFFFFF
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((bind, PORT))
    os.set_blocking(fd, False)
    sock.setblocking(False)
    print("ready", flush=True)

    def ttl(buf: bytearray) -> bool:
        if buf[8] <= 1:
            return False
        buf[8] -= 1
        c = ((buf[10] << 8) | buf[11]) + 0x100
        c = (c & 0xFFFF) + (c >> 16)
        buf[10], buf[11] = c >> 8, c & 0xFF
        return True

    while True:
        ready, _, _ = select.select([fd, sock.fileno()], [], [])
        if fd in ready:
            try:
                pkt = bytearray(os.read(fd, 1600))
            except BlockingIOError:
                pkt = bytearray()
            if len(pkt) >= 20:
                peer = table.get(int.from_bytes(pkt[16:20], "big") & mask)
                if peer is not None and ttl(pkt):
                    sock.sendto(pkt, peer)
        if sock.fileno() in ready:
            try:
                data = bytearray(sock.recv(1600))
            except BlockingIOError:
                data = bytearray()
            if len(data) >= 20 and ttl(data):
                os.write(fd, data)


# -- measurements ---------------------------------------------------------------------


@dataclass
class Result:
    gbps: float
    seconds: float
    nbytes: int
    packets: float = 0.0


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def iperf_tcp(client: Host | Pod, server: Host | Pod, seconds: float, streams: int) -> Result:
    srv = server.ns.spawn("iperf3", "-s", "-1")
    time.sleep(0.3)
    try:
        out = client.ns.out(
            "iperf3",
            "-J",
            "-c",
            str(server.ip),
            "-t",
            str(seconds),
            "-P",
            str(streams),
            timeout=seconds + 30,
        )
    finally:
        srv.stop()
    data = json.loads(out)["end"]["sum_received"]
    return Result(data["bits_per_second"] / 1e9, data["seconds"], int(data["bytes"]))


def iperf_udp64(client: Pod, server: Pod, seconds: float) -> Result:
    srv = server.ns.spawn("iperf3", "-s", "-1")
    time.sleep(0.3)
    try:
        out = client.ns.out(
            "iperf3",
            "-J",
            "-u",
            "-l",
            "64",
            "-b",
            "0",
            "-c",
            str(server.ip),
            "-t",
            str(seconds),
            timeout=seconds + 30,
        )
    finally:
        srv.stop()
    end = json.loads(out)["end"]
    summ = end.get("sum_received") or end["sum"]
    packets = summ.get("packets", 0) - summ.get("lost_packets", 0)
    return Result(
        summ["bits_per_second"] / 1e9,
        summ["seconds"],
        int(summ["bytes"]),
        packets / summ["seconds"],
    )


def rcvbuf_errors(host: Host) -> int:
    for line in host.ns.out("cat", "/proc/net/snmp").splitlines():
        if line.startswith("Udp:") and "RcvbufErrors" not in line:
            values = line.split()
            return int(values[5])
    return 0


async def start_loden(
    topo: Topology, cfg: NetworkConfig, subnets: list[IPv4Network], workers: int, tso: str
) -> list[Network]:
    nets: list[Network] = []
    leases: list[Lease] = []
    for host, subnet in zip(topo.hosts, subnets, strict=True):
        ext = ExternalInterface("eth0", 0, 1500, host.ip, host.ip)
        knobs = BackendSettings(
            netns=host.name,
            udp_workers=workers or None,
            udp_tso=tso in ("1", "true") if tso else None,
        )
        backend = create_backend("udp", BackendContext(cfg, ext, host.state_dir, knobs))
        lease = Lease(subnet=subnet, attrs=await backend.lease_attrs())
        leases.append(lease)
        nets.append(await backend.activate(lease))
    for i, net in enumerate(nets):
        await net.apply([LeaseEvent(EventKind.ADDED, le) for j, le in enumerate(leases) if j != i])
    return nets


Counters = list[dict[str, int]]


async def worker_counters(nets: list[Network]) -> Counters:
    """Per host: the sums of its workers' counters."""
    out: Counters = []
    tick = os.sysconf("SC_CLK_TCK")
    for net in nets:
        total: dict[str, int] = {"user_us": 0, "sys_us": 0}
        for stats in await net.pool.stats():  # type: ignore[attr-defined]
            for key, value in stats.items():
                if isinstance(value, int) and not isinstance(value, bool) and key != "pid":
                    total[key] = total.get(key, 0) + value
            try:
                stat = Path(f"/proc/{stats['pid']}/stat").read_text().rsplit(")", 1)[1].split()
            except FileNotFoundError:
                continue
            total["user_us"] += int(stat[11]) * 1_000_000 // tick
            total["sys_us"] += int(stat[12]) * 1_000_000 // tick
        out.append(total)
    return out


def batching(before: Counters, after: Counters) -> str:
    """What the counters say about batching during one test, per host."""
    parts = []
    for i, (b, a) in enumerate(zip(before, after, strict=True)):
        d = {k: a.get(k, 0) - b.get(k, 0) for k in a}
        d["packets"] = d.get("rx_packets", 0) + d.get("tx_datagrams", 0)

        def per(num: str, den: str, d: dict[str, int] = d) -> float:
            return d.get(num, 0) / d[den] if d.get(den) else 0.0

        parts.append(
            f"h{i}: rx {d.get('rx_packets', 0)} pkts/{d.get('rx_calls', 0)} reads"
            f" = {per('rx_packets', 'rx_calls'):.1f}/read,"
            f" {per('tun_coalesced', 'tun_writes'):.1f} segs/TUN write"
            f" (writes {d.get('tun_writes', 0)}),"
            f" tx {per('tx_datagrams', 'tx_sends'):.1f} dgrams/send,"
            f" TUN reads {d.get('tun_reads', 0)} ({per('tun_bytes', 'tun_reads'):.0f} B/read),"
            f" dropped {d.get('rx_dropped', 0)}, write errs {d.get('tun_write_errors', 0)};"
            f" CPU per packet (rx + tx) user {per('user_us', 'packets'):.2f} us"
            f" sys {per('sys_us', 'packets'):.2f} us"
        )
    return "\n      ".join(parts)


async def run_suite(
    name: str,
    a: Pod | Host,
    b: Pod | Host,
    seconds: float,
    pids: list[int] | None,
    rows: dict[str, dict[str, Result | float]],
    hosts: list[Host] | None = None,
    probe: Callable[[], Awaitable[Counters]] | None = None,
    udp64: bool = True,
) -> None:
    def drops() -> float:
        return float(sum(rcvbuf_errors(h) for h in hosts or []))

    row: dict[str, Result | float] = {}
    tests: list[tuple[str, Callable[[], Result]]] = [
        ("tcp1", lambda: iperf_tcp(a, b, seconds, 1)),
        ("tcp4", lambda: iperf_tcp(a, b, seconds, 4)),
    ]
    if udp64 and isinstance(a, Pod) and isinstance(b, Pod):
        pa, pb = a, b
        tests.append(("udp64", lambda: iperf_udp64(pa, pb, seconds)))
    for label, test in tests:
        before = cpu_seconds(pids or [])
        lost = drops()
        counters = await probe() if probe else None
        res = test()
        row[label] = res
        if pids and label != "udp64":
            row[f"{label}_cpu_per_gb"] = (cpu_seconds(pids) - before) / (res.nbytes / 1e9)
        if hosts:
            row[f"{label}_rcvbuf_errors"] = drops() - lost
        if probe and counters is not None:
            print(f"    {name} {label} {batching(counters, await probe())}", flush=True)
    rows[name] = row
    summary = ", ".join(
        f"{k}={v.gbps:.2f}Gb/s" if isinstance(v, Result) else f"{k}={v:.2f}" for k, v in row.items()
    )
    print(f"  {name}: {summary}", flush=True)


def veth_gro(topo: Topology) -> None:
    """GRO on each host's eth0, TSO off on its bridge port (see the module docstring)."""
    for host in topo.hosts:
        host.ns.out("ethtool", "-K", "eth0", "gro", "on")
        topo.underlay.out("ethtool", "-K", f"h{host.index}", "tso", "off")


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--workers", type=int, default=0, help="Loden workers (0: default)")
    parser.add_argument("--tso", choices=("", "0", "1"), default="", help="'': default")
    parser.add_argument("--veth-gro", action="store_true")
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--skip-udp64", action="store_true")
    args = parser.parse_args()
    rows: dict[str, dict[str, Result | float]] = {}
    udp64 = not args.skip_udp64
    with Topology(2) as topo:
        h0, h1 = topo.hosts
        if args.veth_gro:
            veth_gro(topo)
        base = int(IPv4Address("10.0.0.0")) + (os.getpid() % 200 + 30) * 65536
        network = IPv4Network((base, 16))
        subnets = [IPv4Network((base + (i + 1) * 256, 24)) for i in range(2)]
        cfg = NetworkConfig.parse(json.dumps({"Network": str(network), "Backend": {"Type": "udp"}}))
        print(
            f"underlay {topo.network}, overlay {network}, {args.seconds}s per test,"
            f" workers {args.workers or 'default'}, tso {args.tso or 'default'},"
            f" veth-gro {args.veth_gro}",
            flush=True,
        )
        await run_suite("underlay", h0, h1, args.seconds, None, rows)
        nets = await start_loden(topo, cfg, subnets, args.workers, args.tso)
        p0 = topo.add_pod(h0, subnets[0], mtu=1472)
        p1 = topo.add_pod(h1, subnets[1], mtu=1472)
        try:
            assert p0.ns.ping(p1.ip, count=2), "no connectivity through Loden udp"
            pids = [pid for net in nets for pid in net.pool.pids()]  # type: ignore[attr-defined]

            async def probe() -> Counters:
                return await worker_counters(nets)

            await run_suite("loden", p0, p1, args.seconds, pids, rows, [h0, h1], probe, udp64)
        finally:
            for net in nets:
                await net.aclose()
        if not args.skip_naive:
            procs = []
            for i, host in enumerate(topo.hosts):
                peer = 1 - i
                procs.append(
                    host.ns.spawn(
                        sys.executable,
                        __file__,
                        "--naive-forwarder",
                        "flannel0",
                        str(host.ip),
                        str(subnets[i].network_address),
                        str(network),
                        f"{subnets[peer]}={topo.hosts[peer].ip}",
                    )
                )
            for proc in procs:  # each prints "ready" once its device and socket are up
                for _ in range(100):
                    if "ready" in proc.output() or not proc.running():
                        break
                    await asyncio.sleep(0.1)
                assert "ready" in proc.output(), f"naive forwarder: {proc.output()[-1500:]}"
            assert p0.ns.ping(p1.ip, count=2), "no connectivity through the naive forwarder"
            pids = [p.pid for p in procs]
            await run_suite("naive", p0, p1, args.seconds, pids, rows, [h0, h1], None, udp64)
            for proc in procs:
                proc.stop()
    under = rows["underlay"]
    print("\nresults (Gbit/s; ratio to the underlay measured in this run)")
    for name, row in rows.items():
        parts = []
        for key in ("tcp1", "tcp4"):
            res = row[key]
            assert isinstance(res, Result)
            ref = under[key]
            assert isinstance(ref, Result)
            parts.append(f"{key} {res.gbps:6.2f} ({res.gbps / ref.gbps:.3f})")
        udp = row.get("udp64")
        if isinstance(udp, Result):
            parts.append(f"udp64 {udp.packets / 1000:7.1f} kpps")
        for key in ("tcp1_cpu_per_gb", "tcp4_cpu_per_gb"):
            value = row.get(key)
            if isinstance(value, float):
                parts.append(f"{key} {value:.2f} s/GB")
        drops = [
            f"{key[:-14]} {int(value)}"
            for key, value in row.items()
            if key.endswith("_rcvbuf_errors") and isinstance(value, float)
        ]
        if drops:
            parts.append("rcvbuf drops " + ", ".join(drops))
        print(f"  {name:9s} " + "  ".join(parts))
    if "naive" in rows:
        lo, nv = rows["loden"], rows["naive"]
        for key in ("tcp1", "tcp4", "udp64"):
            x, y = lo.get(key), nv.get(key)
            if not (isinstance(x, Result) and isinstance(y, Result)):
                continue
            speed = (x.packets / y.packets) if key == "udp64" else (x.gbps / y.gbps)
            print(f"  loden/naive {key}: {speed:.2f}x")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--naive-forwarder":
        naive_forwarder(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6:])
    else:
        asyncio.run(main())
