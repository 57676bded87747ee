"""CPU of one /healthz store probe: the full httpx read vs the kept-open h11 fast path.

Run by hand: ``.venv/bin/python bench/probe.py [--probes 200] [--rounds 5]``.
Starts one etcd (v2 enabled) and one with TLS client certificates, and for each of
v3, v2 and v3+TLS measures the agent process's CPU (``time.process_time``) for
``--probes`` probes the old way (``store.get_config()`` through httpx, what
``EtcdSubnetManager.probe`` did before) and the new way (``manager.probe()``: the fast
path), alternated over ``--rounds`` so machine noise hits both alike. The numbers are
the median round. etcd's own CPU is not counted: it is another process.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loden.lab.etcd import EtcdServer
from loden.lab.pki import EtcdPKI, make_pki
from loden.settings import EtcdSettings
from loden.subnet import open_store
from loden.subnet.manager import EtcdSubnetManager

CONFIG = b'{"Network": "10.0.0.0/8", "Backend": {"Type": "vxlan"}}'


async def cpu_ms(probe: Callable[[], Awaitable[object]], probes: int) -> float:
    """CPU milliseconds per call of ``probe``."""
    began = time.process_time()
    for _ in range(probes):
        await probe()
    return (time.process_time() - began) * 1000 / probes


async def compare(settings: EtcdSettings, probes: int, rounds: int) -> tuple[float, float]:
    store = await open_store(settings)
    try:
        await store.put_config(CONFIG)
        manager = EtcdSubnetManager(store)
        await store.get_config()  # both paths connected before measuring
        await manager.probe()
        old: list[float] = []
        new: list[float] = []
        for _ in range(rounds):
            old.append(await cpu_ms(store.get_config, probes))
            new.append(await cpu_ms(manager.probe, probes))
        return statistics.median(old), statistics.median(new)
    finally:
        await store.aclose()


def settings(url: str, api: str, pki: EtcdPKI | None = None) -> EtcdSettings:
    return EtcdSettings(
        endpoints=(url,),
        prefix="/bench-probe/network",
        keyfile=str(pki.client_key) if pki else "",
        certfile=str(pki.client_cert) if pki else "",
        cafile=str(pki.ca_cert) if pki else "",
        username="",
        password="",
        api=api,
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probes", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="loden-bench-probe-") as tmp:
        pki = make_pki(Path(tmp) / "pki", ["127.0.0.1"])
        with (
            EtcdServer(enable_v2=True).start() as plain,
            EtcdServer(enable_v2=True, pki=pki).start() as tls,
        ):
            cases = {
                "v3": settings(plain.client_url, "v3"),
                "v2": settings(plain.client_url, "v2"),
                "v3+tls": settings(tls.client_url, "v3", pki),
            }
            print(f"CPU per probe, median of {args.rounds} rounds of {args.probes} probes")
            print(f"{'store':8} {'httpx ms':>9} {'fast ms':>9} {'ratio':>7}")
            for name, case in cases.items():
                old, new = await compare(case, args.probes, args.rounds)
                print(f"{name:8} {old:9.3f} {new:9.3f} {old / new:6.1f}x")


if __name__ == "__main__":
    asyncio.run(main())
