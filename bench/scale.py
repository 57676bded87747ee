"""Control-plane scale: one real agent against 5,000 peer leases in a real etcd, and
against 5,000 Node objects in the Kubernetes API double (``--kube-subnet-mgr``).

Run by hand as root (not part of the test suite)::

    .venv/bin/python bench/scale.py [--peers 5000] [--new 200] [--backends vxlan host-gw]
                                    [--stores etcd kube]

For each backend: a one-host :class:`tests.fixtures.topology.Topology` on a random
172.x/16 underlay (so every synthetic peer public IP is on-link; no traffic is sent to
them), a real etcd in the underlay namespace holding ``--peers`` leases written up front
(byte-exact flannel lease JSON, attached to one 24 h etcd lease; vxlan ones carry
``{"VNI":1,"VtepMAC":...}``), and one real ``flanneld`` process (Network 10.0.0.0/8,
SubnetLen 24, ``--resync-period=2``, ``--healthz-port``). Measured:

a. cold start: process start -> the last peer route in the kernel (timestamped like d.;
   the agent writes routes after neighbours/FDB), then one ``ip``/``bridge`` dump confirms
   every entry (routes proto 76; vxlan also permanent neighbours and FDB on flannel.1);
   a cold-start timeline from the agent's JSON log is printed too;
b. no-change resync: each pass of ``loden_reconcile_duration_seconds`` (the agent's
   /metrics histogram, one scrape per pass);
c. RSS of the agent process (VmRSS after the cold start and at the end, and VmHWM);
d. new lease -> route: ``--new`` leases written one at a time, each awaited (closed
   loop), then ``--new`` more at random (Poisson) times, mean gap ``--gap`` ms (open loop:
   arrivals independent of the agent's periodic resync); each route's RTM_NEWROUTE is
   timestamped by a netlink multicast socket of this process inside the host namespace;
e. burst: ``--burst`` leases written back to back (a scale-up): first write -> last route.

Both stores run side by side in one run (same backends, peers, phases). ``kube``: the API
double (``python -m loden.kubeapi``, plain HTTP like the bench's etcd) in the underlay
namespace; every peer is a Node whose podCIDR is the peer subnet and whose annotations are
exactly Go flanneld's (``kube-subnet-manager``, ``backend-type``, ``backend-data``,
``public-ip``), created in bulk up front; a "new lease" is a POST of one more such Node.
The agent runs with ``--kube-subnet-mgr --kube-api-url=http://...`` and ``NODE_NAME`` of
its own Node (podCIDR 10.0.1.0/24). Idle CPU is the agent's CPU time over the resync
phase (no changes; periodic resyncs only) divided by its wall time.

``--ipv6`` (etcd store): every lease is dual-stack (``<v4>-24&<v6>-64``, ``PublicIPv6`` on
an on-link IPv6 underlay, vxlan ``BackendV6Data``), the config enables IPv6, and the
agent programs both families (vxlan: ``flannel.1`` and ``flannel-v6.1``): twice the
entries, the new-lease latency still timed on the IPv4 route.

Targets: cold start <= 3 s, idle resync <= 0.5 s, RSS <= 100 MB, new-lease latency
p50 <= 50 ms and p99 <= 250 ms. ``--py-spy DIR`` profiles the agent per phase and prints
where the samples go. Everything is torn down on exit, Ctrl-C or failure.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ctypes
import datetime
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
from collections import Counter
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

from loden.kubeapi.control import KubeApiProcess, node_body
from loden.model.lease import Lease, LeaseAttrs

FLANNELD = str(Path(sys.executable).parent / "flanneld")
NETWORK = IPv4Network("10.0.0.0/8")
PREFIX = "/coreos.com/network"
HEALTHZ_PORT = 8471
RESYNC_PERIOD = 2
TXN_OPS = 128  # etcd's default --max-txn-ops
KUBE_PREFIX = "flannel.alpha.coreos.com/"
AGENT_NODE = "bench-agent"
AGENT_SUBNET = IPv4Network("10.0.1.0/24")  # below every peer_subnet()
#: ``--ipv6``: the overlay's IPv6Network and an IPv6 underlay /64 (inside the host netns).
NETWORK6 = IPv6Network("fd5d::/48")
UNDERLAY6 = IPv6Network("fd5c::/64")
TARGETS = {"cold": 3.0, "resync": 0.5, "rss": 100.0, "p50": 50.0, "p99": 250.0}

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


# -- sockets inside a network namespace ----------------------------------------------------


def in_netns(netns: str, make: Callable[[], socket.socket]) -> socket.socket:
    """Create a socket inside ``netns``: a short-lived thread enters it, makes the socket
    and exits; the socket stays in that namespace (this process never moves)."""
    result: list[socket.socket | BaseException] = []

    def target() -> None:
        try:
            fd = os.open(f"/var/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, _CLONE_NEWNET) != 0:
                    code = ctypes.get_errno()
                    raise OSError(code, f"setns({netns}): {os.strerror(code)}")
            finally:
                os.close(fd)
            result.append(make())
        except BaseException as exc:  # handed to the caller
            result.append(exc)

    thread = threading.Thread(target=target, name=f"netns-{netns}")
    thread.start()
    thread.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


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


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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


_METRIC = re.compile(r"^loden_reconcile_duration_seconds_(sum|count) (\S+)$", re.M)


def reconcile_totals(host: Host) -> tuple[int, float]:
    """(count, sum) of the agent's reconcile histogram from /metrics."""
    http = HTTP(host.name, str(host.ip), HEALTHZ_PORT, timeout=5)
    try:
        status, body = http.request("GET", "/metrics")
    finally:
        http.close()
    if status != 200:
        raise TopologyError(f"/metrics on {host.name} answered HTTP {status}")
    found = dict(_METRIC.findall(body.decode()))
    return int(float(found["count"])), float(found["sum"])


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
    idle_cpu_pct: float = 0.0
    closed: Latency = field(default_factory=lambda: Latency())
    open: Latency = field(default_factory=lambda: Latency())
    burst: Latency = field(default_factory=lambda: Latency())
    log_errors: int = 0
    log_warnings: int = 0
    timeline: list[tuple[float, str]] = field(default_factory=list)
    profiles: list[Path] = field(default_factory=list)


