"""One lab node: a network namespace on the underlay, a private file tree, the agent.

Building a node (:func:`build_node`):

* network namespace ``loden-<lab>-node<i>`` with ``eth0`` (a veth whose other end,
  ``node<i>``, is a port of ``br0`` in the underlay namespace), the node address
  ``<underlay>.1<i>``, a default route via the bridge, and ``ip_forward=1``;
* a persistent mount namespace in which the seed's paths are private bind mounts of
  directories under ``/run/loden-lab/<lab>/nodes/<node>/fs`` (so ``fs/run/flannel`` is
  the node's /run/flannel, readable from the host for ``status`` and ``check``);
* ``loden systemd render --root /`` run *inside* the node, which writes the guide's
  /opt/kubernetes/cfg/flanneld, /opt/kubernetes/bin/{flanneld,mk-docker-opts.sh} and
  /usr/lib/systemd/system/{flanneld,docker}.service into those private directories.

Starting the agent (:func:`start_agent`) is ``systemctl start flanneld`` done by
:mod:`loden.lab.units`: ExecStart from the unit with its EnvironmentFile, READY=1 on
NOTIFY_SOCKET, then ExecStartPost (mk-docker-opts).

CNI nodes get one drop-in. The seed's ExecStartPost is
``mk-docker-opts.sh -k DOCKER_NETWORK_OPTIONS -d /run/flannel/subnet.env``; since
``-f`` defaults to the same file, it *replaces* subnet.env with DOCKER_OPT_* lines only,
and the flannel CNI plugin then fails with "subnet.env is missing FLANNEL_NETWORK...".
(The seed never notices because its runtime is Docker.) A CNI node keeps mk-docker-opts
but points ``-d`` at /run/flannel/docker_opts.env, the way an administrator would with
``systemctl edit flanneld``.
"""

from __future__ import annotations

import json
import logging
import sys
from ipaddress import IPv4Interface, IPv6Interface
from pathlib import Path

from loden.errors import LodenError
from loden.files import replace_file
from loden.lab import cloud, netns, proc, units
from loden.lab.pki import EtcdPKI
from loden.lab.plan import HEALTHZ_PORT, LabPlan
from loden.lab.state import LabState, NodeRecord, ensure_mountpoint, host_lock
from loden.model.subnet_env import parse_env_text
from loden.tools.systemd import SEED_BIN_DIR, SUBNET_FILE, default_loden

log = logging.getLogger(__name__)

#: Paths that are private to each node (target in the node, read-only?).
PRIVATE_PATHS: tuple[str, ...] = (
    "/run/flannel",
    "/opt/kubernetes",
    "/usr/lib/systemd/system",
    "/var/lib/cni",
    "/etc/cni/net.d",
    "/var/run/wireguard",
    "/var/lib/loden",
)
DOCKER_PATHS: tuple[str, ...] = ("/etc/docker", "/run/containerd", "/run/docker")
ETCD_SSL = "/opt/etcd/ssl"
DOCKER_OPTS_FILE = "/run/flannel/docker_opts.env"
CNI_DROPIN = f"""\
# loden lab (CNI node): the seed's ExecStartPost writes DOCKER_OPT_* lines over
# {SUBNET_FILE} (mk-docker-opts.sh reads and writes the same file), which would take
# FLANNEL_NETWORK and FLANNEL_SUBNET away from the flannel CNI plugin.
[Service]
ExecStartPost=
ExecStartPost={SEED_BIN_DIR}/mk-docker-opts.sh -k DOCKER_NETWORK_OPTIONS -d {DOCKER_OPTS_FILE}
"""


def loden_executable() -> str:
    """The ``loden`` console script of this installation (what the wrappers exec)."""
    candidate = Path(default_loden())
    if candidate.exists():
        return str(candidate)
    return str(Path(sys.argv[0]).resolve())


