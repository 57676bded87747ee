"""``loden systemd``: the seed guide's files, and systemd's reading of them."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from loden.errors import ConfigError, ParseError
from loden.tools.mk_docker_opts import main as mk_docker_opts
from loden.tools.systemd import RenderOptions, file_modes, main, render_files, write_files
from loden.tools.systemd_files import (
    exec_argv,
    parse_environment_file,
    parse_unit,
    unit_environment,
    unit_exec_argv,
)

ENDPOINTS = "https://10.211.55.10:2379,https://10.211.55.12:2379,https://10.211.55.13:2379"

# What `bash flannel.sh <ENDPOINTS>` from the seed guide writes (heredocs expanded by
# bash: the backslash-newlines inside FLANNEL_OPTIONS join into one line).
SEED_CFG = (
    "\n"
    'FLANNEL_OPTIONS="--etcd-endpoints=https://10.211.55.10:2379,https://10.211.55.12:2379,'
    "https://10.211.55.13:2379 -etcd-cafile=/opt/etcd/ssl/ca.pem "
    "-etcd-certfile=/opt/etcd/ssl/server.pem "
    '-etcd-keyfile=/opt/etcd/ssl/server-key.pem"\n'
    "\n"
)
SEED_FLANNELD_SERVICE = """\
[Unit]
Description=Flanneld overlay address etcd agent
After=network-online.target network.target
Before=docker.service

[Service]
Type=notify
EnvironmentFile=/opt/kubernetes/cfg/flanneld
ExecStart=/opt/kubernetes/bin/flanneld --ip-masq $FLANNEL_OPTIONS
ExecStartPost=/opt/kubernetes/bin/mk-docker-opts.sh -k DOCKER_NETWORK_OPTIONS -d /run/flannel/subnet.env
Restart=on-failure

[Install]
WantedBy=multi-user.target

"""  # noqa: E501
SEED_DOCKER_SERVICE = """
[Unit]
Description=Docker Application Container Engine
Documentation=https://docs.docker.com
After=network-online.target firewalld.service
Wants=network-online.target

[Service]
Type=notify
EnvironmentFile=/run/flannel/subnet.env
ExecStart=/usr/bin/dockerd $DOCKER_NETWORK_OPTIONS
ExecReload=/bin/kill -s HUP $MAINPID
LimitNOFILE=infinity
LimitNPROC=infinity
LimitCORE=infinity
TimeoutStartSec=0
Delegate=yes
KillMode=process
Restart=on-failure
StartLimitBurst=3
StartLimitInterval=60s

[Install]
WantedBy=multi-user.target

