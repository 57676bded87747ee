"""Fault injection around :class:`~tests.integration.agent_support.AgentCluster`.

What the chaos scenarios add to the end-to-end harness:

* :class:`ChaosCluster`: the same agents-in-host-namespaces cluster, but with a single
  etcd *or* a multi-member :class:`~tests.fixtures.etcd.EtcdCluster` in the underlay,
  nodes that can be added later (:meth:`ChaosCluster.add_node`), restarts that keep the
  subnet file (a crash does not delete it) and direct reads of etcd and ``/healthz``;
* :class:`NetnsThread`: one worker thread that entered a network namespace, so the test
  process itself can talk to etcd and the agents' health ports (sub-millisecond polls,
  no ``ip netns exec`` per request);
* :class:`CountingProxy`: a TCP proxy inside a namespace that counts HTTP requests per
  listening port and records how every connection began (TLS or plaintext);
* :class:`ContinuousPing`: a 10/s ping whose lost sequence numbers are counted exactly;
* :func:`kernel_state`: the routes, permanent neighbours and FDB entries of a node,
  to compare before and after a fault;
* :func:`figure`: prints the ``FIGURE <scenario>: key=value ...`` line that
  ``scripts/reliability_table.py`` turns into docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import http.client
import json
import random
import re
import signal
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any, TypeVar

from loden.kernel.netns import enter_netns
from tests.fixtures.etcd import EtcdCluster, EtcdServer
from tests.fixtures.topology import Host, Namespace, Process, Topology, wait_until
from tests.integration.agent_support import FLANNELD, LODEN, AgentCluster, AgentNode

T = TypeVar("T")
HEALTHZ_PORT = 8471
SUBNETS_PREFIX = "/coreos.com/network/subnets/"


# ----------------------------------------------------------------------------- figures


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value).replace(" ", "_")


def figure(scenario: str, **values: object) -> str:
    """Print (and return) ``FIGURE <scenario>: k=v ...`` for scripts/reliability_table.py."""
    line = f"FIGURE {scenario}: " + " ".join(f"{k}={_fmt(v)}" for k, v in values.items())
    print(line, flush=True)
    return line


def wait_for(
    predicate: Callable[[], bool], *, timeout: float, interval: float = 0.05
) -> float | None:
    """Seconds until ``predicate`` held (polled every ``interval``), None on timeout."""
    began = time.monotonic()
    if wait_until(predicate, timeout=timeout, interval=interval):
        return time.monotonic() - began
    return None


# ----------------------------------------------------------------------------- netns


class NetnsThread:
    """A single worker thread living in a network namespace.

    Sockets belong to the namespace of the thread that creates them, so everything run
    through :meth:`run` talks to that namespace's addresses. The rest of the test
    process stays where it was.
    """

    def __init__(self, netns: str) -> None:
        self.netns = netns
        self._pool = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix=f"netns-{netns}",
            initializer=enter_netns,
            initargs=(netns,),
        )

    def run(self, fn: Callable[..., T], *args: Any, timeout: float = 30.0) -> T:
        return self._pool.submit(fn, *args).result(timeout)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def http_request(
    host: str,
    port: int,
    path: str,
    *,
    method: str = "GET",
    body: bytes | None = None,
    timeout: float = 3.0,
) -> tuple[int, bytes]:
    """One HTTP/1.1 request; ``(0, b"")`` when the connection fails or times out."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    except (OSError, http.client.HTTPException):
        return 0, b""
    finally:
        conn.close()


def _prefix_end(prefix: bytes) -> bytes:
    end = bytearray(prefix)
    end[-1] += 1
    return bytes(end)


def etcd_range(url: str, prefix: str, *, timeout: float = 3.0) -> dict[str, bytes] | None:
    """Every key under ``prefix`` (v3 gateway, linearizable); None if etcd did not answer."""
    parts = urllib.parse.urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    raw = prefix.encode()
    body = json.dumps(
        {
            "key": base64.b64encode(raw).decode(),
            "range_end": base64.b64encode(_prefix_end(raw)).decode(),
        }
    ).encode()
    status, data = http_request(
        parts.hostname, parts.port, "/v3/kv/range", method="POST", body=body, timeout=timeout
    )
    if status != 200:
        return None
    reply = json.loads(data)
    return {
        base64.b64decode(kv["key"]).decode(): base64.b64decode(kv.get("value", ""))
        for kv in reply.get("kvs", [])
    }