def setup_etcd(
    kind: str, args: argparse.Namespace, topo: Topology, stack: contextlib.ExitStack, res: Result
) -> tuple[Callable[[Lease], bool], list[str], dict[str, str]]:
    """etcd with the config and ``--peers`` leases; returns (put, agent args, agent env)."""
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
    if args.ipv6:
        config.update(EnableIPv6=True, IPv6Network=str(NETWORK6))
    http.post("/v3/kv/put", {"key": _b64(f"{PREFIX}/config"), "value": _b64(json.dumps(config))})
    etcd_lease = str(http.post("/v3/lease/grant", {"TTL": 86400})["ID"])
    t0 = time.perf_counter()
    underlay = topo.network
    ops = [put_op(peer_lease(i, underlay, kind, args.ipv6), etcd_lease) for i in range(args.peers)]
    for start in range(0, len(ops), TXN_OPS):
        batch = ops[start : start + TXN_OPS]
        http.post("/v3/kv/txn", {"success": [{"request_put": op} for op in batch]})
    res.write_s = time.perf_counter() - t0

    def put(lease: Lease) -> bool:
        body = json.dumps(put_op(lease, etcd_lease)).encode()
        return http.request("POST", "/v3/kv/put", body)[0] == 200

    return put, [f"--etcd-endpoints={etcd.client_url}"], {}


