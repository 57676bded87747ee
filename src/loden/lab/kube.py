"""The lab's Kubernetes mode (``loden lab up --store kube``): an API server and a "kubelet".

Instead of etcd, the underlay namespace runs the API server double
(:mod:`loden.kubeapi`) at ``https://<underlay>.2:6443``, and the lab does what a
cluster's control plane and kubelets would do, reading everything from the objects of
``loden kube manifest`` (:mod:`loden.tools.kube_manifest`), so the lab exercises
exactly what an operator applies:

* the **controller-manager**: one Node object per lab node (kubelet's labels, the
  ``node.alpha.kubernetes.io/ttl`` annotation every kubelet writes, ``Ready``, the
  node's ``InternalIP``) whose ``spec.podCIDR`` is the node's /24 of ``Network`` in
  order, as ``--allocate-node-cidrs --cluster-cidr=<Network>`` assigns them;
* **RBAC**: the ServiceAccount's token authenticates as
  ``system:serviceaccount:kube-flannel:flannel`` and gets exactly the manifest
  ClusterRole's rules (through its ClusterRoleBinding), so a missing verb fails in the
  lab as it would in a cluster;
* the **DaemonSet controller**: one Pod ``kube-flannel-ds-xxxxx`` per node, scheduled
  there (``spec.nodeName``);
* the **kubelet**: the pod's volumes in the node's mount namespace (the ConfigMap's
  ``net-conf.json``/``cni-conf.json`` read-only at ``/etc/kube-flannel``, the
  service-account ``token``/``ca.crt``/``namespace`` read-only at
  ``/var/run/secrets/kubernetes.io/serviceaccount``; ``/run/flannel``, ``/etc/cni/net.d``
  and ``/var/lib/loden`` are the node's own), the ``install-cni`` init container
  (``loden kube install-conf``, run in the node), then the container: its args and env
  (``POD_NAME``/``POD_NAMESPACE`` from the pod, ``EVENT_QUEUE_DEPTH``,
  ``CONT_WHEN_CACHE_NOT_READY``) plus what kubelet injects (``KUBERNETES_SERVICE_HOST``/
  ``PORT``). It runs through the lab's mini systemd (``kube-flannel.service``, written
  from the container spec) so ``up`` waits for READY=1 as for the etcd units.

Two lab adaptations, both said in the unit file: the agent's ``--healthz-port`` is the
lab's (8471, on the node address, where ``lab check`` looks), and the
``install-cni-plugin`` init container is not run (its ``/flannel`` binary comes from
flannel's own image; the lab's CNI path already has Loden's ``flannel`` plugin).
"""

from __future__ import annotations

import json
import logging
import secrets
import sys
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from loden.errors import LodenError
from loden.kubeapi.control import KubeApiClient, KubeApiError, KubeApiProcess
from loden.lab import netns, proc
from loden.lab.plan import ENV_MARKER, HEALTHZ_PORT, LabPlan
from loden.lab.state import LabState, NodeRecord, ProcRecord
from loden.tools.kube_manifest import ManifestOptions, objects
from loden.tools.systemd import UNIT_DIR
from loden.tools.systemd_files import under_root

log = logging.getLogger(__name__)

JsonObject = dict[str, Any]
API_PORT = 6443
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
CFG_DIR = "/etc/kube-flannel"
UNIT = "kube-flannel.service"
#: Node paths that are pod volumes (read-only, as kubelet mounts them).
POD_VOLUMES: tuple[str, ...] = (SA_DIR, CFG_DIR)


def manifest(plan: LabPlan) -> list[JsonObject]:
    return objects(ManifestOptions(network=str(plan.network), backend=plan.backend))


def find(objs: list[JsonObject], kind: str) -> JsonObject:
    for obj in objs:
        if obj.get("kind") == kind:
            return obj
    raise LodenError(f"`loden kube manifest` has no {kind}: cannot build the kube lab")


def api_address(plan: LabPlan) -> IPv4Address:
    return plan.etcd_addresses()[0]


def api_url(plan: LabPlan) -> str:
    return f"https://{api_address(plan)}:{API_PORT}"


def pod_cidr(plan: LabPlan, node: str) -> IPv4Network:
    """The /24 the controller-manager's range allocator gives the node (in node order)."""
    index = int(node.removeprefix("node")) - 1
    return next(s for i, s in enumerate(plan.network.subnets(new_prefix=24)) if i == index)


def _service_account(objs: list[JsonObject]) -> tuple[str, str, list[JsonObject]]:
    """(namespace, name, rules) of the DaemonSet's service account, via the binding."""
    sa = find(objs, "ServiceAccount")["metadata"]
    binding = find(objs, "ClusterRoleBinding")
    role = find(objs, "ClusterRole")
    subjects = binding.get("subjects") or []
    bound = any(
        s.get("kind") == "ServiceAccount"
        and s.get("name") == sa["name"]
        and s.get("namespace") == sa["namespace"]
        for s in subjects
    )
    if not bound or binding["roleRef"]["name"] != role["metadata"]["name"]:
        raise LodenError(
            "the manifest's ClusterRoleBinding does not bind its ClusterRole to its ServiceAccount"
        )
    return str(sa["namespace"]), str(sa["name"]), list(role.get("rules") or [])