def build_node(
    state: LabState, node: str, tls: EtcdPKI | None, *, extra_ro: tuple[str, ...] = ()
) -> NodeRecord:
    """Create the node's namespaces and private tree and render its units.

    ``extra_ro``: more private node paths, read-only inside the node (kube mode's pod
    volumes); then nothing is rendered (the kube lab writes its own unit).
    """
    plan = state.plan
    ns = plan.node_ns(node)
    address = plan.node_address(node)
    netns.add_netns(state, ns)
    netns.attach_host(plan.underlay_ns, node, ns, address, gateway=plan.gateway.ip)
    address6 = ""
    if plan.ipv6 != "off":
        add_ipv6(ns, plan.node_address6(node), plan.gateway6, forwarding=True)
        address6 = str(plan.node_address6(node))

    root = plan.node_root(node)
    targets = list(PRIVATE_PATHS) + (list(DOCKER_PATHS) if plan.runtime == "docker" else [])
    binds: list[tuple[Path, str, bool]] = [(root / t.lstrip("/"), t, False) for t in targets]
    binds += [(root / t.lstrip("/"), t, True) for t in extra_ro]
    if tls is not None:
        binds.append((tls.dir, ETCD_SSL, True))
    with host_lock():
        for _, target, _ in binds:
            ensure_mountpoint(Path(target))
    mntns = plan.workdir / "mntns" / node
    record = NodeRecord(
        name=node, netns=ns, address=str(address), mntns=str(mntns), address6=address6
    )
    state.set_node(record)
    netns.make_mount_ns(state, mntns, ns, binds, cgroups=plan.runtime == "docker")
    if plan.store == "etcd":
        render(plan, record, tls)
    return record


def add_ipv6(
    ns: str, address: IPv6Interface, gateway: IPv6Interface | None, *, forwarding: bool
) -> None:
    """IPv6 on ``eth0`` of ``ns`` (default route via ``gateway``), without duplicate
    address detection: a tentative address is unusable for a second after it is added,
    and devices made later (cni0, flannel-v6.N) inherit ``default``."""
    for key in ("all", "default", "eth0"):
        netns.sysctl(ns, f"net.ipv6.conf.{key}.accept_dad", "0")
    if forwarding:
        netns.sysctl(ns, "net.ipv6.conf.all.forwarding", "1")
    netns.ip(ns, "-6", "addr", "add", str(address), "dev", "eth0", "nodad")
    if gateway is not None:
        netns.ip(ns, "-6", "route", "add", "default", "via", str(gateway.ip), "dev", "eth0")


def agent_options(plan: LabPlan, address: IPv4Interface) -> str:
    """Loden flags appended to FLANNEL_OPTIONS: /healthz on the node's own address (and
    the emulated cloud's metadata server for aws-vpc/gce)."""
    flags = f"-healthz-ip={address.ip} -healthz-port={HEALTHZ_PORT}"
    if plan.backend in cloud.CLOUD_BACKENDS:
        flags += f" -cloud-metadata-endpoint={cloud.endpoint(plan)}"
    return flags


def render(plan: LabPlan, node: NodeRecord, tls: EtcdPKI | None) -> None:
    """``loden systemd render --root /`` inside the node (the seed's flannel.sh)."""
    argv = [
        loden_executable(),
        "systemd",
        "render",
        "--root",
        "/",
        f"--etcd-endpoints={plan.etcd_endpoints()}",
        f"--extra-options={agent_options(plan, IPv4Interface(node.address))}",
    ]
    if tls is None:
        argv += ["--etcd-cafile=", "--etcd-certfile=", "--etcd-keyfile="]
    proc.run(netns.in_node(node.mntns, node.netns, argv))
    if plan.runtime == "cni":
        units.write_dropin(plan.node_root(node.name), "flanneld.service", "10-lab-cni", CNI_DROPIN)
    if plan.backend in cloud.CLOUD_BACKENDS:
        units.write_dropin(
            plan.node_root(node.name), "flanneld.service", "20-lab-cloud", cloud.dropin(plan)
        )


def etcd_flags(plan: LabPlan) -> list[str]:
    """The etcd flags of the rendered FLANNEL_OPTIONS, for operator commands in a node."""
    flags = [f"-etcd-endpoints={plan.etcd_endpoints()}"]
    if plan.tls:
        flags += [
            f"-etcd-cafile={ETCD_SSL}/ca.pem",
            f"-etcd-certfile={ETCD_SSL}/server.pem",
            f"-etcd-keyfile={ETCD_SSL}/server-key.pem",
        ]
    return flags


def write_network_config(state: LabState, node: NodeRecord) -> str:
    """Write the network config the seed's way, from inside ``node``; returns the argv used.

    v3: ``loden config set '<json>'`` with the node's etcd flags; v2: ``ETCDCTL_API=2
    etcdctl set /coreos.com/network/config '<json>'`` with the guide's TLS flags.

    :raises CommandError: the command failed.
    """
    plan = state.plan
    config = plan.network_config()
    env = {"PATH": proc.SERVICE_PATH}
    if plan.etcd_api == "v3":
        argv = [loden_executable(), "config", "set", config, *etcd_flags(plan), "-etcd-api=v3"]
    else:
        env["ETCDCTL_API"] = "2"
        argv = [proc.require("etcdctl", "etcd-client")]
        if plan.tls:
            argv += [
                f"--ca-file={ETCD_SSL}/ca.pem",
                f"--cert-file={ETCD_SSL}/server.pem",
                f"--key-file={ETCD_SSL}/server-key.pem",
            ]
        argv += [
            f"--endpoints={plan.etcd_endpoints()}",
            "set",
            "/coreos.com/network/config",
            config,
        ]
    proc.run(netns.in_node(node.mntns, node.netns, argv), env=env, timeout=30)
    return " ".join(argv)


