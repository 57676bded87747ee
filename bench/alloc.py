"""Allocation storm: N subnet managers acquire leases at once on one real etcd.

Run by hand: ``.venv/bin/python bench/alloc.py [--nodes 64 256] [--api v3 v2]``.
Prints p50/p99 acquisition latency, total time, lost races (retries) and the number of
duplicate subnets (must be 0). Each manager has its own HTTP connection pool, like
separate agents; all use the same random seed, the worst case for collisions.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from ipaddress import IPv4Address
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loden.lab.etcd import EtcdServer
from loden.model.lease import LeaseAttrs
from loden.model.subnet_env import PreviousSubnets
from loden.settings import EtcdSettings
from loden.subnet import open_store
from loden.subnet.manager import EtcdSubnetManager


async def storm(url: str, api: str, nodes: int, seed_mode: str) -> dict[str, float]:
    prefix = f"/bench{random.randrange(1 << 30)}/network"
    settings = EtcdSettings(
        endpoints=(url,),
        prefix=prefix,
        keyfile="",
        certfile="",
        cafile="",
        username="",
        password="",
        api=api,
    )
    admin = await open_store(settings)
    await admin.put_config(b'{"Network": "10.0.0.0/8", "SubnetLen": 24}')
    stores = [await open_store(settings) for _ in range(nodes)]
    managers = [
        EtcdSubnetManager(s, rng=random.Random(0 if seed_mode == "same" else i))
        for i, s in enumerate(stores)
    ]
    latencies: list[float] = []

    async def one(i: int, manager: EtcdSubnetManager) -> str:
        attrs = LeaseAttrs(IPv4Address(int(IPv4Address("192.168.0.0")) + i), "host-gw")
        began = time.perf_counter()
        lease = await manager.acquire_lease(attrs, PreviousSubnets())
        latencies.append(time.perf_counter() - began)
        return lease.key

    began = time.perf_counter()
    keys = await asyncio.gather(*(one(i, m) for i, m in enumerate(managers)))
    total = time.perf_counter() - began
    stored = [kv.name for kv in (await admin.list()).kvs]
    for store in stores:
        await store.aclose()
    await admin.aclose()
    latencies.sort()
    return {
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000,
        "total_s": total,
        "retries": float(sum(m.claim_conflicts for m in managers)),
        "duplicates": float(len(keys) - len(set(keys)) + len(stored) - len(set(stored))),
        "leases": float(len(stored)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--api", nargs="+", default=["v3", "v2"])
    parser.add_argument("--seed", choices=["same", "distinct"], default="same")
    args = parser.parse_args()
    with EtcdServer(enable_v2=True) as etcd:
        etcd.start()
        print(
            f"{'api':<4} {'nodes':>5} {'p50 ms':>8} {'p99 ms':>8} {'total s':>8} "
            f"{'retries':>8} {'dups':>5} {'leases':>6}"
        )
        for api in args.api:
            for n in args.nodes:
                r = asyncio.run(storm(etcd.client_url, api, n, args.seed))
                print(
                    f"{api:<4} {n:>5} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} "
                    f"{r['total_s']:>8.2f} {r['retries']:>8.0f} {r['duplicates']:>5.0f} "
                    f"{r['leases']:>6.0f}"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
