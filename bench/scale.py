"""Control-plane scale: one real agent against 5,000 peer leases in a real etcd, and
against 5,000 Node objects in the Kubernetes API double (``--kube-subnet-mgr``).

Run by hand as root (not part of the test suite)::

    .venv/bin/python bench/scale.py [--peers 5000] [--new 200] [--backends vxlan host-gw]
        [--stores etcd kube] [--modes old new] [--idle 300] [--drift 30]

Every figure comes from the kernel, /proc and the agent's /metrics, never from its log.
Each backend runs once per ``--modes`` entry, side by side in one table: ``old`` is the
agent with ``-kernel-events=false -resync-period=10`` (drift found by a full dump and
diff every 10 s), ``new`` the default (drift repaired from netlink notifications, a full
pass every ``-resync-period``, by default 300 s).

For each backend: a one-host :class:`tests.fixtures.topology.Topology` on a random
172.x/16 underlay (so every synthetic peer public IP is on-link; no traffic is sent to
them), a real etcd in the underlay namespace holding ``--peers`` leases written up front
(byte-exact flannel lease JSON, attached to one 24 h etcd lease; vxlan ones carry
``{"VNI":1,"VtepMAC":...}``), and one real ``flanneld`` process (Network 10.0.0.0/8,
SubnetLen 24, ``--healthz-port`` and the mode's flags). Measured:

a. cold start: process start -> the last peer route in the kernel (timestamped like d.;
   the agent writes routes after neighbours/FDB), then one ``ip``/``bridge`` dump confirms
   every entry (routes proto 76; vxlan also permanent neighbours and FDB on flannel.1);
b. no-change resync (modes with a periodic pass under a minute): each pass of
   ``loden_reconcile_duration_seconds`` (the agent's /metrics histogram, one scrape per pass);
c. RSS of the agent process (VmRSS after the cold start and at the end, and VmHWM);
d. new lease -> route: ``--new`` leases written one at a time, each awaited (closed
   loop), then ``--new`` more at random (Poisson) times, mean gap ``--gap`` ms (open loop:
   arrivals independent of the agent's periodic resync); each route's RTM_NEWROUTE is
   timestamped by a netlink multicast socket of this process inside the host namespace;
e. burst: ``--burst`` leases written back to back (a scale-up): first write -> last route;
f. idle: ``--idle`` s without lease changes: the agent's CPU time (its own, and apart
   its children's, from /proc/PID/stat) as % of one core, and its RSS sampled each second;
g. drift repair: ``--drift`` owned entries (routes, neighbours, FDB entries) deleted at
   random by hand in one batch; time until all are back (kernel polled), and the agent's
   ``loden_kernel_repairs_total`` / ``loden_reconcile_changes_total``;
h. RSS growth (a second agent on a fresh etcd): VmRSS at 0 peers, then 1,000, then
   ``--peers``, then after ``--churn`` leases deleted and as many new ones written;
i. churn (``--churn-seconds``, etcd store, same agent as h.): for that long, rounds of
   ``--churn`` leases deleted (the oldest) and as many new ones written (new subnets and
   MACs, cycling through the underlay's /16), each awaited in the kernel, then
   ``--churn-pause`` s without changes; VmRSS after each round's pause, printed as it
   runs, so growth over time is visible (the first and last quarters' medians, the max).

Targets (issue 14): cold start <= 1.6 s, RSS <= 40 MB, new-lease latency p50 <= 10 ms and
p99 <= 50 ms, idle CPU <= 0.1 % of a core, drift repaired in <= 1 s. ``--py-spy DIR``
profiles the agent per phase and prints where the samples go. Everything is torn down
on exit, Ctrl-C or failure.

Both stores run side by side in one run (same backends, peers, phases). ``kube``: the API
double (``python -m loden.kubeapi``, plain HTTP like the bench's etcd) in the underlay
namespace; every peer is a Node whose podCIDR is the peer subnet and whose annotations are
exactly Go flanneld's (``kube-subnet-manager``, ``backend-type``, ``backend-data``,
``public-ip``), created in bulk up front; a "new lease" is a POST of one more such Node.
The agent runs with ``--kube-subnet-mgr --kube-api-url=http://...`` and ``NODE_NAME`` of
its own Node (podCIDR 10.0.1.0/24). Each store is one function returning a :class:`Store`
(:func:`setup_etcd`, :func:`setup_kube`).

``--ipv6`` (etcd store): every lease is dual-stack (``<v4>-24&<v6>-64``, ``PublicIPv6`` on
an on-link IPv6 underlay, vxlan ``BackendV6Data``), the config enables IPv6, and the
agent programs both families (vxlan: ``flannel.1`` and ``flannel-v6.1``): twice the
entries, the new-lease latency still timed on the IPv4 route.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import random
import re
import shlex
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from types import FrameType
from typing import Any

import h11

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.fixtures.etcd import EtcdServer
from tests.fixtures.topology import Host, Process, Topology, TopologyError, wait_until

from loden.kernel.netns import call_in_netns
from loden.kubeapi.control import KubeApiProcess, node_body
from loden.model.lease import Lease, LeaseAttrs

FLANNELD = str(Path(sys.executable).parent / "flanneld")
NETWORK = IPv4Network("10.0.0.0/8")
PREFIX = "/coreos.com/network"
HEALTHZ_PORT = 8471
TXN_OPS = 128  # etcd's default --max-txn-ops
KUBE_PREFIX = "flannel.alpha.coreos.com/"
AGENT_NODE = "bench-agent"
AGENT_SUBNET = IPv4Network("10.0.1.0/24")  # below every peer_subnet()
#: ``--ipv6``: the overlay's IPv6Network and an IPv6 underlay /64 (inside the host netns).
NETWORK6 = IPv6Network("fd5d::/48")
UNDERLAY6 = IPv6Network("fd5c::/64")
#: The steady idle window (see ``Result.idle_steady_pct``): after the changes written
#: before idling, the agent verifies the kernel once in full at its next periodic pass
#: (up to 300 s later); the passes after it only fingerprint the kernel's dumps.
STEADY_WINDOW = 300.0

TARGETS = {
    "cold": 1.6,
    "resync": 0.5,
    "rss": 40.0,
    "p50": 10.0,
    "p99": 50.0,
    "idle": 0.1,
    "drift": 1.0,
}
#: Agent flags per mode; the period of its full pass (None: too rare to measure here).
MODES: dict[str, tuple[list[str], float | None]] = {
    "old": (["--kernel-events=false", "--resync-period=10"], 10.0),
    "new": (["--kernel-events=true", "--resync-period=300"], None),
}


# -- sockets inside a network namespace ----------------------------------------------------


def in_netns(netns: str, make: Callable[[], socket.socket]) -> socket.socket:
    """Create a socket inside ``netns`` (the project's one way in: a short-lived thread
    enters it); the socket stays in that namespace, this process never moves."""
    return call_in_netns(netns, make)


class HTTP:
    """A minimal HTTP/1.1 client on one keep-alive socket (h11), made inside a netns."""

    def __init__(self, netns: str, host: str, port: int, timeout: float = 10.0) -> None:
        self.host = host
        self.sock = in_netns(netns, lambda: socket.create_connection((host, port), timeout))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.conn = h11.Connection(h11.CLIENT)

    def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        headers = [("Host", self.host), ("Content-Length", str(len(body)))]
        if body:
            headers.append(("Content-Type", "application/json"))
        out = self.conn.send(h11.Request(method=method, target=path, headers=headers)) or b""
        if body:
            out += self.conn.send(h11.Data(data=body)) or b""
        self.sock.sendall(out + (self.conn.send(h11.EndOfMessage()) or b""))
        status, chunks = 0, []
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(self.sock.recv(1 << 16))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                break
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        return status, b"".join(chunks)

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        status, data = self.request("POST", path, json.dumps(body).encode())
        if status != 200:
            raise TopologyError(f"POST {path} -> HTTP {status}: {data[:300]!r}")
        answer: dict[str, Any] = json.loads(data)
        return answer

    def close(self) -> None:
        self.sock.close()


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


# -- route events (netlink multicast) ---------------------------------------------------------

_RTMGRP_IPV4_ROUTE = 0x40
_RTM_NEWROUTE = 24
_RTA_DST = 1
_RTPROT_LODEN = 76
_SO_RCVBUFFORCE = 33
_NLMSG_HDR = struct.Struct("=IHHII")
_RTMSG = struct.Struct("=BBBBBBBBI")


class RouteMonitor:
    """Arrival times (``time.perf_counter``) of Loden's routes (RTM_NEWROUTE, protocol 76)
    per destination, read from a netlink multicast socket inside a namespace."""

    def __init__(self, netns: str) -> None:
        self.netns = netns

        def make() -> socket.socket:
            s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
            s.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, 64 << 20)
            s.bind((0, _RTMGRP_IPV4_ROUTE))
            return s

        self.sock = in_netns(netns, make)
        self.sock.settimeout(0.2)
        self.seen: dict[IPv4Network, float] = {}
        self.overflowed = False  # ENOBUFS: events were lost, counts are not complete
        self.cond = threading.Condition()
        self._stop = False
        self.thread = threading.Thread(target=self._run, name="route-monitor", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(1 << 20)
            except TimeoutError:
                continue
            except OSError:
                self.overflowed = True
                continue
            now = time.perf_counter()
            found = list(self._parse(data))
            if found:
                with self.cond:
                    for dst in found:
                        self.seen.setdefault(dst, now)
                    self.cond.notify_all()

    @staticmethod
    def _parse(data: bytes) -> Iterator[IPv4Network]:
        offset = 0
        while offset + _NLMSG_HDR.size <= len(data):
            length, kind, _, _, _ = _NLMSG_HDR.unpack_from(data, offset)
            if length < _NLMSG_HDR.size:
                return
            body = offset + _NLMSG_HDR.size
            if kind == _RTM_NEWROUTE and length >= _NLMSG_HDR.size + _RTMSG.size:
                family, dst_len, _, _, _, protocol, _, _, _ = _RTMSG.unpack_from(data, body)
                attr = body + _RTMSG.size
                end = offset + length
                while family == socket.AF_INET and protocol == _RTPROT_LODEN and attr + 4 <= end:
                    alen, atype = struct.unpack_from("=HH", data, attr)
                    if alen < 4:
                        break
                    if atype == _RTA_DST and alen >= 8:
                        raw = data[attr + 4 : attr + 8]
                        yield IPv4Network((int.from_bytes(raw, "big"), dst_len))
                        break
                    attr += (alen + 3) & ~3
            offset += (length + 3) & ~3

    def wait_count(self, want: int, timeout: float) -> float | None:
        """Time at which ``want`` distinct routes had arrived, or None on timeout."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while len(self.seen) < want:
                left = deadline - time.monotonic()
                if left <= 0 or self.overflowed:
                    return None
                self.cond.wait(min(left, 0.2))
            return sorted(self.seen.values())[want - 1]

    def wait_for(self, dst: IPv4Network, timeout: float) -> float | None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while dst not in self.seen:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(left)
            return self.seen[dst]

    def present(self, dst: IPv4Network) -> bool:
        """Is the route in the kernel (asked directly, for a route whose event never came)?"""
        argv = ["ip", "-n", self.netns, "route", "show", "exact", str(dst), "proto", "76"]
        return bool(subprocess.run(argv, capture_output=True, text=True, check=False).stdout)

    def close(self) -> None:
        self._stop = True
        self.thread.join(2)
        self.sock.close()


