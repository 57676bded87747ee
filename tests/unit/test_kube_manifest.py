"""``loden kube manifest`` (kube-flannel.yml's equivalent, spec §4.6/§9.1) and
``loden kube install-conf``."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
import yaml

from loden.model.config import NetworkConfig
from loden.tools import kube
from loden.tools.kube_manifest import ManifestOptions, render


def _docs(opts: ManifestOptions | None = None) -> dict[str, dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(render(opts or ManifestOptions())) if d]
    return {d["kind"]: d for d in docs}


def test_objects_and_names_match_kube_flannel_yml() -> None:
    docs = _docs()
    assert list(docs) == [
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
        "DaemonSet",
    ]
    assert docs["Namespace"]["metadata"]["name"] == "kube-flannel"
    assert docs["ConfigMap"]["metadata"]["name"] == "kube-flannel-cfg"
    assert docs["DaemonSet"]["metadata"]["name"] == "kube-flannel-ds"
    binding = docs["ClusterRoleBinding"]
    assert binding["roleRef"]["name"] == "flannel"
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "flannel", "namespace": "kube-flannel"}
    ]


def test_rbac_is_exactly_what_the_agent_uses() -> None:
    rules = {(r["resources"][0], tuple(r["verbs"])) for r in _docs()["ClusterRole"]["rules"]}
    assert rules == {
        ("pods", ("get",)),
        ("nodes", ("get", "list", "watch")),
        ("nodes/status", ("patch",)),
    }


def test_configmap_files() -> None:
    data = _docs(ManifestOptions(network="10.50.0.0/16", backend="host-gw"))["ConfigMap"]["data"]
    config = NetworkConfig.parse(data["net-conf.json"], validate=False)
    assert str(config.network) == "10.50.0.0/16"
    assert config.backend_type == "host-gw"
    assert json.loads(data["cni-conf.json"]) == {
        "name": "cbr0",
        "cniVersion": "0.3.1",
        "plugins": [
            {"type": "flannel", "delegate": {"hairpinMode": True, "isDefaultGateway": True}},
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


def test_daemonset_pod() -> None:
    pod = _docs()["DaemonSet"]["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    assert pod["priorityClassName"] == "system-node-critical"
    assert pod["serviceAccountName"] == "flannel"
    assert {"operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    (agent,) = pod["containers"]
    assert agent["args"] == ["--ip-masq", "--kube-subnet-mgr", "--healthz-port=8081"]
    assert agent["securityContext"] == {
        "privileged": False,
        "capabilities": {"add": ["NET_ADMIN", "NET_RAW"]},
    }
    assert agent["resources"] == {"requests": {"cpu": "100m", "memory": "50Mi"}}
    env = {e["name"]: e for e in agent["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert env["EVENT_QUEUE_DEPTH"]["value"] == "5000"
    assert env["CONT_WHEN_CACHE_NOT_READY"]["value"] == "false"
    assert agent["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": 8081}
    assert (
        agent["livenessProbe"]["initialDelaySeconds"],
        agent["livenessProbe"]["periodSeconds"],
    ) == (10, 30)
    assert agent["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 8081}
    mounts = {m["mountPath"] for m in agent["volumeMounts"]}
    assert {"/run/flannel", "/etc/kube-flannel/", "/run/xtables.lock"} <= mounts
    hostpaths = {v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    assert {"/run/flannel", "/opt/cni/bin", "/etc/cni/net.d", "/run/xtables.lock"} <= hostpaths
    plugin, conf = pod["initContainers"]
    assert plugin["args"] == ["-f", "/flannel", "/opt/cni/bin/flannel"]
    assert conf["args"][-2:] == [
        "/etc/kube-flannel/cni-conf.json",
        "/etc/cni/net.d/10-flannel.conflist",
    ]


def test_cli_renders(capsys: pytest.CaptureFixture[str]) -> None:
    assert kube.main(["manifest", "--network", "10.9.0.0/16", "--no-ip-masq"]) == 0
    out = capsys.readouterr().out
    assert '"Network": "10.9.0.0/16"' in out
    assert "--ip-masq" not in out


def test_install_conf_is_atomic_with_source_mode(tmp_path: Path) -> None:
    src = tmp_path / "cni-conf.json"
    src.write_text('{"name": "cbr0"}')
    os.chmod(src, 0o640)
    dst = tmp_path / "net.d" / "10-flannel.conflist"
    assert kube.main(["install-conf", str(src), str(dst)]) == 0
    assert dst.read_text() == '{"name": "cbr0"}'
    assert stat.S_IMODE(dst.stat().st_mode) == 0o640
    assert [p.name for p in dst.parent.iterdir()] == ["10-flannel.conflist"]  # no temp left


def test_install_conf_missing_source(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert kube.main(["install-conf", str(tmp_path / "nope"), str(tmp_path / "dst")]) == 1
    assert "cannot read" in capsys.readouterr().err
