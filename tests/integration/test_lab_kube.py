"""``loden lab up --store kube``: the API server double, agents as DaemonSet pods, per backend.

Each lab is driven through the real CLI and torn down (and checked gone) by the ``lab``
fixture of test_lab_cluster. The API server's own view is read with the lab's admin
client: Node annotations exactly as Go flanneld writes them, the NetworkUnavailable
condition, and every agent request made as the DaemonSet's service account, never denied.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from loden.lab import kube
from loden.lab.state import LabState
from tests.integration.test_lab_cluster import lab, loden, node_exec, pytestmark, skip_without, up

__all__ = ["lab", "pytestmark"]
PREFIX = "flannel.alpha.coreos.com/"
SA_USER = "system:serviceaccount:kube-flannel:flannel"


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["vxlan", "host-gw", "udp", "wireguard"])
def test_kube_lab_per_backend(lab: Callable[[], str], backend: str) -> None:
    skip_without(backend)
    name = lab()
    nodes = 3 if backend == "vxlan" else 2
    up(name, "--store", "kube", "--backend", backend, "--nodes", str(nodes), "--pods", "1")
    check = loden("lab", "check", "--name", name, "--wait", "10", check=False, timeout=180)
    assert check.returncode == 0, check.stdout + check.stderr

    state = LabState.load(name)
    client = kube.admin_client(state.plan)
    items = client.list_objects("nodes")["items"]
    assert [n["metadata"]["name"] for n in items] == [f"node{i}" for i in range(1, nodes + 1)]
    for node in items:
        meta, spec = node["metadata"], node["spec"]
        record = state.nodes[meta["name"]]
        assert spec["podCIDR"] == str(kube.pod_cidr(state.plan, meta["name"])) == record.subnet
        annotations = meta["annotations"]
        assert annotations["node.alpha.kubernetes.io/ttl"] == "0", "kubelet's own stays"
        assert annotations[PREFIX + "kube-subnet-manager"] == "true"
        assert annotations[PREFIX + "public-ip"] == record.address.split("/")[0]
        assert annotations[PREFIX + "backend-type"] == ("" if backend == "udp" else backend)
        data = annotations[PREFIX + "backend-data"]
        if backend == "vxlan":
            assert set(json.loads(data)) == {"VNI", "VtepMAC"}
        elif backend == "wireguard":
            assert "PublicKey" in json.loads(data)
        else:
            assert data == "null"
        conditions = {c["type"]: c for c in node["status"]["conditions"]}
        assert conditions["Ready"]["status"] == "True", "the condition patch merged by type"
        unavailable = conditions["NetworkUnavailable"]
        assert (unavailable["status"], unavailable["reason"]) == ("False", "FlannelIsUp")
    pods = client.list_objects("pods", "kube-flannel")["items"]
    assert sorted(p["spec"]["nodeName"] for p in pods) == sorted(state.nodes)

    agent_requests = [r for r in client.requests_log() if r["user"] == SA_USER]
    assert agent_requests and all(r["status"] < 400 for r in agent_requests), agent_requests
    patches = [r for r in agent_requests if r["method"] == "PATCH"]
    assert {r["path"] for r in patches} == {f"/api/v1/nodes/{n}/status" for n in state.nodes}
    assert {r["contentType"] for r in patches} == {"application/strategic-merge-patch+json"}
    watches = [r for r in agent_requests if "watch=true" in r["query"]]
    assert len(watches) >= nodes

    status = loden("lab", "status", "--name", name).stdout
    assert "node annotations" in status and "kube-subnet-manager=true" in status

    # Inside a node: what kubelet mounted for the pod, and the installed conflist.
    sa = "/var/run/secrets/kubernetes.io/serviceaccount"
    assert node_exec(name, "node1", "cat", f"{sa}/namespace") == "kube-flannel"
    net_conf = json.loads(node_exec(name, "node1", "cat", "/etc/kube-flannel/net-conf.json"))
    assert net_conf["Backend"]["Type"] == backend
    conflist = json.loads(node_exec(name, "node1", "cat", "/etc/cni/net.d/10-flannel.conflist"))
    assert conflist["plugins"][0]["type"] == "flannel"
    assert not Path(sa, "token").exists(), "the token is private to the node"

    if backend == "vxlan" and shutil.which("kubectl"):
        # kubectl with the lab's admin kubeconfig, from the underlay: a deleted Node's
        # route leaves its peers.
        config = str(kube.admin_kubeconfig(state.plan))
        cache = f"--cache-dir={kube.admin_kubeconfig(state.plan).parent / 'kubectl-cache'}"
        kubectl = ["kubectl", f"--kubeconfig={config}", cache, "--request-timeout=10s"]
        listed = node_exec(name, "underlay", *kubectl, "get", "nodes", "-o", "name")
        assert listed.split() == ["node/node1", "node/node2", "node/node3"]
        gone = str(kube.pod_cidr(state.plan, "node3"))
        assert gone in node_exec(name, "node1", "ip", "route")
        node_exec(name, "underlay", *kubectl, "delete", "node", "node3")
        deadline = time.monotonic() + 15
        while gone in node_exec(name, "node1", "ip", "route"):
            assert time.monotonic() < deadline, "node3's route stayed on node1"
            time.sleep(0.3)
        assert str(kube.pod_cidr(state.plan, "node2")) in node_exec(name, "node1", "ip", "route")
