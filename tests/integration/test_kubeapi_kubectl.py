"""A real client (kubectl) against the Kubernetes API server double.

Runs every kubectl found: /usr/bin/kubectl (1.32 here, Debian's kubernetes-client 1.20
on a clean Debian 12) and, where present, the cloud SDK's versioned binaries, so the
double is checked against more than one client generation. No root needed: the double
listens on loopback.

A status change needs ``kubectl patch --subresource=status`` (kubectl 1.24+). Older
clients have no subresource flag and no raw PATCH, so there the change goes through
``kubectl proxy`` (the client's own authenticated connection to the API server) with a
strategic-merge PATCH of ``/api/v1/nodes/<name>/status``; that path is checked with
every kubectl.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from loden.kubeapi.control import KubeApiClient
from tests.fixtures.kubeapi import KubeApiFactory

SDK = Path("/usr/lib/google-cloud-sdk/bin")
# LODEN_KUBECTLS: more kubectl binaries (colon-separated), e.g. Debian's 1.20 extracted with
# `apt-get download kubernetes-client && dpkg -x kubernetes-client_*.deb DIR`.
EXTRA = [p for p in os.environ.get("LODEN_KUBECTLS", "").split(":") if p]
KUBECTLS = (
    [p for p in [shutil.which("kubectl")] if p]
    + [str(SDK / name) for name in ("kubectl.1.27",) if (SDK / name).exists()]
    + EXTRA
)


def _label(path: str) -> str:
    return "none" if not path else Path(path).name if path in KUBECTLS[:2] else path


def _version(kubectl: str) -> tuple[int, int]:
    out = subprocess.run(
        [kubectl, "version", "--client", "-o", "json"], capture_output=True, text=True, timeout=20
    )
    info = json.loads(out.stdout)["clientVersion"]
    return int(info["major"]), int(info["minor"].rstrip("+"))


@pytest.fixture(params=KUBECTLS or [""], ids=lambda p: _label(p))
def kubectl(request: pytest.FixtureRequest) -> str:
    if not request.param:
        pytest.skip("no kubectl installed (scripts/install-deps.sh installs kubernetes-client)")
    return str(request.param)


def run(
    kubectl: str, config: Path, *args: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    cache = config.parent / "kube-cache"  # never the user's ~/.kube/cache
    done = subprocess.run(
        [kubectl, f"--kubeconfig={config}", f"--cache-dir={cache}", "--request-timeout=10s", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if check and done.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed ({done.returncode}): {done.stderr}")
    return done


def test_get_annotate_and_patch_status(
    kubectl: str, kubeapi: KubeApiClient, tmp_path: Path
) -> None:
    config = kubeapi.write_kubeconfig(tmp_path / "kubeconfig")
    kubeapi.create_node("node-a", "10.244.1.0/24")
    kubeapi.create_node(
        "node-b", "10.244.2.0/24", labels={"node-role.kubernetes.io/control-plane": ""}
    )

    table = run(kubectl, config, "get", "nodes").stdout.splitlines()
    assert table[0].split() == ["NAME", "STATUS", "ROLES", "AGE", "VERSION"]
    assert table[1].split()[:3] == ["node-a", "Ready", "<none>"]
    assert table[2].split()[:3] == ["node-b", "Ready", "control-plane"]

    run(
        kubectl, config, "annotate", "node", "node-a", "flannel.alpha.coreos.com/backend-type=vxlan"
    )
    node = kubeapi.get("nodes", "node-a")
    assert node["metadata"]["annotations"]["flannel.alpha.coreos.com/backend-type"] == "vxlan"
    assert node["metadata"]["annotations"]["node.alpha.kubernetes.io/ttl"] == "0"

    major, minor = _version(kubectl)
    condition = {
        "type": "NetworkUnavailable",
        "status": "False",
        "reason": "FlannelIsUp",
        "message": "Flannel is running on this node",
    }
    body = json.dumps({"status": {"conditions": [condition]}})
    if (major, minor) >= (1, 24):
        run(
            kubectl,
            config,
            "patch",
            "node",
            "node-a",
            "--subresource=status",
            "--type=strategic",
            "-p",
            body,
        )
    else:
        patch_status_via_proxy(kubectl, config, "node-a", body)
    node = kubeapi.get("nodes", "node-a")
    kinds = [c["type"] for c in node["status"]["conditions"]]
    assert kinds == ["Ready", "NetworkUnavailable"], "strategic merge keeps Ready (merged by type)"

    # the main resource ignores status changes, as the real node strategy does
    run(
        kubectl,
        config,
        "patch",
        "node",
        "node-b",
        "--type=merge",
        "-p",
        '{"status":{"conditions":[]}}',
    )
    assert [c["type"] for c in kubeapi.get("nodes", "node-b")["status"]["conditions"]] == ["Ready"]


def test_watch_sees_an_event(kubectl: str, kubeapi: KubeApiClient, tmp_path: Path) -> None:
    config = kubeapi.write_kubeconfig(tmp_path / "kubeconfig")
    kubeapi.create_node("node-a", "10.244.1.0/24")
    watch = subprocess.Popen(
        [
            kubectl,
            f"--kubeconfig={config}",
            f"--cache-dir={tmp_path / 'c'}",
            "get",
            "nodes",
            "-w",
            "-o",
            "name",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(1.0)  # let the list and the watch start
        kubeapi.create_node("node-late", "10.244.9.0/24")
        deadline = time.monotonic() + 15
        lines: list[str] = []
        assert watch.stdout is not None
        while time.monotonic() < deadline:
            line = watch.stdout.readline().strip()
            if line:
                lines.append(line)
            if "node/node-late" in lines:
                break
        assert lines[0] == "node/node-a"
        assert "node/node-late" in lines
    finally:
        watch.kill()
        watch.communicate(timeout=10)
    watches = [r for r in kubeapi.requests_log() if "watch=true" in r["query"]]
    assert watches and watches[0]["status"] == 200


def test_delete_node_and_namespaced_pod(
    kubectl: str, kubeapi: KubeApiClient, tmp_path: Path
) -> None:
    config = kubeapi.write_kubeconfig(tmp_path / "kubeconfig")
    kubeapi.create_node("node-a", "10.244.1.0/24")
    kubeapi.create_namespace("kube-flannel")
    kubeapi.create_pod("kube-flannel", "kube-flannel-ds-abcde", "node-a")
    pods = run(kubectl, config, "get", "pods", "-n", "kube-flannel", "-o", "wide").stdout
    assert "kube-flannel-ds-abcde" in pods and "node-a" in pods
    run(kubectl, config, "delete", "node", "node-a")
    assert "node-a" not in run(kubectl, config, "get", "nodes", "-o", "name").stdout


def test_rbac_denial_and_bad_token(kubectl: str, kubeapi: KubeApiClient, tmp_path: Path) -> None:
    kubeapi.create_node("node-a", "10.244.1.0/24")
    token = kubeapi.service_account(
        rules=[{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch"]}]
    )
    config = kubeapi.write_kubeconfig(tmp_path / "sa", token=token)
    assert "node-a" in run(kubectl, config, "get", "nodes").stdout
    denied = run(kubectl, config, "annotate", "node", "node-a", "x=y", check=False)
    assert denied.returncode != 0
    assert (
        'nodes "node-a" is forbidden: User "system:serviceaccount:kube-flannel:flannel" '
        'cannot patch resource "nodes" in API group "" at the cluster scope'
    ) in denied.stderr
    bad = kubeapi.write_kubeconfig(tmp_path / "bad", token="not-a-token")
    refused = run(kubectl, bad, "get", "nodes", check=False)
    assert refused.returncode != 0 and "Unauthorized" in refused.stderr


def patch_status_via_proxy(kubectl: str, config: Path, node: str, body: str) -> dict[str, object]:
    """Strategic-merge PATCH of ``nodes/<node>/status`` through ``kubectl proxy``."""
    cache = config.parent / "kube-cache"
    proxy = subprocess.Popen(
        [kubectl, f"--kubeconfig={config}", f"--cache-dir={cache}", "proxy", "--port=0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proxy.stdout is not None
        line = proxy.stdout.readline()
        match = re.search(r"127\.0\.0\.1:(\d+)", line)
        assert match, f"kubectl proxy said: {line!r}"
        request = urllib.request.Request(
            f"http://127.0.0.1:{match.group(1)}/api/v1/nodes/{node}/status",
            data=body.encode(),
            method="PATCH",
            headers={"Content-Type": "application/strategic-merge-patch+json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            result = json.load(response)
            assert isinstance(result, dict)
            return result
    finally:
        proxy.kill()
        proxy.communicate(timeout=10)


def test_status_patch_through_kubectl_proxy(
    kubectl: str, kubeapi: KubeApiClient, tmp_path: Path
) -> None:
    config = kubeapi.write_kubeconfig(tmp_path / "kubeconfig")
    kubeapi.create_node("node-a", "10.244.1.0/24")
    body = {
        "metadata": {"annotations": {"flannel.alpha.coreos.com/backend-type": "host-gw"}},
        "status": {"conditions": [{"type": "NetworkUnavailable", "status": "False"}]},
    }
    patch_status_via_proxy(kubectl, config, "node-a", json.dumps(body))
    node = kubeapi.get("nodes", "node-a")
    assert node["metadata"]["annotations"]["flannel.alpha.coreos.com/backend-type"] == "host-gw"
    assert [c["type"] for c in node["status"]["conditions"]] == ["Ready", "NetworkUnavailable"]
    patches = [r for r in kubeapi.requests_log() if r["method"] == "PATCH"]
    assert patches[-1]["path"] == "/api/v1/nodes/node-a/status"
    assert patches[-1]["user"] == "kubernetes-admin", "the proxy forwards the kubeconfig's token"


def test_apply_and_label(kubectl: str, kubeapi: KubeApiClient, tmp_path: Path) -> None:
    """Client-side apply (GET, then create or a strategic PATCH with last-applied)."""
    config = kubeapi.write_kubeconfig(tmp_path / "kubeconfig")
    manifest = tmp_path / "node.yaml"
    manifest.write_text(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: n9\n  labels: {a: b}\n"
        "spec:\n  podCIDR: 10.9.0.0/24\n"
    )
    # --validate=false: the double serves no OpenAPI document
    assert (
        "created" in run(kubectl, config, "apply", "--validate=false", "-f", str(manifest)).stdout
    )
    again = run(kubectl, config, "apply", "--validate=false", "-f", str(manifest)).stdout
    assert "unchanged" in again
    run(kubectl, config, "label", "node", "n9", "c=d")
    shown = run(kubectl, config, "get", "node", "n9", "--show-labels").stdout
    assert "a=b,c=d" in shown
    node = kubeapi.get("nodes", "n9")
    assert "kubectl.kubernetes.io/last-applied-configuration" in node["metadata"]["annotations"]
    assert node["spec"]["podCIDRs"] == ["10.9.0.0/24"]


def test_client_certificate_kubeconfig(
    kubectl: str, kubeapi_server: KubeApiFactory, tmp_path: Path
) -> None:
    server = kubeapi_server()
    assert server.client is not None
    server.client.create_node("node-a", "10.244.1.0/24")
    cert, key = server.admin_cert
    config = server.client.write_kubeconfig(
        tmp_path / "kubeconfig", client_cert=cert, client_key=key, embed=True
    )
    assert "node-a" in run(kubectl, config, "get", "nodes").stdout
    users = {r["user"] for r in server.client.requests_log() if r["path"] == "/api/v1/nodes"}
    assert users == {"kubernetes-admin"}, "the certificate's CN, no token"
