"""Chaos scenarios 3, 4 and 5: agents and nodes die.

3. An agent is SIGKILLed under traffic and restarted: it keeps its subnet and VTEP MAC,
   established flows lose nothing, and every node's kernel state afterwards is exactly
   what it was (no duplicate, no stale entry).
4. A node dies for good: its lease expires (short TTL) and every other node removes its
   route, neighbour and FDB entry within one resync, touching nothing else; the subnet
   is free again for a new node.
5. The node comes back after its old subnet went to another node (flannel #1289): it
   gets a different subnet; no two leases ever share one.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from ipaddress import IPv4Network

import pytest

from tests.chaos.conftest import ChaosFactory
from tests.chaos.support import (
    ChaosCluster,
    ContinuousPing,
    copy_subnet_file,
    entries_of,
    figure,
    kernel_state,
    vtep_mac,
    wait_for,
)
from tests.integration.agent_support import AgentNode

pytestmark = [pytest.mark.root, pytest.mark.slow]

TTL = 5  # --subnet-lease-ttl for the node-death scenarios
RESYNC = 1.0  # --resync-period of every agent (ChaosCluster)


def lease_key(subnet: IPv4Network) -> str:
    return f"{subnet.network_address}-{subnet.prefixlen}"


def states(cluster: ChaosCluster, nodes: list[AgentNode]) -> dict[str, list[str]]:
    return {n.host.name: kernel_state(n.host.ns) for n in nodes}


def routes_include(node: AgentNode, wanted: set[str]) -> Callable[[], bool]:
    return lambda: all(w in node.host.ns.ip("route", "show").stdout for w in wanted)


def test_agent_crash_under_traffic_restores_identical_kernel_state(chaos: ChaosFactory) -> None:
    cluster = chaos({"Type": "vxlan"})
    cluster.start_all()
    cluster.add_pods()
    assert cluster.mesh_failures() == []
    victim, b, c = cluster.nodes
    subnet, mac = victim.subnet, vtep_mac(victim.host.ns)
    time.sleep(2 * RESYNC)
    before = states(cluster, cluster.nodes)
    pings = [
        ContinuousPing(victim.pods[0].ns, b.pods[0].ip),  # from the crashing node
        ContinuousPing(c.pods[0].ns, victim.pods[0].ip),  # towards it
        ContinuousPing(b.pods[0].ns, c.pods[0].ip),  # bystanders
    ]
    try:
        time.sleep(1.0)
        cluster.crash(victim)
        ready = cluster.restart(victim)
        time.sleep(2 * RESYNC + 0.5)  # the restarted agent's first resyncs have run
    finally:
        results = [p.stop() for p in pings]
    after = states(cluster, cluster.nodes)
    leases = cluster.leases()
    assert leases is not None and len(leases) == 3
    assert victim.subnet == subnet and vtep_mac(victim.host.ns) == mac
    assert after == before, {k: (before[k], after[k]) for k in before if before[k] != after[k]}
    for result in results:
        assert result.lost == 0 and result.trailing <= 2, result
    figure(
        "agent-crash",
        pings_sent=sum(r.sent for r in results),
        pings_lost=sum(r.lost for r in results),
        restart_to_ready_s=ready,
        same_subnet="yes",
        same_vtep_mac="yes",
        kernel_entries_changed=0,
    )


def test_dead_node_lease_expires_and_is_removed_everywhere(chaos: ChaosFactory) -> None:
    cluster = chaos({"Type": "vxlan"}, extra_args=(f"--subnet-lease-ttl={TTL}",))
    cluster.start_all()
    cluster.add_pods()
    assert cluster.mesh_failures() == []
    a, b, dead = cluster.nodes
    dead_subnet, dead_mac = dead.subnet, vtep_mac(dead.host.ns)
    needles = (str(dead_subnet), str(dead_subnet.network_address), dead_mac)
    survivors = [a, b]
    time.sleep(2 * RESYNC)
    before = states(cluster, survivors)
    for state in before.values():
        assert len(entries_of(state, *needles)) == 3  # route, neighbour, FDB entry
    ping = ContinuousPing(a.pods[0].ns, b.pods[0].ip)
    try:
        cluster.crash(dead)
        killed = time.monotonic()

        def expired() -> bool:
            leases = cluster.leases()
            return leases is not None and lease_key(dead_subnet) not in leases

        assert wait_for(expired, timeout=TTL + 10) is not None
        expiry = time.monotonic() - killed

        def removed() -> bool:
            return all(not entries_of(kernel_state(n.host.ns), *needles) for n in survivors)

        removal = wait_for(removed, timeout=3 * RESYNC + 5, interval=0.02)
        assert removal is not None
        time.sleep(2 * RESYNC)
        after = states(cluster, survivors)
    finally:
        traffic = ping.stop()
    for name, state in after.items():
        untouched = [ln for ln in before[name] if not entries_of([ln], *needles)]
        assert state == untouched, (name, state, untouched)
    assert traffic.lost == 0, traffic
    assert removal <= RESYNC + 0.5
    # The subnet is free: a new node that brings the dead node's subnet.env gets it.
    newcomer = cluster.add_node()
    copy_subnet_file(dead, newcomer)
    cluster.restart(newcomer)
    assert newcomer.subnet == dead_subnet
    assert wait_for(lambda: all(cluster.programmed(n, dead_subnet) for n in survivors), timeout=10)
    figure(
        "node-death",
        lease_ttl_s=TTL,
        kill_to_expiry_s=expiry,
        expiry_to_removed_everywhere_s=removal,
        resync_s=RESYNC,
        other_entries_changed=0,
        pings_lost=traffic.lost,
        subnet_reused_by_new_node="yes",
    )


def test_returning_node_never_shares_its_old_subnet(chaos: ChaosFactory) -> None:
    cluster = chaos({"Type": "host-gw"}, extra_args=(f"--subnet-lease-ttl={TTL}",))
    cluster.start_all()
    a, b, returning = cluster.nodes
    old_subnet = returning.subnet
    cluster.crash(returning)

    def expired() -> bool:
        leases = cluster.leases()
        return leases is not None and lease_key(old_subnet) not in leases

    assert wait_for(expired, timeout=TTL + 10) is not None
    # Meanwhile another node takes the subnet (it brings the same previous subnet).
    taker = cluster.add_node()
    copy_subnet_file(returning, taker)
    cluster.restart(taker)
    assert taker.subnet == old_subnet
    # The node comes back with its stale subnet.env still claiming old_subnet.
    assert returning.subnet == old_subnet
    cluster.restart(returning)
    new_subnet = returning.subnet
    leases = cluster.leases()
    assert leases is not None
    subnets = [IPv4Network(k.replace("-", "/")) for k in leases]
    overlapping = [(x, y) for i, x in enumerate(subnets) for y in subnets[i + 1 :] if x.overlaps(y)]
    owners = {
        IPv4Network(k.replace("-", "/")): json.loads(v)["PublicIP"] for k, v in leases.items()
    }
    assert new_subnet != old_subnet
    assert overlapping == [] and len(subnets) == 4
    assert owners[old_subnet] == str(taker.host.ip)
    assert owners[new_subnet] == str(returning.host.ip)
    assert {n.subnet for n in cluster.nodes} == set(subnets)
    # Every node routes the old subnet to its new owner, the new one to the returner.
    for node in (a, b):
        want = {f"{new_subnet} via {returning.host.ip} ", f"{old_subnet} via {taker.host.ip} "}
        assert wait_for(routes_include(node, want), timeout=5), node.host.ns.ip("route").stdout
    figure(
        "returning-node",
        old_subnet_taken_by_other="yes",
        returned_with_new_subnet="yes",
        leases=len(subnets),
        duplicate_or_overlapping_subnets=len(overlapping),
    )