# -- the world ----------------------------------------------------------------------------------


def peer_subnet(i: int) -> IPv4Network:
    return IPv4Network((int(NETWORK.network_address) + ((i + 2) << 8), 24))


def peer_lease(i: int, underlay: IPv4Network, kind: str, dual: bool = False) -> Lease:
    public_ip = underlay.network_address + 256 + i  # never .1 (etcd) or .11 (the host)
    data = data6 = None
    if kind == "vxlan":
        mac = bytes([0x0A, 0x58, (i >> 16) & 255, (i >> 8) & 255, i & 255, 1]).hex(":")
        data = LeaseAttrs.encode_data({"VNI": 1, "VtepMAC": mac})
        if dual:
            mac6 = bytes([0x0A, 0x58, (i >> 16) & 255, (i >> 8) & 255, i & 255, 2]).hex(":")
            data6 = LeaseAttrs.encode_data({"VNI": 1, "VtepMAC": mac6})
    if not dual:
        return Lease(peer_subnet(i), LeaseAttrs(public_ip, kind, data))
    subnet6 = IPv6Network((int(NETWORK6.network_address) + ((i + 2) << 64), 64))
    public_ip6 = UNDERLAY6.network_address + 256 + i
    return Lease(peer_subnet(i), LeaseAttrs(public_ip, kind, data, public_ip6, data6), subnet6)


def peer_node(i: int, lease: Lease) -> dict[str, Any]:
    """A peer Node as Go flanneld leaves it: podCIDR = the lease, its four annotations."""
    annotations = {
        KUBE_PREFIX + "kube-subnet-manager": "true",
        KUBE_PREFIX + "backend-type": lease.attrs.backend_type,
        KUBE_PREFIX + "backend-data": lease.attrs.backend_data or "null",
        KUBE_PREFIX + "public-ip": str(lease.attrs.public_ip),
    }
    return node_body(f"peer{i}", str(lease.subnet), annotations=annotations)


