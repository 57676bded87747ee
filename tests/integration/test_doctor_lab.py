"""``loden doctor`` and ``loden status`` on a clean ``loden lab`` (the seed's deployment:
systemd units, /run/flannel, CNI pods): nothing found; one injected fault: found."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

LODEN = str(Path(sys.prefix) / "bin" / "loden")

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, mounts)"),
]


def loden(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [LODEN, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture
def lab() -> Iterator[str]:
    name = f"dr{secrets.token_hex(3)}"
    try:
        up = loden("lab", "up", "--nodes", "2", "--name", name, timeout=240)
        assert up.returncode == 0, up.stdout + up.stderr
        yield name
    finally:
        down = loden("lab", "down", "--name", name)
        assert down.returncode == 0, down.stdout + down.stderr


def on_node(lab: str, node: str, script: str) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in the node with the agent's own options (its EnvironmentFile)."""
    return loden(
        "lab", "exec", "--name", lab, node, "--",
        "sh", "-c", f". /opt/kubernetes/cfg/flanneld; {script}",
    )  # fmt: skip


def test_lab_picture_after_a_check(lab: str, tmp_path: Path) -> None:
    """``lab check`` then ``lab status --svg``: every node and pod drawn, all tunnels green."""
    assert loden("lab", "check", "--name", lab).returncode == 0
    svg = tmp_path / "lab.svg"
    proc = loden("lab", "status", "--name", lab, "--svg", str(svg))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    root = ET.parse(svg).getroot()
    text = "\n".join(t.text or "" for t in root.iter("{http://www.w3.org/2000/svg}text"))
    for name in ("node1", "node2", "node1-pod0", "node2-pod1", "vxlan (flannel.1)"):
        assert name in text
    assert "ok, " in text and "not checked" not in text
    assert "#c62828" not in svg.read_text()  # no red: every probe answered


def test_clean_lab_then_one_fault(lab: str) -> None:
    for node in ("node1", "node2"):
        proc = on_node(lab, node, f"{LODEN} doctor $FLANNEL_OPTIONS")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert proc.stdout == "no problems found\n"
        status = on_node(lab, node, f"{LODEN} status $FLANNEL_OPTIONS")
        assert status.returncode == 0, status.stdout + status.stderr
        assert "kernel:    in sync (3 entries on flannel.1)" in status.stdout
    proc = on_node(
        lab,
        "node1",
        f"sysctl -qw net.ipv4.conf.flannel/1.rp_filter=1; {LODEN} doctor $FLANNEL_OPTIONS",
    )
    assert proc.returncode == 1
    assert proc.stdout.startswith("[sysctl/rp-filter] strict reverse-path filtering on flannel.1")
    assert "sysctl -w net.ipv4.conf.flannel/1.rp_filter=2" in proc.stdout


@pytest.fixture
def kube_lab() -> Iterator[str]:
    name = f"dk{secrets.token_hex(3)}"
    try:
        up = loden("lab", "up", "--store", "kube", "--nodes", "2", "--pods", "1", "--name", name,
                   timeout=240)  # fmt: skip
        assert up.returncode == 0, up.stdout + up.stderr
        yield name
    finally:
        down = loden("lab", "down", "--name", name)
        assert down.returncode == 0, down.stdout + down.stderr


def test_status_and_doctor_in_kubernetes_mode(kube_lab: str) -> None:
    """``-kube-subnet-mgr``: the leases are the Nodes' podCIDRs and annotations."""
    from loden.lab import kube
    from loden.lab.state import LabState

    plan = LabState.load(kube_lab).plan
    env = (
        f"KUBERNETES_SERVICE_HOST={kube.api_address(plan)} "
        f"KUBERNETES_SERVICE_PORT={kube.API_PORT} NODE_NAME=node1"
    )
    status = loden("lab", "exec", "--name", kube_lab, "node1", "--", "sh", "-c",
                   f"env {env} {LODEN} status -kube-subnet-mgr")  # fmt: skip
    out = status.stdout
    assert "store:     reachable (Kubernetes API, -kube-subnet-mgr)" in out, out
    assert "this node's podCIDR (Kubernetes: no expiry)" in out
    assert "kernel:    in sync (3 entries on flannel.1)" in out and "peers:     1" in out
    doctor = loden("lab", "exec", "--name", kube_lab, "node1", "--", "sh", "-c",
                   f"env {env} {LODEN} doctor -kube-subnet-mgr")  # fmt: skip
    assert doctor.returncode == 0 and doctor.stdout == "no problems found\n", doctor.stdout
