"""``loden lab down``: remove everything a lab made, whatever state ``up`` left it in.

The record in state.json is used first, then everything is swept by name and marker,
so a lab whose ``up`` was killed before it could record a resource still goes away:

1. docker containers are removed through their dockerd (``docker rm -f``), if it runs;
2. processes: the recorded ones (pid + start time) plus every process carrying
   ``LODEN_LAB=<name>`` or living in one of the lab's network or mount namespaces,
   with all their descendants: SIGTERM, then SIGKILL after a grace period;
3. every mount under the lab directory (mount-namespace files, the private bind of
   their directory), deepest first;
4. network namespaces ``loden-<name>-underlay|node<i>|node<i>-pod<j>`` (pods first);
5. cgroup directories dockerd left for the lab's containers;
6. the lab directory; then, if no lab is left, the mount-point directories labs
   created on the host.

Each step tolerates what is already gone, so ``down`` is safe to run twice.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from loden.errors import ConfigError
from loden.lab import netns, proc
from loden.lab.plan import ENV_MARKER, LAB_ROOT, check_name, netns_prefix
from loden.lab.runtime_docker import remove_containers
from loden.lab.state import LabState, host_lock, release_mountpoints

log = logging.getLogger(__name__)


@dataclass(slots=True)
class DownReport:
    processes: int = 0
    mounts: int = 0
    namespaces: int = 0
    leftovers: list[str] = field(default_factory=list)


def lab_netns(name: str) -> list[str]:
    """This lab's network namespaces (never another lab's whose name shares a prefix)."""
    pattern = re.compile(re.escape(netns_prefix(name)) + r"(underlay|node\d+(-pod\d+)?)")
    try:
        entries = [p.name for p in netns.NETNS_DIR.iterdir()]
    except FileNotFoundError:
        return []
    return sorted((e for e in entries if pattern.fullmatch(e)), key=len, reverse=True)


def _mounts_under(directory: Path) -> list[str]:
    prefix = str(directory).rstrip("/") + "/"
    points = [p for p in netns.mount_points() if p == str(directory) or p.startswith(prefix)]
    return sorted(points, key=len, reverse=True)


def down(name: str) -> DownReport:
    """Tear lab ``name`` down completely (see the module docstring)."""
    check_name(name)
    report = DownReport()
    workdir = LAB_ROOT / name
    state: LabState | None = None
    with contextlib.suppress(ConfigError):
        state = LabState.load(name)
    if state is not None:
        with contextlib.suppress(Exception):
            state.set_phase("removing")
        for node in state.nodes.values():
            if node.docker_sock:
                with contextlib.suppress(Exception):
                    remove_containers(state, node)

    namespaces = lab_netns(name)
    ids = {proc.ns_id(netns.netns_path(ns)) for ns in namespaces}
    mntns_dir = workdir / "mntns"
    if mntns_dir.is_dir():
        ids |= {proc.ns_id(str(f)) for f in mntns_dir.iterdir()}
    ids.discard((0, 0))
    pids = proc.lab_processes(f"{ENV_MARKER}={name}".encode(), ids)
    if state is not None:
        pids |= {p.pid for p in state.processes if proc.alive(p.pid, p.start)}
    report.processes = len(pids)
    stuck = proc.stop_all(pids, grace=2.0)
    report.leftovers += [f"process {pid} would not die" for pid in stuck]

    for point in _mounts_under(workdir):
        for _ in range(10):  # a point may carry several stacked mounts
            if point not in netns.mount_points():
                break
            done = proc.run(["umount", point], check=False)
            if done.returncode != 0:
                done = proc.run(["umount", "-l", point], check=False)
            if done.returncode != 0:
                report.leftovers.append(f"mount {point}")
                break
            report.mounts += 1

    for ns in namespaces:
        done = proc.run(["ip", "netns", "del", ns], check=False)
        if done.returncode == 0:
            report.namespaces += 1
        else:
            report.leftovers.append(f"netns {ns}: {done.stderr.decode(errors='replace').strip()}")

    if state is not None and state.plan.runtime == "docker":
        _remove_cgroups([c.docker_id for p in state.pods for c in p.containers if c.docker_id])

    with host_lock():
        shutil.rmtree(workdir, ignore_errors=True)
        if workdir.exists():
            report.leftovers.append(f"directory {workdir}")
        release_mountpoints(netns.mount_points())
    return report


def _remove_cgroups(docker_ids: list[str]) -> None:
    """rmdir the containers' cgroups, then dockerd's parent ``docker`` cgroups if empty.

    rmdir of a cgroup that has processes or children fails, so another dockerd's
    cgroups are never harmed; it recreates the parent when it needs it.
    """
    root = Path("/sys/fs/cgroup")
    for docker_id in docker_ids:
        for directory in root.glob(f"*/docker/{docker_id}"):
            with contextlib.suppress(OSError):
                directory.rmdir()
    for parent in root.glob("*/docker"):
        with contextlib.suppress(OSError):
            parent.rmdir()
