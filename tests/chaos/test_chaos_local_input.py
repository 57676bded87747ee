"""Chaos scenario 8: bad local input.

Each case starts a real agent with one thing wrong on its own node: the subnet file, the
TLS files, the backend, the interface, a port already taken, a bad flag. The promise:
one clear error line naming what to fix, the documented exit status (``flanneld --help``:
1 startup failed, 2 bad flag), no traceback, and nothing half-configured left behind: no
``flannel.*`` device, no FLANNEL rules, no subnet.env.

A subnet file with garbage in it is the one non-fatal case: Loden never trusts local
state, so it warns once, allocates as if the file were absent and rewrites it.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.chaos.conftest import ChaosFactory
from tests.chaos.support import (
    FLANNELD,
    HEALTHZ_PORT,
    ChaosCluster,
    NetnsThread,
    figure,
    wait_for,
)
from tests.fixtures.etcd import EtcdServer, FixturePKI, make_pki
from tests.fixtures.topology import Namespace

pytestmark = [pytest.mark.root, pytest.mark.slow]

VXLAN = '{"Network": "10.7.0.0/16", "Backend": {"Type": "vxlan"}}'


@dataclass
class Case:
    name: str
    args: list[str]
    exit_code: int | None  # None: the agent must keep running
    fragment: str
    config: str = VXLAN
    prepare: Callable[[Path], None] | None = None


def leftovers(ns: Namespace, subnet_file: Path) -> list[str]:
    found: list[str] = []
    links = ns.ip("-o", "link", "show").stdout
    found += [f"link {ln.split(':')[1].strip()}" for ln in links.splitlines() if "flannel" in ln]
    for table in ("filter", "nat"):
        rules = ns.run("iptables", "-t", table, "-S").stdout
        found += [f"iptables {ln}" for ln in rules.splitlines() if "FLANNEL" in ln]
    nft = ns.run("nft", "list", "ruleset", check=False).stdout
    found += [f"nft {ln.strip()}" for ln in nft.splitlines() if "flannel" in ln.lower()]
    if subnet_file.is_file():
        found.append(f"file {subnet_file}")
    return found


def clean(ns: Namespace) -> None:
    """Undo whatever a failing case left, so the next case starts clean."""
    links = ns.ip("-o", "link", "show").stdout
    for line in links.splitlines():
        if "flannel" in line:
            ns.ip("link", "del", line.split(":")[1].strip().split("@")[0], check=False)


def write_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def hold_port(kind: int, host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, kind)
    sock.bind((host, port))
    if kind == socket.SOCK_STREAM:
        sock.listen()
    return sock


def run_case(case: Case, ns: Namespace, workdir: Path, endpoint: str) -> list[str]:
    """Run one agent with ``case``'s bad input; returns what went wrong (empty: fine)."""
    failures: list[str] = []
    subnet_file = workdir / "run" / "subnet.env"
    if case.prepare is not None:
        case.prepare(subnet_file)
    argv = [
        FLANNELD,
        f"--etcd-endpoints={endpoint}",
        f"--subnet-file={subnet_file}",
        f"--state-dir={workdir / 'state'}",
        "--iptables-resync=1",
        *case.args,
    ]
    began = time.monotonic()
    proc = ns.spawn(*argv)
    left: list[str] = []
    status: int | None
    if case.exit_code is None:
        ready = wait_for(lambda: "flanneld is ready" in proc.output(), timeout=20)
        status = None if ready is not None else -1
        proc.stop()  # it ran: its device and rules were its working state
        if "FLANNEL_SUBNET=10.7." not in (subnet_file.read_text() if subnet_file.is_file() else ""):
            failures.append(f"{case.name}: subnet.env not rewritten")
    else:
        exited = wait_for(lambda: not proc.running(), timeout=25)
        status = proc.popen.returncode if exited is not None else None
        if exited is None:
            proc.stop()
        left = leftovers(ns, subnet_file)
    elapsed = time.monotonic() - began
    output = proc.output()
    errors = [ln for ln in output.splitlines() if " ERROR " in ln or ln.startswith("flanneld: ")]
    warned = [ln for ln in output.splitlines() if case.fragment in ln]
    if status != case.exit_code:
        failures.append(f"{case.name}: exit {status}, want {case.exit_code}:\n{output}")
    if len(warned) != 1:
        failures.append(f"{case.name}: {len(warned)} lines with {case.fragment!r}:\n{output}")
    if "Traceback" in output:
        failures.append(f"{case.name}: traceback:\n{output}")
    if case.exit_code is not None and len(errors) != 1:
        failures.append(f"{case.name}: {len(errors)} error lines:\n{output}")
    if left:
        failures.append(f"{case.name}: left behind {left}")
        clean(ns)
    for line in errors or [ln for ln in output.splitlines() if case.fragment in ln]:
        print(f"    {case.name}: {line.split(': ', 1)[-1]}")  # the message, for the record
    figure(
        f"bad-local-input/{case.name}",
        exit=case.exit_code if case.exit_code is not None else "keeps_running",
        seconds=elapsed,
        error_lines=len(errors),
        leftovers=len(left),
    )
    return failures


