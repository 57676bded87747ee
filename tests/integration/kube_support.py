"""Real agents in ``--kube-subnet-mgr`` mode, in the host namespaces of a Topology, with
the API server double in the underlay namespace: one Node object per host with its
podCIDR (as the controller-manager assigns it), a service-account token bound to the
ClusterRole of kube-flannel.yml, and net-conf.json as the ConfigMap mounts it."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Network
from pathlib import Path

import pytest

from loden.kubeapi.auth import FLANNEL_RULES
from tests.fixtures.kubeapi import KubeApiClient, KubeApiFactory
from tests.fixtures.topology import Host, Pod, Process, Topology, TopologyFactory, wait_until
from tests.integration.agent_support import FLANNELD

P = "flannel.alpha.coreos.com/"
#: wireguard: run "$@" with this host's own /run/wireguard and /run/flannel (the UAPI
#: socket and key file are machine-wide paths; see test_agent_wireguard.py).
PRIVATE_RUN = (
    'mkdir -p /run/wireguard /run/flannel "$1/wireguard" "$1/flannel"'
    ' && mount --bind "$1/wireguard" /run/wireguard'
    ' && mount --bind "$1/flannel" /run/flannel'
    ' && shift && exec "$@"'
)


@dataclass
class KubeNode:
    host: Host
    name: str
    pod_cidr: IPv4Network
    dir: Path
    args: list[str]
    proc: Process | None = None
    pods: list[Pod] = field(default_factory=list)

    @property
    def subnet_file(self) -> Path:
        return self.dir / "subnet.env"

    def healthz(self) -> tuple[int, str]:
        """``GET /healthz`` from inside the node's namespace."""
        out = self.host.ns.run(
            "curl", "-s", "-o", "-", "-w", "\n%{http_code}", f"http://{self.host.ip}:8471/healthz"
        ).stdout
        body, _, code = out.rpartition("\n")
        return int(code or 0), body


class KubeAgentCluster:
    def __init__(
        self,
        topo: Topology,
        kubeapi_server: KubeApiFactory,
        backend: Mapping[str, object],
        *,
        extra_args: tuple[str, ...] = (),
        rules: tuple[Mapping[str, object], ...] = FLANNEL_RULES,
        create_nodes: bool = True,
    ) -> None:
        self.topo = topo
        assert topo.underlay_address is not None
        server = kubeapi_server(netns=topo.underlay.name, host=str(topo.underlay_address.ip))
        assert server.client is not None
        self.api: KubeApiClient = server.client
        self.network = IPv4Network(f"10.{random.randint(100, 199)}.0.0/16")
        self.workdir = topo.workdir / "kube"
        self.workdir.mkdir(exist_ok=True)
        self.net_conf = self.workdir / "net-conf.json"
        self.net_conf.write_text(json.dumps({"Network": str(self.network), "Backend": backend}))
        self.private_run = backend.get("Type") == "wireguard"
        self.token = self.api.service_account(rules=rules)
        self.kubeconfig = self.api.write_kubeconfig(self.workdir / "kubeconfig", token=self.token)
        self.admin_kubeconfig = self.api.write_kubeconfig(self.workdir / "admin.kubeconfig")
        self.nodes: list[KubeNode] = []
        for index, host in enumerate(topo.hosts):
            workdir = host.ns.workdir / "agent"
            workdir.mkdir(exist_ok=True)
            name = f"node{index + 1}"
            cidr = IPv4Network(f"{self.network.network_address + (index + 1) * 256}/24")
            args = [
                "--kube-subnet-mgr",
                f"--kubeconfig-file={self.kubeconfig}",
                f"--net-config-path={self.net_conf}",
                f"--subnet-file={workdir / 'subnet.env'}",
                f"--state-dir={workdir / 'state'}",
                "--ip-masq",
                "--iptables-resync=1",
                "--resync-period=1",
                f"--healthz-ip={host.ip}",
                "--healthz-port=8471",
                *extra_args,
            ]
            node = KubeNode(host=host, name=name, pod_cidr=cidr, dir=workdir, args=args)
            self.nodes.append(node)
            if create_nodes:
                self.create_node(node)

    def create_node(self, node: KubeNode, **kwargs: object) -> None:
        self.api.create_node(
            node.name,
            str(node.pod_cidr),
            addresses=[("InternalIP", str(node.host.ip))],
            **kwargs,  # type: ignore[arg-type]
        )

    def close(self) -> None:
        for node in self.nodes:
            if node.proc is not None:
                node.proc.stop()

    def start(
        self, node: KubeNode, *, wait: bool = True, env: dict[str, str] | None = None
    ) -> None:
        node.subnet_file.unlink(missing_ok=True)
        argv = [FLANNELD, *node.args]
        if self.private_run:
            argv = ["sh", "-c", PRIVATE_RUN, "sh", str(node.dir / "run"), *argv]
        node.proc = node.host.ns.spawn(*argv, env={"NODE_NAME": node.name, **(env or {})})
        if wait:
            self.wait_ready(node)

    def wait_ready(self, node: KubeNode, timeout: float = 30.0) -> None:
        if not wait_until(lambda: node.subnet_file.exists(), timeout=timeout):
            output = node.proc.output() if node.proc else ""
            raise AssertionError(f"agent on {node.name} not ready:\n{output}")

    def start_all(self) -> None:
        for node in self.nodes:
            self.start(node, wait=False)
        for node in self.nodes:
            self.wait_ready(node)

    def add_pods(self, per_node: int = 1, nodes: list[KubeNode] | None = None) -> None:
        for node in self.nodes if nodes is None else nodes:
            mtu = None
            for line in node.subnet_file.read_text().splitlines():
                if line.startswith("FLANNEL_MTU="):
                    mtu = int(line.split("=", 1)[1])
            for _ in range(per_node):
                node.pods.append(self.topo.add_pod(node.host, node.subnet_file, mtu=mtu))

    def mesh_failures(self, timeout: float = 15.0) -> list[str]:
        pods = [pod for node in self.nodes for pod in node.pods]
        pairs = [(src.ns, dst.ip) for src in pods for dst in pods if src is not dst]
        pairs += [(n.host.ns, pod.ip) for n in self.nodes if n.pods for pod in pods]
        failing = pairs
        deadline = time.monotonic() + timeout
        while failing and time.monotonic() < deadline:
            failing = [(ns, ip) for ns, ip in failing if not ns.ping(ip, wait=1.0)]
        return [f"{ns.name} -> {ip}" for ns, ip in failing]

    def kubectl(self, *args: str) -> str:
        """The real kubectl (1.32), run inside the underlay namespace, as admin."""
        return self.topo.underlay.out("kubectl", f"--kubeconfig={self.admin_kubeconfig}", *args)

    def routes(self, node: KubeNode) -> str:
        return node.host.ns.ip("route", "show").stdout


ClusterFactory = Callable[..., KubeAgentCluster]


@pytest.fixture
def kube_cluster(
    make_topology: TopologyFactory, kubeapi_server: KubeApiFactory
) -> Iterator[ClusterFactory]:
    made: list[KubeAgentCluster] = []

    def factory(
        backend: Mapping[str, object], *, hosts: int = 3, **kwargs: object
    ) -> KubeAgentCluster:
        topo = make_topology(hosts=hosts)
        cluster = KubeAgentCluster(topo, kubeapi_server, backend, **kwargs)  # type: ignore[arg-type]
        made.append(cluster)
        return cluster

    try:
        yield factory
    finally:
        for cluster in made:
            cluster.close()
