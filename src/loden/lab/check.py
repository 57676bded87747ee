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

On a ``--ipv6 dual`` lab rules 1, 3 and 4 run once per family (ping for IPv4, ping to
the pods' IPv6 addresses for IPv6, diagnosed on ``flannel-v6.1`` and with ip6tables);
``--ipv6 only`` checks IPv6 alone.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from ipaddress import IPv4Interface, ip_address, ip_interface, ip_network

from loden.errors import LodenError
from loden.lab import netns, proc
from loden.lab.plan import HEALTHZ_PORT
from loden.lab.runtime_cni import APP_PORT
from loden.lab.state import LabState, NodeRecord, PodRecord

_TIME = re.compile(r"time=([\d.]+) ms")
VXLAN_DEVICE = "flannel.1"
VXLAN_DEVICE_V6 = "flannel-v6.1"


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
    version: int = 4


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


def _eth0_ip(netns_path: str, version: int = 4) -> str:
    argv = ["ip", f"-{version}", "-o", "addr", "show", "dev", "eth0", "scope", "global"]
    done = proc.run(netns.in_net(netns_path, argv), check=False, timeout=5)
    words = done.stdout.decode(errors="replace").split()
    for before, word in zip(words, words[1:], strict=False):
        if before in ("inet", "inet6") and "/" in word:
            return word.split("/")[0]
    return ""


def _suffix(state: LabState, version: int) -> str:
    return "" if state.plan.families == (4,) else f" (IPv{version})"


def rule_own_ip(state: LabState, version: int = 4) -> RuleResult:
    problems: list[str] = []
    seen: dict[str, str] = {}
    for pod in state.pods:
        ip = pod.address(version)
        if ip in seen:
            problems.append(f"{pod.name} and {seen[ip]} both have {ip}")
        seen[ip] = pod.name
        actual = _eth0_ip(pod.netns, version)
        if actual != ip:
            problems.append(f"{pod.name}: eth0 has {actual or 'no address'}, expected {ip}")
        subnet = state.nodes[pod.node].subnet_of(version)
        if subnet and ip and ip_address(ip) not in ip_network(subnet):
            problems.append(f"{pod.name}: {ip} is outside {pod.node}'s subnet {subnet}")
    return RuleResult(
        "every pod has its own IP" + _suffix(state, version),
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
        version = state.plan.families[0]
        addresses = {c.name: _eth0_ip(f"/proc/{c.pid}/ns/net", version) for c in pod.containers}
        if len(namespaces) != 1 or (0, 0) in namespaces:
            problems.append(f"{pod.name}: containers are in different network namespaces")
        if set(addresses.values()) != {pod.address(version)}:
            problems.append(
                f"{pod.name}: containers see {addresses}, expected {pod.address(version)}"
            )
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
    sources: Sequence[Source],
    targets: Sequence[PodRecord],
    *,
    wait: float,
    workers: int = 16,
    version: int = 4,
) -> list[Probe]:
    """Ping every (source, target) pair except a pod to itself; retry failures until ``wait``."""
    pairs = [(s, t) for s in sources for t in targets if s.name != t.name]
    results: dict[tuple[str, str], Probe] = {}
    deadline = time.monotonic() + wait
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = pairs
        while pending:
            outcomes = list(pool.map(lambda p: ping(p[0].netns, p[1].address(version)), pending))
            for (source, target), (ok, ms) in zip(pending, outcomes, strict=True):
                results[(source.name, target.name)] = Probe(source, target, ok, ms, version)
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


def _path_problems(
    state: LabState, src: NodeRecord, dst: NodeRecord, version: int = 4
) -> list[str]:
    """What is missing on ``src`` for traffic to ``dst``'s subnet (of IP ``version``)."""
    causes: list[str] = []
    subnet = dst.subnet_of(version)
    if not subnet:
        return [f"{dst.name} has no known IPv{version} subnet (is its agent running?)"]
    family = f"-{version}"
    routes = _json(["ip", "-n", src.netns, family, "-j", "route", "show", "exact", subnet])
    if not routes:
        causes.append(f"{src.name} has no route to {dst.name}'s subnet {subnet}")
    if state.plan.backend == "vxlan":
        device = VXLAN_DEVICE if version == 4 else VXLAN_DEVICE_V6
        gateway = str(ip_network(subnet).network_address)
        neigh = _json(["ip", "-n", src.netns, family, "-j", "neigh", "show", "dev", device])
        if not any(e.get("dst") == gateway for e in neigh):
            causes.append(f"{src.name} has no neighbour entry for {gateway} on {device}")
        fdb = _json(["bridge", "-n", src.netns, "-j", "fdb", "show", "dev", device])
        peer = str(ip_interface(dst.address_of(version)).ip)
        if not any(e.get("dst") == peer for e in fdb):
            causes.append(f"{src.name} has no FDB entry towards {peer} on {device}")
    return causes


def diagnose(state: LabState, source_node: str, target: PodRecord, version: int = 4) -> str:
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
    causes += _path_problems(state, src, dst, version)
    causes += [f"replies are lost: {p}" for p in _path_problems(state, dst, src, version)]
    tables = "iptables" if version == 4 else "ip6tables"
    for node in {src.name: src, dst.name: dst}.values():
        chain = proc.run(
            netns.in_net(node.netns, [tables, "-S", "FLANNEL-FWD"]), check=False, timeout=5
        )
        if chain.returncode != 0:
            causes.append(f"FLANNEL-FWD chain missing on {node.name} ({tables} forward rules)")
    if not causes:
        causes.append(
            f"not obvious: try `loden lab exec {src.name} -- ip route get "
            f"{target.address(version)}`"
        )
    return "; ".join(causes)


def run_check(
    state: LabState, *, wait: float = 5.0, on_rule: Callable[[RuleResult], None] | None = None
) -> CheckResult:
    """Evaluate the four rules; never raises for a network failure (it is the result)."""
    families = state.plan.families
    rules = [rule_own_ip(state, v) for v in families] + [rule_shared_ip(state)]
    pod_sources = [Source(p.name, p.node, p.netns) for p in state.pods]
    node_sources = [Source(n.name, n.name, netns.netns_path(n.netns)) for n in state.nodes.values()]
    all_probes: list[Probe] = []
    diagnoses: list[str] = []
    for version in families:
        probes = probe_all(pod_sources + node_sources, state.pods, wait=wait, version=version)
        all_probes += probes
        causes: dict[tuple[str, str], str] = {}
        for kind, names in (
            ("pod", {s.name for s in pod_sources}),
            ("node", {s.name for s in node_sources}),
        ):
            failed = [p for p in probes if p.source.name in names and not p.ok]
            total = sum(1 for p in probes if p.source.name in names)
            title = (
                "every pod reaches every other pod"
                if kind == "pod"
                else "every node reaches every pod"
            ) + _suffix(state, version)
            details = [f"{total - len(failed)}/{total} pairs answered"]
            groups: dict[tuple[str, str], list[Probe]] = {}
            for probe in failed:
                groups.setdefault((probe.source.node, probe.target.node), []).append(probe)
            for (src, dst), group in groups.items():
                if (src, dst) not in causes:
                    causes[(src, dst)] = diagnose(state, src, group[0].target, version)
                pairs = ", ".join(f"{p.source.name}→{p.target.name}" for p in group)
                line = f"{src} → {dst} ({pairs}): {causes[(src, dst)]}"
                details.append(line)
                diagnoses.append(line)
            rules.append(RuleResult(title, not failed, tuple(details)))
    probes = all_probes
    if on_rule is not None:
        for rule in rules:
            on_rule(rule)
    return CheckResult(tuple(rules), tuple(probes), tuple(diagnoses))