def setup_kube(
    kind: str, args: argparse.Namespace, topo: Topology, stack: contextlib.ExitStack, res: Result
) -> tuple[Callable[[Lease], bool], list[str], dict[str, str]]:
    """The API double with the agent's Node and ``--peers`` peer Nodes (see the docstring)."""
    assert topo.underlay_address is not None
    ip = str(topo.underlay_address.ip)
    server = KubeApiProcess(
        topo.workdir / "kubeapi", host=ip, netns=topo.underlay.name, insecure=True
    )
    stack.callback(server.stop)
    admin = server.start()
    admin.create_node(AGENT_NODE, str(AGENT_SUBNET))
    underlay = topo.network
    t0 = time.perf_counter()
    admin.bulk_create(
        "nodes", [peer_node(i, peer_lease(i, underlay, kind)) for i in range(args.peers)]
    )
    res.write_s = time.perf_counter() - t0
    http = HTTP(topo.underlay.name, ip, admin.port)
    stack.callback(http.close)
    names: dict[str, int] = {}

    def put(lease: Lease) -> bool:
        index = names.setdefault(str(lease.subnet), len(names) + args.peers)
        body = json.dumps(peer_node(index, lease)).encode()
        return http.request("POST", "/api/v1/nodes", body)[0] == 201

    net_conf = topo.workdir / "net-conf.json"
    net_conf.write_text(json.dumps({"Network": str(NETWORK), "Backend": {"Type": kind}}))
    agent_args = [
        "--kube-subnet-mgr",
        f"--kube-api-url={admin.url}",
        f"--net-config-path={net_conf}",
    ]
    return put, agent_args, {"NODE_NAME": AGENT_NODE}


def run_backend(
    kind: str, store: str, args: argparse.Namespace, stack: contextlib.ExitStack
) -> Result:
    res = Result(kind, store, args.peers)
    underlay = IPv4Network(f"172.{random.randint(16, 31)}.0.0/16")
    topo = Topology(1, underlay=underlay, prefix="bs")
    stack.callback(topo.close)
    host = topo.hosts[0]
    if args.ipv6:  # peers' public IPv6 addresses are on-link, like their IPv4 ones
        for key in ("all", "default", "eth0"):
            host.ns.sysctl(f"net.ipv6.conf.{key}.accept_dad", "0")
        host.ns.ip("-6", "addr", "add", f"{UNDERLAY6.network_address + 11}/64", "dev", "eth0")
        host.ns.ip("-6", "route", "add", "default", "dev", "eth0")
    setup = setup_kube if store == "kube" else setup_etcd
    put, store_args, env = setup(kind, args, topo, stack, res)
    workdir = host.ns.workdir / "agent"
    workdir.mkdir()
    subnet_file = workdir / "subnet.env"
    want = args.peers
    monitor = RouteMonitor(host.name)
    stack.callback(monitor.close)
    t0 = time.perf_counter()
    wall0 = time.time()
    proc = host.ns.spawn(
        FLANNELD,
        "--log-format=json",
        *store_args,
        f"--subnet-file={subnet_file}",
        f"--state-dir={workdir / 'state'}",
        f"--healthz-ip={host.ip}",
        f"--healthz-port={HEALTHZ_PORT}",
        f"--resync-period={RESYNC_PERIOD}",
        *args.agent_arg,
        env=env or None,
    )
    stack.callback(proc.stop)
    stack.push(_log_tail_on_failure(proc))
    profiler = Profiler(args.py_spy_bin, args.py_spy, f"{kind}-{store}")
    stack.callback(profiler.stop)
    if args.py_spy is not None:
        wait_until(lambda: _is_python(proc.pid), timeout=5, interval=0.002)
        profiler.start(proc.pid, "cold")
    deadline = t0 + args.timeout
    while not subnet_file.exists():
        if time.perf_counter() > deadline or not proc.running():
            raise TopologyError(f"agent not ready:\n{proc.output()[-3000:]}")
        time.sleep(0.01)
    res.ready_s = time.perf_counter() - t0
    # (a) the arrival of the last route (routes are written after neighbours/FDB), then
    # one kernel dump to confirm every entry is there (polling if events were lost).
    last_route = monitor.wait_count(want, max(0.0, deadline - time.perf_counter()))
    counts = kernel_counts(host, kind == "vxlan", args.ipv6)
    while min(counts) < want:
        if time.perf_counter() > deadline or not proc.running():
            raise TopologyError(
                f"only {counts} of {want} entries after {args.timeout} s:\n{proc.output()[-3000:]}"
            )
        time.sleep(0.05)
        last_route = None
        counts = kernel_counts(host, kind == "vxlan", args.ipv6)
    res.cold_s = (last_route or time.perf_counter()) - t0
    res.cold_polled = last_route is None
    res.entries = sum(counts)
    pid = agent_pid(proc)
    res.rss_cold = memory_mib(pid)["VmRSS"]
    # (b) every pass after the snapshot one is a no-change resync: one scrape per pass.
    profiler.start(pid, "resync")
    if not wait_until(lambda: reconcile_totals(host)[0] >= 1, timeout=10, interval=0.05):
        raise TopologyError("the agent never recorded a reconcile in /metrics")
    count, total = reconcile_totals(host)
    res.snapshot_reconcile_s = total if count == 1 else float("nan")
    idle_cpu0, idle_wall0 = cpu_seconds(pid), time.monotonic()
    pass_deadline = time.monotonic() + (args.resyncs + 2) * RESYNC_PERIOD + 10
    while len(res.resync_s) < args.resyncs and time.monotonic() < pass_deadline:
        time.sleep(0.25)
        new_count, new_total = reconcile_totals(host)
        if new_count == count + 1:
            res.resync_s.append(new_total - total)
        elif new_count > count + 1:  # two passes between scrapes: record their mean
            res.resync_s += [(new_total - total) / (new_count - count)] * (new_count - count)
        count, total = new_count, new_total
    res.idle_cpu_pct = 100 * (cpu_seconds(pid) - idle_cpu0) / (time.monotonic() - idle_wall0)
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
    res.closed = write_new_leases(put, monitor, new[: args.new], "closed")
    res.open = write_new_leases(put, monitor, new[args.new : 2 * args.new], "open", args.gap)
    time.sleep(1.0)  # let the open-loop backlog drain
    res.burst = write_new_leases(put, monitor, new[2 * args.new :], "burst")
    profiler.stop()
    mem = memory_mib(pid)
    res.rss_end, res.hwm = mem["VmRSS"], mem["VmHWM"]
    res.profiles = profiler.files
    read_log(proc.output(), wall0, res)
    return res


