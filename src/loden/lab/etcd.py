"""Real etcd servers (``/usr/bin/etcd``, 3.4): the one harness of the lab, tests and benchmarks.

:class:`EtcdServer` is one member: its command line, its lifecycle when this process
owns it (tests, benchmarks), its health, and ``etcdctl`` against it. :class:`EtcdCluster`
is a static ``--initial-cluster`` of several. :func:`start` builds the lab's etcd from
them; ``tests/fixtures/etcd.py`` wraps them in pytest fixtures.

Design decisions:

* **One server per test.** A single member is serving in ~0.1-0.2 s (heartbeat 20 ms,
  election 200 ms by default), so every test gets a fresh one (revision 1, no
  compaction/auth/kill leaking between tests) instead of a shared one with prefixes.
* Free ports come from binding port 0 (loopback) or, inside a network namespace, a
  random high port (namespaces do not share ports with the host); a start that loses
  the port race ("address already in use") is retried with new ports.
* Data dirs live on tmpfs (``/dev/shm``, or ``$LODEN_ETCD_TMPDIR``) by default: on a
  disk every write costs ~6 ms of fsync, on tmpfs ~1 ms. Pass ``base_dir`` for disk.
* A server this process starts dies with the thread that started it (``setpriv
  --pdeathsig KILL``; no ``preexec_fn``, which is unsafe with threads), so a crashed
  test run leaves no etcd behind. The lab's members must outlive ``loden lab up``: it
  starts them itself from :meth:`EtcdServer.argv` and records them (:func:`start`).
* Inside a network namespace a member runs under ``nsenter`` and is probed from a
  thread in that namespace (:mod:`loden.kernel.netns`).
* Readiness = ``/health`` says ``true`` (the member has a leader), polled for a bounded
  time; a failure raises with the tail of the member's log.
* The lab's members listen on their own addresses on the underlay bridge (``.2``,
  ``.3``, ``.4``), ports 2379/2380, as the seed's nodes reach
  ``https://10.211.55.10:2379,...``; v2 is enabled because the seed writes the config
  with ``etcdctl set``; with TLS, clients must present a certificate signed by the lab
  CA and peers talk TLS too.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypedDict

from loden.errors import LodenError
from loden.kernel.netns import netns_argv
from loden.lab import netns, proc
from loden.lab.pki import EtcdPKI
from loden.lab.plan import ENV_MARKER, LabPlan
from loden.lab.state import LabState, ProcRecord

ETCDCTL_ENV = {"ETCDCTL_API": "3"}
_used_ports: set[int] = set()
_ports_lock = threading.Lock()


class TLSKwargs(TypedDict, total=False):
    """The TLS keyword arguments of the Loden etcd clients."""

    ca_file: str
    cert_file: str
    key_file: str


def free_port(host: str = "127.0.0.1", *, netns: str | None = None) -> int:
    """A port nobody in this process was given yet, free on ``host`` right now."""
    with _ports_lock:
        for _ in range(200):
            if netns:  # cannot bind inside the namespace from here; it has its own ports
                port = random.randint(20000, 59999)
            else:
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                    s.bind((host, 0))
                    port = int(s.getsockname()[1])
            if port not in _used_ports:
                _used_ports.add(port)
                return port
    raise LodenError("no free TCP port found after 200 tries")


def tmp_root() -> str | None:
    """Where servers put their directories (tmpfs if available; None = system default)."""
    root = os.environ.get("LODEN_ETCD_TMPDIR") or "/dev/shm"
    return root if os.path.isdir(root) and os.access(root, os.W_OK) else None


def client_context(pki: EtcdPKI) -> ssl.SSLContext:
    """A client context from ``pki``'s files only (never REQUESTS_CA_BUNDLE & co.)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=str(pki.ca_cert))
    context.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    return context


