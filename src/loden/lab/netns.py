"""Network and mount namespaces: the lab's hosts, and how to run things inside them.

A node is a network namespace plus a *persistent mount namespace* made with
``unshare --mount=FILE --propagation slave`` (test-environment.md): slave propagation
lets pod namespaces created later under /var/run/netns show up inside the node, while
the node's own mounts (its private /run/flannel, /opt/kubernetes, /var/lib/cni, ...)
stay invisible to the host and to other nodes. ``FILE`` must sit on a non-shared
mount, so each lab bind-mounts its ``mntns`` directory onto itself and makes it
private first. A fresh sysfs is mounted in each node so /sys/class/net shows the
node's own devices, as ``ip netns exec`` does.

Commands run in a node through ``nsenter --mount=FILE --net=/var/run/netns/NAME``
(nsenter execs, so the pid it starts is the program's pid). Short requests from this
process (HTTP to an agent's /healthz, to etcd's /health) run in a thread that has
entered the node's network namespace (:mod:`loden.kernel.netns`, the one way Loden
does either).
"""

from __future__ import annotations

import http.client
import ssl
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path

from loden.kernel.netns import NETNS_DIR as NETNS_DIR
from loden.kernel.netns import call_in_netns, netns_argv
from loden.kernel.netns import netns_path as netns_path
from loden.lab import proc
from loden.lab.plan import LAB_ROOT
from loden.lab.state import LabState


def add_netns(state: LabState, name: str) -> None:
    """Create network namespace ``name`` (recorded first) with loopback up."""
    state.record_netns(name)
    proc.run(["ip", "netns", "add", name])
    ip(name, "link", "set", "lo", "up")


def ip(ns: str, *args: str, check: bool = True) -> str:
    """``ip -n <ns> args``; returns stdout."""
    done = proc.run(["ip", "-n", ns, *args], check=check)
    return done.stdout.decode(errors="replace")


def in_net(netns: str, argv: Sequence[str]) -> list[str]:
    """argv that runs ``argv`` in network namespace ``netns`` (a name or a path)."""
    return netns_argv(netns, argv)


def in_node(mntns: str, netns: str, argv: Sequence[str]) -> list[str]:
    """argv that runs ``argv`` inside a node: its mount and network namespaces."""
    return ["nsenter", f"--mount={mntns}", f"--net={netns_path(netns)}", "--", *argv]


def sysctl(ns: str, key: str, value: str) -> None:
    proc.run(in_net(ns, ["sysctl", "-q", "-w", f"{key}={value}"]))


# -- an underlay and the hosts on it (the lab's nodes, the tests' topology hosts) ------------


def make_underlay(ns: str, *, address: IPv4Interface | None = None, mtu: int | None = None) -> None:
    """Bridge ``br0`` in namespace ``ns`` (up, with ``address`` if given), loopback up.

    :raises CommandError: an ``ip`` command failed.
    """
    ip(ns, "link", "add", "br0", "type", "bridge")
    if mtu is not None:
        ip(ns, "link", "set", "br0", "mtu", str(mtu))
    if address is not None:
        ip(ns, "addr", "add", str(address), "dev", "br0")
    ip(ns, "link", "set", "br0", "up")
    ip(ns, "link", "set", "lo", "up")


def attach_host(
    underlay_ns: str,
    port: str,
    host_ns: str,
    address: IPv4Interface,
    *,
    gateway: IPv4Address | None = None,
    mtu: int | None = None,
) -> None:
    """Make ``host_ns`` a node on the underlay: ``eth0`` (veth, its peer ``port`` on
    ``br0``) with ``address``, a default route via ``gateway`` if given, IPv4 forwarding.

    :raises CommandError: an ``ip`` or ``sysctl`` command failed.
    """
    sized = ["mtu", str(mtu)] if mtu is not None else []
    peer = ["peer", "name", "eth0", *sized, "netns", host_ns]
    ip(underlay_ns, "link", "add", port, *sized, "type", "veth", *peer)
    ip(underlay_ns, "link", "set", port, "master", "br0", "up")
    ip(host_ns, "link", "set", "lo", "up")
    ip(host_ns, "addr", "add", str(address), "dev", "eth0")
    ip(host_ns, "link", "set", "eth0", "up")
    if gateway is not None:
        ip(host_ns, "route", "add", "default", "via", str(gateway))
    sysctl(host_ns, "net.ipv4.ip_forward", "1")


