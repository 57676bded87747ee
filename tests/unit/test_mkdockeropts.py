"""``loden mk-docker-opts`` against flannel's goldens (spec §5.2) and the seed guide."""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loden.errors import ConfigError, ParseError
from loden.tools.mk_docker_opts import (
    USAGE,
    collision_pattern,
    main,
    parse_options,
    parse_sh_assignments,
    render,
    route_collisions,
)

# flannel's dist/sample_subnet.env
SAMPLE = (
    "FLANNEL_NETWORK=10.1.0.0/16\n"
    "FLANNEL_SUBNET=10.1.74.1/24\n"
    "FLANNEL_MTU=1472\n"
    "FLANNEL_IPMASQ=false\n"
)

# dist/mk_docker_opts_test.go, byte for byte.
GOLDENS: dict[str, tuple[list[str], str]] = {
    "default": (
        [],
        'DOCKER_OPT_BIP="--bip=10.1.74.1/24"\n'
        'DOCKER_OPT_IPMASQ="--ip-masq=true"\n'
        'DOCKER_OPT_MTU="--mtu=1472"\n'
        'DOCKER_OPTS=" --bip=10.1.74.1/24 --ip-masq=true --mtu=1472"\n',
    ),
    "individual": (
        ["-i"],
        'DOCKER_OPT_BIP="--bip=10.1.74.1/24"\n'
        'DOCKER_OPT_IPMASQ="--ip-masq=true"\n'
        'DOCKER_OPT_MTU="--mtu=1472"\n',
    ),
    "combined": (
        ["-c"],
        'DOCKER_OPTS=" --bip=10.1.74.1/24 --ip-masq=true --mtu=1472"\n',
    ),
    "custom-key": (
        ["-k", "CUSTOM_KEY"],
        'DOCKER_OPT_BIP="--bip=10.1.74.1/24"\n'
        'DOCKER_OPT_IPMASQ="--ip-masq=true"\n'
        'DOCKER_OPT_MTU="--mtu=1472"\n'
        'CUSTOM_KEY=" --bip=10.1.74.1/24 --ip-masq=true --mtu=1472"\n',
    ),
    "no-masq": (
        ["-m"],
        'DOCKER_OPT_BIP="--bip=10.1.74.1/24"\n'
        'DOCKER_OPT_MTU="--mtu=1472"\n'
        'DOCKER_OPTS=" --bip=10.1.74.1/24 --mtu=1472"\n',
    ),
}

# The script has no IPv6 option: FLANNEL_IPV6_* lines are sourced and ignored, and an
# IPv6-only file (no FLANNEL_SUBNET) gives no --bip and no route check. Outputs from the
# script's own code run by /bin/sh on these files (flannel's docs leave IPv6 to the
# operator: dockerd --ipv6 --fixed-cidr-v6=$FLANNEL_IPV6_SUBNET).
DUAL_SUBNET_ENV = (
    "FLANNEL_NETWORK=10.42.0.0/16\n"
    "FLANNEL_SUBNET=10.42.0.1/24\n"
    "FLANNEL_IPV6_NETWORK=2001:cafe:42::/56\n"
    "FLANNEL_IPV6_SUBNET=2001:cafe:42::1/64\n"
    "FLANNEL_MTU=1450\n"
    "FLANNEL_IPMASQ=true\n"
)
V6_ONLY_SUBNET_ENV = (
    "FLANNEL_IPV6_NETWORK=2001:cafe:42::/56\n"
    "FLANNEL_IPV6_SUBNET=2001:cafe:42::1/64\n"
    "FLANNEL_MTU=1450\n"
    "FLANNEL_IPMASQ=false\n"
)
IPV6_GOLDENS: dict[str, tuple[str, list[str], str]] = {
    "dual": (
        DUAL_SUBNET_ENV,
        [],
        'DOCKER_OPT_BIP="--bip=10.42.0.1/24"\n'
        'DOCKER_OPT_IPMASQ="--ip-masq=false"\n'
        'DOCKER_OPT_MTU="--mtu=1450"\n'
        'DOCKER_OPTS=" --bip=10.42.0.1/24 --ip-masq=false --mtu=1450"\n',
    ),
    "dual-combined": (
        DUAL_SUBNET_ENV,
        ["-c"],
        'DOCKER_OPTS=" --bip=10.42.0.1/24 --ip-masq=false --mtu=1450"\n',
    ),
    "v6-only": (
        V6_ONLY_SUBNET_ENV,
        [],
        'DOCKER_OPT_IPMASQ="--ip-masq=true"\n'
        'DOCKER_OPT_MTU="--mtu=1450"\n'
        'DOCKER_OPTS=" --ip-masq=true --mtu=1450"\n',
    ),
    "v6-only-no-masq": (
        V6_ONLY_SUBNET_ENV,
        ["-m", "-i"],
        'DOCKER_OPT_MTU="--mtu=1450"\n',
    ),
}

