"""Chaos scenario 6: an allocation storm, then a network that is too small.

64 agents start at the same moment against one etcd, on a /18 cut into /24s with
SubnetMin at the network address, i.e. exactly 64 subnets: every one must end up with
a distinct subnet, none may exit. Then 24 agents start on a network with room for
exactly 16: 16 succeed, the other 8 say the network is exhausted and keep retrying with
a bounded backoff, which a counting proxy in front of etcd (one port per agent) checks
by measuring each waiting agent's request rate.

The agents use the ``alloc`` backend (leases only, no data plane) with distinct
``--public-ip`` values, all in one host namespace, as the 32-agent test of
test_agent_control.py does. Each agent is a Python process of about 40-50 MB.
"""

from __future__ import annotations

import json
import re
import signal
import time
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from tests.chaos.conftest import ChaosFactory
from tests.chaos.support import FLANNELD, ChaosCluster, CountingProxy, figure, wait_for
from tests.fixtures.etcd import free_port
from tests.fixtures.topology import Process

pytestmark = [pytest.mark.root, pytest.mark.slow]

STORM = 64
SMALL_AGENTS, SMALL_FITS = 24, 16
#: Seconds after every waiting agent first reported exhaustion: the window in which
#: their request rate is measured (after the first backoff steps of 1, 2, 4, 8 s).
WINDOW = (10.0, 25.0)
MAX_RATE = 0.5  # requests per second per waiting agent in that window


def agent_argv(
    cluster: ChaosCluster, workdir: Path, public_ip: IPv4Address, endpoint: str
) -> list[str]:
    return [
        FLANNELD,
        f"--etcd-endpoints={endpoint}",
        f"--subnet-file={workdir / 'subnet.env'}",
        f"--state-dir={workdir / 'state'}",
        "--iptables-forward-rules=false",
        "--iface=eth0",
        f"--public-ip={public_ip}",
    ]


def subnet_of(path: Path) -> str:
    for line in path.read_text().splitlines():
        if line.startswith("FLANNEL_SUBNET="):
            return line.split("=", 1)[1]
    raise AssertionError(f"{path} has no FLANNEL_SUBNET")


def rss_mb(proc: Process) -> float:
    status = Path(f"/proc/{proc.pid}/status").read_text()
    match = re.search(r"VmRSS:\s+(\d+) kB", status)
    return int(match[1]) / 1024 if match else 0.0


def stop_all(procs: list[Process]) -> None:
    for proc in procs:
        proc.signal(signal.SIGTERM)
    for proc in procs:
        proc.wait(20)


def test_allocation_storm_then_exhaustion_with_bounded_retries(chaos: ChaosFactory) -> None:
    cluster = chaos(
        {"Type": "alloc"},
        hosts=1,
        network="10.9.0.0/18",
        config={"SubnetLen": 24, "SubnetMin": "10.9.0.0"},
    )
    host = cluster.topo.hosts[0]
    base = host.ip + 100

    # -- 64 agents at once, 64 subnets ---------------------------------------------------
    dirs = [host.ns.workdir / f"storm{i}" for i in range(STORM)]
    began = time.monotonic()
    procs = [
        host.ns.spawn(*agent_argv(cluster, d, base + i, cluster.endpoints[0]))
        for i, d in enumerate(dirs)
    ]
    done = wait_for(lambda: all((d / "subnet.env").exists() for d in dirs), timeout=150)
    assert done is not None, [p.output()[-500:] for p in procs if p.running()][:2]
    storm_seconds = time.monotonic() - began
    subnets = {subnet_of(d / "subnet.env") for d in dirs}
    exited = [p.popen.returncode for p in procs if not p.running()]
    leases = cluster.leases()
    memory = sorted(rss_mb(p) for p in procs)
    races = sum(p.output().count("lost the race") for p in procs)
    assert exited == []
    assert len(subnets) == STORM
    assert leases is not None and len(leases) == STORM
    stop_all(procs)

    # -- 24 agents, room for 16 -------------------------------------------------------------
    uip = str(cluster.topo.underlay_address.ip) if cluster.topo.underlay_address else ""
    cluster.topo.underlay.run(
        "etcdctl",
        f"--endpoints={cluster.endpoints[0]}",
        "del",
        "--prefix",
        "/coreos.com/network/subnets/",
    )
    small = IPv4Network("10.9.0.0/19")
    cluster.loden(
        "config",
        "set",
        json.dumps(
            {
                "Network": str(small),
                "SubnetLen": 24,
                "SubnetMin": "10.9.1.0",
                "SubnetMax": "10.9.16.0",
                "Backend": {"Type": "alloc"},
            }
        ),
    )
    ports = [free_port(uip, netns=cluster.topo.underlay.name) for _ in range(SMALL_AGENTS)]
    proxy = CountingProxy(
        cluster.topo.underlay.name, uip, (uip, cluster.etcd.client_port), ports
    ).start()
    try:
        dirs = [host.ns.workdir / f"small{i}" for i in range(SMALL_AGENTS)]
        procs = [
            host.ns.spawn(*agent_argv(cluster, d, base + i, f"http://{uip}:{port}"))
            for i, (d, port) in enumerate(zip(dirs, ports, strict=True))
        ]
        exhausted_text = f"out of subnets: all {SMALL_FITS} /24 subnets of Network {small}"

        def settled() -> bool:
            ok = sum((d / "subnet.env").exists() for d in dirs)
            waiting = sum(exhausted_text in p.output() for p in procs)
            return ok == SMALL_FITS and waiting == SMALL_AGENTS - SMALL_FITS

        assert wait_for(settled, timeout=90, interval=0.2) is not None, [
            p.output()[-800:] for p in procs
        ][:2]
        all_waiting = time.monotonic()
        time.sleep(WINDOW[1])
        waiting = [i for i, d in enumerate(dirs) if not (d / "subnet.env").exists()]
        rates = [
            proxy.count([ports[i]], all_waiting + WINDOW[0], all_waiting + WINDOW[1])
            / (WINDOW[1] - WINDOW[0])
            for i in waiting
        ]
        first_10s = [proxy.count([ports[i]], 0.0, all_waiting + WINDOW[0]) for i in waiting]
        exited = [p.popen.returncode for p in procs if not p.running()]
        leases = cluster.leases()
        ok_subnets = {subnet_of(d / "subnet.env") for d in dirs if (d / "subnet.env").exists()}
    finally:
        proxy.close()
    assert exited == []
    assert len(waiting) == SMALL_AGENTS - SMALL_FITS
    assert len(ok_subnets) == SMALL_FITS
    assert leases is not None and len(leases) == SMALL_FITS
    assert max(rates) < MAX_RATE, rates
    figure(
        "allocation-storm",
        agents=STORM,
        subnets=STORM,
        distinct=len(subnets),
        all_leased_s=storm_seconds,
        lost_races_retried=races,
        agents_exited=0,
        rss_mb_median=memory[len(memory) // 2],
    )
    figure(
        "subnet-exhaustion",
        agents=SMALL_AGENTS,
        fit=SMALL_FITS,
        succeeded=len(ok_subnets),
        waiting=len(waiting),
        agents_exited=0,
        requests_per_waiting_agent_first_10s_max=max(first_10s),
        request_rate_per_waiting_agent_after_10s_max=max(rates),
        request_rate_limit=MAX_RATE,
    )
