"""The lab's record of what it made: ``/run/loden-lab/<name>/state.json``.

Every resource is recorded *before* it is created (namespaces, mounts) or right after
its process id exists (processes, with their start time so a recycled pid is never
killed), and the file is rewritten atomically after each change. ``down`` trusts the
record first and then sweeps by name and marker for anything a killed ``up`` could
not record (see :mod:`loden.lab.teardown`).

Directories the lab had to create on the host as mount points (``/run/flannel``,
``/opt/kubernetes``...; the private copies are bind-mounted onto them inside each
node's mount namespace) are listed in ``/run/loden-lab/mountpoints.json`` and removed
by the ``down`` of the last lab. A host-wide lock (``/run/loden-lab.lock``, flock)
serialises the short critical sections: picking addresses, creating or removing a
lab's directory, creating or removing mount points.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

from loden.errors import ConfigError
from loden.files import replace_file
from loden.lab.plan import LAB_ROOT, LabPlan

LOCK_FILE = Path("/run/loden-lab.lock")
MOUNTPOINTS = LAB_ROOT / "mountpoints.json"


@dataclass(frozen=True, slots=True)
class ProcRecord:
    """A long-running process the lab started (agent, etcd, dockerd, pod container)."""

    role: str
    node: str
    pid: int
    start: int
    argv: tuple[str, ...]
    log: str = ""


@dataclass(frozen=True, slots=True)
class ContainerRecord:
    name: str
    pid: int
    start: int
    docker_id: str = ""


@dataclass(frozen=True, slots=True)
class PodRecord:
    """A pod: its network namespace (a path) and the processes sharing it."""

    name: str
    node: str
    #: The pod's IPv4 address ("" on an IPv6-only lab).
    ip: str
    netns: str
    containers: tuple[ContainerRecord, ...] = ()
    ip6: str = ""

    def address(self, version: int) -> str:
        return self.ip if version == 4 else self.ip6


@dataclass(frozen=True, slots=True)
class NodeRecord:
    name: str
    netns: str
    address: str
    mntns: str
    subnet: str = ""
    mtu: int = 0
    agent_pid: int = 0
    docker_sock: str = ""
    address6: str = ""
    subnet6: str = ""

    def subnet_of(self, version: int) -> str:
        return self.subnet if version == 4 else self.subnet6

    def address_of(self, version: int) -> str:
        return self.address if version == 4 else self.address6


@dataclass
class LabState:
    """The mutable record of one lab; every mutator saves the file."""

    plan: LabPlan
    phase: str = "creating"
    netns: list[str] = field(default_factory=list)
    mounts: list[str] = field(default_factory=list)
    processes: list[ProcRecord] = field(default_factory=list)
    nodes: dict[str, NodeRecord] = field(default_factory=dict)
    pods: list[PodRecord] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def path(self) -> Path:
        return self.plan.workdir / "state.json"

    # -- mutators (thread-safe: nodes are built in parallel) ----------------------------

    def set_phase(self, phase: str) -> None:
        with self._lock:
            self.phase = phase
            self._save()

    def record_netns(self, name: str) -> None:
        with self._lock:
            if name not in self.netns:
                self.netns.append(name)
            self._save()

    def record_mount(self, path: str) -> None:
        with self._lock:
            if path not in self.mounts:
                self.mounts.append(path)
            self._save()

    def record_process(self, proc: ProcRecord) -> None:
        with self._lock:
            self.processes.append(proc)
            self._save()

    def set_node(self, node: NodeRecord) -> None:
        with self._lock:
            self.nodes[node.name] = node
            self.nodes = dict(sorted(self.nodes.items(), key=lambda kv: int(kv[0][4:])))
            self._save()

    def update_node(self, name: str, **changes: Any) -> NodeRecord:
        with self._lock:
            self.nodes[name] = replace(self.nodes[name], **changes)
            self._save()
            return self.nodes[name]

    def add_pod(self, pod: PodRecord) -> None:
        with self._lock:
            pods = [p for p in self.pods if p.name != pod.name] + [pod]
            self.pods = sorted(pods, key=lambda p: [int(x) for x in p.name[4:].split("-pod")])
            self._save()

    def note(self, text: str) -> None:
        with self._lock:
            if text not in self.notes:
                self.notes.append(text)
            self._save()

    # -- persistence --------------------------------------------------------------------

    def save(self) -> None:
        with self._lock:
            self._save()

    def _save(self) -> None:
        doc = {
            "plan": self.plan.to_json(),
            "phase": self.phase,
            "netns": self.netns,
            "mounts": self.mounts,
            "processes": [asdict(p) for p in self.processes],
            "nodes": {k: asdict(v) for k, v in self.nodes.items()},
            "pods": [asdict(p) for p in self.pods],
            "notes": self.notes,
        }
        replace_file(self.path, (json.dumps(doc, indent=1) + "\n").encode("utf-8"))

    @classmethod
    def load(cls, name: str) -> LabState:
        """:raises ConfigError: no such lab, or its state.json is unreadable."""
        path = LAB_ROOT / name / "state.json"
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError(
                f"no lab named {name!r} (no {path}); see `loden lab status --all`"
            ) from exc
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read {path}: {exc}; `loden lab down` still works") from exc
        try:
            return cls(
                plan=LabPlan.from_json(doc["plan"]),
                phase=str(doc.get("phase", "")),
                netns=[str(n) for n in doc.get("netns", [])],
                mounts=[str(m) for m in doc.get("mounts", [])],
                processes=[_proc(p) for p in doc.get("processes", [])],
                nodes={k: NodeRecord(**v) for k, v in doc.get("nodes", {}).items()},
                pods=[_pod(p) for p in doc.get("pods", [])],
                notes=[str(n) for n in doc.get("notes", [])],
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"malformed {path}: {exc}; `loden lab down` still works") from exc


def _proc(data: dict[str, Any]) -> ProcRecord:
    return ProcRecord(**{**data, "argv": tuple(data["argv"])})


def _pod(data: dict[str, Any]) -> PodRecord:
    containers = tuple(ContainerRecord(**c) for c in data.get("containers", []))
    return PodRecord(**{**data, "containers": containers})


# -- host-wide bookkeeping ----------------------------------------------------------------


@contextlib.contextmanager
def host_lock() -> Iterator[None]:
    """Exclusive lock shared by every ``loden lab`` process on this machine."""
    fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def lab_names() -> list[str]:
    """Names of the labs that have a directory under /run/loden-lab (any phase)."""
    if not LAB_ROOT.is_dir():
        return []
    return sorted(p.name for p in LAB_ROOT.iterdir() if p.is_dir())


def taken_networks(exclude: str = "") -> list[IPv4Network]:
    """Underlay and overlay networks of every other recorded lab."""
    taken: list[IPv4Network] = []
    for name in lab_names():
        if name == exclude:
            continue
        try:
            plan = LabState.load(name).plan
        except ConfigError:
            continue
        taken += [plan.underlay, plan.network]
    return taken


def _read_mountpoints() -> list[str]:
    try:
        data = json.loads(MOUNTPOINTS.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return [str(p) for p in data] if isinstance(data, list) else []


def ensure_mountpoint(path: Path) -> None:
    """``mkdir -p path`` on the host, remembering each directory the lab created.

    Call with :func:`host_lock` held.
    """
    missing: list[Path] = []
    current = path
    while not current.exists():
        missing.append(current)
        current = current.parent
    if not missing:
        return
    known = _read_mountpoints()
    for directory in reversed(missing):
        known.append(str(directory))
        replace_file(MOUNTPOINTS, (json.dumps(known) + "\n").encode("utf-8"))
        directory.mkdir(exist_ok=True)


def release_mountpoints(mounted: set[str]) -> list[str]:
    """Remove the created mount-point directories once no lab is left (lock held).

    ``mounted`` are the host's current mount points, which are never removed. Returns
    the directories removed.
    """
    if lab_names():
        return []
    removed: list[str] = []
    for directory in sorted(_read_mountpoints(), key=len, reverse=True):
        if directory in mounted:
            continue
        with contextlib.suppress(OSError):
            os.rmdir(directory)
            removed.append(directory)
    with contextlib.suppress(FileNotFoundError):
        MOUNTPOINTS.unlink()
    with contextlib.suppress(OSError):
        LAB_ROOT.rmdir()
    return removed
