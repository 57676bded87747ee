"""A small "cluster" for data-plane tests: hosts of a Topology driven by real backends.

No agent and no etcd: every host's backend is created directly (in the host's
namespace through ``BackendContext.settings.netns``) and given the other hosts'
leases, as the agent would after reading them from the store.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from loden.backend import create_backend
from loden.backend.base import Backend, BackendContext, Network, ReconcileReport
from loden.kernel import interfaces
from loden.kernel.netlink import Netlink
from loden.model.config import NetworkConfig
from loden.model.lease import Lease, LeaseAttrs
from loden.settings import BackendSettings
from tests.fixtures.topology import Host, Pod, Topology, TopologyFactory


@dataclass
class Node:
    host: Host
    ctx: BackendContext
    backend: Backend
    network: Network
    lease: Lease
    pods: list[Pod] = field(default_factory=list)

    @property
    def subnet(self) -> IPv4Network:
        return self.lease.subnet


def backend_json(kind: str, **options: Any) -> str:
    parts = [f'"Type":"{kind}"'] + [
        f'"{k}":{str(v).lower() if isinstance(v, bool) else v}' for k, v in options.items()
    ]
    return "{" + ",".join(parts) + "}"


class Cluster:
    def __init__(self, topo: Topology, kind: str, **options: Any) -> None:
        self.topo = topo
        self.kind = kind
        # Pod network: 10.1-99.0.0/16, never overlapping the underlay (10.100+ or 172.x).
        self.network = IPv4Network(f"10.{random.randint(1, 99)}.0.0/16")
        self.config = NetworkConfig.parse(
            f'{{"Network":"{self.network}","SubnetLen":24,'
            f'"Backend":{backend_json(kind, **options)}}}'
        )
        self.nodes: list[Node] = []

    def subnet(self, i: int) -> IPv4Network:
        return IPv4Network((int(self.network.network_address) + ((i + 1) << 8), 24))

    async def context(self, host: Host) -> BackendContext:
        nl = await Netlink.open(host.name)
        try:
            selection = await interfaces.select(nl, interfaces.InterfaceOptions())
        finally:
            await nl.aclose()
        return BackendContext(
            self.config, selection.ext, host.state_dir, BackendSettings(netns=host.name)
        )

    async def start_node(self, i: int) -> Node:
        host = self.topo.hosts[i]
        ctx = await self.context(host)
        backend = create_backend(self.kind, ctx)
        attrs = await backend.lease_attrs()
        lease = Lease(self.subnet(i), attrs)
        network = await backend.activate(lease)
        return Node(host, ctx, backend, network, lease)

    async def start(self, *, pods: int = 1) -> None:
        for i in range(len(self.topo.hosts)):
            node = await self.start_node(i)
            self.nodes.append(node)
            for _ in range(pods):
                node.pods.append(self.topo.add_pod(node.host, node.subnet, mtu=node.network.mtu))
        await self.reconcile_all()

    def peers(self, i: int, extra: Mapping[str, Lease] | None = None) -> dict[str, Lease]:
        out = {n.lease.key: n.lease for j, n in enumerate(self.nodes) if j != i}
        out.update(extra or {})
        return out

    async def reconcile(self, i: int, extra: Mapping[str, Lease] | None = None) -> ReconcileReport:
        return await self.nodes[i].network.reconcile(self.peers(i, extra))

    async def reconcile_all(self) -> None:
        for i in range(len(self.nodes)):
            report = await self.reconcile(i)
            assert not report.errors, report.errors

    async def restart(self, i: int) -> Node:
        """Drop node i's Network and build a new one from scratch, as an agent restart."""
        old = self.nodes[i]
        await old.network.aclose()
        node = await self.start_node(i)
        node.pods = old.pods
        self.nodes[i] = node
        return node

    async def close(self) -> None:
        for node in self.nodes:
            await node.network.aclose()


def vxlan_lease(
    subnet: IPv4Network, public_ip: IPv4Address, mac: str, *, vni: bool = True
) -> Lease:
    data: dict[str, Any] = {"VNI": 1, "VtepMAC": mac} if vni else {"VtepMAC": mac}
    return Lease(subnet, LeaseAttrs(public_ip, "vxlan", LeaseAttrs.encode_data(data)))


def full_mesh(cluster: Cluster) -> list[str]:
    """Every pod pings every other pod, every host pings every remote pod; failures."""
    failures = []
    pods = [pod for node in cluster.nodes for pod in node.pods]
    for src in pods:
        for dst in pods:
            if src is not dst and not src.ns.ping(dst.ip, count=1, wait=2):
                failures.append(f"pod {src.ip} -> pod {dst.ip}")
    for node in cluster.nodes:
        for pod in pods:
            if pod.host is not node.host and not node.host.ns.ping(pod.ip, count=1, wait=2):
                failures.append(f"host {node.host.ip} -> pod {pod.ip}")
    return failures


def lines(text: str) -> set[str]:
    return {" ".join(line.split()) for line in text.splitlines() if line.strip()}


ClusterFactory = Callable[..., Awaitable[Cluster]]


@contextlib.asynccontextmanager
async def clusters(make_topology: TopologyFactory, *, hosts: int) -> AsyncIterator[ClusterFactory]:
    """A factory of :class:`Cluster` (``hosts`` by default), every one closed on exit;
    ``start=False`` leaves a cluster for the test to start."""
    made: list[Cluster] = []

    async def factory(
        kind: str = "vxlan", hosts: int = hosts, *, start: bool = True, **options: object
    ) -> Cluster:
        cluster = Cluster(make_topology(hosts), kind, **options)
        made.append(cluster)
        if start:
            await cluster.start()
        return cluster

    try:
        yield factory
    finally:
        for cluster in made:
            await cluster.close()