@pytest.fixture
def tls_etcd(chaos: ChaosFactory, tmp_path: Path) -> Iterator[tuple[ChaosCluster, EtcdServer]]:
    cluster = chaos({"Type": "vxlan"}, hosts=1)
    assert cluster.topo.underlay_address is not None
    uip = str(cluster.topo.underlay_address.ip)
    pki = make_pki(tmp_path / "pki", [uip])
    etcd = EtcdServer(netns=cluster.topo.underlay.name, host=uip, pki=pki).start()
    try:
        etcd.etcdctl("put", "/coreos.com/network/config", VXLAN)
        yield cluster, etcd
    finally:
        etcd.close()


def test_bad_local_input_fails_cleanly(tls_etcd: tuple[ChaosCluster, EtcdServer]) -> None:
    cluster, tls = tls_etcd
    host = cluster.topo.hosts[0]
    ns = host.ns
    pki = tls.pki
    assert isinstance(pki, FixturePKI)
    in_host = NetnsThread(ns.name)
    https_plain = cluster.endpoints[0].replace("http://", "https://")
    garbage = os.urandom(300) + b"\nFLANNEL_SUBNET=not-a-subnet\n"
    cases = [
        Case(
            "subnet-file-is-a-directory",
            [],
            1,
            "it is a directory; fix or change -subnet-file",
            prepare=lambda f: f.mkdir(parents=True),
        ),
        Case(
            "missing-ca-file",
            [f"--etcd-endpoints={https_plain}", "-etcd-cafile=/nonexistent/ca.pem"],
            1,
            "etcd TLS file not found: /nonexistent/ca.pem",
        ),
        Case(
            "wrong-client-certificate",
            [
                f"--etcd-endpoints={tls.client_url}",
                f"-etcd-cafile={pki.ca_cert}",
                f"-etcd-certfile={pki.rogue_client_cert}",
                f"-etcd-keyfile={pki.rogue_client_key}",
            ],
            1,
            "TLS with etcd at",
        ),
        Case(
            "untrusted-server-certificate",
            [
                f"--etcd-endpoints={tls.client_url}",
                f"-etcd-cafile={pki.rogue_ca_cert}",
                f"-etcd-certfile={pki.client_cert}",
                f"-etcd-keyfile={pki.client_key}",
            ],
            1,
            "CERTIFICATE_VERIFY_FAILED",
        ),
        Case(
            "unknown-backend-type",
            [],
            1,
            "unknown backend type 'bogus': known types are",
            config='{"Network": "10.7.0.0/16", "Backend": {"Type": "bogus"}}',
        ),
        Case("missing-interface", ["--iface=nosuch0"], 1, "nosuch0"),
        Case(
            "udp-port-in-use",
            [],
            1,
            "8285",
            config='{"Network": "10.7.0.0/16", "Backend": {"Type": "udp"}}',
        ),
        Case(
            "healthz-port-in-use",
            [f"--healthz-port={HEALTHZ_PORT}", f"--healthz-ip={host.ip}"],
            1,
            f"cannot serve /healthz on {host.ip}:{HEALTHZ_PORT}",
        ),
        Case("bad-flag-value", ["--healthz-port=99999"], 2, "invalid -healthz-port 99999"),
        # Last: it runs, so its device and rules are legitimately there afterwards.
        Case(
            "garbage-subnet-file",
            [],
            None,
            "has no usable FLANNEL_SUBNET",
            prepare=lambda f: write_file(f, garbage),
        ),
    ]
    held: list[socket.socket] = [
        in_host.run(hold_port, socket.SOCK_DGRAM, str(host.ip), 8285),
        in_host.run(hold_port, socket.SOCK_STREAM, str(host.ip), HEALTHZ_PORT),
    ]
    failures: list[str] = []
    try:
        for i, case in enumerate(cases):
            cluster.put("/coreos.com/network/config", case.config)
            failures += run_case(case, ns, ns.workdir / f"case{i}", cluster.endpoints[0])
    finally:
        for sock in held:
            sock.close()
        in_host.close()
    assert failures == [], "\n\n".join(failures)
