"""``loden kube manifest``: the equivalent of flannel's ``kube-flannel.yml`` (spec §4.6,
§9.1) for Loden.

Same objects, names, labels and RBAC as upstream, so an operator can ``kubectl apply``
it over an existing flannel install and roll nodes over one by one: namespace
``kube-flannel``, ServiceAccount/ClusterRole/ClusterRoleBinding ``flannel`` (exactly
``pods get``, ``nodes get,list,watch``, ``nodes/status patch``), ConfigMap
``kube-flannel-cfg`` with ``net-conf.json`` and ``cni-conf.json``, DaemonSet
``kube-flannel-ds``. Differences: the agent image is Loden's (``flanneld`` is its entry
point), the conflist is installed atomically by ``loden kube install-conf`` (temp file,
fsync, source mode, rename, as flannel's ``install-conf``), and ``/var/lib/loden`` is a
host mount so the VTEP MAC survives pod restarts. The CNI binary still comes from
flannel's own ``flannel-cni-plugin`` image: it runs on the host, outside the image,
and Loden's agent writes the same subnet.env it reads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import yaml

NAMESPACE = "kube-flannel"
DEFAULT_IMAGE = "ghcr.io/loden/loden:v0.1.0"
CNI_PLUGIN_IMAGE = "ghcr.io/flannel-io/flannel-cni-plugin:v1.9.1-flannel3"
HEALTHZ_PORT = 8081

#: What the agent needs from the API (spec §4.5): nothing more.
RBAC_RULES: list[dict[str, Any]] = [
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]},
    {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": [""], "resources": ["nodes/status"], "verbs": ["patch"]},
]

CNI_CONF = {
    "name": "cbr0",
    "cniVersion": "0.3.1",
    "plugins": [
        {"type": "flannel", "delegate": {"hairpinMode": True, "isDefaultGateway": True}},
        {"type": "portmap", "capabilities": {"portMappings": True}},
    ],
}


@dataclass(frozen=True, slots=True)
class ManifestOptions:
    image: str = DEFAULT_IMAGE
    cni_plugin_image: str = CNI_PLUGIN_IMAGE
    network: str = "10.244.0.0/16"
    backend: str = "vxlan"
    namespace: str = NAMESPACE
    ip_masq: bool = True


def net_conf(opts: ManifestOptions) -> str:
    return json.dumps(
        {"Network": opts.network, "EnableNFTables": False, "Backend": {"Type": opts.backend}},
        indent=2,
    )


def _host(path: str, kind: str) -> dict[str, str]:
    return {"path": path, "type": kind}


def _labels(**extra: str) -> dict[str, str]:
    return {"k8s-app": "flannel", **extra}


def objects(opts: ManifestOptions) -> list[dict[str, Any]]:
    """The manifest's objects, in apply order."""
    ns = opts.namespace
    node_labels = {"app": "flannel", "tier": "node"}
    args = ["--kube-subnet-mgr", f"--healthz-port={HEALTHZ_PORT}"]
    if opts.ip_masq:
        args.insert(0, "--ip-masq")
    agent = {
        "name": "kube-flannel",
        "image": opts.image,
        "command": ["/opt/bin/flanneld"],
        "args": args,
        "resources": {"requests": {"cpu": "100m", "memory": "50Mi"}},
        "securityContext": {
            "privileged": False,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"]},
        },
        "env": [
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {
                "name": "POD_NAMESPACE",
                "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
            },
            {"name": "EVENT_QUEUE_DEPTH", "value": "5000"},
            {"name": "CONT_WHEN_CACHE_NOT_READY", "value": "false"},
        ],
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": HEALTHZ_PORT},
            "initialDelaySeconds": 10,
            "periodSeconds": 30,
        },
        "readinessProbe": {
            "httpGet": {"path": "/readyz", "port": HEALTHZ_PORT},
            "initialDelaySeconds": 5,
            "periodSeconds": 10,
        },
        "volumeMounts": [
            {"name": "run", "mountPath": "/run/flannel"},
            {"name": "flannel-cfg", "mountPath": "/etc/kube-flannel/"},
            {"name": "xtables-lock", "mountPath": "/run/xtables.lock"},
            {"name": "loden-state", "mountPath": "/var/lib/loden"},
        ],
    }
    init = [
        {
            "name": "install-cni-plugin",
            "image": opts.cni_plugin_image,
            "command": ["cp"],
            "args": ["-f", "/flannel", "/opt/cni/bin/flannel"],
            "volumeMounts": [{"name": "cni-plugin", "mountPath": "/opt/cni/bin"}],
        },
        {
            "name": "install-cni",
            "image": opts.image,
            "command": ["/usr/local/bin/loden"],
            "args": [
                "kube",
                "install-conf",
                "/etc/kube-flannel/cni-conf.json",
                "/etc/cni/net.d/10-flannel.conflist",
            ],
            "volumeMounts": [
                {"name": "cni", "mountPath": "/etc/cni/net.d"},
                {"name": "flannel-cfg", "mountPath": "/etc/kube-flannel/"},
            ],
        },
    ]
    volumes = [
        {"name": "run", "hostPath": {"path": "/run/flannel"}},
        {"name": "cni-plugin", "hostPath": {"path": "/opt/cni/bin"}},
        {"name": "cni", "hostPath": {"path": "/etc/cni/net.d"}},
        {"name": "flannel-cfg", "configMap": {"name": "kube-flannel-cfg"}},
        {"name": "xtables-lock", "hostPath": {"path": "/run/xtables.lock", "type": "FileOrCreate"}},
        {
            "name": "loden-state",
            "hostPath": {"path": "/var/lib/loden", "type": "DirectoryOrCreate"},
        },
    ]
    return [
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {
                "name": ns,
                "labels": _labels(**{"pod-security.kubernetes.io/enforce": "privileged"}),
            },
        },
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": "flannel", "namespace": ns, "labels": _labels()},
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": "flannel", "labels": _labels()},
            "rules": RBAC_RULES,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "flannel", "labels": _labels()},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "flannel",
            },
            "subjects": [{"kind": "ServiceAccount", "name": "flannel", "namespace": ns}],
        },
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": "kube-flannel-cfg",
                "namespace": ns,
                "labels": _labels(**node_labels),
            },
            "data": {
                "cni-conf.json": json.dumps(CNI_CONF, indent=2) + "\n",
                "net-conf.json": net_conf(opts) + "\n",
            },
        },
        {
            "apiVersion": "apps/v1",
            "kind": "DaemonSet",
            "metadata": {
                "name": "kube-flannel-ds",
                "namespace": ns,
                "labels": _labels(**node_labels),
            },
            "spec": {
                "selector": {"matchLabels": {"app": "flannel"}},
                "template": {
                    "metadata": {"labels": node_labels},
                    "spec": {
                        "affinity": {
                            "nodeAffinity": {
                                "requiredDuringSchedulingIgnoredDuringExecution": {
                                    "nodeSelectorTerms": [
                                        {
                                            "matchExpressions": [
                                                {
                                                    "key": "kubernetes.io/os",
                                                    "operator": "In",
                                                    "values": ["linux"],
                                                }
                                            ]
                                        }
                                    ]
                                }
                            }
                        },
                        "hostNetwork": True,
                        "priorityClassName": "system-node-critical",
                        "serviceAccountName": "flannel",
                        "tolerations": [{"operator": "Exists", "effect": "NoSchedule"}],
                        "initContainers": init,
                        "containers": [agent],
                        "volumes": volumes,
                    },
                },
            },
        },
    ]


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the ConfigMap's JSON files) as literal blocks, like the
    upstream manifest, instead of one escaped line."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def render(opts: ManifestOptions) -> str:
    """Multi-document YAML, ready for ``kubectl apply -f -``."""
    header = (
        "# Loden: a drop-in for kube-flannel.yml (same names, RBAC and files).\n"
        "# kubeadm users: kubeadm init --pod-network-cidr=" + opts.network + "\n"
    )
    docs = [
        yaml.dump(obj, Dumper=_Dumper, sort_keys=False, default_flow_style=False)
        for obj in objects(opts)
    ]
    return header + "---\n" + "---\n".join(docs)