SEED_SUBNET_ENV = (
    "FLANNEL_NETWORK=172.17.0.0/16\n"
    "FLANNEL_SUBNET=172.17.40.1/24\n"
    "FLANNEL_MTU=1500\n"
    "FLANNEL_IPMASQ=true\n"
)
SEED_RESULT = (
    'DOCKER_OPT_BIP="--bip=172.17.40.1/24"\n'
    'DOCKER_OPT_IPMASQ="--ip-masq=false"\n'
    'DOCKER_OPT_MTU="--mtu=1500"\n'
    'DOCKER_NETWORK_OPTIONS=" --bip=172.17.40.1/24 --ip-masq=false --mtu=1500"\n'
)


@dataclass(frozen=True, slots=True)
class Run:
    code: int
    output: str | None
    stderr: str


@pytest.fixture
def run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Callable[..., Run]:
    """Run main() on a flannel file with a pinned environment and routing table."""

    def _run(
        args: list[str],
        flannel: str | None = SAMPLE,
        *,
        environ: Mapping[str, str] | None = None,
        routes: str = "",
        output: Path | None = None,
    ) -> Run:
        source = tmp_path / "subnet.env"
        if flannel is not None:
            source.write_text(flannel)
        target = output or tmp_path / "docker_opts.env"
        argv = ["-f", str(source), "-d", str(target), *args]
        code = main(argv, environ=dict(environ or {}), route_table=lambda: routes)
        text = target.read_text() if target.exists() else None
        return Run(code, text, capsys.readouterr().err)

    return _run


@pytest.mark.parametrize("name", sorted(GOLDENS))
def test_flannel_goldens_byte_exact(run: Callable[..., Run], name: str) -> None:
    args, expected = GOLDENS[name]
    result = run(args)
    assert result.code == 0, result.stderr
    assert result.output == expected
    assert result.stderr == ""


@pytest.mark.parametrize("name", sorted(IPV6_GOLDENS))
def test_ipv6_subnet_env_goldens(run: Callable[..., Run], name: str) -> None:
    flannel, args, expected = IPV6_GOLDENS[name]
    # A route "via" for the IPv4 subnet would make the script exit 1; none for IPv6-only.
    result = run(args, flannel, routes="2001:cafe:42::/64 via fe80::1 dev eth0\n")
    assert (result.code, result.output, result.stderr) == (0, expected, "")