def put_op(lease: Lease, etcd_lease: str) -> dict[str, Any]:
    key = f"{PREFIX}/subnets/{lease.key}"
    return {"key": _b64(key), "value": _b64(lease.attrs.to_json()), "lease": etcd_lease}


def agent_pid(proc: Process) -> int:
    """The agent's Python process: ``ip netns exec`` execs it, but follow children if not."""
    todo = [proc.pid]
    while todo:
        pid = todo.pop(0)
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except FileNotFoundError:
            continue
        if any(part.endswith(b"flanneld") for part in cmdline) and b"python" in b" ".join(
            [cmdline[0], Path(f"/proc/{pid}/exe").resolve().name.encode()]
        ):
            return pid
        for task in Path(f"/proc/{pid}/task").iterdir():
            todo += [int(c) for c in (task / "children").read_text().split()]
    raise TopologyError(f"no flanneld python process under pid {proc.pid}")


def _is_python(pid: int) -> bool:
    try:
        return "python" in Path(f"/proc/{pid}/exe").resolve().name
    except OSError:
        return False


def memory_mib(pid: int) -> dict[str, float]:
    values: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
    return values


def kernel_counts(host: Host, vxlan: bool, dual: bool = False) -> tuple[int, ...]:
    families = ("-4", "-6") if dual else ("-4",)
    routes = [host.ns.ip(f, "route", "show", "proto", "76").stdout.count("\n") for f in families]
    if not vxlan:
        return tuple(routes)
    counts = list(routes)
    for dev in ("flannel.1", "flannel-v6.1") if dual else ("flannel.1",):
        neigh = host.ns.ip("neigh", "show", "dev", dev, "nud", "permanent", check=False)
        fdb = host.ns.run("bridge", "fdb", "show", "dev", dev, check=False).stdout
        counts += [neigh.stdout.count("\n"), sum(1 for ln in fdb.splitlines() if " dst " in ln)]
    return tuple(counts)


_SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*(?:\{[^}]*\})?) (\S+)$", re.M)


def scrape(host: Host) -> dict[str, float]:
    """The agent's /metrics samples (Prometheus text): name{labels} -> value."""
    http = HTTP(host.name, str(host.ip), HEALTHZ_PORT, timeout=5)
    try:
        status, body = http.request("GET", "/metrics")
    finally:
        http.close()
    if status != 200:
        raise TopologyError(f"/metrics on {host.name} answered HTTP {status}")
    return {name: float(value) for name, value in _SAMPLE.findall(body.decode())}


def reconcile_totals(host: Host) -> tuple[int, float]:
    """(count, sum) of the agent's reconcile histogram from /metrics."""
    found = scrape(host)
    count = found["loden_reconcile_duration_seconds_count"]
    return int(count), found["loden_reconcile_duration_seconds_sum"]


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User + system CPU time of ``pid`` itself, and of its waited-for children
    (iptables-save and friends), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    utime, stime, cutime, cstime = (int(v) for v in fields[11:15])
    tick = os.sysconf("SC_CLK_TCK")
    return (utime + stime) / tick, (cutime + cstime) / tick


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


