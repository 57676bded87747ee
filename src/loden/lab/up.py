"""``loden lab up``: build a lab in the order the seed deploys a cluster.

1. underlay namespace with bridge ``br0`` (the nodes' LAN, gateway ``.1``);
2. etcd (one member or three, optionally TLS with certificates made now), or with
   ``--store kube`` the Kubernetes API server double and the objects a cluster would
   hold (:mod:`loden.lab.kube`);
3. the nodes, in parallel: namespaces, private mounts, ``loden systemd render``;
4. the network config, written from node1 the seed's way (``loden config set`` for
   v3, ``ETCDCTL_API=2 etcdctl set`` for v2); kube: the ConfigMap's net-conf.json;
5. ``flanneld.service`` on every node, in parallel (READY=1, then ExecStartPost);
   kube: the DaemonSet pod's ``kube-flannel.service``;
6. the runtime: CNI pods through the flannel plugin, or dockerd from ``docker.service``
   and ``docker run`` containers.

A failure stops ``up`` and leaves what was built (state.json records it) for
inspection; ``loden lab down`` removes it. ``--no-agent`` (hidden, for infrastructure
tests) skips 4-5 and writes each node's subnet.env by hand.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from loden.errors import ConfigError, LodenError
from loden.lab import cloud, etcd, kube, netns, node, proc, runtime_cni, runtime_docker
from loden.lab.pki import EtcdPKI, make_pki
from loden.lab.plan import LAB_ROOT, LabPlan, check_name, pick_addresses
from loden.lab.report import Reporter
from loden.lab.state import LabState, NodeRecord, host_lock, taken_networks

log = logging.getLogger(__name__)
T = TypeVar("T")

BACKEND_MODULES = {
    "vxlan": "loden.backend.vxlan",
    "host-gw": "loden.backend.hostgw",
    "udp": "loden.backend.udp",
    "wireguard": "loden.backend.wireguard",
    "aws-vpc": "loden.backend.aws_vpc",
    "gce": "loden.backend.gce",
}


def backend_available(backend: str) -> bool:
    """True when this build has the backend's module."""
    return importlib.util.find_spec(BACKEND_MODULES[backend]) is not None


def preflight(plan: LabPlan) -> None:
    """:raises LodenError: a program or backend the lab needs is missing."""
    for program, package in (
        ("ip", "iproute2"),
        ("nsenter", "util-linux"),
        ("unshare", "util-linux"),
        ("etcd", "etcd-server"),
        ("busybox", "busybox-static"),
        ("ping", "iputils-ping"),
        ("iptables", "iptables"),
    ):
        proc.require(program, package)
    if plan.etcd_api == "v2":
        proc.require("etcdctl", "etcd-client")
    if plan.runtime == "docker":
        proc.require("dockerd", "docker.io")
        proc.require("docker", "docker.io")
    if plan.backend == "wireguard":
        proc.require("wg", "wireguard-tools")
        proc.require("wireguard-go", "wireguard-go")
        proc.require("setpriv", "util-linux")
    if plan.backend == "aws-vpc":
        for module, package in (("boto3", "boto3"), ("moto", "moto[server]")):
            if importlib.util.find_spec(module) is None:
                raise LodenError(
                    f"the aws-vpc lab emulates EC2 with {module}: pip install '{package}'"
                    " (both are in Loden's dev extra)"
                )
    if plan.with_agent and not backend_available(plan.backend):
        raise LodenError(
            f"backend {plan.backend!r} is not available in this build of Loden "
            f"({BACKEND_MODULES[plan.backend]} is missing); use --backend vxlan or host-gw"
        )


def create_state(
    name: str,
    *,
    nodes: int,
    backend: str,
    runtime: str,
    etcd_mode: str,
    tls: bool,
    etcd_api: str,
    pods: int,
    with_agent: bool,
    ipv6: str = "off",
    store: str = "etcd",
) -> LabState:
    """Pick addresses and create the lab directory with its first state.json.

    :raises ConfigError: a lab of that name exists already.
    """
    check_name(name)
    with host_lock():
        if (LAB_ROOT / name).exists():
            raise ConfigError(
                f"a lab named {name!r} exists already: `loden lab down --name {name}` first, "
                "or pick another --name"
            )
        underlay, network = pick_addresses(name, taken_networks())
        plan = LabPlan(
            name=name,
            nodes=nodes,
            backend=backend,
            runtime=runtime,
            etcd=etcd_mode,
            tls=tls,
            etcd_api=etcd_api,
            pods_per_node=pods,
            underlay=underlay,
            network=network,
            with_agent=with_agent,
            ipv6=ipv6,
            store=store,
        )
        preflight(plan)
        state = LabState(plan)
        state.save()
    return state


def parallel(items: list[str], fn: Callable[[str], T]) -> list[T]:
    """``fn`` over the node names, a few at a time; the first error is raised."""
    if not items:
        return []
    with ThreadPoolExecutor(max_workers=min(len(items), 8)) as pool:
        return list(pool.map(fn, items))