def read_subnet6(plan: LabPlan, node: str) -> str:
    """The IPv6 subnet CIDR from the node's subnet.env ("" when there is none)."""
    path = plan.node_root(node) / SUBNET_FILE.lstrip("/")
    try:
        value = parse_env_text(path.read_text(encoding="utf-8")).get("FLANNEL_IPV6_SUBNET", "")
        return str(IPv6Interface(value).network) if value else ""
    except (OSError, ValueError):
        return ""


def read_subnet(plan: LabPlan, node: str) -> tuple[str, int]:
    """(subnet CIDR, MTU) from the node's subnet.env, before or after mk-docker-opts.

    Returns ("", 0) when the file is missing or says nothing useful.
    """
    path = plan.node_root(node) / SUBNET_FILE.lstrip("/")
    try:
        env = parse_env_text(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "", 0
    gateway = env.get("FLANNEL_SUBNET") or env.get("DOCKER_OPT_BIP", "").removeprefix("--bip=")
    mtu = env.get("FLANNEL_MTU") or env.get("DOCKER_OPT_MTU", "").removeprefix("--mtu=")
    try:
        subnet = str(IPv4Interface(gateway).network) if gateway else ""
    except ValueError:
        subnet = ""
    return subnet, int(mtu) if mtu.isdigit() else 0


def lease_subnet6(state: LabState, node: NodeRecord) -> str:
    """The IPv6 subnet of ``node``'s lease (``loden leases -json`` run in the node,
    matched by its public IPv4), or "" when etcd does not say."""
    argv = netns.in_node(
        node.mntns, node.netns, [loden_executable(), "leases", "-json", *etcd_flags(state.plan)]
    )
    done = proc.run(argv, check=False, timeout=15, env={"PATH": proc.SERVICE_PATH})
    try:
        rows = json.loads(done.stdout) if done.returncode == 0 else []
    except ValueError:
        return ""
    own = str(IPv4Interface(node.address).ip)
    for row in rows if isinstance(rows, list) else []:
        if isinstance(row, dict) and row.get("public_ip") == own and row.get("ipv6_subnet"):
            return str(row["ipv6_subnet"])
    return ""


def start_agent(
    state: LabState, node: NodeRecord, *, timeout: float = 40.0, unit: str = "flanneld.service"
) -> NodeRecord:
    """``systemctl start <unit>`` in the node; records the subnet it got.

    :raises LodenError: the agent failed (message has its log's tail).
    """
    started = units.start_service(state, node, unit, role="agent", timeout=timeout)
    subnet, mtu = read_subnet(state.plan, node.name)
    subnet6 = read_subnet6(state.plan, node.name)
    if 6 in state.plan.families and not subnet6:
        # Docker nodes: the seed's mk-docker-opts has replaced subnet.env by DOCKER_OPT_*
        # lines, and the script has no IPv6 option: ask etcd for our lease instead.
        subnet6 = lease_subnet6(state, node)
    families = state.plan.families
    if (4 in families and not subnet) or (6 in families and not subnet6):
        raise LodenError(
            f"flanneld on {node.name} reported READY=1 but {SUBNET_FILE} has no "
            f"{'IPv6 ' if 6 in families and not subnet6 else ''}subnet; "
            f"last lines of {started.log_path}:\n{proc.tail(started.log_path)}"
        )
    record = state.update_node(
        node.name, subnet=subnet, subnet6=subnet6, mtu=mtu, agent_pid=started.pid
    )
    return record


def write_manual_subnet(state: LabState, node: NodeRecord, index: int) -> NodeRecord:
    """Infrastructure tests without an agent: write subnet.env by hand (``--no-agent``)."""
    plan = state.plan
    subnet = list(plan.network.subnets(new_prefix=24))[index + 1]
    text = (
        f"FLANNEL_NETWORK={plan.network}\nFLANNEL_SUBNET={subnet.network_address + 1}/24\n"
        "FLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"
    )
    path = plan.node_root(node.name) / SUBNET_FILE.lstrip("/")
    replace_file(path, text.encode("utf-8"))  # the CNI plugin may read it at any time
    return state.update_node(node.name, subnet=str(subnet), mtu=1450)