class Profiler:
    """``py-spy record`` attached to the agent for one phase (``--py-spy DIR``)."""

    def __init__(self, binary: str, directory: Path | None, kind: str) -> None:
        self.binary = binary
        self.directory = directory
        self.kind = kind
        self.proc: subprocess.Popen[bytes] | None = None
        self.files: list[Path] = []

    def start(self, pid: int, phase: str) -> None:
        if self.directory is None:
            return
        self.stop()
        out = self.directory / f"{self.kind}-{phase}.txt"
        self.files.append(out)
        self.proc = subprocess.Popen(
            [
                self.binary,
                "record",
                "--pid",
                str(pid),
                "--rate",
                "250",
                "--function",
                "--nonblocking",
                "--format",
                "raw",
                "--output",
                str(out),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
            self.proc = None


def summarize(path: Path, top: int = 12) -> list[str]:
    """Where the samples of a py-spy raw file go: loden functions, self and inclusive."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [f.strip() for f in stack.split(";")[1:]]  # [0] is the process
        loden = [f for f in frames if "loden/" in f]
        leaf = frames[-1] if frames else "?"
        own[loden[-1] if loden else leaf] += count  # time charged to the innermost loden frame
        for name in dict.fromkeys(loden):
            inclusive[name] += count
    if not total:
        return [f"{path.name}: no samples"]
    lines = [f"{path.name}: {total} samples (250/s); innermost loden frame, then inclusive"]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in own.most_common(top)]
    lines.append("  -- inclusive")
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in inclusive.most_common(top)]
    return lines


@dataclass
class Latency:
    """New lease written -> its route in the kernel."""

    latency_ms: list[float] = field(default_factory=list)
    put_ms: list[float] = field(default_factory=list)
    missed: int = 0
    event_lost: int = 0
    #: First write -> last route seen (the whole phase).
    span_s: float = 0.0


def write_new_leases(
    put: Callable[[Lease], bool],
    monitor: RouteMonitor,
    leases: Sequence[Lease],
    mode: str,
    gap_ms: float = 0.0,
) -> Latency:
    """Write ``leases``, one ``put`` each (an etcd put or a Node POST; True when
    accepted), and time each route's arrival in the kernel.

    ``closed``: each lease's route is awaited before the next write. ``open``: writes at
    exponentially distributed gaps of mean ``gap_ms`` whatever the agent is doing
    (arrivals independent of its periodic resync). ``burst``: back to back.
    """
    out = Latency()
    pending: list[tuple[IPv4Network, float]] = []
    first = next_at = time.perf_counter()
    for lease in leases:
        if mode == "open":
            next_at += random.expovariate(1000.0 / gap_ms)
            time.sleep(max(0.0, next_at - time.perf_counter()))
        elif mode == "closed":
            time.sleep(random.uniform(0.0, 0.01))  # no lock-step with the agent's loops
        sent = time.perf_counter()
        accepted = put(lease)
        out.put_ms.append((time.perf_counter() - sent) * 1000)
        if not accepted:
            raise TopologyError(f"the write of {lease.key} was refused")
        pending.append((lease.subnet, sent))
        if mode == "closed":
            _collect(monitor, pending, out, time.monotonic() + 5.0)
            if out.missed >= 5:  # keeps a run against a stuck agent bounded
                raise TopologyError("5 new leases got no route within 5 s each: agent stuck?")
    last = _collect(monitor, pending, out, time.monotonic() + 10.0)
    out.span_s = (last or time.perf_counter()) - first
    return out


def _collect(
    monitor: RouteMonitor, pending: list[tuple[IPv4Network, float]], out: Latency, until: float
) -> float | None:
    """Wait (until ``until``) for the pending routes; returns the last arrival time."""
    last: float | None = None
    for subnet, sent in pending:
        seen = monitor.wait_for(subnet, timeout=max(0.0, until - time.monotonic()))
        if seen is None and monitor.present(subnet):
            out.event_lost += 1  # programmed, but its netlink event never reached us
        elif seen is None:
            out.missed += 1
        else:
            out.latency_ms.append((seen - sent) * 1000)
            last = seen if last is None else max(last, seen)
    pending.clear()
    return last


@dataclass
class Result:
    kind: str
    store: str
    mode: str
    peers: int
    entries: int = 0
    write_s: float = 0.0
    ready_s: float = 0.0
    cold_s: float = 0.0
    cold_polled: bool = False
    snapshot_reconcile_s: float = 0.0
    resync_s: list[float] = field(default_factory=list)
    rss_cold: float = 0.0
    rss_end: float = 0.0
    hwm: float = 0.0
    closed: Latency = field(default_factory=lambda: Latency())
    open: Latency = field(default_factory=lambda: Latency())
    burst: Latency = field(default_factory=lambda: Latency())
    idle_s: float = 0.0
    idle_cpu_pct: float = 0.0
    #: CPU % over the last STEADY_WINDOW s of an idle phase at least twice that long:
    #: the window after the pass that verifies the lease changes made before idling.
    idle_steady_pct: float | None = None
    idle_children_pct: float = 0.0
    idle_rss: list[float] = field(default_factory=list)
    drift_deleted: int = 0
    drift_s: float | None = None
    drift_repairs: float = 0.0
    drift_changes: float = 0.0
    #: VmRSS (MB) per step of the growth run: "0", "1000", ..., "churn".
    growth: dict[str, float] = field(default_factory=dict)
    #: (i) (seconds since the churn began, VmRSS MB) after each round's pause.
    churn_rss: list[tuple[float, float]] = field(default_factory=list)
    churn_leases: int = 0
    churn_cpu_pct: float = 0.0
    churn_hwm: float = 0.0
    reconcile_errors: float = 0.0
    kernel_resyncs: float = 0.0
    profiles: list[Path] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.kind}/{self.store}/{self.mode}"


@dataclass
class Store:
    """Where the agent reads its leases: what a run needs from the store."""

    #: Agent flags and environment that point it at this store.
    agent_args: list[str]
    env: dict[str, str]
    #: Write one lease (an etcd put, a Node POST); True when accepted.
    put: Callable[[Lease], bool]
    #: Write many leases in bulk (created or replaced).
    put_many: Callable[[Sequence[Lease]], None]
    #: Delete leases (None: this store's run does not churn).
    delete_many: Callable[[Sequence[Lease]], None] | None


def setup_etcd(kind: str, topo: Topology, stack: contextlib.ExitStack, ipv6: bool) -> Store:
    """A real etcd in the underlay namespace with the network config written."""
    assert topo.underlay_address is not None
    etcd_ip = str(topo.underlay_address.ip)
    etcd = EtcdServer(netns=topo.underlay.name, host=etcd_ip)
    stack.callback(etcd.close)
    etcd.start()
    http = HTTP(topo.underlay.name, etcd_ip, etcd.client_port)
    stack.callback(http.close)
    config: dict[str, object] = {
        "Network": str(NETWORK),
        "SubnetLen": 24,
        "Backend": {"Type": kind},
    }
    if ipv6:
        config.update(EnableIPv6=True, IPv6Network=str(NETWORK6))
    http.post("/v3/kv/put", {"key": _b64(f"{PREFIX}/config"), "value": _b64(json.dumps(config))})
    etcd_lease = str(http.post("/v3/lease/grant", {"TTL": 86400})["ID"])

    def put(lease: Lease) -> bool:
        body = json.dumps(put_op(lease, etcd_lease)).encode()
        return http.request("POST", "/v3/kv/put", body)[0] == 200

    def put_many(leases: Sequence[Lease]) -> None:
        ops = [put_op(lease, etcd_lease) for lease in leases]
        for start in range(0, len(ops), TXN_OPS):
            batch = ops[start : start + TXN_OPS]
            http.post("/v3/kv/txn", {"success": [{"request_put": op} for op in batch]})

    def delete_many(leases: Sequence[Lease]) -> None:
        keys = [_b64(f"{PREFIX}/subnets/{lease.key}") for lease in leases]
        for start in range(0, len(keys), TXN_OPS):
            ops = [{"request_delete_range": {"key": k}} for k in keys[start : start + TXN_OPS]]
            http.post("/v3/kv/txn", {"success": ops})

    return Store([f"--etcd-endpoints={etcd.client_url}"], {}, put, put_many, delete_many)


def setup_kube(kind: str, topo: Topology, stack: contextlib.ExitStack, ipv6: bool) -> Store:
    """The API double with the agent's Node (see the docstring)."""
    assert topo.underlay_address is not None
    ip = str(topo.underlay_address.ip)
    server = KubeApiProcess(
        topo.workdir / "kubeapi", host=ip, netns=topo.underlay.name, insecure=True
    )
    stack.callback(server.stop)
    admin = server.start()
    admin.create_node(AGENT_NODE, str(AGENT_SUBNET))
    http = HTTP(topo.underlay.name, ip, admin.port)
    stack.callback(http.close)
    names: dict[IPv4Network, int] = {}

    def index(lease: Lease) -> int:
        return names.setdefault(lease.subnet, len(names))

    def put(lease: Lease) -> bool:
        body = json.dumps(peer_node(index(lease), lease)).encode()
        return http.request("POST", "/api/v1/nodes", body)[0] == 201

    def put_many(leases: Sequence[Lease]) -> None:
        admin.bulk_create("nodes", [peer_node(index(lease), lease) for lease in leases])

    net_conf = topo.workdir / "net-conf.json"
    net_conf.write_text(json.dumps({"Network": str(NETWORK), "Backend": {"Type": kind}}))
    agent_args = [
        "--kube-subnet-mgr",
        f"--kube-api-url={admin.url}",
        f"--net-config-path={net_conf}",
    ]
    return Store(agent_args, {"NODE_NAME": AGENT_NODE}, put, put_many, None)


STORES: dict[str, Callable[[str, Topology, contextlib.ExitStack, bool], Store]] = {
    "etcd": setup_etcd,
    "kube": setup_kube,
}


def spawn_agent(
    host: Host, store: Store, mode: str, args: argparse.Namespace, stack: contextlib.ExitStack
) -> tuple[Process, Path]:
    workdir = host.ns.workdir / f"agent-{mode}"
    workdir.mkdir()
    subnet_file = workdir / "subnet.env"
    proc = host.ns.spawn(
        FLANNELD,
        "--log-format=json",
        *store.agent_args,
        f"--subnet-file={subnet_file}",
        f"--state-dir={workdir / 'state'}",
        f"--healthz-ip={host.ip}",
        f"--healthz-port={HEALTHZ_PORT}",
        *MODES[mode][0],
        *args.agent_arg,
        env=store.env or None,
    )
    stack.callback(proc.stop)
    stack.push(_log_tail_on_failure(proc))
    return proc, subnet_file


def wait_ready(proc: Process, subnet_file: Path, deadline: float) -> None:
    while not subnet_file.exists():
        if time.perf_counter() > deadline or not proc.running():
            raise TopologyError(f"agent not ready:\n{proc.output()[-3000:]}")
        time.sleep(0.01)


def wait_entries(
    host: Host, kind: str, want: int, proc: Process, dual: bool, timeout: float
) -> tuple[int, ...]:
    """Poll the kernel until every count (routes; vxlan: + neighbours, FDB) is ``want``."""
    deadline = time.monotonic() + timeout
    while True:
        counts = kernel_counts(host, kind == "vxlan", dual)
        if min(counts) >= want and max(counts) == want:
            return counts
        if time.monotonic() > deadline or not proc.running():
            raise TopologyError(f"{counts} entries, want {want} each:\n{proc.output()[-3000:]}")
        time.sleep(0.05)


def ipv6_host(host: Host) -> None:
    """``--ipv6``: the peers' public IPv6 addresses are on-link, like their IPv4 ones."""
    for key in ("all", "default", "eth0"):
        host.ns.sysctl(f"net.ipv6.conf.{key}.accept_dad", "0")
    host.ns.ip("-6", "addr", "add", f"{UNDERLAY6.network_address + 11}/64", "dev", "eth0")
    host.ns.ip("-6", "route", "add", "default", "dev", "eth0")


def run_backend(
    kind: str, store_name: str, mode: str, args: argparse.Namespace, stack: contextlib.ExitStack
) -> Result:
    res = Result(kind, store_name, mode, args.peers)
    underlay = IPv4Network(f"172.{random.randint(16, 31)}.0.0/16")
    topo = Topology(1, underlay=underlay, prefix="bs")
    stack.callback(topo.close)
    host = topo.hosts[0]
    if args.ipv6:
        ipv6_host(host)
    store = STORES[store_name](kind, topo, stack, args.ipv6)
    t0 = time.perf_counter()
    peers = [peer_lease(i, underlay, kind, args.ipv6) for i in range(args.peers)]
    store.put_many(peers)
    res.write_s = time.perf_counter() - t0
    want = args.peers
    monitor = RouteMonitor(host.name)
    stack.callback(monitor.close)
    t0 = time.perf_counter()
    proc, subnet_file = spawn_agent(host, store, mode, args, stack)
    profiler = Profiler(args.py_spy_bin, args.py_spy, f"{kind}-{store_name}-{mode}")
    stack.callback(profiler.stop)
    if args.py_spy is not None:
        wait_until(lambda: _is_python(proc.pid), timeout=5, interval=0.002)
        profiler.start(proc.pid, "cold")
    deadline = t0 + args.timeout
    wait_ready(proc, subnet_file, deadline)
    res.ready_s = time.perf_counter() - t0
    # (a) the arrival of the last route (routes are written after neighbours/FDB), then
    # one kernel dump to confirm every entry is there (polling if events were lost).
    last_route = monitor.wait_count(want, max(0.0, deadline - time.perf_counter()))
    counts = kernel_counts(host, kind == "vxlan", args.ipv6)
    if min(counts) < want:
        last_route = None
        counts = wait_entries(
            host, kind, want, proc, args.ipv6, max(0.0, deadline - time.perf_counter())
        )
    res.cold_s = (last_route or time.perf_counter()) - t0
    res.cold_polled = last_route is None
    res.entries = sum(counts)
    pid = agent_pid(proc)
    res.rss_cold = memory_mib(pid)["VmRSS"]
    # (b) every pass after the snapshot one is a no-change resync: one scrape per pass.
    if not wait_until(lambda: reconcile_totals(host)[0] >= 1, timeout=10, interval=0.05):
        raise TopologyError("the agent never recorded a reconcile in /metrics")
    count, total = reconcile_totals(host)
    res.snapshot_reconcile_s = total if count == 1 else float("nan")
    period = MODES[mode][1]
    if period is not None:
        profiler.start(pid, "resync")
        pass_deadline = time.monotonic() + (args.resyncs + 2) * period + 10
        while len(res.resync_s) < args.resyncs and time.monotonic() < pass_deadline:
            time.sleep(0.25)
            new_count, new_total = reconcile_totals(host)
            if new_count == count + 1:
                res.resync_s.append(new_total - total)
            elif new_count > count + 1:  # two passes between scrapes: record their mean
                res.resync_s += [(new_total - total) / (new_count - count)] * (new_count - count)
            count, total = new_count, new_total
    # (d) new leases, one at a time: closed loop, then open loop (Poisson arrivals).
    own = subnet_file.read_text()
    fresh = (
        peer_lease(i, underlay, kind, args.ipv6)
        for i in range(args.peers, args.peers + 3 * args.new + 2 * args.burst)
    )
    new = [
        lease
        for lease in fresh
        if f"FLANNEL_SUBNET={lease.subnet.network_address + 1}/" not in own  # not the agent's
        and (
            lease.ipv6_subnet is None
            or f"FLANNEL_IPV6_SUBNET={lease.ipv6_subnet.network_address + 1}/" not in own
        )
    ][: 2 * args.new + args.burst]
    profiler.start(pid, "newlease")
    res.closed = write_new_leases(store.put, monitor, new[: args.new], "closed")
    res.open = write_new_leases(store.put, monitor, new[args.new : 2 * args.new], "open", args.gap)
    time.sleep(1.0)  # let the open-loop backlog drain
    res.burst = write_new_leases(store.put, monitor, new[2 * args.new :], "burst")
    # (f) idle: no lease changes for --idle s.
    profiler.start(pid, "idle")
    time.sleep(2.0)  # the burst's last writes settle
    (own0, kids0), t_idle = cpu_seconds(pid), time.monotonic()
    samples: list[tuple[float, float]] = []  # (monotonic, own CPU seconds)
    while time.monotonic() - t_idle < args.idle:
        time.sleep(1.0)
        res.idle_rss.append(memory_mib(pid)["VmRSS"])
        samples.append((time.monotonic(), cpu_seconds(pid)[0]))
    res.idle_s = time.monotonic() - t_idle
    own1, kids1 = cpu_seconds(pid)
    if res.idle_s >= 2 * STEADY_WINDOW:
        start = next(x for x in samples if x[0] >= samples[-1][0] - STEADY_WINDOW)
        res.idle_steady_pct = 100 * (own1 - start[1]) / (samples[-1][0] - start[0])
    res.idle_cpu_pct = 100 * (own1 - own0) / res.idle_s
    res.idle_children_pct = 100 * (kids1 - kids0) / res.idle_s
    # (g) drift: delete owned entries by hand, time until the kernel holds them again.
    profiler.start(pid, "drift")
    if args.drift:
        drift(host, kind, peers, args.drift, res, proc, args.ipv6)
    profiler.stop()
    mem = memory_mib(pid)
    res.rss_end, res.hwm = mem["VmRSS"], mem["VmHWM"]
    metrics = scrape(host)
    res.reconcile_errors = metrics.get("loden_reconcile_errors_total", 0.0)
    res.kernel_resyncs = metrics.get("loden_kernel_resyncs_total", 0.0)
    res.profiles = profiler.files
    return res


def drift(
    host: Host,
    kind: str,
    peers: Sequence[Lease],
    count: int,
    res: Result,
    proc: Process,
    dual: bool = False,
) -> None:
    """Delete ``count`` owned entries of random peers in one go; time until all are back."""
    before = kernel_counts(host, kind == "vxlan", dual)
    routes: list[str] = []
    neighs: list[str] = []
    fdbs: list[str] = []
    for lease in random.sample(list(peers), count):
        what = random.choice(("route", "neigh", "fdb")) if kind == "vxlan" else "route"
        if what == "route":
            routes.append(f"route del {lease.subnet} proto 76")
        elif what == "neigh":
            neighs.append(f"neigh del {lease.subnet.network_address} dev flannel.1")
        else:
            data = json.loads(lease.attrs.backend_data or "{}")
            fdbs.append(f"fdb del {data['VtepMAC']} dev flannel.1 dst {lease.attrs.public_ip}")
    m0 = scrape(host)
    began = time.perf_counter()
    host.ns.run("ip", "-batch", "-", input="\n".join(routes + neighs) + "\n")
    if fdbs:
        host.ns.run("bridge", "-batch", "-", input="\n".join(fdbs) + "\n")
    res.drift_deleted = count
    deadline = time.monotonic() + 30.0
    while time.monotonic() < deadline and proc.running():
        if kernel_counts(host, kind == "vxlan", dual) == before:
            res.drift_s = time.perf_counter() - began
            break
        time.sleep(0.02)
    m1 = scrape(host)

    def grew(name: str) -> float:
        return m1.get(name, 0.0) - m0.get(name, 0.0)

    res.drift_repairs = grew("loden_kernel_repairs_total")
    res.drift_changes = grew("loden_reconcile_changes_total")


def growth(kind: str, store_name: str, mode: str, args: argparse.Namespace, res: Result) -> None:
    """(h) A fresh agent on an empty store: VmRSS at 0, 1,000, --peers, after churn."""
    with contextlib.ExitStack() as stack:
        underlay = IPv4Network(f"172.{random.randint(16, 31)}.0.0/16")
        topo = Topology(1, underlay=underlay, prefix="bg")
        stack.callback(topo.close)
        host = topo.hosts[0]
        if args.ipv6:
            ipv6_host(host)
        store = STORES[store_name](kind, topo, stack, args.ipv6)
        proc, subnet_file = spawn_agent(host, store, mode, args, stack)
        wait_ready(proc, subnet_file, time.perf_counter() + args.timeout)
        pid = agent_pid(proc)
        own = subnet_file.read_text()
        pool = (peer_lease(i, underlay, kind, args.ipv6) for i in range(65000))
        everyone = [
            lease
            for lease in pool
            if f"FLANNEL_SUBNET={lease.subnet.network_address + 1}/" not in own
        ]
        leases = everyone[: args.peers + args.churn]
        live: list[Lease] = []
        time.sleep(2.0)
        res.growth["0"] = memory_mib(pid)["VmRSS"]
        for step in sorted({min(1000, args.peers), args.peers}):
            store.put_many(leases[len(live) : step])
            live = leases[:step]
            wait_entries(host, kind, step, proc, args.ipv6, args.timeout)
            time.sleep(2.0)
            res.growth[str(step)] = memory_mib(pid)["VmRSS"]
        if args.churn and store.delete_many is not None:
            gone, fresh = live[: args.churn], leases[args.peers : args.peers + args.churn]
            store.delete_many(gone)
            store.put_many(fresh)
            wait_entries(host, kind, args.peers, proc, args.ipv6, args.timeout)
            time.sleep(2.0)
            res.growth["churn"] = memory_mib(pid)["VmRSS"]
            live = live[args.churn :] + fresh
        res.growth["hwm"] = memory_mib(pid)["VmHWM"]
        if args.churn_seconds > 0 and store.delete_many is not None:
            churn(host, kind, store, proc, pid, live, everyone, args, res)


def churn(
    host: Host,
    kind: str,
    store: Store,
    proc: Process,
    pid: int,
    live: list[Lease],
    everyone: list[Lease],
    args: argparse.Namespace,
    res: Result,
) -> None:
    """(i) Rounds of lease replacement for ``--churn-seconds``; VmRSS after each."""
    assert store.delete_many is not None
    queue = deque(live)
    cursor = args.peers + args.churn  # the next lease never yet written
    cpu_before = sum(cpu_seconds(pid))
    began = time.monotonic()
    while time.monotonic() - began < args.churn_seconds:
        gone = [queue.popleft() for _ in range(args.churn)]
        fresh = [everyone[(cursor + k) % len(everyone)] for k in range(args.churn)]
        cursor += args.churn
        store.delete_many(gone)
        store.put_many(fresh)
        queue.extend(fresh)
        wait_replaced(host, gone, fresh, proc, args.timeout)
        res.churn_leases += 2 * args.churn
        time.sleep(args.churn_pause)
        at = time.monotonic() - began
        rss = memory_mib(pid)["VmRSS"]
        res.churn_rss.append((at, rss))
        print(
            f"    churn round {len(res.churn_rss)}, {at:.0f} s, "
            f"{res.churn_leases} lease changes: VmRSS {rss:.1f} MB",
            flush=True,
        )
    res.churn_cpu_pct = 100 * (sum(cpu_seconds(pid)) - cpu_before) / (time.monotonic() - began)
    res.churn_hwm = memory_mib(pid)["VmHWM"]
    wait_entries(host, kind, args.peers, proc, args.ipv6, args.timeout)


def wait_replaced(
    host: Host, gone: Sequence[Lease], fresh: Sequence[Lease], proc: Process, timeout: float
) -> None:
    """Poll the kernel's routes until every fresh lease has one and no gone lease has."""
    want = {str(lease.subnet) for lease in fresh}
    unwanted = {str(lease.subnet) for lease in gone} - want
    deadline = time.monotonic() + timeout
    while True:
        shown = host.ns.ip("-4", "route", "show", "proto", "76").stdout.splitlines()
        routes = {line.split()[0] for line in shown if line}
        if want <= routes and not unwanted & routes:
            return
        if time.monotonic() > deadline or not proc.running():
            missing, left = len(want - routes), len(unwanted & routes)
            raise TopologyError(
                f"churn: {missing} new routes missing, {left} deleted ones left:\n"
                f"{proc.output()[-3000:]}"
            )
        time.sleep(0.05)


def _log_tail_on_failure(proc: Process) -> Callable[..., None]:
    """An ExitStack exit callback: show the agent's last log lines if the run failed."""

    def on_exit(kind: type[BaseException] | None, *_: object) -> None:
        if kind is not None and not issubclass(kind, KeyboardInterrupt):
            print(f"agent log tail:\n{proc.output()[-3000:]}", file=sys.stderr)

    return on_exit


# -- report --------------------------------------------------------------------------------------


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])


