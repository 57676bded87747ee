"""Go flag syntax, FLANNELD_* precedence and the usage/exit-code contract."""

from __future__ import annotations

import subprocess
import sys

import pytest

from loden.errors import UsageError
from loden.flags import HelpRequested
from loden.settings import agent_flagset, parse_agent_args

SEED_ARGS = [
    "--ip-masq",
    "--etcd-endpoints=https://10.211.55.10:2379,https://10.211.55.12:2379",
    "-etcd-cafile=/opt/etcd/ssl/ca.pem",
    "-etcd-certfile=/opt/etcd/ssl/server.pem",
    "-etcd-keyfile=/opt/etcd/ssl/server-key.pem",
]


def test_seed_command_line() -> None:
    s = parse_agent_args(SEED_ARGS, {})
    assert s.rules.ip_masq
    assert s.etcd.endpoints == ("https://10.211.55.10:2379", "https://10.211.55.12:2379")
    assert s.etcd.cafile == "/opt/etcd/ssl/ca.pem" and s.etcd.tls_client
    assert str(s.subnet_file) == "/run/flannel/subnet.env"


@pytest.mark.parametrize(
    "argv", [["-iface", "eth1"], ["--iface=eth1"], ["-iface=eth1"], ["--iface", "eth1"]]
)
def test_all_go_forms(argv: list[str]) -> None:
    assert parse_agent_args(argv, {}).iface.ifaces == ("eth1",)


def test_repeatable_and_bool_forms() -> None:
    s = parse_agent_args(
        ["-iface", "a", "--iface=b", "-ip-masq=false", "-iptables-forward-rules=0"], {}
    )
    assert s.iface.ifaces == ("a", "b")
    assert not s.rules.ip_masq and not s.rules.forward_rules


def test_env_applies_only_to_flags_not_on_the_command_line() -> None:
    env = {
        "FLANNELD_IFACE": "eth0,eth1",
        "FLANNELD_IP_MASQ": "true",
        "FLANNELD_ETCD_PREFIX": "/from/env",
        "FLANNELD_V": "",
        "FLANNELD_VERSION": "true",
    }
    s = parse_agent_args(["-etcd-prefix=/from/flag"], env)
    assert s.iface.ifaces == ("eth0,eth1",)  # one literal value, no comma splitting
    assert s.rules.ip_masq
    assert s.etcd.prefix == "/from/flag"


def test_prefix_is_cleaned_like_path_join() -> None:
    assert parse_agent_args(["-etcd-prefix=/a//b/"], {}).etcd.prefix == "/a/b"


@pytest.mark.parametrize(
    ("argv", "env", "fragment"),
    [
        (["-nope"], {}, "flag provided but not defined: -nope"),
        (["-healthz-port=x"], {}, "invalid value 'x' for -healthz-port"),
        (["-ip-masq=maybe"], {}, "invalid boolean"),
        (["-etcd-prefix"], {}, "flag needs an argument"),
        (["-subnet-lease-renew-margin=0"], {}, "out of acceptable range"),
        (["-subnet-lease-renew-margin=1440"], {}, "out of acceptable range"),
        (["-etcd-api=v4"], {}, "use auto, v3 or v2"),
        (["-public-ip=1.2.3"], {}, "not an IPv4 address"),
        (["-etcd-endpoints=127.0.0.1:2379"], {}, "expected http://host:port"),
        ([], {"FLANNELD_IPTABLES_RESYNC": "soon"}, "FLANNELD_IPTABLES_RESYNC"),
    ],
)
def test_bad_input_is_a_usage_error(argv: list[str], env: dict[str, str], fragment: str) -> None:
    with pytest.raises(UsageError, match=fragment):
        parse_agent_args(argv, env)


def test_help() -> None:
    with pytest.raises(HelpRequested) as info:
        agent_flagset("flanneld").parse(["--help"])
    assert info.value.usage.startswith("Usage: flanneld [OPTION]...")
    assert "-etcd-endpoints string" in info.value.usage


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "loden", *args], capture_output=True, text=True, timeout=30, env=env
    )


def test_cli_exit_codes() -> None:
    bad = _run("agent", "-no-such-flag")
    assert bad.returncode == 2
    assert "flag provided but not defined: -no-such-flag" in bad.stderr.splitlines()[0]
    assert "Usage:" in bad.stderr
    helped = _run("agent", "--help")
    assert helped.returncode == 0 and "Exit status" in helped.stderr
    version = _run("agent", "--version")
    assert version.returncode == 0 and version.stderr.startswith("v")
