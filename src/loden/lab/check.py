"""``loden lab check``: the four rules of the Kubernetes network model (seed, Part 6).

1. every pod has its own IP: the addresses are distinct, each is on the pod's eth0 and
   inside its node's subnet;
2. containers of one pod share it: every container of a multi-container pod sees the
   same network namespace and address, and reaches its neighbour on 127.0.0.1;
3. every pod reaches every other pod; 4. every node reaches every pod: ``ping -c1 -W1``
   for every pair, in parallel with bounded concurrency. A pair that fails is retried
   until ``wait`` seconds have passed (peers that joined last may still be being
   programmed), then reported with the likely cause, found by inspecting the source
   node: agent health, the route to the peer subnet, the neighbour and FDB entries on
   ``flannel.1`` (vxlan), the ``FLANNEL-FWD`` chain.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

from loden.errors import LodenError
from loden.lab import netns, proc
from loden.lab.plan import HEALTHZ_PORT
from loden.lab.runtime_cni import APP_PORT
from loden.lab.state import LabState, NodeRecord, PodRecord

_TIME = re.compile(r"time=([\d.]+) ms")
VXLAN_DEVICE = "flannel.1"


@dataclass(frozen=True, slots=True)
class Source:
    """Where a ping starts: a pod or a node (its network namespace path)."""

    name: str
    node: str
    netns: str


@dataclass(frozen=True, slots=True)
class Probe:
    source: Source
    target: PodRecord
    ok: bool
    ms: float | None


@dataclass(frozen=True, slots=True)
class RuleResult:
    rule: str
    ok: bool
    details: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class CheckResult:
    rules: tuple[RuleResult, ...]
    probes: tuple[Probe, ...]
    diagnoses: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rules)


def ping(netns_path: str, ip: str) -> tuple[bool, float | None]:
    done = proc.run(
        netns.in_net(netns_path, ["ping", "-n", "-c1", "-W1", ip]), check=False, timeout=5
    )
    match = _TIME.search(done.stdout.decode(errors="replace"))
    return done.returncode == 0, float(match.group(1)) if match else None


def _eth0_ip(netns_path: str) -> str:
    done = proc.run(
        netns.in_net(netns_path, ["ip", "-4", "-o", "addr", "show", "dev", "eth0"]),
        check=False,
        timeout=5,
    )
    for word in done.stdout.decode(errors="replace").split():
        if "/" in word and "." in word:
            return word.split("/")[0]
    return ""


def rule_own_ip(state: LabState) -> RuleResult:
    problems: list[str] = []
    seen: dict[str, str] = {}
    for pod in state.pods:
        if pod.ip in seen:
            problems.append(f"{pod.name} and {seen[pod.ip]} both have {pod.ip}")
        seen[pod.ip] = pod.name
        actual = _eth0_ip(pod.netns)
        if actual != pod.ip:
            problems.append(f"{pod.name}: eth0 has {actual or 'no address'}, expected {pod.ip}")
        subnet = state.nodes[pod.node].subnet
        if subnet and IPv4Address(pod.ip) not in IPv4Network(subnet):
            problems.append(f"{pod.name}: {pod.ip} is outside {pod.node}'s subnet {subnet}")
    return RuleResult(
        "every pod has its own IP",
        not problems and bool(state.pods),
        tuple(problems or [f"{len(state.pods)} pods, {len(seen)} distinct IPs"]),
    )


def rule_shared_ip(state: LabState) -> RuleResult:
    problems: list[str] = []
    checked = 0
    busybox = proc.require("busybox", "busybox-static")
    for pod in state.pods:
        if len(pod.containers) < 2:
            continue
        checked += 1
        namespaces = {proc.ns_id(f"/proc/{c.pid}/ns/net") for c in pod.containers}
        addresses = {c.name: _eth0_ip(f"/proc/{c.pid}/ns/net") for c in pod.containers}
        if len(namespaces) != 1 or (0, 0) in namespaces:
            problems.append(f"{pod.name}: containers are in different network namespaces")
        if set(addresses.values()) != {pod.ip}:
            problems.append(f"{pod.name}: containers see {addresses}, expected {pod.ip}")
        for container in pod.containers[1:]:
            # busybox's wget segfaults here (static glibc); its nc does not.
            fetch = [busybox, "nc", "-w", "2", "127.0.0.1", str(APP_PORT)]
            done = proc.run(
                netns.in_net(f"/proc/{container.pid}/ns/net", fetch),
                check=False,
                timeout=5,
                input=b"GET / HTTP/1.0\r\n\r\n",
            )
            if b" 200 " not in done.stdout.split(b"\n", 1)[0]:
                problems.append(
                    f"{pod.name}: {container.name} cannot reach the app container "
                    f"on 127.0.0.1:{APP_PORT}"
                )
    if not checked:
        problems.append("no pod with two containers in this lab")
    return RuleResult(
        "containers of one pod share its IP",
        not problems,
        tuple(problems or [f"{checked} multi-container pod(s) share one IP"]),
    )


def probe_all(
    sources: Sequence[Source], targets: Sequence[PodRecord], *, wait: float, workers: int = 16
) -> list[Probe]:
    """Ping every (source, target) pair except a pod to itself; retry failures until ``wait``."""
    pairs = [(s, t) for s in sources for t in targets if s.name != t.name]
    results: dict[tuple[str, str], Probe] = {}
    deadline = time.monotonic() + wait
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = pairs
        while pending:
            outcomes = list(pool.map(lambda p: ping(p[0].netns, p[1].ip), pending))
            for (source, target), (ok, ms) in zip(pending, outcomes, strict=True):
                results[(source.name, target.name)] = Probe(source, target, ok, ms)
            pending = [(s, t) for s, t in pending if not results[(s.name, t.name)].ok]
            if not pending or time.monotonic() >= deadline:
                break
            time.sleep(0.5)
    return [results[(s.name, t.name)] for s, t in pairs]


def agent_health(state: LabState, node: NodeRecord) -> tuple[bool, str]:
    """(healthy, body) from the agent's /healthz on the node's address."""
    if not state.plan.with_agent:
        return True, "no agent (--no-agent)"
    try:
        status, body = netns.http_get(
            node.netns,
            IPv4Interface(node.address).ip.exploded,
            HEALTHZ_PORT,
            "/healthz",
            timeout=2.0,
        )
    except (OSError, LodenError) as exc:
        return False, f"no answer on {IPv4Interface(node.address).ip}:{HEALTHZ_PORT} ({exc})"
    return status == 200, body.strip().replace("\n", "; ")


def _json(argv: Sequence[str]) -> list[dict[str, object]]:
    done = proc.run(argv, check=False, timeout=5)
    try:
        data = json.loads(done.stdout or b"[]")
    except ValueError:
        return []
    return data if isinstance(data, list) else []


def _path_problems(state: LabState, src: NodeRecord, dst: NodeRecord) -> list[str]:
    """What is missing on ``src`` for traffic to ``dst``'s subnet."""
    causes: list[str] = []
    subnet = dst.subnet
    if not subnet:
        return [f"{dst.name} has no known subnet (is its agent running?)"]
    routes = _json(["ip", "-n", src.netns, "-j", "route", "show", "exact", subnet])
    if not routes:
        causes.append(f"{src.name} has no route to {dst.name}'s subnet {subnet}")
    if state.plan.backend == "vxlan":
        gateway = str(IPv4Network(subnet).network_address)
        neigh = _json(["ip", "-n", src.netns, "-j", "neigh", "show", "dev", VXLAN_DEVICE])
        if not any(e.get("dst") == gateway for e in neigh):
            causes.append(f"{src.name} has no neighbour entry for {gateway} on {VXLAN_DEVICE}")
        fdb = _json(["bridge", "-n", src.netns, "-j", "fdb", "show", "dev", VXLAN_DEVICE])
        peer = str(IPv4Interface(dst.address).ip)
        if not any(e.get("dst") == peer for e in fdb):
            causes.append(f"{src.name} has no FDB entry towards {peer} on {VXLAN_DEVICE}")
    return causes


