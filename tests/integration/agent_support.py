"""Real agents (``flanneld`` processes) in the host namespaces of a Topology, with a
real etcd in the underlay namespace: the whole product, end to end."""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import dataclass, field
from ipaddress import IPv4Network
from pathlib import Path

from tests.fixtures.etcd import EtcdServer
from tests.fixtures.topology import Host, Pod, Process, Topology, subnet_from_env, wait_until

FLANNELD = str(Path(sys.executable).parent / "flanneld")
LODEN = str(Path(sys.executable).parent / "loden")


@dataclass
class AgentNode:
    host: Host
    dir: Path
    args: list[str]
    proc: Process | None = None
    pods: list[Pod] = field(default_factory=list)

    @property
    def subnet_file(self) -> Path:
        return self.dir / "subnet.env"

    @property
    def subnet(self) -> IPv4Network:
        return subnet_from_env(self.subnet_file)


class AgentCluster:
    """``hosts`` nodes running Loden agents against one etcd inside the underlay."""

    def __init__(
        self,
        topo: Topology,
        backend: dict[str, object],
        *,
        api: str = "v3",
        extra_args: tuple[str, ...] = (),
        network: str | None = None,
        nftables: bool = False,
    ) -> None:
        self.topo = topo
        assert topo.underlay_address is not None
        self.etcd = EtcdServer(netns=topo.underlay.name, host=str(topo.underlay_address.ip))
        self.etcd.start()
        self.network = IPv4Network(network or f"10.{random.randint(1, 99)}.0.0/16")
        config: dict[str, object] = {"Network": str(self.network), "Backend": backend}
        if nftables:
            config["EnableNFTables"] = True
        self.config_json = json.dumps(config)
        self.api = api
        if api == "v2":
            self.etcdctl2("set", "/coreos.com/network/config", self.config_json)
        else:
            self.loden("config", "set", self.config_json)
        self.nodes: list[AgentNode] = []
        for host in topo.hosts:
            workdir = host.ns.workdir / "agent"
            workdir.mkdir(exist_ok=True)
            args = [
                f"--etcd-endpoints={self.etcd.client_url}",
                f"--subnet-file={workdir / 'subnet.env'}",
                f"--state-dir={workdir / 'state'}",
                "--ip-masq",
                "--iptables-resync=1",
                "--resync-period=1",
                f"--healthz-ip={host.ip}",
                "--healthz-port=8471",
                *extra_args,
            ]
            self.nodes.append(AgentNode(host=host, dir=workdir, args=args))

    def close(self) -> None:
        """Stop the agents, then etcd (the topology owner deletes the namespaces)."""
        for node in self.nodes:
            if node.proc is not None:
                node.proc.stop()
        self.etcd.close()

    def loden(self, *args: str) -> str:
        return self.topo.underlay.out(LODEN, *args, f"-etcd-endpoints={self.etcd.client_url}")

    def etcdctl2(self, *args: str) -> str:
        return self.topo.underlay.run(
            "env", "ETCDCTL_API=2", "etcdctl", f"--endpoints={self.etcd.client_url}", *args
        ).stdout

    def start(self, node: AgentNode, *, wait: bool = True) -> None:
        node.subnet_file.unlink(missing_ok=True)
        node.proc = node.host.ns.spawn(FLANNELD, *node.args)
        if wait:
            self.wait_ready(node)

    def wait_ready(self, node: AgentNode, timeout: float = 20.0) -> None:
        ok = wait_until(lambda: node.subnet_file.exists(), timeout=timeout)
        if not ok:
            output = node.proc.output() if node.proc else ""
            raise AssertionError(f"agent on {node.host.name} not ready:\n{output}")

    def start_all(self) -> None:
        for node in self.nodes:
            self.start(node, wait=False)
        for node in self.nodes:
            self.wait_ready(node)

    def add_pods(self, per_node: int = 1) -> None:
        mtu = None
        for node in self.nodes:
            env = node.subnet_file.read_text()
            for line in env.splitlines():
                if line.startswith("FLANNEL_MTU="):
                    mtu = int(line.split("=", 1)[1])
            for _ in range(per_node):
                node.pods.append(self.topo.add_pod(node.host, node.subnet_file, mtu=mtu))

    def all_pods(self) -> list[Pod]:
        return [pod for node in self.nodes for pod in node.pods]

    def mesh_failures(self, timeout: float = 15.0) -> list[str]:
        """Every pod pings every other pod and every host pings every pod; returns the
        pairs that still fail after ``timeout`` (first packets may wait for ARP)."""
        pairs = [
            (src.ns, dst.ip) for src in self.all_pods() for dst in self.all_pods() if src is not dst
        ]
        pairs += [(node.host.ns, pod.ip) for node in self.nodes for pod in self.all_pods()]
        failing = pairs
        deadline = time.monotonic() + timeout
        while failing and time.monotonic() < deadline:
            failing = [(ns, ip) for ns, ip in failing if not ns.ping(ip, wait=1.0)]
        return [f"{ns.name} -> {ip}" for ns, ip in failing]


def wait_for_peer_routes(cluster: AgentCluster, timeout: float = 15.0) -> None:
    """Every node has a route to every peer's subnet (agents are ready before that)."""
    for node in cluster.nodes:
        for peer in cluster.nodes:
            if peer is not node:
                show = ("route", "show", str(peer.subnet))
                ok = wait_until(lambda: bool(node.host.ns.ip(*show).stdout), timeout=timeout)  # noqa: B023
                assert ok, f"{node.host.name} has no route to {peer.subnet}"
