"""``bench/scale.py --store kube``: the same measurements with the Kubernetes subnet
manager, side by side with etcd in one run.

The store is the API server double (:mod:`loden.kubeapi`) in the underlay namespace
holding ``--peers`` Node objects, each as a kubelet registers it (status, nodeInfo,
addresses) with its podCIDR (as the controller-manager assigns it) and the annotations
Go flanneld writes (vxlan: ``{"VNI":1,"VtepMAC":...}``). One real ``flanneld`` runs
with ``--kube-subnet-mgr`` and a kubeconfig; a new peer is a Node created through the
API (time from the POST to its route in the kernel). The phases and the :class:`Result`
are scale.py's, so its table prints both stores in adjacent columns.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import socket
import ssl
import time
from collections.abc import Sequence
from ipaddress import IPv4Network
from types import ModuleType
from typing import Any

import h11

from loden.kubeapi.control import KubeApiProcess
from loden.model.lease import Lease

P = "flannel.alpha.coreos.com/"


class KubeHTTP:
    """One keep-alive TLS connection to the double, opened inside the underlay netns."""

    def __init__(self, scale: ModuleType, server: KubeApiProcess) -> None:
        assert server.client is not None and server.netns is not None
        client = server.client
        context = ssl.create_default_context(cafile=str(server.ca_file))
        raw = scale.in_netns(
            server.netns, lambda: socket.create_connection((client.host, client.port), 10)
        )
        self.sock = context.wrap_socket(raw, server_hostname=client.host)
        self.host = client.host
        self.token = client.token
        self.conn = h11.Connection(h11.CLIENT)

    def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        headers = [
            ("Host", self.host),
            ("Authorization", f"Bearer {self.token}"),
            ("Accept", "application/json"),
            ("Content-Length", str(len(body))),
        ]
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
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                break
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        return status, b"".join(chunks)

    def close(self) -> None:
        self.sock.close()


def node_body(name: str, lease: Lease | None, pod_cidr: IPv4Network) -> dict[str, Any]:
    """A Node as kubelet registers it; with ``lease``, annotated as Go flanneld does."""
    annotations = {"node.alpha.kubernetes.io/ttl": "0"}
    if lease is not None:
        annotations |= {
            P + "backend-data": lease.attrs.backend_data or "null",
            P + "backend-type": lease.attrs.backend_type,
            P + "kube-subnet-manager": "true",
            P + "public-ip": str(lease.attrs.public_ip),
        }
    return {
        "metadata": {
            "name": name,
            "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"},
            "annotations": annotations,
        },
        "spec": {"podCIDR": str(pod_cidr), "podCIDRs": [str(pod_cidr)]},
        "status": {
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}],
            "addresses": [
                {"type": "InternalIP", "address": str(lease.attrs.public_ip) if lease else ""},
                {"type": "Hostname", "address": name},
            ],
            "nodeInfo": {
                "kubeletVersion": "v1.32.0",
                "osImage": "Debian GNU/Linux 12 (bookworm)",
                "containerRuntimeVersion": "containerd://1.7.24",
                "operatingSystem": "linux",
                "architecture": "amd64",
            },
        },
    }


def create_node(http: KubeHTTP, body: dict[str, Any]) -> None:
    status, data = http.request("POST", "/api/v1/nodes", json.dumps(body).encode())
    if status != 201:
        raise RuntimeError(f"create node {body['metadata']['name']}: HTTP {status} {data[:200]!r}")


def write_new_nodes(
    scale: ModuleType,
    http: KubeHTTP,
    monitor: Any,
    leases: Sequence[Lease],
    mode: str,
    gap_ms: float = 0.0,
) -> Any:
    """scale.write_new_leases with Node objects: one POST each, timed to the route."""
    out = scale.Latency()
    pending: list[tuple[IPv4Network, float]] = []
    first = next_at = time.perf_counter()
    for lease in leases:
        if mode == "open":
            next_at += random.expovariate(1000.0 / gap_ms)
            time.sleep(max(0.0, next_at - time.perf_counter()))
        elif mode == "closed":
            time.sleep(random.uniform(0.0, 0.01))
        body = node_body(f"peer-{lease.subnet.network_address}", lease, lease.subnet)
        sent = time.perf_counter()
        create_node(http, body)
        out.put_ms.append((time.perf_counter() - sent) * 1000)
        pending.append((lease.subnet, sent))
        if mode == "closed":
            scale._collect(monitor, pending, out, time.monotonic() + 5.0)
            if out.missed >= 5:
                raise RuntimeError("5 new nodes got no route within 5 s each: agent stuck?")
    last = scale._collect(monitor, pending, out, time.monotonic() + 10.0)
    out.span_s = (last or time.perf_counter()) - first
    return out


def run_kube_backend(
    scale: ModuleType, kind: str, args: argparse.Namespace, stack: contextlib.ExitStack
) -> Any:
    """One agent against ``--peers`` Node objects; returns a ``scale.Result``."""
    res = scale.Result(f"{kind}/kube", args.peers)
    underlay = IPv4Network(f"172.{random.randint(16, 31)}.0.0/16")
    topo = scale.Topology(1, underlay=underlay, prefix="bk")
    stack.callback(topo.close)
    host = topo.hosts[0]
    assert topo.underlay_address is not None
    server = KubeApiProcess(
        workdir=topo.workdir / "kubeapi",
        netns=topo.underlay.name,
        host=str(topo.underlay_address.ip),
        history_limit=1_000_000,
    )
    stack.callback(server.stop)
    client = server.start()
    http = KubeHTTP(scale, server)
    stack.callback(http.close)
    own_cidr = IPv4Network("10.0.1.0/24")  # peer_subnet(i) starts at 10.0.2.0
    t0 = time.perf_counter()
    create_node(http, node_body("node0", None, own_cidr))
    for i in range(args.peers):
        lease = scale.peer_lease(i, underlay, kind)
        create_node(http, node_body(f"peer-{i}", lease, lease.subnet))
    res.write_s = time.perf_counter() - t0
    workdir = host.ns.workdir / "agent"
    workdir.mkdir()
    net_conf = workdir / "net-conf.json"
    net_conf.write_text(json.dumps({"Network": str(scale.NETWORK), "Backend": {"Type": kind}}))
    kubeconfig = client.write_kubeconfig(workdir / "kubeconfig", token=client.service_account())
    subnet_file = workdir / "subnet.env"
    monitor = scale.RouteMonitor(host.name)
    stack.callback(monitor.close)
    t0 = time.perf_counter()
    wall0 = time.time()
    proc = host.ns.spawn(
        scale.FLANNELD,
        "--log-format=json",
        "--kube-subnet-mgr",
        f"--kubeconfig-file={kubeconfig}",
        f"--net-config-path={net_conf}",
        f"--subnet-file={subnet_file}",
        f"--state-dir={workdir / 'state'}",
        f"--healthz-ip={host.ip}",
        f"--healthz-port={scale.HEALTHZ_PORT}",
        f"--resync-period={scale.RESYNC_PERIOD}",
        *args.agent_arg,
        env={"NODE_NAME": "node0"},
    )
    stack.callback(proc.stop)
    stack.push(scale._log_tail_on_failure(proc))
    deadline = t0 + args.timeout
    while not subnet_file.exists():
        if time.perf_counter() > deadline or not proc.running():
            raise RuntimeError(f"agent not ready:\n{proc.output()[-3000:]}")
        time.sleep(0.01)
    res.ready_s = time.perf_counter() - t0
    want = args.peers
    last_route = monitor.wait_count(want, max(0.0, deadline - time.perf_counter()))
    counts = scale.kernel_counts(host, kind == "vxlan")
    while min(counts) < want:
        if time.perf_counter() > deadline or not proc.running():
            raise RuntimeError(f"only {counts} of {want} entries:\n{proc.output()[-3000:]}")
        time.sleep(0.05)
        last_route = None
        counts = scale.kernel_counts(host, kind == "vxlan")
    res.cold_s = (last_route or time.perf_counter()) - t0
    res.cold_polled = last_route is None
    res.entries = sum(counts)
    pid = scale.agent_pid(proc)
    res.rss_cold = scale.memory_mib(pid)["VmRSS"]
    cpu0 = _cpu_seconds(pid)
    count, total = scale.reconcile_totals(host)
    pass_deadline = time.monotonic() + (args.resyncs + 2) * scale.RESYNC_PERIOD + 10
    idle0 = time.monotonic()
    while len(res.resync_s) < args.resyncs and time.monotonic() < pass_deadline:
        time.sleep(0.25)
        new_count, new_total = scale.reconcile_totals(host)
        if new_count > count:
            res.resync_s += [(new_total - total) / (new_count - count)] * (new_count - count)
        count, total = new_count, new_total
    res.idle_cpu = 100 * (_cpu_seconds(pid) - cpu0) / (time.monotonic() - idle0)
    extra = range(args.peers, args.peers + 3 * args.new + 2 * args.burst)
    fresh = (scale.peer_lease(i, underlay, kind) for i in extra)
    new = [lease for lease in fresh if lease.subnet != own_cidr][: 2 * args.new + args.burst]
    res.closed = write_new_nodes(scale, http, monitor, new[: args.new], "closed")
    res.open = write_new_nodes(scale, http, monitor, new[args.new : 2 * args.new], "open", args.gap)
    time.sleep(1.0)
    res.burst = write_new_nodes(scale, http, monitor, new[2 * args.new :], "burst")
    mem = scale.memory_mib(pid)
    res.rss_end, res.hwm = mem["VmRSS"], mem["VmHWM"]
    scale.read_log(proc.output(), wall0, res)
    return res


def _cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (clock ticks -> s)."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
