"""Pods the way a CNI runtime makes them: a network namespace, then the plugin chain.

The node's ``/etc/cni/net.d/10-flannel.conflist`` is flannel's own manifest
(``kube-flannel.yml``'s cni-conf.json): the ``flannel`` meta-plugin with
``"delegate": {"hairpinMode": true, "isDefaultGateway": true}``, then ``portmap``.
For each pod the lab does what libcni does for ADD: for every plugin in order, run the
executable found on ``CNI_PATH`` (the venv's bin directory, where ``flannel`` is,
then /usr/lib/cni) *inside the node*, with ``CNI_COMMAND``, ``CNI_CONTAINERID``,
``CNI_NETNS``, ``CNI_IFNAME``, ``CNI_ARGS`` and ``CNI_PATH`` in the environment and the
plugin's config (plus ``name``, ``cniVersion`` and the previous plugin's result as
``prevResult``) on stdin. The pod's address is read from the result.

The "containers" of a pod are processes started in the pod's network namespace:
``app`` (busybox httpd on port 8080 serving the pod's name) in every pod, and a
``sidecar`` (sleep) in the first pod of node1, so ``check`` can show that containers
of one pod share its IP.
"""

from __future__ import annotations

import json
import secrets
import sys
from pathlib import Path
from typing import Any

from loden.errors import LodenError
from loden.files import replace_file
from loden.lab import netns, proc
from loden.lab.plan import ENV_MARKER
from loden.lab.state import ContainerRecord, LabState, NodeRecord, PodRecord, ProcRecord

CONFLIST_PATH = "/etc/cni/net.d/10-flannel.conflist"
CNI_PLUGIN_DIR = "/usr/lib/cni"
APP_PORT = 8080
CONFLIST: dict[str, Any] = {
    "name": "cbr0",
    "cniVersion": "0.3.1",
    "plugins": [
        {"type": "flannel", "delegate": {"hairpinMode": True, "isDefaultGateway": True}},
        {"type": "portmap", "capabilities": {"portMappings": True}},
    ],
}


def cni_path() -> str:
    """The venv's bin directory (``flannel``) first, then the reference plugins."""
    return f"{Path(sys.prefix) / 'bin'}:{CNI_PLUGIN_DIR}"


def write_conflist(state: LabState, node: str) -> Path:
    path = state.plan.node_root(node) / CONFLIST_PATH.lstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_file(path, (json.dumps(CONFLIST, indent=2) + "\n").encode("utf-8"))
    return path


def _find(plugin: str) -> str:
    for directory in cni_path().split(":"):
        candidate = Path(directory) / plugin
        if candidate.is_file():
            return str(candidate)
    raise LodenError(
        f"CNI plugin {plugin!r} not found in {cni_path()}: install containernetworking-plugins "
        "and the loden package (`make deps`)"
    )


def invoke_add(
    state: LabState, node: NodeRecord, pod: str, container_id: str, pod_netns: str
) -> dict[str, Any]:
    """Run the conflist's ADD chain for one pod; returns the last plugin's result.

    :raises LodenError: a plugin failed (with its CNI error message).
    """
    conflist = json.loads(
        (state.plan.node_root(node.name) / CONFLIST_PATH.lstrip("/")).read_text(encoding="utf-8")
    )
    env = {
        "PATH": proc.SERVICE_PATH,
        "CNI_COMMAND": "ADD",
        "CNI_CONTAINERID": container_id,
        "CNI_NETNS": netns.netns_path(pod_netns),
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod};"
        f"K8S_POD_INFRA_CONTAINER_ID={container_id}",
        "CNI_PATH": cni_path(),
    }
    result: dict[str, Any] | None = None
    for plugin in conflist["plugins"]:
        config = {"cniVersion": conflist["cniVersion"], "name": conflist["name"], **plugin}
        config.pop("capabilities", None)
        if result is not None:
            config["prevResult"] = result
        argv = netns.in_node(node.mntns, node.netns, [_find(str(plugin["type"]))])
        done = proc.run(argv, env=env, input=json.dumps(config).encode(), check=False, timeout=30)
        if done.returncode != 0:
            reply = done.stdout.decode(errors="replace").strip()
            raise LodenError(
                f"CNI ADD of pod {pod} on {node.name}: plugin {plugin['type']} exited "
                f"{done.returncode}: {reply or done.stderr.decode(errors='replace')[-300:]}"
            )
        result = json.loads(done.stdout)
    assert result is not None
    return result


def result_ip(result: dict[str, Any], version: int = 4) -> str:
    """The pod's IPv4 (or IPv6) address, without prefix, from a CNI result."""
    for entry in result.get("ips", []):
        address = str(entry.get("address", ""))
        if ("." in address) == (version == 4) and address:
            return address.split("/")[0]
    raise LodenError(f"CNI result has no IPv{version} address: {json.dumps(result)[:300]}")


def start_container(state: LabState, pod: str, pod_netns: str, role: str) -> ContainerRecord:
    """A "container": a process in the pod's network namespace (recorded)."""
    busybox = proc.require("busybox", "busybox-static")
    workdir = state.plan.workdir / "pods" / pod
    if role == "app":
        www = workdir / "www"
        www.mkdir(parents=True, exist_ok=True)
        (www / "index.html").write_text(f"{pod}\n", encoding="utf-8")
        argv = [busybox, "httpd", "-f", "-p", str(APP_PORT), "-h", str(www)]
    else:
        argv = [busybox, "sleep", "100000000"]
    full = netns.in_net(pod_netns, argv)
    env = {"PATH": proc.SERVICE_PATH, ENV_MARKER: state.plan.name}
    popen = proc.spawn(full, env=env, log_path=workdir / f"{role}.log")
    record = ContainerRecord(role, popen.pid, proc.start_time(popen.pid))
    state.record_process(
        ProcRecord(
            f"container:{role}",
            pod,
            popen.pid,
            record.start,
            tuple(full),
            str(workdir / f"{role}.log"),
        )
    )
    return record


def create_pods(state: LabState, node: NodeRecord) -> list[PodRecord]:
    """Create this node's pods (and the two-container pod on node1)."""
    plan = state.plan
    if plan.store == "etcd":  # kube: the install-cni init container installed it
        write_conflist(state, node.name)
    pods: list[PodRecord] = []
    for index in range(plan.pods_per_node):
        name = plan.pod_name(node.name, index)
        ns = plan.pod_ns(name)
        netns.add_netns(state, ns)
        if plan.ipv6 != "off":  # no duplicate address detection delay on the pod's eth0
            for key in ("all", "default"):
                netns.sysctl(ns, f"net.ipv6.conf.{key}.accept_dad", "0")
        container_id = secrets.token_hex(32)
        result = invoke_add(state, node, name, container_id, ns)
        roles = ["app", "sidecar"] if (node.name == "node1" and index == 0) else ["app"]
        containers = tuple(start_container(state, name, ns, role) for role in roles)
        families = plan.families
        pod = PodRecord(
            name=name,
            node=node.name,
            ip=result_ip(result, 4) if 4 in families else "",
            netns=netns.netns_path(ns),
            containers=containers,
            ip6=result_ip(result, 6) if 6 in families else "",
        )
        state.add_pod(pod)
        pods.append(pod)
    return pods
