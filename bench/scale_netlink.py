"""Data-plane scale benchmark (run by hand as root; not part of the test suite).

    .venv/bin/python bench/scale_netlink.py [--peers 5000] [--repeat 3]

In a fresh namespace (one host of a :class:`tests.fixtures.topology.Topology` whose
underlay is a random /16, so every synthetic peer public IP is on-link), drive the
vxlan and the host-gw Network with N synthetic peer leases (no traffic is sent) and
print: cold-start reconcile (programming everything), no-change reconcile, apply of
one new peer, and the process RSS. Targets for 5,000 vxlan peers (15,000 entries):
cold start <= 3 s, no-change reconcile <= 0.5 s.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import resource
import sys
import tempfile
import time
from ipaddress import IPv4Network
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.fixtures.topology import Topology

from loden.backend import create_backend
from loden.backend.base import BackendContext, Network
from loden.kernel import interfaces
from loden.kernel.netlink import Netlink
from loden.model.config import NetworkConfig
from loden.model.lease import EventKind, Lease, LeaseAttrs, LeaseEvent
from loden.settings import BackendSettings


def rss_mib() -> tuple[float, float]:
    current = 0.0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            current = int(line.split()[1]) / 1024
    return current, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peer(i: int, underlay: IPv4Network, kind: str) -> Lease:
    subnet = IPv4Network((0x0A000000 + ((i + 2) << 8), 24))  # 10.0.(i+2).0/24 ...
    public_ip = underlay.network_address + 256 + i
    data = None
    if kind == "vxlan":
        mac = bytes([0x0A, 0x58, (i >> 16) & 255, (i >> 8) & 255, i & 255, 1]).hex(":")
        data = LeaseAttrs.encode_data({"VNI": 1, "VtepMAC": mac})
    return Lease(subnet, LeaseAttrs(public_ip=public_ip, backend_type=kind, backend_data=data))


async def run(kind: str, peers: int, repeat: int) -> None:
    underlay = IPv4Network(f"172.{random.randint(16, 31)}.0.0/16")
    with (
        Topology(1, underlay=underlay, underlay_ip=False) as topo,
        tempfile.TemporaryDirectory() as tmp,
    ):
        host = topo.hosts[0]
        config = NetworkConfig.parse(
            f'{{"Network":"10.0.0.0/8","SubnetLen":24,"Backend":{{"Type":"{kind}"}}}}'
        )
        nl = await Netlink.open(host.name)
        try:
            selection = await interfaces.select(nl, interfaces.InterfaceOptions(ifaces=("eth0",)))
        finally:
            await nl.aclose()
        ctx = BackendContext(config, selection.ext, Path(tmp), BackendSettings(netns=host.name))
        backend = create_backend(kind, ctx)
        t0 = time.perf_counter()
        attrs = await backend.lease_attrs()
        own = Lease(IPv4Network("10.0.1.0/24"), attrs)
        network: Network = await backend.activate(own)
        t_setup = time.perf_counter() - t0
        leases = {lease.key: lease for lease in (peer(i, underlay, kind) for i in range(peers))}
        try:
            t0 = time.perf_counter()
            cold = await network.reconcile(leases)
            t_cold = time.perf_counter() - t0
            assert not cold.errors, cold.errors[:3]
            t_idle = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                idle = await network.reconcile(leases)
                t_idle.append(time.perf_counter() - t0)
                assert idle.added == idle.removed == 0, idle
            extra = peer(peers, underlay, kind)
            t0 = time.perf_counter()
            one = await network.apply([LeaseEvent(EventKind.ADDED, extra)])
            t_one = time.perf_counter() - t0
            assert one.added >= 1 and not one.errors, one
            nl = await Netlink.open(host.name)
            async with nl:
                routes = len(await nl.routes())
        finally:
            await network.aclose()
        now, peak = rss_mib()
        print(
            f"{kind:8s} peers={peers} entries={cold.added} kernel_routes={routes}"
            f" setup={t_setup:.3f}s cold={t_cold:.3f}s"
            f" no-change={min(t_idle):.3f}s (max {max(t_idle):.3f}s)"
            f" apply-one={t_one * 1000:.1f}ms rss={now:.0f}MiB peak={peak:.0f}MiB"
        )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--backend", choices=["vxlan", "host-gw", "both"], default="both")
    args = parser.parse_args()
    kinds = ["vxlan", "host-gw"] if args.backend == "both" else [args.backend]
    for kind in kinds:
        await run(kind, args.peers, args.repeat)


if __name__ == "__main__":
    asyncio.run(main())
