"""The seed document, replayed: every step of its flannel + etcd + Docker guide.

3-member etcd with TLS; the config written with ``ETCDCTL_API=2 etcdctl ... set``;
agents started from the rendered ``flanneld.service`` (``--ip-masq $FLANNEL_OPTIONS``)
with ``ExecStartPost`` mk-docker-opts; dockerd from the rendered ``docker.service``;
busybox containers on different nodes ping each other; ``etcdctl ls/get`` show the
leases exactly as the seed prints them. Then the same with vxlan and the v3 API.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Callable
from ipaddress import IPv4Network
from pathlib import Path

import pytest

from tests.integration.test_lab_cluster import LODEN, lab, loden, node_exec, state, up

pytestmark = [pytest.mark.root, pytest.mark.slow]

__all__ = ["lab"]  # the fixture, re-used from the lab tests

SEED_DOCKER_LINES = re.compile(
    r'DOCKER_OPT_BIP="--bip=(?P<bip>[\d.]+/24)"\n'
    r'DOCKER_OPT_IPMASQ="--ip-masq=false"\n'
    r'DOCKER_OPT_MTU="--mtu=(?P<mtu>\d+)"\n'
    r'DOCKER_NETWORK_OPTIONS=" --bip=(?P=bip) --ip-masq=false --mtu=(?P=mtu)"\n'
)


def etcd_flags(name: str) -> list[str]:
    """The endpoints and TLS files exactly as the node's /opt/kubernetes/cfg/flanneld has
    them (the seed's flannel.sh output)."""
    cfg = node_exec(name, "node1", "cat", "/opt/kubernetes/cfg/flanneld")
    options = shlex.split(cfg.split("FLANNEL_OPTIONS=", 1)[1])[0].split()
    values = dict(opt.lstrip("-").split("=", 1) for opt in options)
    return [
        f"--endpoints={values['etcd-endpoints']}",
        f"--ca-file={values['etcd-cafile']}",
        f"--cert-file={values['etcd-certfile']}",
        f"--key-file={values['etcd-keyfile']}",
    ]


def etcdctl2(name: str, *args: str) -> str:
    return node_exec(name, "node1", "env", "ETCDCTL_API=2", "etcdctl", *etcd_flags(name), *args)


@pytest.mark.parametrize(("backend", "api"), [("host-gw", "v2"), ("vxlan", "v3")])
def test_seed_replay(lab: Callable[[], str], backend: str, api: str) -> None:
    name = lab()
    up(
        name,
        "--nodes",
        "3",
        "--runtime",
        "docker",
        "--backend",
        backend,
        "--etcd",
        "cluster",
        "--tls",
        "--etcd-api",
        api,
    )
    doc = state(name)
    nodes = doc["nodes"]
    assert isinstance(nodes, dict) and len(nodes) == 3

    # flanneld runs with exactly the seed's options (the wrapper at
    # /opt/kubernetes/bin/flanneld execs `loden agent`, so argv[0] is Python's).
    for node in nodes.values():
        argv = Path(f"/proc/{node['agent_pid']}/cmdline").read_bytes().decode().split("\0")
        options = argv[argv.index("agent") + 1 :]
        assert options[:5] == [
            "--ip-masq",
            options[1],
            "-etcd-cafile=/opt/etcd/ssl/ca.pem",
            "-etcd-certfile=/opt/etcd/ssl/server.pem",
            "-etcd-keyfile=/opt/etcd/ssl/server-key.pem",
        ], argv
        assert re.fullmatch(
            r"--etcd-endpoints=(https://[\d.]+:\d+,){2}https://[\d.]+:\d+", options[1]
        ), options[1]

    # etcd holds one lease per node, in the era's JSON.
    if api == "v2":
        config = etcdctl2(name, "get", "/coreos.com/network/config")
        assert '"Type": "host-gw"' in config
        keys = etcdctl2(name, "ls", "/coreos.com/network/subnets").split()
        assert len(keys) == 3
        for key in keys:
            assert re.fullmatch(r"/coreos\.com/network/subnets/[\d.]+\.0-24", key), key
        values = {etcdctl2(name, "get", key).strip() for key in keys}
        assert values == {
            f'{{"PublicIP":"{n["address"].split("/")[0]}","BackendType":"host-gw"}}'
            for n in nodes.values()
        }
    else:
        leases = loden(
            "lab",
            "exec",
            "--name",
            name,
            "node1",
            "--",
            LODEN,
            "leases",
            "-json",
            "-etcd-api=v3",
            *[
                f.replace("--endpoints", "-etcd-endpoints")
                .replace("--ca-file", "-etcd-cafile")
                .replace("--cert-file", "-etcd-certfile")
                .replace("--key-file", "-etcd-keyfile")
                for f in etcd_flags(name)
            ],
        )
        rows = json.loads(leases.stdout)
        assert len(rows) == 3 and all(r["backend"] == "vxlan" for r in rows)
        assert all(re.fullmatch(r"([0-9a-f]{2}:){5}[0-9a-f]{2}", r["detail"]) for r in rows)

    for node_name, node in nodes.items():
        # subnet.env after ExecStartPost mk-docker-opts: exactly the seed's four lines.
        env = node_exec(name, node_name, "cat", "/run/flannel/subnet.env")
        match = SEED_DOCKER_LINES.fullmatch(env)
        assert match, env
        assert IPv4Network(match["bip"], strict=False) == IPv4Network(node["subnet"])
        expected_mtu = "1500" if backend == "host-gw" else "1450"
        assert match["mtu"] == expected_mtu
        # dockerd runs with the seed's options.
        ps = node_exec(name, node_name, "ps", "-eo", "args")
        assert f"dockerd --bip={match['bip']} --ip-masq=false --mtu={expected_mtu}" in ps
        # Routes to the other nodes' subnets.
        routes = node_exec(name, node_name, "ip", "route")
        for other_name, other in nodes.items():
            if other_name == node_name:
                continue
            peer_ip = other["address"].split("/")[0]
            if backend == "host-gw":
                assert re.search(
                    rf"^{re.escape(other['subnet'])} via {peer_ip} dev eth0", routes, re.M
                ), routes
            else:
                assert re.search(
                    rf"^{re.escape(other['subnet'])} via \S+ dev flannel\.1", routes, re.M
                ), routes

    # Busybox containers on different nodes reach each other; nodes reach containers.
    check = loden("lab", "check", "--name", name, "--wait", "15", check=False)
    assert check.returncode == 0, check.stdout + check.stderr