def load() -> str:
    """The machine's load average: other work on a 2-CPU box skews every figure."""
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def table(results: Sequence[Result], gap_ms: float) -> list[str]:
    lines: list[str] = []
    Cell = Callable[[Result], str]

    def row(label: str, target: str, cell: Cell) -> None:
        values = " ".join(f"{cell(r):>13}" for r in results)
        lines.append(f"{label:<46} {target:>7} {values}")

    def ok(value: float, limit: float) -> str:
        return f"{value:.3g}{'' if value <= limit else ' !'}"

    def stat(pick: Callable[[Result], list[float]], fn: Callable[[list[float]], str]) -> Cell:
        return lambda r: fn(pick(r)) if pick(r) else "-"

    def latency_rows(tag: str, title: str, pick: Callable[[Result], Latency]) -> None:
        lines.append(f"{tag} new lease -> route in kernel, {title}")

        def lat(r: Result) -> list[float]:
            return pick(r).latency_ms

        def puts(r: Result) -> list[float]:
            return pick(r).put_ms

        row("    p50, ms", "<= 10", stat(lat, lambda v: ok(statistics.median(v), TARGETS["p50"])))
        row("    p99, ms", "<= 50", stat(lat, lambda v: ok(percentile(v, 0.99), TARGETS["p99"])))
        row("    p90 / max, ms", "", stat(lat, lambda v: f"{percentile(v, 0.9):.0f}/{max(v):.0f}"))
        row("    leases slower than 100 ms", "", lambda r: str(sum(x > 100 for x in lat(r))))
        row(
            "    measured / missed (> 5 s) / event lost",
            "",
            lambda r: f"{len(lat(r))}/{pick(r).missed}/{pick(r).event_lost}",
        )
        row(
            "    store write round trip, p50, ms",
            "",
            stat(puts, lambda v: f"{statistics.median(v):.1f}"),
        )

    row("metric", "target", lambda r: r.label)
    row("peer leases (etcd) / Nodes (kube)", "", lambda r: str(r.peers))
    row("kernel entries programmed", "", lambda r: str(r.entries))
    row("pre-write (etcd txn of 128 / kube bulk), s", "", lambda r: f"{r.write_s:.2f}")
    row("agent start -> subnet.env written, s", "", lambda r: f"{r.ready_s:.2f}")
    row(
        "(a) agent start -> all entries in kernel, s",
        "<= 1.6",
        lambda r: ok(r.cold_s, TARGETS["cold"]),
    )
    row(
        "    of which snapshot reconcile (metrics), s",
        "",
        lambda r: f"{r.snapshot_reconcile_s:.2f}",
    )
    resync = stat(lambda r: r.resync_s, lambda v: ok(statistics.median(v), TARGETS["resync"]))
    row("(b) no-change resync, median of passes, s", "<= 0.5", resync)
    row("    no-change resync, max, s", "", stat(lambda r: r.resync_s, lambda v: f"{max(v):.3f}"))
    row("    passes measured", "", lambda r: str(len(r.resync_s)))
    row("(c) agent VmRSS after cold start, MB", "<= 40", lambda r: ok(r.rss_cold, TARGETS["rss"]))
    row("    agent VmRSS at the end, MB", "<= 40", lambda r: ok(r.rss_end, TARGETS["rss"]))
    row("    agent VmHWM (peak RSS), MB", "", lambda r: f"{r.hwm:.0f}")
    latency_rows("(d)", "closed loop: write, wait for the route, next", lambda r: r.closed)
    latency_rows("(d')", f"open loop: Poisson writes, mean gap {gap_ms:g} ms", lambda r: r.open)
    lines.append("(e) burst: new leases written back to back")
    row("    leases", "", lambda r: str(len(r.burst.put_ms)))
    row("    first write -> last route in kernel, s", "", lambda r: f"{r.burst.span_s:.2f}")
    burst = stat(lambda r: r.burst.latency_ms, lambda v: f"{statistics.median(v):.0f}/{max(v):.0f}")
    row("    per-lease latency p50 / max, ms", "", burst)
    row("    missed (> 10 s) / event lost", "", lambda r: f"{r.burst.missed}/{r.burst.event_lost}")
    lines.append("(f) idle: no lease changes")
    row("    seconds measured", "", lambda r: f"{r.idle_s:.0f}")
    row(
        "    agent process CPU, % of one core",
        "<= 0.1",
        lambda r: ok(r.idle_cpu_pct, TARGETS["idle"]),
    )
    row(
        f"    same, last {STEADY_WINDOW:.0f} s of an idle >= {2 * STEADY_WINDOW:.0f} s",
        "<= 0.1",
        lambda r: "-" if r.idle_steady_pct is None else ok(r.idle_steady_pct, TARGETS["idle"]),
    )
    row(
        "    its children (iptables-save...), % of one core",
        "",
        lambda r: f"{r.idle_children_pct:.3g}",
    )
    row(
        "    VmRSS min / max while idle, MB",
        "",
        stat(lambda r: r.idle_rss, lambda v: f"{min(v):.1f}/{max(v):.1f}"),
    )
    lines.append("(g) drift: owned entries deleted by hand at random, in one batch")
    row("    entries deleted", "", lambda r: str(r.drift_deleted))
    row(
        "    deletion -> all back in the kernel, s",
        "<= 1",
        lambda r: "never" if r.drift_s is None else ok(r.drift_s, TARGETS["drift"]),
    )
    row(
        "    repaired by notification / by reconcile",
        "",
        lambda r: f"{r.drift_repairs:.0f}/{r.drift_changes - r.drift_repairs:.0f}",
    )
    lines.append("(h) VmRSS of a fresh agent as peers arrive, MB")
    steps = sorted({k for r in results for k in r.growth}, key=_step_order)
    for step in steps:
        label = f"    at {step} peers" if step.isdigit() else f"    {step}"
        if step == "churn":
            label = "    after churn (leases deleted + as many new)"
        elif step == "hwm":
            label = "    VmHWM (peak)"
        target = "<= 40" if step != "hwm" else ""
        row(label, target, _growth_cell(step))
    if any(r.churn_rss for r in results):
        churn_rows(results, row)
    row(
        "reconcile errors / kernel resyncs (metrics)",
        "",
        lambda r: f"{r.reconcile_errors:.0f}/{r.kernel_resyncs:.0f}",
    )
    return lines