class EtcdServer:
    """One etcd member. Use as a context manager or call :meth:`close`.

    ``initial_cluster`` (``name=peer_url,...``) makes it a cluster member; by default it
    is a single-member cluster of its own. With ``pki`` it serves https with
    ``--client-cert-auth`` (``client_cert_auth=False`` to allow cert-less clients), and
    with ``peer_tls`` its peers talk TLS with the same pair. ``netns`` runs it there
    (``host`` must then be an address in that namespace). ``heartbeat_ms``/
    ``election_ms`` ``None`` keep etcd's 100/1000 ms.
    """

    def __init__(
        self,
        *,
        name: str | None = None,
        host: str = "127.0.0.1",
        client_port: int | None = None,
        peer_port: int | None = None,
        enable_v2: bool = True,
        pki: EtcdPKI | None = None,
        client_cert_auth: bool = True,
        peer_tls: bool = False,
        netns: str | None = None,
        base_dir: Path | None = None,
        initial_cluster: str | None = None,
        cluster_token: str | None = None,
        auto_compaction_retention: str | None = None,
        heartbeat_ms: int | None = 20,
        election_ms: int | None = 200,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.name = name or f"ld{secrets.token_hex(4)}"
        self.host, self.netns, self.pki = host, netns, pki
        self.peer_tls = peer_tls and pki is not None
        self._own_dir = base_dir is None
        self.dir = base_dir or Path(tempfile.mkdtemp(prefix=f"etcd-{self.name}-", dir=tmp_root()))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.dir / "data"
        self.log_path = self.dir / "etcd.log"
        self._auto_ports = client_port is None or peer_port is None
        self.client_port = client_port or free_port(host, netns=netns)
        self.peer_port = peer_port or free_port(host, netns=netns)
        self.enable_v2 = enable_v2
        self.client_cert_auth = client_cert_auth
        self.initial_cluster = initial_cluster
        self.cluster_token = cluster_token or f"tok-{self.name}"
        self.auto_compaction_retention = auto_compaction_retention
        self.heartbeat_ms = heartbeat_ms
        self.election_ms = election_ms
        self._extra = list(extra_args)
        self.proc: subprocess.Popen[bytes] | None = None

    # -- addresses
    @property
    def scheme(self) -> str:
        return "https" if self.pki else "http"

    @property
    def client_url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"{'https' if self.peer_tls else 'http'}://{self.host}:{self.peer_port}"

    def client_kwargs(self) -> TLSKwargs:
        """TLS keyword arguments for the Loden etcd clients (empty without TLS)."""
        if not self.pki:
            return {}
        return {
            "ca_file": str(self.pki.ca_cert),
            "cert_file": str(self.pki.client_cert),
            "key_file": str(self.pki.client_key),
        }

    def argv(self, *, initial_state: str = "new") -> list[str]:
        """The member's command line (under nsenter when it lives in a namespace)."""
        cluster = self.initial_cluster or f"{self.name}={self.peer_url}"
        argv = [
            shutil.which("etcd") or "/usr/bin/etcd",
            f"--name={self.name}",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={self.client_url}",
            f"--advertise-client-urls={self.client_url}",
            f"--listen-peer-urls={self.peer_url}",
            f"--initial-advertise-peer-urls={self.peer_url}",
            f"--initial-cluster={cluster}",
            f"--initial-cluster-state={initial_state}",
            f"--initial-cluster-token={self.cluster_token}",
            f"--enable-v2={'true' if self.enable_v2 else 'false'}",
            "--logger=zap",
            "--log-outputs=stderr",
        ]
        if self.auto_compaction_retention:
            argv.append(f"--auto-compaction-retention={self.auto_compaction_retention}")
        if self.heartbeat_ms:
            argv.append(f"--heartbeat-interval={self.heartbeat_ms}")
        if self.election_ms:
            argv.append(f"--election-timeout={self.election_ms}")
        if self.pki:
            argv += [
                f"--cert-file={self.pki.server_cert}",
                f"--key-file={self.pki.server_key}",
                f"--trusted-ca-file={self.pki.ca_cert}",
            ]
            if self.client_cert_auth:
                argv.append("--client-cert-auth")
            if self.peer_tls:
                argv += [
                    f"--peer-cert-file={self.pki.server_cert}",
                    f"--peer-key-file={self.pki.server_key}",
                    f"--peer-trusted-ca-file={self.pki.ca_cert}",
                    "--peer-client-cert-auth",
                ]
        argv += self._extra
        return netns_argv(self.netns, argv) if self.netns else argv

    # -- lifecycle
    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, *, wait: bool = True, ready_timeout: float = 10.0) -> EtcdServer:
        """Start the process (and wait until healthy). Retries port races up to 3 times.

        :raises LodenError: it exited or was not healthy in time (with its log's tail).
        """
        for attempt in range(3):
            self._spawn(initial_state="existing" if self.data_dir.exists() else "new")
            if not wait:
                return self
            try:
                self.wait_ready(ready_timeout)
                return self
            except LodenError:
                in_use = "address already in use" in self.log_tail(20)
                self.kill()  # never leave a half-started member behind
                if not (in_use and self._auto_ports and attempt < 2):
                    raise
                shutil.rmtree(self.data_dir, ignore_errors=True)
                self.client_port = free_port(self.host, netns=self.netns)
                self.peer_port = free_port(self.host, netns=self.netns)
        raise AssertionError("unreachable")

    def adopt(self, popen: subprocess.Popen[bytes]) -> None:
        """Watch a member process started elsewhere (the lab's, which outlive it)."""
        self.proc = popen

    def _spawn(self, *, initial_state: str) -> None:
        if self.running:
            raise LodenError(f"etcd {self.name} is already running")
        argv = self.argv(initial_state=initial_state)
        setpriv = shutil.which("setpriv")
        if setpriv and threading.current_thread() is threading.main_thread():
            argv = [setpriv, "--pdeathsig", "KILL", "--", *argv]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Poll until the member reports healthy.

        :raises LodenError: it exited, or was not healthy within ``timeout`` (with the
            tail of its log).
        """
        deadline = time.monotonic() + timeout
        last = "not polled"
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise LodenError(
                    f"etcd member {self.name} exited ({self.proc.returncode}) during "
                    f"startup; last log lines:\n{self.log_tail()}"
                )
            ok, last = self.health()
            if ok:
                return
            time.sleep(0.05)
        raise LodenError(
            f"etcd member {self.name} ({self.host}) not healthy after {timeout:.0f}s "
            f"({last}); last log lines:\n{self.log_tail()}"
        )

    def health(self) -> tuple[bool, str]:
        """(healthy, detail) from the member's own ``/health`` endpoint."""
        context = client_context(self.pki) if self.pki else None
        try:
            status, body = netns.http_get(
                self.netns, self.host, self.client_port, "/health", context=context, timeout=1.0
            )
        except (OSError, LodenError) as exc:
            return False, f"{type(exc).__name__}: {exc}"
        try:
            healthy = status == 200 and json.loads(body).get("health") == "true"
        except (ValueError, AttributeError):
            healthy = False
        return healthy, body.strip()

    def etcdctl(self, *args: str, check: bool = True) -> str:
        """Run ``etcdctl`` (API v3) against this member; returns stdout.

        :raises LodenError: it failed (with ``check``).
        """
        tls = []
        if self.pki:
            tls = [
                f"--cacert={self.pki.ca_cert}",
                f"--cert={self.pki.client_cert}",
                f"--key={self.pki.client_key}",
            ]
        argv = [shutil.which("etcdctl") or "/usr/bin/etcdctl", f"--endpoints={self.client_url}"]
        argv += [*tls, *args]
        if self.netns:
            argv = netns_argv(self.netns, argv)
        res = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=20,
            env={**os.environ, **ETCDCTL_ENV},
            check=False,
        )
        if check and res.returncode != 0:
            raise LodenError(f"{' '.join(argv)} failed: {res.stderr.strip()}")
        return res.stdout

    def kill(self) -> None:
        """SIGKILL the process (data dir kept, so :meth:`restart` resumes it)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def restart(self, *, ready_timeout: float = 10.0) -> None:
        self.kill()
        self._spawn(initial_state="existing")
        self.wait_ready(ready_timeout)

    def log_tail(self, lines: int = 40) -> str:
        return proc.tail(self.log_path, lines) or "(no log)"

    def close(self) -> None:
        """Kill the process and remove the directory this object created."""
        self.kill()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> EtcdServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_etcd(*, ready_timeout: float = 10.0, **kwargs: Any) -> EtcdServer:
    """Start a single etcd (keyword arguments of :class:`EtcdServer`); caller closes it."""
    server = EtcdServer(**kwargs)
    try:
        return server.start(ready_timeout=ready_timeout)
    except BaseException:
        server.close()
        raise


class EtcdCluster:
    """A static ``--initial-cluster`` of members; SIGKILL-able one by one.

    By default ``size`` members on one ``host`` with ports of their own (plain http
    peers) and faster elections than etcd's (heartbeat 50 ms, election 500 ms, so the
    failover tests stay short). ``hosts`` puts one member on each address instead, all
    on ``client_port``/``peer_port`` (the lab's layout).
    """

    def __init__(
        self,
        size: int = 3,
        *,
        host: str = "127.0.0.1",
        hosts: Sequence[str] | None = None,
        names: Sequence[str] | None = None,
        client_port: int | None = None,
        peer_port: int | None = None,
        pki: EtcdPKI | None = None,
        peer_tls: bool = False,
        enable_v2: bool = True,
        netns: str | None = None,
        base_dir: Path | None = None,
        token: str | None = None,
        heartbeat_ms: int | None = 50,
        election_ms: int | None = 500,
    ) -> None:
        token = token or f"ld{secrets.token_hex(4)}"
        addresses = list(hosts) if hosts is not None else [host] * size
        names = list(names) if names is not None else [f"{token}-{i}" for i in range(size)]
        self._own_dir = base_dir is None
        self.dir = base_dir or Path(tempfile.mkdtemp(prefix=f"etcd-{token}-", dir=tmp_root()))
        peers = [peer_port or free_port(a, netns=netns) for a in addresses]
        scheme = "https" if peer_tls and pki is not None else "http"
        cluster = ",".join(
            f"{n}={scheme}://{a}:{p}" for n, a, p in zip(names, addresses, peers, strict=True)
        )
        self.members = [
            EtcdServer(
                name=n,
                host=a,
                peer_port=p,
                client_port=client_port or free_port(a, netns=netns),
                enable_v2=enable_v2,
                pki=pki,
                peer_tls=peer_tls,
                netns=netns,
                base_dir=self.dir / n,
                initial_cluster=cluster,
                cluster_token=token,
                heartbeat_ms=heartbeat_ms,
                election_ms=election_ms,
            )
            for n, a, p in zip(names, addresses, peers, strict=True)
        ]

    @property
    def client_urls(self) -> list[str]:
        return [m.client_url for m in self.members]

    def start(self, ready_timeout: float = 15.0) -> EtcdCluster:
        """Start all members, then wait for each; on failure everything is closed."""
        try:
            for m in self.members:
                m.start(wait=False)
            self.wait_ready(ready_timeout)
        except BaseException:
            self.close()
            raise
        return self

    def wait_ready(self, timeout: float) -> None:
        """Wait until every member is healthy (members elect together: one deadline).

        :raises LodenError: a member exited or was not healthy in time.
        """
        deadline = time.monotonic() + timeout
        for m in self.members:
            m.wait_ready(max(deadline - time.monotonic(), 0.5))

    def kill(self, index: int) -> None:
        self.members[index].kill()

    def restart(self, index: int, ready_timeout: float = 10.0) -> None:
        self.members[index].restart(ready_timeout=ready_timeout)

    def close(self) -> None:
        for m in self.members:
            m.close()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> EtcdCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- the lab's etcd ------------------------------------------------------------------------


def lab_cluster(plan: LabPlan, tls: EtcdPKI | None) -> EtcdCluster:
    """The lab's members (``etcd1``...) on the underlay bridge, etcd's own raft timing."""
    return EtcdCluster(
        hosts=[str(ip) for ip in plan.etcd_addresses()],
        names=[f"etcd{i}" for i in range(1, len(plan.etcd_addresses()) + 1)],
        client_port=2379,
        peer_port=2380,
        pki=tls,
        peer_tls=True,
        netns=plan.underlay_ns,
        base_dir=plan.workdir / "etcd",
        token=f"loden-lab-{plan.name}",
        heartbeat_ms=None,
        election_ms=None,
    )


def start(state: LabState, tls: EtcdPKI | None, *, timeout: float = 30.0) -> None:
    """Add the member addresses to the underlay bridge, start every member, wait healthy.

    The members are started detached and recorded in ``state`` (they outlive this
    process; ``loden lab down`` stops them).

    :raises LodenError: a member exited or the cluster was not healthy within ``timeout``.
    """
    plan = state.plan
    proc.require("etcd", "etcd-server")
    env = {"PATH": proc.SERVICE_PATH, ENV_MARKER: plan.name}
    cluster = lab_cluster(plan, tls)
    for member in cluster.members:
        netns.ip(
            plan.underlay_ns,
            "addr",
            "add",
            f"{member.host}/{plan.underlay.prefixlen}",
            "dev",
            "br0",
        )
        member.data_dir.mkdir(parents=True, exist_ok=True)
        argv = member.argv()
        popen = proc.spawn(argv, env=env, log_path=member.log_path)
        state.record_process(
            ProcRecord(
                "etcd",
                member.name,
                popen.pid,
                proc.start_time(popen.pid),
                tuple(argv),
                str(member.log_path),
            )
        )
        member.adopt(popen)
    cluster.wait_ready(timeout)


__all__ = [
    "EtcdCluster",
    "EtcdServer",
    "TLSKwargs",
    "client_context",
    "free_port",
    "lab_cluster",
    "start",
    "start_etcd",
    "tmp_root",
]