def process(plan: LabPlan, *, create: bool = False) -> KubeApiProcess:
    """The double's process description; its token and PKI files live in ``<lab>/kube``.

    :raises LodenError: (without ``create``) the lab has no API server files.
    """
    workdir = plan.workdir / "kube"
    tokens = workdir / "lab-tokens.json"
    if tokens.exists():
        saved = json.loads(tokens.read_text())
    elif create:
        workdir.mkdir(parents=True, exist_ok=True)
        saved = {"admin": secrets.token_urlsafe(24), "serviceaccount": secrets.token_urlsafe(32)}
        tokens.write_text(json.dumps(saved) + "\n")
        tokens.chmod(0o600)
    else:
        raise LodenError(f"lab {plan.name} has no API server ({tokens} is missing)")
    namespace, name, rules = _service_account(manifest(plan))
    user = f"system:serviceaccount:{namespace}:{name}"
    return KubeApiProcess(
        workdir=workdir,
        host=str(api_address(plan)),
        port=API_PORT,
        netns=plan.underlay_ns,
        die_with_parent=False,
        python=sys.executable,
        admin_token=str(saved["admin"]),
        tokens={
            str(saved["serviceaccount"]): (
                user,
                ("system:serviceaccounts", f"system:serviceaccounts:{namespace}"),
            )
        },
        rules={f"user:{user}": rules},
        state_file=workdir / "state.json",  # objects and versions, as etcd would keep them
    )


def admin_client(plan: LabPlan) -> KubeApiClient:
    """A client for a running lab's API server (admin token; requests from the underlay)."""
    server = process(plan)
    return KubeApiClient(
        str(api_address(plan)), API_PORT, server.ca_file, server.admin_token, netns=plan.underlay_ns
    )


def start_api(state: LabState, *, timeout: float = 30.0) -> KubeApiClient:
    """Start the double in the underlay namespace (recorded) and wait until it answers.

    :raises LodenError: it exited or did not answer in time (with its log's tail).
    """
    plan = state.plan
    server = process(plan, create=True)
    netns.ip(
        plan.underlay_ns,
        "addr",
        "add",
        f"{api_address(plan)}/{plan.underlay.prefixlen}",
        "dev",
        "br0",
    )
    argv = server.argv()
    env = {"PATH": proc.SERVICE_PATH, ENV_MARKER: plan.name, "PYTHONUNBUFFERED": "1"}
    popen = proc.spawn(argv, env=env, log_path=server.log_path)
    state.record_process(
        ProcRecord(
            "kubeapi",
            "kube-apiserver",
            popen.pid,
            proc.start_time(popen.pid),
            tuple(argv),
            str(server.log_path),
        )
    )
    try:
        client = server.connect(timeout=timeout, alive=lambda: popen.poll() is None)
    except KubeApiError as exc:
        raise LodenError(f"the lab's API server did not start: {exc}") from exc
    client.write_kubeconfig(admin_kubeconfig(plan), user="kubernetes-admin")
    return client


def admin_kubeconfig(plan: LabPlan) -> Path:
    """For kubectl run in the underlay (``loden lab exec underlay -- kubectl ...``)."""
    return plan.workdir / "kube" / "admin.kubeconfig"


def register(state: LabState, client: KubeApiClient) -> dict[str, str]:
    """The objects a cluster would have: namespace, Nodes with podCIDRs, DaemonSet pods.

    Returns the pod name of each node.
    """
    plan = state.plan
    objs = manifest(plan)
    namespace = find(objs, "Namespace")["metadata"]
    try:
        client.request("POST", "/api/v1/namespaces", body={"metadata": namespace})
        pods: dict[str, str] = {}
        for node in plan.node_names():
            address = str(plan.node_address(node).ip)
            client.create_node(node, str(pod_cidr(plan, node)), addresses=[("InternalIP", address)])
            pod = f"kube-flannel-ds-{secrets.token_hex(3)[:5]}"
            client.create_pod(str(namespace["name"]), pod, node)
            pods[node] = pod
    except KubeApiError as exc:
        raise LodenError(f"registering the lab's objects in the API server failed: {exc}") from exc
    return pods


def container(objs: list[JsonObject], name: str) -> tuple[JsonObject, list[JsonObject]]:
    """(the DaemonSet's container ``name`` or init container, the pod template spec)."""
    spec = find(objs, "DaemonSet")["spec"]["template"]["spec"]
    for item in [*spec.get("initContainers", []), *spec.get("containers", [])]:
        if item.get("name") == name:
            return item, spec.get("volumes", [])
    raise LodenError(f"the manifest's DaemonSet has no container {name!r}")