def test_seed_same_file_read_then_written(tmp_path: Path, run: Callable[..., Run]) -> None:
    subnet_env = tmp_path / "subnet.env"
    result = run(
        ["-k", "DOCKER_NETWORK_OPTIONS", "-d", str(subnet_env)],
        SEED_SUBNET_ENV,
        output=subnet_env,
    )
    assert result.code == 0, result.stderr
    assert result.output == SEED_RESULT
    assert stat.S_IMODE(subnet_env.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["subnet.env"]  # no temp file left


def test_seed_output_sourced_by_real_shell(tmp_path: Path, run: Callable[..., Run]) -> None:
    subnet_env = tmp_path / "subnet.env"
    run(["-k", "DOCKER_NETWORK_OPTIONS", "-d", str(subnet_env)], SEED_SUBNET_ENV, output=subnet_env)
    shell = subprocess.run(
        [
            "sh",
            "-c",
            '. "$1"; echo "$DOCKER_NETWORK_OPTIONS"; echo "$DOCKER_OPT_BIP"',
            "sh",
            str(subnet_env),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
    )
    assert (
        shell.stdout == " --bip=172.17.40.1/24 --ip-masq=false --mtu=1500\n--bip=172.17.40.1/24\n"
    )


def test_hostile_values_stay_data_in_a_real_shell(tmp_path: Path, run: Callable[..., Run]) -> None:
    marker = tmp_path / "pwned"
    subnet = f'10.0.0.1/24"; touch {marker}; echo "`id`$HOME\\'
    result = run(["-c"], f"FLANNEL_SUBNET='{subnet}'\n")
    assert result.output is not None
    out = tmp_path / "docker_opts.env"
    shell = subprocess.run(
        ["sh", "-c", '. "$1"; printf %s "$DOCKER_OPTS"', "sh", str(out)],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/nonexistent"},
    )
    assert not marker.exists()
    assert shell.stdout == " --bip=" + " ".join(subnet.split())


def test_running_twice_on_the_same_file_duplicates_like_the_script(
    tmp_path: Path, run: Callable[..., Run]
) -> None:
    subnet_env = tmp_path / "subnet.env"
    run(["-k", "DOCKER_NETWORK_OPTIONS", "-d", str(subnet_env)], SEED_SUBNET_ENV, output=subnet_env)
    code = main(
        ["-k", "DOCKER_NETWORK_OPTIONS", "-f", str(subnet_env), "-d", str(subnet_env)],
        environ={},
        route_table=lambda: "",
    )
    assert code == 0
    opts = " --bip=172.17.40.1/24 --ip-masq=false --mtu=1500"
    assert subnet_env.read_text().splitlines()[-1] == f'DOCKER_NETWORK_OPTIONS="{opts} {opts}"'


def test_missing_flannel_file_writes_empty_options(run: Callable[..., Run]) -> None:
    result = run([], None)
    assert result.code == 0
    assert result.output == 'DOCKER_OPTS=""\n'


def test_missing_flannel_file_uses_the_environment(run: Callable[..., Run]) -> None:
    result = run(["-c"], None, environ={"FLANNEL_SUBNET": "10.9.1.1/24", "FLANNEL_MTU": "1400"})
    assert result.output == 'DOCKER_OPTS=" --bip=10.9.1.1/24 --mtu=1400"\n'


def test_bad_ipmasq_exits_1_and_writes_nothing(run: Callable[..., Run]) -> None:
    result = run([], "FLANNEL_SUBNET=10.1.74.1/24\nFLANNEL_IPMASQ=yes\n")
    assert result.code == 1
    assert result.stderr == "Invalid value of FLANNEL_IPMASQ: yes\n"
    assert result.output is None


def test_bad_ipmasq_is_ignored_with_m(run: Callable[..., Run]) -> None:
    result = run(["-m", "-c"], "FLANNEL_MTU=1450\nFLANNEL_IPMASQ=yes\n")
    assert result.code == 0
    assert result.output == 'DOCKER_OPTS=" --mtu=1450"\n'


@pytest.mark.parametrize(
    ("args", "diagnostic"),
    [
        (["-h"], ""),
        (["-?"], ""),
        (["-x"], "Illegal option -x\n"),
        (["-i", "-z"], "Illegal option -z\n"),
        (["-k"], "No arg for -k option\n"),
    ],
)
def test_usage_exits_1_on_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], diagnostic: str
) -> None:
    target = tmp_path / "out.env"
    assert main(["-d", str(target), *args], environ={}, route_table=lambda: "") == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == diagnostic + USAGE.format(prog="mk-docker-opts.sh")
    assert captured.err.endswith("(useful for older Docker version)\n\n")
    assert not target.exists()


