"""``loden lab status``: one row per node, read live from the nodes and from etcd.

The subnet and VTEP MAC / WireGuard key come from the leases in etcd (``loden leases
-json`` run inside node1 with the node's own etcd flags, so it also proves the store is
reachable from the nodes); when that fails they come from the node itself (subnet.env
and the ``flannel.1`` device). Agent health is the agent's own ``/healthz``. In kube
mode (``--store kube``) the detail column is the node's flannel annotations, read with
``loden leases -kube-subnet-mgr -json`` inside node1 through its in-cluster config.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from ipaddress import IPv4Interface, IPv6Interface

from rich.markup import escape
from rich.table import Table

from loden.lab import cloud, kube, netns, proc
from loden.lab.check import VXLAN_DEVICE, VXLAN_DEVICE_V6, agent_health
from loden.lab.node import etcd_flags, loden_executable, read_subnet, read_subnet6
from loden.lab.plan import LabPlan
from loden.lab.state import LabState, NodeRecord

WIREGUARD_DEVICE = "flannel-wg"


@dataclass(frozen=True, slots=True)
class NodeStatus:
    node: str
    public_ip: str
    subnet: str
    backend: str
    detail: str
    pods: int
    health: str
    healthy: bool
    subnet6: str = ""


def leases(state: LabState) -> dict[str, dict[str, object]] | None:
    """Leases by public IP, read through etcd from the first node; None if that fails."""
    node = next(iter(state.nodes.values()), None)
    if node is None:
        return None
    argv = netns.in_node(
        node.mntns, node.netns, [loden_executable(), "leases", "-json", *etcd_flags(state.plan)]
    )
    done = proc.run(argv, check=False, timeout=15, env={"PATH": proc.SERVICE_PATH})
    if done.returncode != 0:
        return None
    try:
        rows = json.loads(done.stdout)
    except ValueError:
        return None
    return {str(r.get("public_ip")): r for r in rows if isinstance(r, dict)}


def _local_detail(state: LabState, node: NodeRecord) -> str:
    backend = state.plan.backend
    if backend == "vxlan":
        device = VXLAN_DEVICE if 4 in state.plan.families else VXLAN_DEVICE_V6
        done = proc.run(
            ["ip", "-n", node.netns, "-j", "link", "show", device], check=False, timeout=5
        )
        try:
            return str(json.loads(done.stdout or b"[{}]")[0].get("address", ""))
        except (ValueError, IndexError):
            return ""
    if backend == "wireguard":
        done = proc.run(
            netns.in_node(node.mntns, node.netns, ["wg", "show", WIREGUARD_DEVICE, "public-key"]),
            check=False,
            timeout=5,
        )
        return done.stdout.decode(errors="replace").strip()
    return "-"


def _cloud_detail(state: LabState, subnet: str) -> str:
    """The node's route as the emulated cloud holds it (what the VPC router applies)."""
    target = cloud.cloud_routes(state.plan).get(subnet)
    return f"route -> {target.rsplit('/', 1)[-1]}" if target else "no cloud route"


def collect(state: LabState) -> list[NodeStatus]:
    kube_mode = state.plan.store == "kube"
    by_ip = leases(state) if state.plan.with_agent and not kube_mode else None
    by_node = kube.node_annotations(state) if state.plan.with_agent and kube_mode else None
    rows: list[NodeStatus] = []
    for node in state.nodes.values():
        public_ip = str(IPv4Interface(node.address).ip)
        lease = (by_ip or {}).get(public_ip)
        subnet = (
            str(lease["subnet"])
            if lease
            else (read_subnet(state.plan, node.name)[0] or node.subnet)
        )
        detail = str(lease.get("detail") or "-") if lease else _local_detail(state, node)
        subnet6 = ""
        if 6 in state.plan.families:
            subnet6 = (
                (str(lease.get("ipv6_subnet") or "") if lease else "")
                or read_subnet6(state.plan, node.name)
                or node.subnet6
            )
            if node.address6:
                public_ip = f"{public_ip} {IPv6Interface(node.address6).ip}"
            if 4 not in state.plan.families:
                subnet = ""
        if by_node is not None and node.name in by_node:
            detail = kube.describe(by_node[node.name])
        if state.plan.backend in cloud.CLOUD_BACKENDS and subnet:
            detail = _cloud_detail(state, subnet)
        healthy, body = agent_health(state, node)
        rows.append(
            NodeStatus(
                node=node.name,
                public_ip=public_ip,
                subnet=subnet or ("-" if 4 not in state.plan.families else "?"),
                backend=state.plan.backend,
                subnet6=subnet6 or "?",
                detail=detail or "-",
                pods=sum(1 for p in state.pods if p.node == node.name),
                health=body[:60],
                healthy=healthy,
            )
        )
    return rows


def _networks(plan: LabPlan) -> str:
    v4 = f"Network {plan.network}"
    v6 = f"IPv6Network {plan.network6}"
    underlay = f"underlay {plan.underlay}"
    if plan.ipv6 == "off":
        return f"{v4}, {underlay}"
    nets = v6 if plan.ipv6 == "only" else f"{v4} + {v6}"
    return f"{nets}, {underlay} + {plan.underlay6}"


def table(state: LabState, rows: list[NodeStatus]) -> Table:
    plan = state.plan
    title = (
        f"lab {plan.name}: {plan.nodes} nodes, {plan.backend}, {plan.runtime} runtime, "
        + (
            f"API server {kube.api_url(plan)}, "
            if plan.store == "kube"
            else f"etcd {plan.etcd}{' TLS' if plan.tls else ''} ({plan.etcd_api}), "
        )
        + f"{_networks(plan)} {escape(f'[{state.phase}]')}"
    )
    out = Table(title=title, title_justify="left")
    ipv6 = 6 in plan.families
    columns = ["node", "public IP", "subnet"] + (["IPv6 subnet"] if ipv6 else [])
    detail_column = "node annotations" if plan.store == "kube" else "VTEP MAC / key"
    for column in (*columns, "backend", detail_column, "pods", "agent /healthz"):
        out.add_column(column)
    for row in rows:
        text = escape(row.health)
        health = f"[green]{text}[/]" if row.healthy else f"[red]{text}[/]"
        subnets = [row.subnet] + ([row.subnet6] if ipv6 else [])
        out.add_row(
            row.node, row.public_ip, *subnets, row.backend, row.detail, str(row.pods), health
        )
    return out