def churn_rows(
    results: Sequence[Result], row: Callable[[str, str, Callable[[Result], str]], None]
) -> None:
    """(i): VmRSS over the churn, its first and last quarters side by side."""

    def quarter(r: Result, last: bool) -> str:
        if not r.churn_rss:
            return "-"
        span = r.churn_rss[-1][0]
        picked = [
            rss for at, rss in r.churn_rss if (at >= 0.75 * span if last else at <= 0.25 * span)
        ]
        return f"{statistics.median(picked):.1f}"

    def cell(fn: Callable[[Result], str]) -> Callable[[Result], str]:
        return lambda r: fn(r) if r.churn_rss else "-"

    row(
        "(i) churn: rounds / lease changes / s",
        "",
        cell(lambda r: f"{len(r.churn_rss)}/{r.churn_leases}/{r.churn_rss[-1][0]:.0f}"),
    )
    row("    VmRSS after round 1, MB", "<= 40", cell(lambda r: f"{r.churn_rss[0][1]:.1f}"))
    row(
        "    VmRSS median, first / last quarter, MB",
        "no growth",
        cell(lambda r: f"{quarter(r, False)}/{quarter(r, True)}"),
    )
    row(
        "    VmRSS max after a round / at the end, MB",
        "<= 40",
        cell(lambda r: f"{max(v for _, v in r.churn_rss):.1f}/{r.churn_rss[-1][1]:.1f}"),
    )
    row("    VmHWM (peak), MB", "", cell(lambda r: f"{r.churn_hwm:.1f}"))
    row("    agent CPU while churning, % of a core", "", cell(lambda r: f"{r.churn_cpu_pct:.1f}"))