def test_getopts_forms() -> None:
    opts = parse_options(["-ic", "-kKEY", "-f", "/a", "-d/b", "-m", "ignored", "-x"])
    assert (opts.individual, opts.combined, opts.no_masq) == (True, True, True)
    assert (opts.key, opts.flannel_env, opts.docker_env) == ("KEY", "/a", "/b")
    assert parse_options(["--", "-i"]).individual is False
    assert parse_options(["-k", "-i"]).key == "-i"
    defaults = parse_options([])
    assert (defaults.flannel_env, defaults.docker_env, defaults.key) == (
        "/run/flannel/subnet.env",
        "/run/docker_opts.env",
        "DOCKER_OPTS",
    )


def test_combined_starts_from_the_keys_current_value(run: Callable[..., Run]) -> None:
    result = run(["-c"], environ={"DOCKER_OPTS": "--debug"})
    assert result.output == 'DOCKER_OPTS="--debug  --bip=10.1.74.1/24 --ip-masq=true --mtu=1472"\n'


def test_other_docker_opt_variables_join_in_set_order(run: Callable[..., Run]) -> None:
    result = run([], environ={"DOCKER_OPT_ZZ": "zz", "MY_DOCKER_OPT_A": "1", "DOCKER_OPTS": ""})
    assert result.output == (
        'DOCKER_OPT_BIP="--bip=10.1.74.1/24"\n'
        'DOCKER_OPT_IPMASQ="--ip-masq=true"\n'
        'DOCKER_OPT_MTU="--mtu=1472"\n'
        'DOCKER_OPT_ZZ="zz"\n'
        'MY_DOCKER_OPT_A="1"\n'
        'DOCKER_OPTS=" --bip=10.1.74.1/24 --ip-masq=true --mtu=1472 zz 1"\n'
    )


def test_route_collision_exits_1_after_writing(run: Callable[..., Run]) -> None:
    routes = (
        "default via 10.211.55.1 dev eth0\n"
        "10.1.74.0/24 via 10.211.55.13 dev eth0\n"
        "10.1.75.0/24 dev docker0 proto kernel scope link src 10.1.75.1\n"
    )
    result = run([], routes=routes)
    assert result.code == 1
    assert result.stderr == (
        "Your routing table already contains the subnet: 10.1.74.0/24 via 10.211.55.13 dev eth0\n"
    )
    assert result.output == GOLDENS["default"][1]


def test_own_bridge_route_is_no_collision(run: Callable[..., Run]) -> None:
    routes = "10.1.74.0/24 dev docker0 proto kernel scope link src 10.1.74.1\n"
    assert run([], routes=routes).code == 0


def test_collision_pattern_follows_the_cut_pipeline() -> None:
    assert collision_pattern("10.1.74.1/24", {}) == "10.1.74.0/24"
    assert collision_pattern("10.1.74.0/24", {}) == "10.1.74.-1/24"
    assert collision_pattern("10.1.74.010/24", {}) == "10.1.74.7/24"  # dash reads octal
    assert collision_pattern("10.1.74.08/24", {}) is None  # dash: arithmetic error
    # BRE: '.' matches any character, exactly as grep does.
    assert route_collisions("10.1.74.0/24", "10x1x74x0/24 via 1.2.3.4") != ""
    assert route_collisions("-1.2/3", "-1.2/3 via x") == ""


def test_unwritable_output_exits_1(run: Callable[..., Run], tmp_path: Path) -> None:
    result = run([], output=tmp_path / "no" / "such" / "dir.env")
    assert result.code == 1
    assert "cannot create" in result.stderr


def test_unparseable_flannel_file_exits_2(run: Callable[..., Run]) -> None:
    result = run([], "FLANNEL_SUBNET=$(reboot)\n")
    assert result.code == 2
    assert "command substitution" in result.stderr
    assert result.output is None