def etcd_put(url: str, key: str, value: bytes | str, *, timeout: float = 3.0) -> None:
    """Write a key through the v3 gateway (raises AssertionError if etcd refuses)."""
    parts = urllib.parse.urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    raw = value.encode() if isinstance(value, str) else value
    body = json.dumps(
        {"key": base64.b64encode(key.encode()).decode(), "value": base64.b64encode(raw).decode()}
    ).encode()
    status, data = http_request(
        parts.hostname, parts.port, "/v3/kv/put", method="POST", body=body, timeout=timeout
    )
    assert status == 200, f"put {key} on {url}: HTTP {status} {data[:200]!r}"


def etcd_delete(url: str, key: str, *, timeout: float = 3.0) -> None:
    """Delete a key through the v3 gateway (raises AssertionError if etcd refuses)."""
    parts = urllib.parse.urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    body = json.dumps({"key": base64.b64encode(key.encode()).decode()}).encode()
    status, data = http_request(
        parts.hostname, parts.port, "/v3/kv/deleterange", method="POST", body=body, timeout=timeout
    )
    assert status == 200, f"delete {key} on {url}: HTTP {status} {data[:200]!r}"


# ----------------------------------------------------------------------------- proxy

_MARK = b" HTTP/1.1\r\n"


class CountingProxy:
    """A TCP proxy inside namespace ``netns``: ``listen_host:port -> target`` for each
    of ``ports``. It counts HTTP/1.1 requests per listening port (with timestamps) and
    keeps the first bytes every client connection sent (``0x16`` opens a TLS handshake,
    a method name opens plaintext HTTP). Runs an asyncio loop in its own thread."""

    def __init__(
        self, netns: str, listen_host: str, target: tuple[str, int], ports: Sequence[int]
    ) -> None:
        self.netns = netns
        self.listen_host = listen_host
        self.target = target
        self.ports = list(ports)
        self.requests: list[tuple[float, int]] = []
        self.openings: list[bytes] = []
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._thread = threading.Thread(target=self._main, name=f"proxy-{netns}", daemon=True)

    def start(self) -> CountingProxy:
        self._thread.start()
        if not self._ready.wait(10):
            raise AssertionError("counting proxy did not start within 10 s")
        if self._error is not None:
            raise AssertionError(f"counting proxy failed: {self._error}")
        return self

    def close(self) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and self._thread.is_alive():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop.set)
        self._thread.join(10)

    def count(
        self, ports: Iterable[int] | None = None, since: float = 0.0, until: float = float("inf")
    ) -> int:
        wanted = set(self.ports if ports is None else ports)
        with self._lock:
            return sum(1 for t, p in self.requests if p in wanted and since <= t < until)

    def _main(self) -> None:
        try:
            enter_netns(self.netns)
            asyncio.run(self._serve())
        except BaseException as exc:  # reported by start() or ignored after close()
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        servers = [
            await asyncio.start_server(
                functools.partial(self._client, port), self.listen_host, port
            )
            for port in self.ports
        ]
        self._ready.set()
        await self._stop.wait()
        for server in servers:
            server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _client(
        self, port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        upstream: asyncio.StreamWriter | None = None
        try:
            try:
                up_reader, upstream = await asyncio.open_connection(*self.target)
            except OSError:
                return
            await asyncio.gather(
                self._pump_counting(port, reader, upstream),
                self._pump(up_reader, writer),
            )
        finally:
            for w in (writer, upstream):
                if w is not None:
                    w.close()
            self._tasks.discard(task)

    async def _pump_counting(
        self, port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        tail, first = b"", True
        try:
            while data := await reader.read(65536):
                now = time.monotonic()
                buf = tail + data
                with self._lock:
                    if first:
                        self.openings.append(data[:8])
                        first = False
                    self.requests.extend((now, port) for _ in range(buf.count(_MARK)))
                tail = buf[-(len(_MARK) - 1) :]
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except OSError:
            writer.close()

    @staticmethod
    async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        writer.close()


# ----------------------------------------------------------------------------- traffic


@dataclass(frozen=True, slots=True)
class PingResult:
    sent: int
    received: int
    #: sequence numbers without a reply, up to the last one answered
    lost: int
    #: sent after the last reply (0 or 1 while traffic flows: the one in flight)
    trailing: int


class ContinuousPing:
    """``ping -i 0.1`` from ``src`` to ``dst`` until :meth:`stop` (SIGINT)."""

    def __init__(self, src: Namespace, dst: IPv4Address, interval: float = 0.1) -> None:
        self.proc: Process = src.spawn("ping", "-n", "-i", str(interval), "-W", "1", str(dst))

    def stop(self) -> PingResult:
        self.proc.signal(signal.SIGINT)
        self.proc.wait(5)
        out = self.proc.output()
        answered = {int(s) for s in re.findall(r"icmp_seq=(\d+) ttl=", out)}
        summary = re.search(r"(\d+) packets transmitted, (\d+) received", out)
        assert summary is not None, out[-500:]
        sent, received = int(summary[1]), int(summary[2])
        last = max(answered, default=0)
        lost = len(set(range(1, last + 1)) - answered)
        return PingResult(sent=sent, received=received, lost=lost, trailing=sent - last)


def kernel_state(ns: Namespace, device: str = "flannel.1") -> list[str]:
    """Sorted routes (main table), permanent neighbours and FDB entries of ``device``.

    A list, not a set: a duplicate entry shows up as a repeated line.
    """
    lines = [f"route {ln}" for ln in ns.ip("route", "show").stdout.splitlines()]
    if ns.ip("link", "show", device, check=False).returncode == 0:
        neigh = ns.ip("neigh", "show", "dev", device, "nud", "permanent").stdout
        lines += [f"neigh {ln}" for ln in neigh.splitlines()]
        fdb = ns.run("bridge", "fdb", "show", "dev", device).stdout
        lines += [f"fdb {ln}" for ln in fdb.splitlines() if " dst " in ln]
    return sorted(ln.strip() for ln in lines if ln.strip())


def entries_of(state: Iterable[str], *needles: str) -> list[str]:
    """The lines of a :func:`kernel_state` that mention any of ``needles``."""
    return [ln for ln in state if any(n in ln for n in needles)]


def vtep_mac(ns: Namespace, device: str = "flannel.1") -> str:
    return ns.out("cat", f"/sys/class/net/{device}/address").strip()


# ----------------------------------------------------------------------------- cluster


class ChaosCluster(AgentCluster):
    """:class:`AgentCluster` with an optional etcd *cluster*, late nodes and fault tools.

    ``etcd_members > 1`` runs a :class:`EtcdCluster` in the underlay and gives every
    agent all its endpoints (member 0 first, so that is the one they talk to).
    """

    def __init__(
        self,
        topo: Topology,
        backend: dict[str, object],
        *,
        etcd_members: int = 1,
        extra_args: Sequence[str] = (),
        network: str | None = None,
        config: dict[str, object] | None = None,
    ) -> None:
        # AgentCluster.__init__ is not called: it always starts one etcd. The attributes
        # it sets are set here the same way, so its other methods work unchanged.
        self.topo = topo
        assert topo.underlay_address is not None
        host = str(topo.underlay_address.ip)
        self.etcd_cluster: EtcdCluster | None = None
        self.under = NetnsThread(topo.underlay.name)
        self.nodes: list[AgentNode] = []
        try:
            if etcd_members > 1:
                self.etcd_cluster = EtcdCluster(etcd_members, netns=topo.underlay.name, host=host)
                self.etcd_cluster.start()
                self.etcd = self.etcd_cluster.members[0]
                self.endpoints = self.etcd_cluster.client_urls
            else:
                self.etcd = EtcdServer(netns=topo.underlay.name, host=host)
                self.etcd.start()
                self.endpoints = [self.etcd.client_url]
            self.network = IPv4Network(network or f"10.{random.randint(1, 99)}.0.0/16")
            cfg: dict[str, object] = {"Network": str(self.network), "Backend": backend}
            cfg.update(config or {})
            self.config_json = json.dumps(cfg)
            self.api = "v3"
            self.extra_args = tuple(extra_args)
            self.loden("config", "set", self.config_json)
            self.nodes = [self.make_node(h) for h in topo.hosts]
        except BaseException:
            self.close()
            raise

    # -- etcd -------------------------------------------------------------------------

    @property
    def endpoint_flag(self) -> str:
        return ",".join(self.endpoints)

    def loden(self, *args: str) -> str:
        return self.topo.underlay.out(LODEN, *args, f"-etcd-endpoints={self.endpoint_flag}")

    def leases(self, timeout: float = 3.0) -> dict[str, bytes] | None:
        """Lease key name (``10.5.3.0-24``) -> raw value, from the first member answering."""
        for url in self.endpoints:
            found = self.under.run(etcd_range, url, SUBNETS_PREFIX, timeout=timeout + 5)
            if found is not None:
                return {k.removeprefix(SUBNETS_PREFIX): v for k, v in found.items()}
        return None

    def put(self, key: str, value: bytes | str) -> None:
        self.under.run(etcd_put, self.endpoints[0], key, value)

    def delete(self, key: str) -> None:
        self.under.run(etcd_delete, self.endpoints[0], key)

    # -- nodes ------------------------------------------------------------------------

    def make_node(self, host: Host, *extra: str) -> AgentNode:
        workdir = host.ns.workdir / "agent"
        workdir.mkdir(exist_ok=True)
        args = [
            f"--etcd-endpoints={self.endpoint_flag}",
            f"--subnet-file={workdir / 'subnet.env'}",
            f"--state-dir={workdir / 'state'}",
            "--ip-masq",
            "--iptables-resync=1",
            "--resync-period=1",
            f"--healthz-ip={host.ip}",
            f"--healthz-port={HEALTHZ_PORT}",
            *self.extra_args,
            *extra,
        ]
        return AgentNode(host=host, dir=workdir, args=args)

    def add_node(self, *extra: str) -> AgentNode:
        """A new host on the underlay with an agent configured like the others."""
        node = self.make_node(self.topo.add_host(), *extra)
        self.nodes.append(node)
        return node

    def crash(self, node: AgentNode) -> None:
        """SIGKILL the agent (its kernel state, lease and subnet file stay)."""
        assert node.proc is not None
        node.proc.signal(signal.SIGKILL)
        node.proc.wait(5)

    def restart(self, node: AgentNode, timeout: float = 20.0) -> float:
        """Start the agent again *keeping* its subnet file (as after a crash or reboot);
        returns the seconds until it logged that it is ready."""
        began = time.monotonic()
        proc = node.proc = node.host.ns.spawn(FLANNELD, *node.args)
        if not wait_until(lambda: "flanneld is ready" in proc.output(), timeout=timeout):
            raise AssertionError(f"agent on {node.host.name} not ready:\n{proc.output()[-3000:]}")
        return time.monotonic() - began

    def health(self, node: AgentNode, path: str = "/healthz") -> tuple[int, str]:
        status, body = self.under.run(http_request, str(node.host.ip), HEALTHZ_PORT, path)
        return status, body.decode(errors="replace")

    def programmed(self, node: AgentNode, subnet: IPv4Network) -> bool:
        """Has ``node``'s kernel a route to ``subnet`` (any Loden backend)?"""
        return f"{subnet} " in node.host.ns.ip("route", "show", str(subnet)).stdout + " "

    def close(self) -> None:
        for node in self.nodes:
            if node.proc is not None:
                node.proc.stop()
        if self.etcd_cluster is not None:
            self.etcd_cluster.close()
        elif hasattr(self, "etcd"):
            self.etcd.close()
        self.under.close()


def copy_subnet_file(src: AgentNode, dst: AgentNode) -> None:
    dst.subnet_file.parent.mkdir(parents=True, exist_ok=True)
    dst.subnet_file.write_text(src.subnet_file.read_text())


def log_lines(proc: Process, level: str = "WARNING") -> list[str]:
    return [ln for ln in proc.output().splitlines() if f" {level} " in ln]


__all__ = [
    "FLANNELD",
    "HEALTHZ_PORT",
    "ChaosCluster",
    "ContinuousPing",
    "CountingProxy",
    "NetnsThread",
    "PingResult",
    "copy_subnet_file",
    "entries_of",
    "etcd_delete",
    "etcd_put",
    "etcd_range",
    "figure",
    "http_request",
    "kernel_state",
    "log_lines",
    "vtep_mac",
    "wait_for",
]