def environment(item: JsonObject, pod: str, namespace: str, plan: LabPlan) -> dict[str, str]:
    """The container's env as kubelet resolves it (fieldRefs), plus the service env."""
    env: dict[str, str] = {}
    for var in item.get("env", []):
        if "value" in var:
            env[var["name"]] = str(var["value"])
            continue
        path = var.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
        if path == "metadata.name":
            env[var["name"]] = pod
        elif path == "metadata.namespace":
            env[var["name"]] = namespace
        else:
            raise LodenError(f"the lab's kubelet cannot resolve env {var['name']} ({var})")
    env["KUBERNETES_SERVICE_HOST"] = str(api_address(plan))
    env["KUBERNETES_SERVICE_PORT"] = str(API_PORT)
    env["KUBERNETES_SERVICE_PORT_HTTPS"] = str(API_PORT)
    return env


def unit_text(plan: LabPlan, node: NodeRecord, pod: str, loden: str) -> str:
    """``kube-flannel.service``: the DaemonSet container as a Type=notify unit."""
    objs = manifest(plan)
    agent, _ = container(objs, "kube-flannel")
    namespace = str(find(objs, "Namespace")["metadata"]["name"])
    env = environment(agent, pod, namespace, plan)
    args = [
        a for a in agent.get("args", []) if not a.startswith(("--healthz-port", "-healthz-port"))
    ]
    address = node.address.split("/")[0]
    args += [f"--healthz-ip={address}", f"--healthz-port={HEALTHZ_PORT}"]
    environment_line = " ".join(f'"{k}={v}"' for k, v in env.items())
    return (
        f"# {pod} on {node.name}: the DaemonSet kube-flannel-ds's container {agent['name']!r}\n"
        "# from `loden kube manifest`, as the lab's kubelet runs it. Its command\n"
        f"# {' '.join(agent.get('command', []))} is `loden agent`; --healthz-port is the lab's\n"
        "# (where `loden lab check` looks).\n"
        "[Unit]\n"
        f"Description=pod {namespace}/{pod} container {agent['name']}\n"
        "\n"
        "[Service]\n"
        "Type=notify\n"
        f"Environment={environment_line}\n"
        f"ExecStart={loden} agent {' '.join(args)}\n"
    )


def prepare_node(state: LabState, node: NodeRecord, pod: str, loden: str) -> None:
    """The pod's volumes, the install-cni init container and the unit, in the node."""
    plan = state.plan
    root = plan.node_root(node.name)
    objs = manifest(plan)
    server = process(plan)
    namespace = str(find(objs, "Namespace")["metadata"]["name"])
    sa_dir = root / SA_DIR.lstrip("/")
    sa_dir.mkdir(parents=True, exist_ok=True)
    token = next(iter(server.tokens))
    (sa_dir / "token").write_text(token)
    (sa_dir / "namespace").write_text(namespace)
    (sa_dir / "ca.crt").write_bytes(server.ca_file.read_bytes())
    config_map = find(objs, "ConfigMap")
    cfg_dir = root / CFG_DIR.lstrip("/")
    cfg_dir.mkdir(parents=True, exist_ok=True)
    for name, text in config_map["data"].items():
        (cfg_dir / name).write_text(text)
    init, _ = container(objs, "install-cni")
    argv = [loden, *[str(a) for a in init.get("args", [])]]
    done = proc.run(netns.in_node(node.mntns, node.netns, argv), check=False, timeout=30)
    if done.returncode != 0:
        raise LodenError(
            f"init container install-cni on {node.name} ({' '.join(argv)}) exited "
            f"{done.returncode}: {done.stderr.decode(errors='replace').strip()[-300:]}"
        )
    unit = under_root(root, f"{UNIT_DIR}/{UNIT}")
    unit.parent.mkdir(parents=True, exist_ok=True)
    unit.write_text(unit_text(plan, node, pod, loden))


def node_annotations(state: LabState) -> dict[str, dict[str, str]] | None:
    """Each node's flannel annotations (prefix removed), from ``loden leases
    -kube-subnet-mgr -json`` run inside node1 with its in-cluster config; None on failure."""
    node = next(iter(state.nodes.values()), None)
    if node is None:
        return None
    from loden.lab.node import loden_executable

    plan = state.plan
    argv = netns.in_node(
        node.mntns, node.netns, [loden_executable(), "leases", "-kube-subnet-mgr", "-json"]
    )
    env = {
        "PATH": proc.SERVICE_PATH,
        "KUBERNETES_SERVICE_HOST": str(api_address(plan)),
        "KUBERNETES_SERVICE_PORT": str(API_PORT),
    }
    done = proc.run(argv, check=False, timeout=15, env=env)
    if done.returncode != 0:
        log.debug("leases in node1 failed: %s", done.stderr.decode(errors="replace"))
        return None
    try:
        rows = json.loads(done.stdout)
    except ValueError:
        return None
    return {
        str(r.get("node")): {str(k): str(v) for k, v in (r.get("annotations") or {}).items()}
        for r in rows
        if isinstance(r, dict)
    }


def describe(annotations: dict[str, str]) -> str:
    """The annotations a peer reads, one short line each."""
    keys = (
        "backend-type",
        "public-ip",
        "backend-data",
        "public-ipv6",
        "backend-v6-data",
        "kube-subnet-manager",
    )
    return "\n".join(f"{k}={annotations[k]}" for k in keys if k in annotations) or "-"