def diagnose(state: LabState, source_node: str, target: PodRecord) -> str:
    """The likely cause of ``source_node`` → ``target`` failing, from the source node."""
    src = state.nodes[source_node]
    dst = state.nodes[target.node]
    causes: list[str] = []
    for node in {src.name: src, dst.name: dst}.values():
        healthy, body = agent_health(state, node)
        if not healthy:
            causes.append(f"agent on {node.name} unhealthy: {body}")
    if source_node == target.node:
        causes.append(f"same node: check cni0 and the pod's veth on {source_node}")
        return "; ".join(causes)
    causes += _path_problems(state, src, dst)
    causes += [f"replies are lost: {p}" for p in _path_problems(state, dst, src)]
    for node in {src.name: src, dst.name: dst}.values():
        chain = proc.run(
            netns.in_net(node.netns, ["iptables", "-S", "FLANNEL-FWD"]), check=False, timeout=5
        )
        if chain.returncode != 0:
            causes.append(f"FLANNEL-FWD chain missing on {node.name} (forward rules)")
    if not causes:
        causes.append(f"not obvious: try `loden lab exec {src.name} -- ip route get {target.ip}`")
    return "; ".join(causes)


def run_check(
    state: LabState, *, wait: float = 5.0, on_rule: Callable[[RuleResult], None] | None = None
) -> CheckResult:
    """Evaluate the four rules; never raises for a network failure (it is the result)."""
    rules = [rule_own_ip(state), rule_shared_ip(state)]
    pod_sources = [Source(p.name, p.node, p.netns) for p in state.pods]
    node_sources = [Source(n.name, n.name, netns.netns_path(n.netns)) for n in state.nodes.values()]
    probes = probe_all(pod_sources + node_sources, state.pods, wait=wait)
    diagnoses: list[str] = []
    causes: dict[tuple[str, str], str] = {}
    for kind, names in (
        ("pod", {s.name for s in pod_sources}),
        ("node", {s.name for s in node_sources}),
    ):
        failed = [p for p in probes if p.source.name in names and not p.ok]
        total = sum(1 for p in probes if p.source.name in names)
        title = (
            "every pod reaches every other pod" if kind == "pod" else "every node reaches every pod"
        )
        details = [f"{total - len(failed)}/{total} pairs answered"]
        groups: dict[tuple[str, str], list[Probe]] = {}
        for probe in failed:
            groups.setdefault((probe.source.node, probe.target.node), []).append(probe)
        for (src, dst), group in groups.items():
            if (src, dst) not in causes:
                causes[(src, dst)] = diagnose(state, src, group[0].target)
            pairs = ", ".join(f"{p.source.name}→{p.target.name}" for p in group)
            line = f"{src} → {dst} ({pairs}): {causes[(src, dst)]}"
            details.append(line)
            diagnoses.append(line)
        rules.append(RuleResult(title, not failed, tuple(details)))
    if on_rule is not None:
        for rule in rules:
            on_rule(rule)
    return CheckResult(tuple(rules), tuple(probes), tuple(diagnoses))
