"""A real etcd for the lab: one member or a three-member cluster in the underlay namespace.

Members listen on their own addresses on the underlay bridge (``.2``, ``.3``, ``.4``),
port 2379 for clients and 2380 for peers, so every node reaches them the way the seed's
nodes reach ``https://10.211.55.10:2379,...``. The v2 API is enabled (``--enable-v2``)
because the seed writes the network config with ``etcdctl set``. With TLS, clients
must present a certificate signed by the lab CA (``--client-cert-auth``), and peers
talk TLS too. Data lives in the lab's work directory.
"""

from __future__ import annotations

import json
import logging
import ssl
import subprocess
import time
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

from loden.errors import LodenError
from loden.lab import netns, proc
from loden.lab.pki import TlsFiles
from loden.lab.plan import ENV_MARKER, LabPlan
from loden.lab.state import LabState, ProcRecord

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EtcdMember:
    name: str
    ip: IPv4Address
    data_dir: Path
    log_path: Path


def members(plan: LabPlan) -> list[EtcdMember]:
    base = plan.workdir / "etcd"
    return [
        EtcdMember(f"etcd{i}", ip, base / f"etcd{i}.data", base / f"etcd{i}.log")
        for i, ip in enumerate(plan.etcd_addresses(), start=1)
    ]


def member_argv(plan: LabPlan, member: EtcdMember, tls: TlsFiles | None) -> list[str]:
    scheme = plan.etcd_scheme
    cluster = ",".join(f"{m.name}={scheme}://{m.ip}:2380" for m in members(plan))
    argv = [
        proc.require("etcd", "etcd-server"),
        f"--name={member.name}",
        f"--data-dir={member.data_dir}",
        f"--listen-client-urls={scheme}://{member.ip}:2379",
        f"--advertise-client-urls={scheme}://{member.ip}:2379",
        f"--listen-peer-urls={scheme}://{member.ip}:2380",
        f"--initial-advertise-peer-urls={scheme}://{member.ip}:2380",
        f"--initial-cluster={cluster}",
        "--initial-cluster-state=new",
        f"--initial-cluster-token=loden-lab-{plan.name}",
        "--enable-v2=true",
        "--logger=zap",
    ]
    if tls is not None:
        argv += [
            f"--cert-file={tls.cert}",
            f"--key-file={tls.key}",
            f"--trusted-ca-file={tls.ca}",
            "--client-cert-auth",
            f"--peer-cert-file={tls.cert}",
            f"--peer-key-file={tls.key}",
            f"--peer-trusted-ca-file={tls.ca}",
            "--peer-client-cert-auth",
        ]
    return argv


def client_context(tls: TlsFiles) -> ssl.SSLContext:
    """A client context from the lab's files only (never the REQUESTS_CA_BUNDLE & co.)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=str(tls.ca))
    context.load_cert_chain(str(tls.cert), str(tls.key))
    return context


def start(state: LabState, tls: TlsFiles | None, *, timeout: float = 30.0) -> None:
    """Add the member addresses to the underlay bridge, start every member, wait healthy.

    :raises LodenError: a member exited or the cluster was not healthy within ``timeout``.
    """
    plan = state.plan
    env = {"PATH": proc.SERVICE_PATH, ENV_MARKER: plan.name}
    started: list[subprocess.Popen[bytes]] = []
    for member in members(plan):
        netns.ip(
            plan.underlay_ns, "addr", "add", f"{member.ip}/{plan.underlay.prefixlen}", "dev", "br0"
        )
        member.data_dir.mkdir(parents=True, exist_ok=True)
        argv = netns.in_net(plan.underlay_ns, member_argv(plan, member, tls))
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
        started.append(popen)
    wait_healthy(plan, tls, timeout=timeout, procs=started)


def health(plan: LabPlan, member: EtcdMember, tls: TlsFiles | None) -> tuple[bool, str]:
    """(healthy, detail) from the member's own /health endpoint."""
    context = client_context(tls) if tls is not None else None
    try:
        status, body = netns.http_get(
            plan.underlay_ns, str(member.ip), 2379, "/health", context=context, timeout=2.0
        )
    except (OSError, LodenError) as exc:
        return False, str(exc)
    try:
        healthy = status == 200 and json.loads(body).get("health") == "true"
    except ValueError:
        healthy = False
    return healthy, body.strip()


def wait_healthy(
    plan: LabPlan,
    tls: TlsFiles | None,
    *,
    timeout: float,
    procs: list[subprocess.Popen[bytes]] | None = None,
) -> None:
    """Poll every member's /health until all answer healthy.

    :raises LodenError: timeout or a member process exited (with its log's tail).
    """
    deadline = time.monotonic() + timeout
    pending = members(plan)
    while True:
        results = {m.name: health(plan, m, tls) for m in pending}
        pending = [m for m in pending if not results[m.name][0]]
        if not pending:
            return
        for member, popen in zip(members(plan), procs or [], strict=False):
            if popen.poll() is not None:
                raise LodenError(
                    f"etcd member {member.name} exited ({popen.returncode}) during startup; "
                    f"last log lines:\n{proc.tail(member.log_path)}"
                )
        if time.monotonic() > deadline:
            first = pending[0]
            raise LodenError(
                f"etcd member {first.name} ({first.ip}) not healthy after {timeout:.0f}s "
                f"({results[first.name][1]}); last log lines:\n{proc.tail(first.log_path)}"
            )
        time.sleep(0.2)
