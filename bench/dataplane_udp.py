"""udp backend end to end: raw underlay vs Loden udp vs a naive Python forwarder.

Two host namespaces on an underlay bridge, one pod each (tests/fixtures/topology.py).
For each data path: iperf3 TCP with 1 and 4 streams pod to pod, and 64-byte UDP at an
unlimited rate (packets/s received). The naive forwarder (written here) speaks the same
wire format the simplest way: one select loop, one read/sendto per packet, one
recvfrom/write per packet, TUN without offloads. Prints Gbit/s, ratios to the underlay
measured in the same run, and the forwarders' CPU seconds per GB moved.

Run as root: ``.venv/bin/python bench/dataplane_udp.py [--seconds 5] [--workers N]``.
(``--naive-forwarder`` is the entry point of the naive forwarder subprocess.)
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import json
import os
import select
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.fixtures.topology import Host, Pod, Topology

from loden.backend import create_backend
from loden.backend.base import BackendContext, ExternalInterface, Network
from loden.model.config import NetworkConfig
from loden.model.lease import EventKind, Lease, LeaseEvent

PORT = 8285


# -- the naive forwarder (runs inside a host namespace) --------------------------------


def naive_forwarder(tun_name: str, bind: str, own: str, network: str, peers: list[str]) -> None:
    """flannel's wire format, one packet per system call, single thread, no offloads."""
    fd = os.open("/dev/net/tun", os.O_RDWR)
    req = struct.pack("16sH22x", tun_name.encode(), 0x0001 | 0x1000)
    fcntl.ioctl(fd, 0x400454CA, req)
    for argv in (
        ["ip", "addr", "add", f"{own}/32", "dev", tun_name],
        ["ip", "link", "set", tun_name, "mtu", "1472", "up"],
        ["ip", "route", "add", network, "dev", tun_name],
    ):
        subprocess.run(argv, check=True)
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
    topo: Topology, cfg: NetworkConfig, subnets: list[IPv4Network], workers: int
) -> list[Network]:
    nets: list[Network] = []
    leases: list[Lease] = []
    for host, subnet in zip(topo.hosts, subnets, strict=True):
        ext = ExternalInterface("eth0", 0, 1500, host.ip, host.ip)
        extra = {"netns": host.name, "udp_workers": str(workers) if workers else ""}
        backend = create_backend("udp", BackendContext(cfg, ext, host.state_dir, extra))
        lease = Lease(subnet=subnet, attrs=await backend.lease_attrs())
        leases.append(lease)
        nets.append(await backend.activate(lease))
    for i, net in enumerate(nets):
        await net.apply([LeaseEvent(EventKind.ADDED, le) for j, le in enumerate(leases) if j != i])
    return nets


def run_suite(
    name: str,
    a: Pod | Host,
    b: Pod | Host,
    seconds: float,
    pids: list[int] | None,
    rows: dict[str, dict[str, Result | float]],
    hosts: list[Host] | None = None,
) -> None:
    def drops() -> float:
        return float(sum(rcvbuf_errors(h) for h in hosts or []))

    row: dict[str, Result | float] = {}
    for label, streams in (("tcp1", 1), ("tcp4", 4)):
        before = cpu_seconds(pids or [])
        lost = drops()
        res = iperf_tcp(a, b, seconds, streams)
        row[label] = res
        if pids:
            row[f"{label}_cpu_per_gb"] = (cpu_seconds(pids) - before) / (res.nbytes / 1e9)
        if hosts:
            row[f"{label}_rcvbuf_errors"] = drops() - lost
    if isinstance(a, Pod) and isinstance(b, Pod):
        lost = drops()
        row["udp64"] = iperf_udp64(a, b, seconds)
        if hosts:
            row["udp64_rcvbuf_errors"] = drops() - lost
    rows[name] = row
    summary = ", ".join(
        f"{k}={v.gbps:.2f}Gb/s" if isinstance(v, Result) else f"{k}={v:.2f}" for k, v in row.items()
    )
    print(f"  {name}: {summary}", flush=True)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--workers", type=int, default=0, help="Loden workers (0: default)")
    parser.add_argument("--skip-naive", action="store_true")
    args = parser.parse_args()
    rows: dict[str, dict[str, Result | float]] = {}
    with Topology(2) as topo:
        h0, h1 = topo.hosts
        base = int(IPv4Address("10.0.0.0")) + (os.getpid() % 200 + 30) * 65536
        network = IPv4Network((base, 16))
        subnets = [IPv4Network((base + (i + 1) * 256, 24)) for i in range(2)]
        cfg = NetworkConfig.parse(json.dumps({"Network": str(network), "Backend": {"Type": "udp"}}))
        print(f"underlay {topo.network}, overlay {network}, {args.seconds}s per test", flush=True)
        run_suite("underlay", h0, h1, args.seconds, None, rows)
        nets = await start_loden(topo, cfg, subnets, args.workers)
        p0 = topo.add_pod(h0, subnets[0], mtu=1472)
        p1 = topo.add_pod(h1, subnets[1], mtu=1472)
        try:
            assert p0.ns.ping(p1.ip, count=2), "no connectivity through Loden udp"
            pids = [pid for net in nets for pid in net.pool.pids()]  # type: ignore[attr-defined]
            run_suite("loden", p0, p1, args.seconds, pids, rows, [h0, h1])
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
            await asyncio.sleep(1.0)
            assert p0.ns.ping(p1.ip, count=2), "no connectivity through the naive forwarder"
            run_suite("naive", p0, p1, args.seconds, [p.pid for p in procs], rows, [h0, h1])
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
        print(f"  {name:9s} " + "  ".join(parts))
    if "naive" in rows:
        lo, nv = rows["loden"], rows["naive"]
        for key in ("tcp1", "tcp4", "udp64"):
            x, y = lo[key], nv[key]
            assert isinstance(x, Result) and isinstance(y, Result)
            speed = (x.packets / y.packets) if key == "udp64" else (x.gbps / y.gbps)
            print(f"  loden/naive {key}: {speed:.2f}x")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--naive-forwarder":
        naive_forwarder(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6:])
    else:
        asyncio.run(main())