def test_render_is_pure() -> None:
    env = {"FLANNEL_SUBNET": "10.1.74.1/24", "FLANNEL_MTU": "1472", "FLANNEL_IPMASQ": "false"}
    text = render(env, individual=False, combined=True, key="K", no_masq=False, key_env_value="x")
    assert text == 'K="x  --bip=10.1.74.1/24 --ip-masq=true --mtu=1472"\n'
    with pytest.raises(ConfigError, match="^Invalid value of FLANNEL_IPMASQ: 1$"):
        render(
            {"FLANNEL_IPMASQ": "1"},
            individual=True,
            combined=True,
            key="K",
            no_masq=False,
            key_env_value="",
        )


# --------------------------------------------------------------------------------------
# The sh-subset reader.


def test_sh_subset_forms() -> None:
    text = (
        "# comment\n"
        "\n"
        "export A=1\n"
        "B='two words' C=\"x$A${A}\\$\" ; D=un\\ quoted#not-a-comment # comment\n"
        "export E\n"
        'F="multi\n'
        'line"\n'
        "G=a\\\n"
        "b\n"
        "H=\n"
        "I=$UNSET.$HOME\n"
    )
    assert parse_sh_assignments(text, {"HOME": "/root"}) == {
        "A": "1",
        "B": "two words",
        "C": "x11$",
        "D": "un quoted#not-a-comment",
        "F": "multi\nline",
        "G": "ab",
        "H": "",
        "I": "./root",
    }


@pytest.mark.parametrize(
    "text",
    [
        "echo hi\n",
        "A=$(id)\n",
        "A=`id`\n",
        'A="`id`"\n',
        "A=1 | cat\n",
        "A=1 > /tmp/x\n",
        "A='open\n",
        'A="open\n',
        "A=${B:-c}\n",
        "A=$1\n",
        "A=1 cmd\n",
    ],
)
def test_sh_subset_refuses_anything_that_runs(text: str) -> None:
    with pytest.raises(ParseError):
        parse_sh_assignments(text)


@settings(max_examples=400, deadline=None)
@given(st.text())
def test_sh_subset_only_raises_parse_error(text: str) -> None:
    try:
        parse_sh_assignments(text)
    except ParseError:
        pass


_VALUE_CHARS = st.text(
    alphabet=st.sampled_from(list("ab Z09_-./:=,#~*?[]{}'\"$\\`\t")), max_size=12
)


def _sh_quote_single(value: str) -> str:
    return "'" + value.replace("'", "'\\''") + "'"


def _sh_quote_double(value: str) -> str:
    return '"' + "".join("\\" + c if c in '"\\$`' else c for c in value) + '"'


def _sh_quote_bare(value: str) -> str:
    return "".join(c if c.isalnum() or c in "_-./:=,%+@" else "\\" + c for c in value) or "''"


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(_VALUE_CHARS, st.sampled_from(["single", "double", "bare"])), max_size=4))
def test_sh_subset_agrees_with_a_real_shell(
    tmp_path_factory: pytest.TempPathFactory, items: list[tuple[str, str]]
) -> None:
    quote = {"single": _sh_quote_single, "double": _sh_quote_double, "bare": _sh_quote_bare}
    lines = [f"V{i}={quote[style](value)}" for i, (value, style) in enumerate(items)]
    path = tmp_path_factory.mktemp("sh") / "vars.env"
    path.write_text("\n".join(lines) + "\n")
    names = [f"V{i}" for i in range(len(items))]
    script = '. "$1"; shift; for n in "$@"; do eval "printf \'%s\\0\' \\"\\$$n\\""; done'
    shell = subprocess.run(
        ["sh", "-c", script, "sh", str(path), *names],
        capture_output=True,
        check=True,
        timeout=10,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
    )
    from_shell = shell.stdout.decode().split("\0")[:-1]
    ours = parse_sh_assignments(path.read_text())
    assert [ours[name] for name in names] == from_shell == [value for value, _ in items]