"""
# The guide's `ps -ef` line for flanneld, as an argv.
SEED_FLANNELD_ARGV = [
    "/opt/kubernetes/bin/flanneld",
    "--ip-masq",
    "--etcd-endpoints=https://10.211.55.10:2379,https://10.211.55.12:2379,"
    "https://10.211.55.13:2379",
    "-etcd-cafile=/opt/etcd/ssl/ca.pem",
    "-etcd-certfile=/opt/etcd/ssl/server.pem",
    "-etcd-keyfile=/opt/etcd/ssl/server-key.pem",
]

OPTS = RenderOptions(etcd_endpoints=ENDPOINTS, loden="/opt/loden/.venv/bin/loden")


def test_render_matches_the_seed_files() -> None:
    files = render_files(OPTS)
    assert files == {
        "/opt/kubernetes/cfg/flanneld": SEED_CFG,
        "/usr/lib/systemd/system/flanneld.service": SEED_FLANNELD_SERVICE,
        "/usr/lib/systemd/system/docker.service": SEED_DOCKER_SERVICE,
        "/opt/kubernetes/bin/flanneld": ('#!/bin/sh\nexec /opt/loden/.venv/bin/loden agent "$@"\n'),
        "/opt/kubernetes/bin/mk-docker-opts.sh": (
            '#!/bin/sh\nexec /opt/loden/.venv/bin/loden mk-docker-opts "$@"\n'
        ),
    }


def test_environment_file_and_exec_start_give_the_seeds_argv() -> None:
    env = parse_environment_file(SEED_CFG)
    assert list(env) == ["FLANNEL_OPTIONS"]
    unit = parse_unit(SEED_FLANNELD_SERVICE)
    exec_start = dict(unit["Service"])["ExecStart"]
    assert exec_argv(exec_start, env) == SEED_FLANNELD_ARGV
    assert exec_argv("ExecStart=" + exec_start, env) == SEED_FLANNELD_ARGV


def test_files_written_under_root_with_modes(tmp_path: Path) -> None:
    written = write_files(tmp_path, OPTS)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in written) == [
        "opt/kubernetes/bin/flanneld",
        "opt/kubernetes/bin/mk-docker-opts.sh",
        "opt/kubernetes/cfg/flanneld",
        "usr/lib/systemd/system/docker.service",
        "usr/lib/systemd/system/flanneld.service",
    ]
    modes = {p.relative_to(tmp_path).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in written}
    assert modes["opt/kubernetes/bin/flanneld"] == 0o755
    assert modes["opt/kubernetes/bin/mk-docker-opts.sh"] == 0o755
    assert modes["opt/kubernetes/cfg/flanneld"] == 0o644
    assert modes["usr/lib/systemd/system/flanneld.service"] == 0o644
    assert file_modes(OPTS)["/opt/kubernetes/bin/flanneld"] == 0o755
    unit_path = tmp_path / "usr/lib/systemd/system/flanneld.service"
    assert unit_exec_argv(unit_path.read_text(), root=tmp_path) == SEED_FLANNELD_ARGV
    leftovers = [p for p in tmp_path.rglob(".*")]
    assert leftovers == []


def test_wrappers_exec_loden_with_all_arguments(tmp_path: Path) -> None:
    fake = tmp_path / "fake-loden"
    log = tmp_path / "args"
    fake.write_text(f'#!/bin/sh\nfor a in "$@"; do printf "%s|" "$a"; done > {log}\n')
    fake.chmod(0o755)
    write_files(tmp_path / "root", RenderOptions(etcd_endpoints="http://x:2379", loden=str(fake)))
    wrapper = tmp_path / "root/opt/kubernetes/bin/flanneld"
    subprocess.run([str(wrapper), "--ip-masq", "a b", ""], check=True, timeout=10)
    assert log.read_text() == "agent|--ip-masq|a b||"


def test_main_render_and_argv(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["render", "--root", str(tmp_path), "--etcd-endpoints", ENDPOINTS]
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert f"{tmp_path}/usr/lib/systemd/system/flanneld.service" in out
    cfg = (tmp_path / "opt/kubernetes/cfg/flanneld").read_text()
    assert cfg == SEED_CFG
    wrapper = (tmp_path / "opt/kubernetes/bin/flanneld").read_text()
    assert wrapper.startswith("#!/bin/sh\nexec /") and wrapper.endswith('/bin/loden agent "$@"\n')
    assert main(["argv", "--root", str(tmp_path), "/usr/lib/systemd/system/flanneld.service"]) == 0
    assert capsys.readouterr().out.strip().startswith('["/opt/kubernetes/bin/flanneld"')


def test_main_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["render", "--root", str(tmp_path)]) == 2  # --etcd-endpoints is required
    bad = ["render", "--root", str(tmp_path), "--etcd-endpoints", 'http://a"b']
    assert main(bad) == 1
    assert "must not contain" in capsys.readouterr().err


def test_optional_tls_and_extra_options() -> None:
    opts = RenderOptions(
        etcd_endpoints="http://127.0.0.1:2379",
        etcd_cafile="",
        etcd_certfile="",
        etcd_keyfile="",
        extra_options=" --iface=eth1   -v=2 ",
        bin_dir="/usr/local/bin",
        loden="/x/loden",
    )
    files = render_files(opts)
    env = parse_environment_file(files["/opt/kubernetes/cfg/flanneld"])
    unit = files["/usr/lib/systemd/system/flanneld.service"]
    assert exec_argv(dict(parse_unit(unit)["Service"])["ExecStart"], env) == [
        "/usr/local/bin/flanneld",
        "--ip-masq",
        "--etcd-endpoints=http://127.0.0.1:2379",
        "--iface=eth1",
        "-v=2",
    ]
    assert "ExecStartPost=/usr/local/bin/mk-docker-opts.sh -k" in unit


@pytest.mark.parametrize(
    "opts",
    [
        RenderOptions(etcd_endpoints=""),
        RenderOptions(etcd_endpoints="http://a b"),
        RenderOptions(etcd_endpoints="x", bin_dir="relative/bin"),
        RenderOptions(etcd_endpoints="x", bin_dir="/opt/%n"),
        RenderOptions(etcd_endpoints="x", extra_options='--a="b"'),
    ],
)
def test_values_that_would_break_the_files(opts: RenderOptions) -> None:
    with pytest.raises(ConfigError):
        render_files(opts)


def test_docker_unit_reads_mk_docker_opts_output(tmp_path: Path) -> None:
    """The seed's chain: flanneld's subnet.env → mk-docker-opts → dockerd's argv."""
    subnet_env = tmp_path / "run/flannel/subnet.env"
    subnet_env.parent.mkdir(parents=True)
    subnet_env.write_text(
        "FLANNEL_NETWORK=172.17.0.0/16\nFLANNEL_SUBNET=172.17.40.1/24\n"
        "FLANNEL_MTU=1500\nFLANNEL_IPMASQ=true\n"
    )
    argv = ["-k", "DOCKER_NETWORK_OPTIONS", "-f", str(subnet_env), "-d", str(subnet_env)]
    assert mk_docker_opts(argv, environ={}, route_table=lambda: "") == 0
    assert unit_exec_argv(SEED_DOCKER_SERVICE, root=tmp_path) == [
        "/usr/bin/dockerd",
        "--bip=172.17.40.1/24",
        "--ip-masq=false",
        "--mtu=1500",
    ]
    reload_argv = unit_exec_argv(SEED_DOCKER_SERVICE, key="ExecReload", root=tmp_path)
    assert reload_argv == ["/bin/kill", "-s", "HUP"]  # $MAINPID is unset here