def up(state: LabState, reporter: Reporter, *, agent_timeout: float = 40.0) -> LabState:
    """Build the lab recorded in ``state`` (see the module docstring)."""
    plan = state.plan
    with reporter.step(f"underlay {plan.underlay_ns}: bridge br0 {plan.gateway}"):
        netns.add_netns(state, plan.underlay_ns)
        netns.make_underlay(plan.underlay_ns, address=plan.gateway)
        if plan.ipv6 != "off":
            for key in ("all", "default"):
                netns.sysctl(plan.underlay_ns, f"net.ipv6.conf.{key}.accept_dad", "0")
            netns.ip(
                plan.underlay_ns, "-6", "addr", "add", str(plan.gateway6), "dev", "br0", "nodad"
            )
    if plan.store == "kube":
        return up_kube(state, reporter, agent_timeout=agent_timeout)
    tls: EtcdPKI | None = None
    if plan.tls:
        with reporter.step("TLS: CA and etcd server/client certificate (the seed's server.pem)"):
            # Like the seed's cfssl hosts list, the SANs name every machine: etcd checks a
            # client certificate's IP SANs against the address the client connects from.
            hosts = [plan.gateway.ip, *plan.etcd_addresses()]
            hosts += [plan.node_address(n).ip for n in plan.node_names()]
            tls = make_pki(plan.workdir / "pki", hosts)
    members = len(plan.etcd_addresses())
    with reporter.step(
        f"etcd: {members} member{'s' if members > 1 else ''} at {plan.etcd_endpoints()}"
    ):
        etcd.start(state, tls)
    if plan.backend in cloud.CLOUD_BACKENDS:
        with reporter.step(
            f"emulated {plan.backend} cloud at {cloud.endpoint(plan)},"
            f" VPC router {plan.underlay_ns}"
        ):
            cloud.start(state)

    def build(name: str) -> NodeRecord:
        with reporter.step(f"{name}: namespaces, private mounts, `loden systemd render`") as s:
            record = node.build_node(state, name, tls)
            s.text = f"{name}: {record.address} in {record.netns}, units rendered"
            return record

    netns.private_dir(state, plan.workdir / "mntns")
    records = parallel(plan.node_names(), build)
    if plan.with_agent or plan.etcd_api == "v2":
        how = "loden config set" if plan.etcd_api == "v3" else "ETCDCTL_API=2 etcdctl set"
        with reporter.step(f"network config {plan.network_config()} ({how}, from node1)"):
            node.write_network_config(state, records[0])

    def start(name: str) -> NodeRecord:
        record = state.nodes[name]
        if not plan.with_agent:
            with reporter.step(f"{name}: subnet.env written by hand (--no-agent)"):
                return node.write_manual_subnet(state, record, records.index(record))
        with reporter.step(f"{name}: flanneld.service") as s:
            ready = node.start_agent(state, record, timeout=agent_timeout)
            subnets = " ".join(s for s in (ready.subnet, ready.subnet6) if s)
            s.text = f"{name}: flanneld ready, subnet {subnets}, MTU {ready.mtu}"
            return ready

    records = parallel(plan.node_names(), start)
    if plan.backend in cloud.CLOUD_BACKENDS and plan.with_agent:
        with reporter.step("cloud routes of every node in the emulated route table"):
            cloud.wait_for_routes(plan, [r.subnet for r in records])
    start_pods(state, reporter)
    state.set_phase("up")
    return state


def up_kube(state: LabState, reporter: Reporter, *, agent_timeout: float) -> LabState:
    """``up`` with the API server double instead of etcd (see :mod:`loden.lab.kube`)."""
    plan = state.plan
    with reporter.step(f"API server double at {kube.api_url(plan)} (python -m loden.kubeapi)"):
        client = kube.start_api(state)
    with reporter.step("Nodes with podCIDRs (controller-manager), DaemonSet pods") as s:
        pod_names = kube.register(state, client)
        s.text = "Nodes " + ", ".join(f"{n}={kube.pod_cidr(plan, n)}" for n in plan.node_names())
    netns.private_dir(state, plan.workdir / "mntns")
    loden = node.loden_executable()

    def build(name: str) -> NodeRecord:
        with reporter.step(f"{name}: namespaces, pod volumes, init container install-cni") as s:
            record = node.build_node(state, name, None, extra_ro=kube.POD_VOLUMES)
            kube.prepare_node(state, record, pod_names[name], loden)
            s.text = f"{name}: {record.address} in {record.netns}, pod {pod_names[name]}"
            return record

    parallel(plan.node_names(), build)

    def start(name: str) -> NodeRecord:
        with reporter.step(f"{name}: pod {pod_names[name]} (--kube-subnet-mgr)") as s:
            ready = node.start_agent(
                state, state.nodes[name], timeout=agent_timeout, unit=kube.UNIT
            )
            s.text = f"{name}: agent ready, podCIDR {ready.subnet}, MTU {ready.mtu}"
            return ready

    if plan.with_agent:
        parallel(plan.node_names(), start)
    else:
        for index, name in enumerate(plan.node_names()):
            node.write_manual_subnet(state, state.nodes[name], index - 1)  # = podCIDR
    start_pods(state, reporter)
    state.note(
        f"kubectl: loden lab exec --name {plan.name} underlay -- kubectl "
        f"--kubeconfig {kube.admin_kubeconfig(plan)} get nodes -o wide"
    )
    state.set_phase("up")
    return state


def start_pods(state: LabState, reporter: Reporter) -> None:
    """The runtime's pods (or docker containers) on every node."""
    plan = state.plan

    def pods(name: str) -> None:
        record = state.nodes[name]
        if plan.runtime == "docker":
            with reporter.step(f"{name}: docker.service (dockerd $DOCKER_NETWORK_OPTIONS)"):
                record = runtime_docker.start_dockerd(state, record)
            with reporter.step(f"{name}: {plan.pods_per_node} containers (docker run)") as s:
                made = runtime_docker.create_pods(state, record)
                s.text = f"{name}: containers " + ", ".join(
                    f"{p.name}={'+'.join(a for a in (p.ip, p.ip6) if a)}" for p in made
                )
        else:
            with reporter.step(f"{name}: {plan.pods_per_node} pods (CNI ADD via flannel)") as s:
                made = runtime_cni.create_pods(state, record)
                s.text = f"{name}: pods " + ", ".join(
                    f"{p.name}={'+'.join(a for a in (p.ip, p.ip6) if a)}" for p in made
                )

    parallel(plan.node_names(), pods)
