"""Chaos scenario 10: security properties that need a running agent.

* TLS configured means TLS or nothing: an ``https://`` endpoint that is really a plain
  HTTP etcd fails with a clear error and not one plaintext request reaches it (a
  counting proxy in front of etcd records how every connection began);
* subnet.env is 0644 (its new directory 0755) and the state directory 0700 whatever the
  umask; /healthz, /readyz and /metrics listen only where ``--healthz-ip`` says;
* the etcd password (flag or ``FLANNELD_ETCD_PASSWORD``) never appears in the log (at
  debug level), in /metrics or in /healthz, not even when it is wrong.

The static half (no shell anywhere in src/) is tests/unit/test_security_no_shell.py.
"""

from __future__ import annotations

import os
import secrets
import stat
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.chaos.conftest import ChaosFactory
from tests.chaos.support import (
    FLANNELD,
    HEALTHZ_PORT,
    CountingProxy,
    NetnsThread,
    figure,
    http_request,
    wait_for,
)
from tests.fixtures.etcd import free_port, make_pki
from tests.fixtures.topology import Process

pytestmark = [pytest.mark.root, pytest.mark.slow]


def proc_exited(proc: Process) -> Callable[[], bool]:
    return lambda: not proc.running()


def test_tls_endpoint_never_falls_back_to_plaintext(chaos: ChaosFactory, tmp_path: Path) -> None:
    cluster = chaos({"Type": "vxlan"}, hosts=1)
    under = cluster.topo.underlay
    assert cluster.topo.underlay_address is not None
    uip = str(cluster.topo.underlay_address.ip)
    pki = make_pki(tmp_path / "pki", [uip])
    ports = [free_port(uip, netns=under.name) for _ in range(2)]
    proxy = CountingProxy(under.name, uip, (uip, cluster.etcd.client_port), ports).start()
    ns = cluster.topo.hosts[0].ns
    results: list[tuple[str, int | None, str]] = []
    try:
        for api, port in zip(("auto", "v2"), ports, strict=True):
            workdir = ns.workdir / f"tls-{api}"
            proc = ns.spawn(
                FLANNELD,
                f"--etcd-endpoints=https://{uip}:{port}",
                f"-etcd-cafile={pki.ca_cert}",
                f"-etcd-certfile={pki.client_cert}",
                f"-etcd-keyfile={pki.client_key}",
                f"-etcd-api={api}",
                f"--subnet-file={workdir / 'subnet.env'}",
                f"--state-dir={workdir / 'state'}",
            )
            exited = wait_for(proc_exited(proc), timeout=20)
            if exited is None:
                proc.stop()
            errors = [ln for ln in proc.output().splitlines() if " ERROR " in ln]
            results.append((api, proc.popen.returncode if exited else None, " ".join(errors)))
            assert not (workdir / "subnet.env").exists()
    finally:
        proxy.close()
    plaintext = [o for o in proxy.openings if not o.startswith(b"\x16\x03")]
    for api, status, error in results:
        assert status == 1, (api, status, error)
        assert "TLS with etcd at https://" in error, error
    assert proxy.openings and plaintext == [], proxy.openings
    assert proxy.count() == 0  # not one HTTP request reached the plaintext etcd
    figure(
        "security-tls-no-plaintext-fallback",
        connections=len(proxy.openings),
        tls_handshakes=len(proxy.openings) - len(plaintext),
        plaintext_connections=len(plaintext),
        http_requests_reaching_etcd=proxy.count(),
        exit_status=1,
    )


def test_file_modes_healthz_binding_and_no_secret_leaks(chaos: ChaosFactory) -> None:
    cluster = chaos({"Type": "vxlan"}, hosts=1)
    host = cluster.topo.hosts[0]
    ns = host.ns
    password = f"S3cret-{secrets.token_hex(8)}"
    wrong = f"Wr0ng-{secrets.token_hex(8)}"
    under = cluster.topo.underlay
    etcdctl = ["etcdctl", f"--endpoints={cluster.endpoints[0]}"]
    under.run(*etcdctl, "user", "add", "root", f"--new-user-password={password}")
    under.run(*etcdctl, "auth", "enable")
    workdir = ns.workdir / "sec"
    subnet_file = workdir / "run" / "flannel" / "subnet.env"
    state_dir = workdir / "state"
    argv = [
        FLANNELD,
        f"--etcd-endpoints={cluster.endpoints[0]}",
        "-etcd-username=root",
        f"--subnet-file={subnet_file}",
        f"--state-dir={state_dir}",
        f"--healthz-ip={host.ip}",
        f"--healthz-port={HEALTHZ_PORT}",
        "-v=10",  # debug: the most verbose log must not leak it either
    ]
    old_umask = os.umask(0o077)  # the agent inherits a restrictive umask
    try:
        agent = ns.spawn(*argv, f"-etcd-password={password}")
        refused = ns.spawn(
            *[a for a in argv if "healthz" not in a and "state-dir" not in a],
            f"--state-dir={workdir / 'state2'}",
            f"--subnet-file={workdir / 'other' / 'subnet.env'}",
            env={"FLANNELD_ETCD_PASSWORD": wrong},
        )
    finally:
        os.umask(old_umask)
    in_host = NetnsThread(ns.name)
    try:
        ready = wait_for(lambda: "flanneld is ready" in agent.output(), timeout=20)
        assert ready is not None, agent.output()
        assert wait_for(lambda: not refused.running(), timeout=20) is not None
        bodies = {
            path: cluster.under.run(http_request, str(host.ip), HEALTHZ_PORT, path)
            for path in ("/healthz", "/readyz", "/metrics")
        }
        loopback = in_host.run(http_request, "127.0.0.1", HEALTHZ_PORT, "/healthz")
        listening = ns.run("ss", "-Hltn").stdout
        time.sleep(1.0)  # a few debug-logged loop iterations
        logs = agent.output() + refused.output()
    finally:
        in_host.close()
    modes = {
        "subnet.env": stat.S_IMODE(subnet_file.stat().st_mode),
        "subnet.env dir": stat.S_IMODE(subnet_file.parent.stat().st_mode),
        "state dir": stat.S_IMODE(state_dir.stat().st_mode),
    }
    assert modes == {"subnet.env": 0o644, "subnet.env dir": 0o755, "state dir": 0o700}, modes
    assert all(status == 200 for status, _ in bodies.values()), bodies
    assert loopback == (0, b""), loopback  # nothing listens on 127.0.0.1
    sockets = [ln.split()[3] for ln in listening.splitlines() if f":{HEALTHZ_PORT}" in ln]
    assert sockets == [f"{host.ip}:{HEALTHZ_PORT}"], listening
    assert refused.popen.returncode == 1
    assert "authentication" in refused.output().lower(), refused.output()
    leaks = [
        where
        for where, text in [("log", logs)] + [(p, b.decode()) for p, (_, b) in bodies.items()]
        for secret in (password, wrong)
        if secret in text
    ]
    assert leaks == [], leaks
    figure(
        "security-files-healthz-secrets",
        subnet_env_mode=oct(modes["subnet.env"]),
        state_dir_mode=oct(modes["state dir"]),
        healthz_listens_on=sockets[0],
        loopback_reachable="no",
        secret_leaks=len(leaks),
        wrong_password_exit=refused.popen.returncode,
    )