def test_parse_environment_file_rules() -> None:
    text = (
        "# comment\n"
        "; also a comment\n"
        "  A = plain value   \n"
        "B='single \\n kept'\n"
        'C="double \\" \\\\ \\$ \\x kept"\n'
        "D=\"x\"y'z'\n"
        "E=un\\\n"
        "continued\n"
        "export F=ignored\n"
        "G=\n"
        "bad-name=1\n"
        "H=a\\ b\\\\c\n"
        "I\n"
        'J="unterminated'
    )
    assert parse_environment_file(text) == {
        "A": "plain value",
        "B": "single \\n kept",
        "C": 'double " \\ $ \\x kept',
        "D": "xy'z'",  # after a bare character, quotes are literal
        "E": "uncontinued",
        "G": "",
        "H": "a b\\c",
        "J": "unterminated",
    }


def test_exec_argv_expansion_rules() -> None:
    env = {"A": "one  'two three'", "B": "x y", "EMPTY": ""}
    assert exec_argv("/bin/cmd $A ${B} pre${B}post $UNSET $EMPTY $$ a$B", env) == [
        "/bin/cmd",
        "one",
        "two three",
        "x y",
        "prex ypost",
        "$",
        "a$B",
    ]
    assert exec_argv("-/bin/cmd '$A' \"q w\" e\\x41\\s", env) == [
        "/bin/cmd",
        "one",
        "two three",
        "q w",
        "eA ",
    ]
    assert exec_argv(":/bin/cmd $A 100%%", env) == ["/bin/cmd", "$A", "100%"]
    assert exec_argv("@/bin/real argv0 x ; /bin/second", env) == ["/bin/real", "x"]
    with pytest.raises(ParseError):
        exec_argv("/bin/cmd 'open", env)
    with pytest.raises(ParseError):
        exec_argv("/bin/cmd %n", env)


def test_unit_environment_order_and_optional_files(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/one").write_text("A=file\n")
    unit = (
        "[Service]\n"
        'Environment="A=inline" B=2\n'
        "EnvironmentFile=/etc/one\n"
        "EnvironmentFile=-/etc/missing\n"
        "ExecStart=/bin/x \\\n"
        "  ${A} ${B}\n"
    )
    assert unit_environment(unit, root=tmp_path) == {"A": "file", "B": "2"}
    assert unit_exec_argv(unit, root=tmp_path) == ["/bin/x", "file", "2"]
    with pytest.raises(ConfigError, match="does not exist"):
        unit_environment(unit.replace("-/etc/missing", "/etc/missing"), root=tmp_path)
    with pytest.raises(ConfigError, match="no ExecStop"):
        unit_exec_argv(unit, key="ExecStop", root=tmp_path)
    assert os.path.exists(tmp_path / "etc/one")
