"""``loden lab status --svg FILE``: the lab as a picture.

Each node is a box (name, public IP, subnet, backend, VTEP MAC or key, agent health)
holding its pods; etcd sits on the underlay; between every two nodes one edge for the
tunnel or route that carries their pods' traffic (vxlan ``flannel.1``, a host-gw route,
udp ``flannel0``, wireguard ``flannel-wg``). Edges and node borders are coloured by the
last ``loden lab check`` (saved by :func:`save_check` next to the lab's state): green
when every probe between the two nodes answered, red when one failed, grey when no
check ran yet; the label gives the median round trip, and slower pairs are drawn
darker. Layout and SVG are Graphviz's (the ``dot`` binary, through the ``graphviz``
package): hand-written SVG would be more code and worse pictures.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from loden.errors import ConfigError

CHECK_FILE = "last-check.json"
TUNNEL = {
    "vxlan": "vxlan (flannel.1)",
    "host-gw": "host-gw route",
    "udp": "udp (flannel0 :8285)",
    "wireguard": "wireguard (flannel-wg)",
}
GREEN, RED, GREY = "#2e7d32", "#c62828", "#9e9e9e"


@dataclass(frozen=True, slots=True)
class PairResult:
    """All probes from one node (its pods and itself) to the pods of another node."""

    ok: int
    total: int
    median_ms: float | None

    @property
    def healthy(self) -> bool:
        return self.ok == self.total


@dataclass(frozen=True, slots=True)
class NodeBox:
    name: str
    public_ip: str
    subnet: str
    backend: str
    detail: str
    healthy: bool
    health: str


@dataclass(frozen=True, slots=True)
class PodDot:
    name: str
    node: str
    ip: str


def summarise(probes: Iterable[tuple[str, str, bool, float | None]]) -> dict[str, PairResult]:
    """(source node, target node, ok, ms) per probe -> ``"a|b"`` -> result."""
    grouped: dict[str, list[tuple[bool, float | None]]] = {}
    for src, dst, ok, ms in probes:
        grouped.setdefault(f"{src}|{dst}", []).append((ok, ms))
    out: dict[str, PairResult] = {}
    for key, results in grouped.items():
        times = [ms for ok, ms in results if ok and ms is not None]
        out[key] = PairResult(
            ok=sum(1 for ok, _ in results if ok),
            total=len(results),
            median_ms=statistics.median(times) if times else None,
        )
    return out


def save_check(workdir: Path, pairs: dict[str, PairResult]) -> None:
    doc = {
        "time": time.time(),
        "pairs": {k: [v.ok, v.total, v.median_ms] for k, v in pairs.items()},
    }
    (workdir / CHECK_FILE).write_text(json.dumps(doc, indent=1) + "\n")


def load_check(workdir: Path) -> dict[str, PairResult] | None:
    try:
        doc = json.loads((workdir / CHECK_FILE).read_text())
        return {k: PairResult(int(v[0]), int(v[1]), v[2]) for k, v in doc["pairs"].items()}
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None


def _between(pairs: dict[str, PairResult] | None, a: str, b: str) -> PairResult | None:
    """Both directions between nodes ``a`` and ``b`` (or a node with itself)."""
    if pairs is None:
        return None
    found = [pairs[k] for k in {f"{a}|{b}", f"{b}|{a}"} if k in pairs]
    if not found:
        return None
    times = [r.median_ms for r in found if r.median_ms is not None]
    return PairResult(
        sum(r.ok for r in found), sum(r.total for r in found), max(times) if times else None
    )


def _colour(result: PairResult | None, slowest: float) -> str:
    if result is None:
        return GREY
    if not result.healthy:
        return RED
    if result.median_ms is None or slowest <= 0:
        return GREEN
    # Darker green for slower pairs: 0 (fastest) .. 1 (slowest in this lab).
    share = min(1.0, result.median_ms / slowest)
    green = int(0xC8 - share * 0x80)
    return f"#1b{green:02x}20"


def _label(result: PairResult | None) -> str:
    if result is None:
        return "not checked"
    ms = "" if result.median_ms is None else f", {result.median_ms:.2f} ms"
    return f"{result.ok}/{result.total} ok{ms}"


def render_svg(
    title: str,
    nodes: Sequence[NodeBox],
    pods: Sequence[PodDot],
    pairs: dict[str, PairResult] | None,
    *,
    backend: str,
    underlay: str,
    store: str = "etcd",
) -> bytes:
    """The picture as SVG bytes (needs Graphviz's ``dot``)."""
    import graphviz  # optional dependency: loden[pictures]

    graph = graphviz.Graph("lab", format="svg", engine="dot")
    graph.attr(label=title, labelloc="t", fontname="Helvetica", fontsize="16", compound="true",
               rankdir="TB", nodesep="0.6", ranksep="1.0")  # fmt: skip
    graph.attr("node", fontname="Helvetica", fontsize="11")
    graph.attr("edge", fontname="Helvetica", fontsize="10")
    times = [
        r.median_ms
        for a in nodes
        for b in nodes
        if (r := _between(pairs, a.name, b.name)) is not None and r.median_ms is not None
    ]
    slowest = max(times, default=0.0)
    server = "kube-apiserver (double)" if store == "kube" else "etcd"
    graph.node("underlay", f"underlay {underlay}\n{server}", shape="cylinder", style="filled",
               fillcolor="#eceff1")  # fmt: skip
    for node in nodes:
        inside = _between(pairs, node.name, node.name)
        with graph.subgraph(name=f"cluster_{node.name}") as box:
            health = "healthy" if node.healthy else f"UNHEALTHY: {node.health}"
            box.attr(
                label=(
                    f"{node.name}  {node.public_ip}\nsubnet {node.subnet}  {node.backend}\n"
                    f"{node.detail}\nagent: {health}"
                ),
                labelloc="b",
                fontsize="12",
                style="rounded,filled",
                fillcolor="#f1f8e9" if node.healthy else "#ffebee",
                color=_colour(inside, slowest) if inside else GREY,
                penwidth="2",
            )
            box.node(f"{node.name}_host", node.name, shape="box", style="filled",
                     fillcolor="white")  # fmt: skip
            for pod in pods:
                if pod.node == node.name:
                    box.node(pod.name, f"{pod.name}\n{pod.ip}", shape="ellipse",
                             style="filled", fillcolor="#e3f2fd")  # fmt: skip
                    box.edge(f"{node.name}_host", pod.name, color=GREY, arrowhead="none")
        graph.edge("underlay", f"{node.name}_host", style="dashed", color=GREY)
    for i, a in enumerate(nodes):
        for b in nodes[i + 1 :]:
            result = _between(pairs, a.name, b.name)
            graph.edge(
                f"{a.name}_host",
                f"{b.name}_host",
                label=f"{TUNNEL.get(backend, backend)}\n{_label(result)}",
                color=_colour(result, slowest),
                fontcolor=_colour(result, slowest),
                penwidth="3",
                constraint="false",
            )
    try:
        return bytes(graph.pipe(format="svg"))
    except graphviz.ExecutableNotFound as exc:
        raise ConfigError("Graphviz's `dot` is not installed: apt-get install graphviz") from exc
