"""``loden lab status --svg``: the picture names every node, pod and tunnel, and its
colours follow the last ``lab check`` (needs Graphviz's ``dot``)."""

from __future__ import annotations

import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from loden.lab.picture import (
    GREEN,
    GREY,
    RED,
    NodeBox,
    PairResult,
    PodDot,
    load_check,
    render_svg,
    save_check,
    summarise,
)

pytestmark = pytest.mark.skipif(shutil.which("dot") is None, reason="needs graphviz (dot)")

NODES = [
    NodeBox("node1", "172.20.0.11", "10.5.1.0/24", "vxlan", "0a:00:00:00:00:01", True, "ok"),
    NodeBox("node2", "172.20.0.12", "10.5.2.0/24", "vxlan", "0a:00:00:00:00:02", True, "ok"),
    NodeBox("node3", "172.20.0.13", "10.5.3.0/24", "vxlan", "0a:00:00:00:00:03", False, "503"),
]
PODS = [PodDot(f"{n.name}-pod0", n.name, n.subnet.replace("0/24", "2")) for n in NODES]


def texts(svg: bytes) -> str:
    root = ET.fromstring(svg)
    return "\n".join(t.text or "" for t in root.iter("{http://www.w3.org/2000/svg}text"))


def edge_colours(svg: bytes) -> set[str]:
    root = ET.fromstring(svg)
    return {
        path.get("stroke", "")
        for g in root.iter("{http://www.w3.org/2000/svg}g")
        if g.get("class") == "edge"
        for path in g.iter("{http://www.w3.org/2000/svg}path")
    }


def test_check_results_colour_the_tunnels(tmp_path: Path) -> None:
    probes = [
        ("node1", "node2", True, 0.1), ("node2", "node1", True, 0.3),
        ("node1", "node3", False, None), ("node3", "node1", True, 0.2),
        ("node2", "node3", True, 0.2), ("node1", "node1", True, 0.05),
    ]  # fmt: skip
    save_check(tmp_path, summarise(probes))
    pairs = load_check(tmp_path)
    assert pairs is not None and pairs["node1|node3"] == PairResult(0, 1, None)
    svg = render_svg("lab t", NODES, PODS, pairs, backend="vxlan", underlay="172.20.0.0/24")
    text = texts(svg)
    for node in NODES:
        assert node.name in text and node.subnet in text and node.public_ip in text
    for pod in PODS:
        assert pod.ip in text
    assert "UNHEALTHY: 503" in text
    assert "vxlan (flannel.1)" in text and "2/2 ok, 0.30 ms" in text and "1/2 ok" in text
    colours = edge_colours(svg)
    assert RED in colours  # node1 <-> node3 lost a probe
    assert any(c.startswith("#1b") for c in colours)  # latency-shaded green


def test_without_a_check_the_tunnels_are_grey(tmp_path: Path) -> None:
    assert load_check(tmp_path) is None
    svg = render_svg("lab t", NODES[:2], PODS[:2], None, backend="host-gw", underlay="u")
    assert "host-gw route" in texts(svg) and "not checked" in texts(svg)
    assert GREY in edge_colours(svg) and GREEN not in edge_colours(svg)