# -- mount namespaces ------------------------------------------------------------------------


def private_dir(state: LabState, directory: Path) -> None:
    """Make ``directory`` a private bind mount of itself (for mount-namespace files)."""
    directory.mkdir(parents=True, exist_ok=True)
    if str(directory) in mount_points():
        return
    state.record_mount(str(directory))
    proc.run(["mount", "--bind", str(directory), str(directory)])
    proc.run(["mount", "--make-private", str(directory)])


def make_mount_ns(
    state: LabState,
    file: Path,
    netns: str,
    binds: Sequence[tuple[Path, str, bool]],
    *,
    cgroups: bool = False,
) -> None:
    """Create a persistent mount namespace at ``file`` and set it up for a node.

    ``file``'s directory must already be private (:func:`private_dir`).
    ``binds``: (source directory on the host, target path in the node, read-only). The
    targets must exist on the host (see :func:`loden.lab.state.ensure_mountpoint`).
    ``cgroups``: mount a tmpfs on /sys/fs/cgroup and the host's cgroup hierarchies again
    (dockerd needs them; the fresh sysfs has none).
    """
    file.touch()
    state.record_mount(str(file))
    proc.run(["unshare", f"--mount={file}", "--propagation", "slave", "true"])

    def node(*argv: str) -> None:
        proc.run(in_node(str(file), netns, argv))

    # Copies of the labs' mount-namespace files would keep those namespaces alive as
    # long as this one lives: drop them inside the new namespace (they are private).
    for point in sorted(mount_points()):
        if point.startswith(f"{LAB_ROOT}/") and point.endswith("/mntns"):
            node("umount", "-l", point)
    node("mount", "-t", "sysfs", "-o", "nosuid,nodev,noexec", "sysfs", "/sys")
    for source, target, read_only in binds:
        source.mkdir(parents=True, exist_ok=True)
        node("mount", "-o", "bind,ro" if read_only else "bind", str(source), target)
    if cgroups:
        node("mount", "-t", "tmpfs", "-o", "mode=755", "cgroup", "/sys/fs/cgroup")
        for target, fstype, options in host_cgroup_mounts():
            node("mkdir", "-p", target)
            node("mount", "-t", fstype, "-o", options, "cgroup", target)


def host_cgroup_mounts() -> list[tuple[str, str, str]]:
    """(target, fstype, options) of the host's cgroup hierarchies under /sys/fs/cgroup."""
    mounts: list[tuple[str, str, str]] = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        sep = fields.index("-")
        target, fstype, super_opts = fields[4], fields[sep + 1], fields[sep + 3]
        if fstype in ("cgroup", "cgroup2") and target.startswith("/sys/fs/cgroup/"):
            options = ",".join(o for o in super_opts.split(",") if o not in ("rw", "ro"))
            mounts.append((target, fstype, options or "defaults"))
    return mounts


def mount_points() -> set[str]:
    """Every mount point of this process's mount namespace."""
    points: set[str] = set()
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        points.add(line.split()[4].replace("\\040", " "))
    return points


# -- calling into a network namespace from this process -------------------------------------


def http_get(
    netns: str | None,
    host: str,
    port: int,
    path: str,
    *,
    context: ssl.SSLContext | None = None,
    timeout: float = 3.0,
) -> tuple[int, str]:
    """(status, body) of ``GET path`` from inside ``netns`` (None: from here).

    :raises OSError: connection failed; :raises LodenError: timed out.
    """

    def request() -> tuple[int, str]:
        conn: http.client.HTTPConnection
        if context is not None:
            conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=context)
        else:
            conn = http.client.HTTPConnection(host, port, timeout=timeout)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read().decode(errors="replace")
        finally:
            conn.close()

    if netns is None:
        return request()
    return call_in_netns(netns, request, timeout=timeout + 2)