def _growth_cell(step: str) -> Callable[[Result], str]:
    return lambda r: f"{r.growth[step]:.1f}" if step in r.growth else "-"


def _step_order(step: str) -> tuple[int, int]:
    return (0, int(step)) if step.isdigit() else (1, 0 if step == "churn" else 1)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--peers", type=int, default=5000, help="peer leases written up front")
    parser.add_argument("--new", type=int, default=200, help="leases added one at a time")
    parser.add_argument("--resyncs", type=int, default=3, help="no-change passes to measure")
    parser.add_argument("--stores", nargs="+", choices=list(STORES), default=list(STORES))
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=list(MODES),
        default=list(MODES),
        help="old: 10 s dump-and-diff loop; new: kernel notifications (default: both)",
    )
    parser.add_argument(
        "--idle",
        type=float,
        default=300.0,
        help="idle phase length, s (600 or more also reports its last 300 s: the steady state)",
    )
    parser.add_argument("--drift", type=int, default=30, help="owned entries deleted by hand")
    parser.add_argument("--churn", type=int, default=1000, help="leases replaced in (h), (i)")
    parser.add_argument(
        "--churn-seconds",
        type=float,
        default=0.0,
        help="run (i) for this long after (h): rounds of --churn leases replaced (etcd store)",
    )
    parser.add_argument(
        "--churn-pause", type=float, default=10.0, help="(i): quiet time after each round, s"
    )
    parser.add_argument(
        "--growth",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run (h), the RSS growth agent",
    )
    parser.add_argument(
        "--backends", nargs="+", choices=["vxlan", "host-gw"], default=["vxlan", "host-gw"]
    )
    parser.add_argument(
        "--gap", type=float, default=50.0, help="mean gap of the open-loop writes, ms"
    )
    parser.add_argument(
        "--burst", type=int, default=100, help="leases written back to back at the end"
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="cold-start limit, s")
    parser.add_argument(
        "--ipv6", action="store_true", help="dual-stack leases and config (etcd store only)"
    )
    parser.add_argument(
        "--agent-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra flanneld argument, e.g. --agent-arg=-v=2",
    )
    parser.add_argument(
        "--py-spy",
        type=Path,
        metavar="DIR",
        help="profile the agent per phase (cold, resync, newlease) into DIR (figures then "
        "include the sampling overhead)",
    )
    parser.add_argument(
        "--py-spy-bin",
        default=shutil.which("py-spy") or "/tmp/pyspy/bin/py-spy",
        help="py-spy executable (default: %(default)s)",
    )
    args = parser.parse_args()
    if args.py_spy is not None:
        args.py_spy.mkdir(parents=True, exist_ok=True)
    if args.ipv6 and "kube" in args.stores:
        parser.error("--ipv6 runs the etcd store only: add --stores etcd")
    if args.peers < 1 or args.new < 1 or args.resyncs < 1 or args.burst < 0 or args.gap <= 0:
        parser.error("--peers, --new, --resyncs and --gap must be positive, --burst >= 0")
    if args.churn_seconds > 0 and not (args.growth and 0 < args.churn <= args.peers):
        parser.error("--churn-seconds needs --growth and 0 < --churn <= --peers")
    if args.peers + 3 * args.new + 2 * args.burst > 65000:
        parser.error("--peers + 3 x --new + 2 x --burst must stay <= 65000 (one /16 of peer IPs)")
    for signum in (signal.SIGTERM, signal.SIGINT):  # SIGINT too: it may start out ignored
        signal.signal(signum, _interrupt)
    print(f"command: {command_line()}; {load()}", flush=True)
    results: list[Result] = []
    began = time.monotonic()
    for kind in args.backends:
        for store in args.stores:
            for mode in args.modes:
                label = f"{kind}/{store}/{mode}"
                with contextlib.ExitStack() as stack:
                    print(f"  {label}: {args.peers} peers ...", flush=True)
                    result = run_backend(kind, store, mode, args, stack)
                if args.growth:
                    print(f"  {label}: RSS growth ...", flush=True)
                    growth(kind, store, mode, args, result)
                results.append(result)
    print()
    modes = "; ".join(f"{m}: {' '.join(MODES[m][0])}" for m in args.modes)
    print(
        f"one flanneld agent, {args.peers} {'dual-stack ' if args.ipv6 else ''}peer leases "
        f"({modes}), "
        f"{args.new} + {args.new} + {args.burst} new leases ('!' marks a missed target)"
    )
    for line in table(results, args.gap):
        print(line)
    for result in results:
        if result.cold_polled:
            print(f"{result.label}: route events were lost: cold start measured by polling")
    for result in results:
        for path in result.profiles:
            if path.exists():
                print()
                print("\n".join(summarize(path)))
    print(f"total {time.monotonic() - began:.0f} s, {load()}; command: {command_line()}")
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:
        print("interrupted: everything this run created has been removed", file=sys.stderr)
        raise SystemExit(130) from None