def _log_tail_on_failure(proc: Process) -> Callable[..., None]:
    """An ExitStack exit callback: show the agent's last log lines if the run failed."""

    def on_exit(kind: type[BaseException] | None, *_: object) -> None:
        if kind is not None and not issubclass(kind, KeyboardInterrupt):
            print(f"agent log tail:\n{proc.output()[-3000:]}", file=sys.stderr)

    return on_exit


def _log_time(ts: float | str) -> float:
    """The JSON log's ``ts``: epoch seconds, or (since the log fields were shared with the
    text format) RFC 3339 UTC text like ``2026-12-05T08:15:58.202Z``."""
    if isinstance(ts, int | float):
        return float(ts)
    stamp = datetime.datetime.strptime(ts.rstrip("Z"), "%Y-%m-%dT%H:%M:%S.%f")
    return stamp.replace(tzinfo=datetime.UTC).timestamp()


def read_log(text: str, wall0: float, res: Result) -> None:
    """Count errors/warnings; keep the start-up lines (until the first reconcile report)
    with their offsets from the spawn, for the cold-start timeline."""
    startup = True
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        level = record.get("level", "")
        res.log_errors += level in ("error", "critical")
        res.log_warnings += level == "warning"
        if startup:
            res.timeline.append((_log_time(record["ts"]) - wall0, f"{level}: {record['msg']}"))
            startup = "data plane repaired" not in record["msg"]


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

        row("    p50, ms", "<= 50", stat(lat, lambda v: ok(statistics.median(v), TARGETS["p50"])))
        row("    p99, ms", "<= 250", stat(lat, lambda v: ok(percentile(v, 0.99), TARGETS["p99"])))
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

    row("metric", "target", lambda r: f"{r.kind}/{r.store}")
    row("peer leases (etcd) / Nodes (kube)", "", lambda r: str(r.peers))
    row("kernel entries programmed", "", lambda r: str(r.entries))
    row("pre-write (etcd txn of 128 / kube bulk of 500), s", "", lambda r: f"{r.write_s:.2f}")
    row("agent start -> subnet.env written, s", "", lambda r: f"{r.ready_s:.2f}")
    row(
        "(a) agent start -> all entries in kernel, s",
        "<= 3",
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
    row("(c) agent VmRSS after cold start, MB", "<= 100", lambda r: ok(r.rss_cold, TARGETS["rss"]))
    row("    agent VmRSS at the end, MB", "<= 100", lambda r: ok(r.rss_end, TARGETS["rss"]))
    row("    agent VmHWM (peak RSS), MB", "", lambda r: f"{r.hwm:.0f}")
    row("(c') agent CPU while idle (resyncs only), %", "", lambda r: f"{r.idle_cpu_pct:.1f}")
    latency_rows("(d)", "closed loop: write, wait for the route, next", lambda r: r.closed)
    latency_rows("(d')", f"open loop: Poisson writes, mean gap {gap_ms:g} ms", lambda r: r.open)
    lines.append("(e) burst: new leases written back to back")
    row("    leases", "", lambda r: str(len(r.burst.put_ms)))
    row("    first write -> last route in kernel, s", "", lambda r: f"{r.burst.span_s:.2f}")
    burst = stat(lambda r: r.burst.latency_ms, lambda v: f"{statistics.median(v):.0f}/{max(v):.0f}")
    row("    per-lease latency p50 / max, ms", "", burst)
    row("    missed (> 10 s) / event lost", "", lambda r: f"{r.burst.missed}/{r.burst.event_lost}")
    row(
        "agent log lines at ERROR / WARNING level", "", lambda r: f"{r.log_errors}/{r.log_warnings}"
    )
    return lines


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--peers", type=int, default=5000, help="peer leases written up front")
    parser.add_argument("--new", type=int, default=200, help="leases added one at a time")
    parser.add_argument("--resyncs", type=int, default=5, help="no-change passes to measure")
    parser.add_argument(
        "--backends", nargs="+", choices=["vxlan", "host-gw"], default=["vxlan", "host-gw"]
    )
    parser.add_argument("--stores", nargs="+", choices=["etcd", "kube"], default=["etcd", "kube"])
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
    if args.peers + 3 * args.new + 2 * args.burst > 65000:
        parser.error("--peers + 3 x --new + 2 x --burst must stay <= 65000 (one /16 of peer IPs)")
    for signum in (signal.SIGTERM, signal.SIGINT):  # SIGINT too: it may start out ignored
        signal.signal(signum, _interrupt)
    print(f"command: {command_line()}; {load()}", flush=True)
    results: list[Result] = []
    began = time.monotonic()
    for kind in args.backends:
        for store in args.stores:
            with contextlib.ExitStack() as stack:
                print(f"  {kind}/{store}: {args.peers} peers ...", flush=True)
                results.append(run_backend(kind, store, args, stack))
    print()
    print(
        f"one flanneld agent, {args.peers} {'dual-stack ' if args.ipv6 else ''}peer leases, "
        f"resync period {RESYNC_PERIOD} s, "
        f"{args.new} + {args.new} + {args.burst} new leases ('!' marks a missed target)"
    )
    for line in table(results, args.gap):
        print(line)
    for result in results:
        label = f"{result.kind}/{result.store}"
        print(f"\n{label}: cold-start timeline from the agent's log (s after spawn)")
        if result.cold_polled:
            print("  (route events were lost: cold start measured by polling)")
        for offset, msg in result.timeline:
            print(f"  {offset:6.3f}  {msg[:110]}")
        print(f"  {result.cold_s:6.3f}  last peer route seen in the kernel")
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
