"""Docker nodes: the seed's flow, ``dockerd $DOCKER_NETWORK_OPTIONS`` on every node.

After flanneld's ExecStartPost has rewritten /run/flannel/subnet.env into
``DOCKER_NETWORK_OPTIONS=" --bip=... --ip-masq=false --mtu=..."``, the node's rendered
``docker.service`` is started like systemd would (EnvironmentFile=/run/flannel/subnet.env,
Type=notify: dockerd sends READY=1 itself). What makes one dockerd per node possible
comes from the node's private ``/etc/docker/daemon.json`` (data-root, exec-root,
pidfile and the API socket under the lab directory; dockerd then runs its own
containerd under exec-root), a private /run/containerd, and the cgroup hierarchies
mounted again inside the node (test-environment.md). Debian installs dockerd as
/usr/sbin/dockerd while the seed's unit says /usr/bin/dockerd; where that path does not
exist the lab adds the drop-in an administrator would (``ExecStart=`` reset).

No registry is reachable, so the image is made locally: a rootfs with the static
busybox and its applet links, ``docker import``-ed as ``busybox:latest`` on each node.
Pods are ``docker run -d`` containers; node1's first pod gets a second container that
joins its network namespace (``--network container:<pod>``).

Dual-stack labs (``--ipv6 dual``): mk-docker-opts has no IPv6 option (flannel's script
ignores ``FLANNEL_IPV6_*``), so the node's daemon.json gets what an administrator adds
by hand, ``"ipv6": true`` and ``"fixed-cidr-v6": <FLANNEL_IPV6_SUBNET>`` (the daemon.json
form of ``dockerd --ipv6 --fixed-cidr-v6``): containers then get an address of the
node's IPv6 subnet on ``docker0``.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import threading
from pathlib import Path

from loden.errors import LodenError
from loden.files import replace_file
from loden.lab import proc, units
from loden.lab.runtime_cni import APP_PORT
from loden.lab.state import ContainerRecord, LabState, NodeRecord, PodRecord

SEED_DOCKERD = "/usr/bin/dockerd"
IMAGE = "busybox:latest"


def docker_dir(state: LabState, node: str) -> Path:
    return state.plan.node_dir(node) / "docker"


def socket_path(state: LabState, node: str) -> Path:
    return docker_dir(state, node) / "docker.sock"


def docker_argv(state: LabState, node: str, *args: str) -> list[str]:
    return [proc.require("docker", "docker.io"), "-H", f"unix://{socket_path(state, node)}", *args]


def prepare(state: LabState, node: NodeRecord) -> None:
    """daemon.json and (if needed) the dockerd path drop-in, in the node's private tree."""
    base = docker_dir(state, node.name)
    for sub in ("data", "exec"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    daemon: dict[str, object] = {
        "data-root": str(base / "data"),
        "exec-root": str(base / "exec"),
        "pidfile": str(base / "docker.pid"),
        "hosts": [f"unix://{socket_path(state, node.name)}"],
    }
    if 6 in state.plan.families:
        if not node.subnet6:
            raise LodenError(f"{node.name} has no IPv6 subnet: is its agent running?")
        daemon.update({"ipv6": True, "fixed-cidr-v6": node.subnet6})
    config = state.plan.node_root(node.name) / "etc/docker/daemon.json"
    config.parent.mkdir(parents=True, exist_ok=True)
    replace_file(config, (json.dumps(daemon, indent=2) + "\n").encode("utf-8"))
    if not os.path.exists(SEED_DOCKERD):
        dockerd = proc.require("dockerd", "docker.io")
        units.write_dropin(
            state.plan.node_root(node.name),
            "docker.service",
            "10-lab-dockerd-path",
            f"# loden lab: dockerd is {dockerd} on this machine, not {SEED_DOCKERD}\n"
            f"[Service]\nExecStart=\nExecStart={dockerd} $DOCKER_NETWORK_OPTIONS\n",
        )
        state.note(f"docker.service: ExecStart uses {dockerd} ({SEED_DOCKERD} does not exist)")


def start_dockerd(state: LabState, node: NodeRecord, *, timeout: float = 60.0) -> NodeRecord:
    """``systemctl start docker`` in the node.

    :raises LodenError: dockerd did not become ready (with its log's tail and a hint).
    """
    prepare(state, node)
    try:
        units.start_service(state, node, "docker.service", role="dockerd", timeout=timeout)
    except LodenError as exc:
        raise LodenError(
            f"{exc}\nDocker cannot run in this lab node; `--runtime cni` does not need it"
        ) from exc
    return state.update_node(node.name, docker_sock=str(socket_path(state, node.name)))


def busybox_rootfs(path: Path) -> Path:
    """A tar of the static busybox, its applet links and /www/index.html."""
    if path.exists():
        return path
    busybox = Path(proc.require("busybox", "busybox-static")).resolve()
    applets = proc.out([str(busybox), "--list"]).split()
    # Nodes build their pods in parallel threads: each writes its own temp file, and
    # the atomic rename makes the last identical copy win.
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.{threading.get_ident()}.tmp")
    with tarfile.open(tmp, "w") as tar:
        for directory in ("bin", "etc", "proc", "sys", "dev", "tmp", "www", "root"):
            info = tarfile.TarInfo(directory)
            info.type = tarfile.DIRTYPE
            info.mode = 0o1777 if directory == "tmp" else 0o755
            tar.addfile(info)
        tar.add(str(busybox), arcname="bin/busybox")
        for applet in applets:
            if applet != "busybox":
                link = tarfile.TarInfo(f"bin/{applet}")
                link.type = tarfile.SYMTYPE
                link.linkname = "busybox"
                tar.addfile(link)
        for name, text in (
            ("www/index.html", "loden lab\n"),
            ("etc/passwd", "root:x:0:0::/root:/bin/sh\n"),
        ):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    tmp.replace(path)
    return path


def _inspect(state: LabState, node: str, container: str) -> tuple[int, str, str]:
    """(pid, IPv4, IPv6) of a container ("" for an address it does not have)."""
    fmt = "{{.State.Pid}} {{.NetworkSettings.IPAddress}} {{.NetworkSettings.GlobalIPv6Address}}"
    words = proc.out(docker_argv(state, node, "inspect", "-f", fmt, container)).split()
    words += [""] * (3 - len(words))
    return int(words[0]), words[1], words[2]


def create_pods(state: LabState, node: NodeRecord) -> list[PodRecord]:
    """Import the image, then ``docker run -d`` this node's pods."""
    plan = state.plan
    rootfs = busybox_rootfs(plan.workdir / "busybox-rootfs.tar")
    proc.run(docker_argv(state, node.name, "import", str(rootfs), IMAGE), timeout=60)
    pods: list[PodRecord] = []
    for index in range(plan.pods_per_node):
        name = plan.pod_name(node.name, index)
        cid = proc.out(
            docker_argv(
                state,
                node.name,
                "run",
                "-d",
                "--name",
                name,
                IMAGE,
                "httpd",
                "-f",
                "-p",
                str(APP_PORT),
                "-h",
                "/www",
            ),
            timeout=60,
        ).strip()
        pid, ip, ip6 = _inspect(state, node.name, name)
        containers = [ContainerRecord("app", pid, proc.start_time(pid), cid)]
        if node.name == "node1" and index == 0:
            side = f"{name}-sidecar"
            sid = proc.out(
                docker_argv(
                    state,
                    node.name,
                    "run",
                    "-d",
                    "--name",
                    side,
                    "--network",
                    f"container:{name}",
                    IMAGE,
                    "sleep",
                    "100000000",
                ),
                timeout=60,
            ).strip()
            spid, _, _ = _inspect(state, node.name, side)
            containers.append(ContainerRecord("sidecar", spid, proc.start_time(spid), sid))
        if not ip:
            raise LodenError(f"docker container {name} on {node.name} got no IP address")
        if 6 in plan.families and not ip6:
            raise LodenError(f"docker container {name} on {node.name} got no IPv6 address")
        pod = PodRecord(
            name=name,
            node=node.name,
            ip=ip,
            netns=f"/proc/{pid}/ns/net",
            containers=tuple(containers),
            ip6=ip6 if 6 in plan.families else "",
        )
        state.add_pod(pod)
        pods.append(pod)
    return pods


def remove_containers(state: LabState, node: NodeRecord) -> None:
    """``docker rm -f`` every recorded container of the node (best effort, bounded)."""
    ids = [
        c.docker_id for p in state.pods if p.node == node.name for c in p.containers if c.docker_id
    ]
    if ids and node.docker_sock and Path(node.docker_sock).exists():
        proc.run(docker_argv(state, node.name, "rm", "-f", *ids), check=False, timeout=30)
