"""The flannel CNI plugin's pure parts: netconf, subnet.env, delegate JSON (spec §9.2).

Expected documents are flannel-io/cni-plugin's own test expectations
(``flannel_linux_test.go``) plus the §9.2 golden; a fake delegate (a small shell
script on a temporary CNI_PATH) covers the process plumbing without root.
"""

from __future__ import annotations

import io
import json
import stat
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loden.cni.delegate import build_delegate, delegate_ipam
from loden.cni.netconf import DEFAULT_DATA_DIR, DEFAULT_SUBNET_FILE, marshal, parse_netconf
from loden.cni.plugin import Outcome, Request, decode_request, handle
from loden.cni.subnet_env import FlannelSubnetEnv, parse_subnet_env
from loden.cni.types import CniFailure, version_reply
from loden.errors import NetworkConfigError, ParseError

V4 = (
    "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.17.1/24\n"
    "FLANNEL_MTU=1472\nFLANNEL_IPMASQ=true\n"
)
V6 = (
    "FLANNEL_IPV6_NETWORK=fc00::/48\nFLANNEL_IPV6_SUBNET=fc00::1/64\n"
    "FLANNEL_MTU=1472\nFLANNEL_IPMASQ=true\n"
)
DUAL = (
    "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.17.1/24\n"
    "FLANNEL_IPV6_NETWORK=fc00::/48\nFLANNEL_IPV6_SUBNET=fc00::1/64\n"
    "FLANNEL_MTU=1472\nFLANNEL_IPMASQ=true\n"
)
V4_TWO = (
    "FLANNEL_NETWORK=10.1.0.0/16,192.168.0.0/16\nFLANNEL_SUBNET=10.1.17.1/24\n"
    "FLANNEL_MTU=1472\nFLANNEL_IPMASQ=true\n"
)
INPUT_ROUTES = [{"dst": "10.96.0.0/12"}, {"dst": "192.168.244.0/24", "gw": "10.1.17.20"}]


def conf_json(**extra: Any) -> str:
    return json.dumps({"name": "cni-flannel", "type": "flannel", **extra})


def delegate_for(env_text: str, **extra: Any) -> dict[str, Any]:
    env = parse_subnet_env(env_text, "/run/flannel/subnet.env")
    delegate = build_delegate(parse_netconf(conf_json(**extra)), env)
    # What is saved and sent is the marshalled form: compare that, parsed back.
    parsed = json.loads(marshal(delegate))
    assert isinstance(parsed, dict)
    return parsed


def expected(ranges: list[list[dict[str, str]]], routes: list[dict[str, str]]) -> dict[str, Any]:
    return {
        "ipMasq": False,
        "ipam": {"routes": routes, "ranges": ranges, "type": "host-local"},
        "isGateway": True,
        "mtu": 1472,
        "name": "cni-flannel",
        "type": "bridge",
    }


def test_spec_golden_byte_exact() -> None:
    env = parse_subnet_env(
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\n"
        "FLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
        "subnet.env",
    )
    conf = parse_netconf(
        '{"name":"cbr0","cniVersion":"0.3.1","type":"flannel",'
        '"delegate":{"hairpinMode":true,"isDefaultGateway":true}}'
    )
    assert marshal(build_delegate(conf, env)) == (
        b'{"cniVersion":"0.3.1","name":"cbr0","type":"bridge","hairpinMode":true,'
        b'"isDefaultGateway":true,"isGateway":true,"ipMasq":false,"mtu":1450,'
        b'"ipam":{"type":"host-local","ranges":[[{"subnet":"10.244.1.0/24"}]],'
        b'"routes":[{"dst":"10.244.0.0/16"}]}}'
    )


def test_ipv4() -> None:
    assert delegate_for(V4) == expected([[{"subnet": "10.1.17.0/24"}]], [{"dst": "10.1.0.0/16"}])


def test_ipv4_two_networks() -> None:
    assert delegate_for(V4_TWO) == expected(
        [[{"subnet": "10.1.17.0/24"}]], [{"dst": "10.1.0.0/16"}, {"dst": "192.168.0.0/16"}]
    )


def test_ipv6_only() -> None:
    assert delegate_for(V6) == expected([[{"subnet": "fc00::/64"}]], [{"dst": "fc00::/48"}])


def test_dual_stack() -> None:
    assert delegate_for(DUAL) == expected(
        [[{"subnet": "10.1.17.0/24"}], [{"subnet": "fc00::/64"}]],
        [{"dst": "10.1.0.0/16"}, {"dst": "fc00::/48"}],
    )


@pytest.mark.parametrize("env_text", [V4, V6, DUAL])
def test_ipam_merge_keeps_input_routes_first_and_unknown_keys(env_text: str) -> None:
    env = parse_subnet_env(env_text, "subnet.env")
    ipam_in = {"type": "my-ipam", "unknown-param": "unknown-value", "routes": INPUT_ROUTES}
    ipam = json.loads(marshal(delegate_ipam(parse_netconf(conf_json(ipam=ipam_in)), env)))
    flannel_routes = [{"dst": str(n)} for n in (*env.networks, *env.ipv6_networks)]
    ranges = [[{"subnet": str(s)}] for s in (env.subnet, env.ipv6_subnet) if s is not None]
    assert ipam == {
        "type": "my-ipam",
        "unknown-param": "unknown-value",
        "routes": INPUT_ROUTES + flannel_routes,
        "ranges": ranges,
    }
    assert list(ipam)[0] == "type"


def test_ipam_type_defaults_to_host_local() -> None:
    env = parse_subnet_env(V4, "subnet.env")
    ipam = delegate_ipam(parse_netconf(conf_json(ipam={"routes": INPUT_ROUTES})), env)
    assert ipam["type"] == "host-local"
    assert ipam["routes"] == [*INPUT_ROUTES, {"dst": "10.1.0.0/16"}]


def test_ipam_input_ranges_are_replaced_and_routes_normalised() -> None:
    env = parse_subnet_env(V4, "subnet.env")
    routes = [{"DST": "10.96.0.1/12", "gw": "", "mtu": 0, "table": 0, "junk": 1}]
    ipam = delegate_ipam(
        parse_netconf(conf_json(ipam={"ranges": [[{"subnet": "1.2.3.0/24"}]], "routes": routes})),
        env,
    )
    assert ipam["ranges"] == [[{"subnet": "10.1.17.0/24"}]]
    # Like Go's types.Route: host bits kept, empty gw / zero mtu dropped, table kept.
    assert ipam["routes"][0] == {"dst": "10.96.0.1/12", "table": 0}


@pytest.mark.parametrize(
    "routes", ["10.0.0.0/8", [{"gw": "10.0.0.1"}], [{"dst": "10.0.0.0"}], [{"dst": "x", "gw": 1}]]
)
def test_bad_ipam_routes(routes: Any) -> None:
    env = parse_subnet_env(V4, "subnet.env")
    with pytest.raises(NetworkConfigError, match="failed to assemble Delegate IPAM"):
        build_delegate(parse_netconf(conf_json(ipam={"routes": routes})), env)


@pytest.mark.parametrize(
    ("delegate", "message"),
    [
        (
            {"name": "x"},
            "'delegate' dictionary must not have 'name' field, it'll be set by flannel",
        ),
        ({"ipam": {}}, "'delegate' dictionary must not have 'ipam' field, it'll be set by flannel"),
        ({"type": 1}, "'delegate' dictionary, if present, must have (string) 'type' field"),
        ({"type": None}, "'delegate' dictionary, if present, must have (string) 'type' field"),
    ],
)
def test_forbidden_delegate_fields(delegate: dict[str, Any], message: str) -> None:
    env = parse_subnet_env(V4, "subnet.env")
    with pytest.raises(NetworkConfigError) as info:
        build_delegate(parse_netconf(conf_json(delegate=delegate)), env)
    assert str(info.value) == message


def test_delegate_values_win_over_defaults() -> None:
    got = delegate_for(
        V4,
        cniVersion="1.0.0",
        delegate={"type": "ipvlan", "ipMasq": True, "mtu": 9000, "cniVersion": "0.3.1"},
        runtimeConfig={"portMappings": []},
    )
    assert got["cniVersion"] == "1.0.0"  # the netconf's version overrides the delegate's
    assert (got["type"], got["ipMasq"], got["mtu"]) == ("ipvlan", True, 9000)
    assert "isGateway" not in got  # only for bridge
    assert got["runtimeConfig"] == {"portMappings": []}


def test_bridge_keeps_explicit_is_gateway_and_ipmasq_false_when_flannel_does_not() -> None:
    env_text = V4.replace("FLANNEL_IPMASQ=true", "FLANNEL_IPMASQ=false")
    got = delegate_for(env_text, delegate={"isGateway": False})
    assert got["isGateway"] is False
    assert got["ipMasq"] is True


def test_netconf_defaults_and_go_key_matching() -> None:
    conf = parse_netconf(conf_json())
    assert (conf.subnet_file, conf.data_dir) == (DEFAULT_SUBNET_FILE, DEFAULT_DATA_DIR)
    assert conf.delegate is None and conf.ipam is None
    conf = parse_netconf(
        '{"name":"n","SUBNETFILE":"/a","subnetfile":"/b","DataDir":null,"Delegate":{"Type":1}}'
    )
    assert (conf.subnet_file, conf.data_dir) == ("/b", DEFAULT_DATA_DIR)
    assert conf.delegate == {"Type": 1}  # map keys stay case-sensitive


@pytest.mark.parametrize(
    "text",
    ['{"name":"n","subnetFile":1}', '{"name":"n","delegate":[]}', '{"name":"n","ipam":"x"}'],
)
def test_netconf_wrong_types(text: str) -> None:
    with pytest.raises(NetworkConfigError, match="cannot unmarshal"):
        parse_netconf(text)


# --------------------------------------------------------------------------------------
# subnet.env


def test_subnet_env_per_family() -> None:
    v4 = parse_subnet_env(V4, "f")
    assert [str(n) for n in v4.networks] == ["10.1.0.0/16"]
    assert str(v4.subnet) == "10.1.17.0/24"
    assert (v4.mtu, v4.ipmasq) == (1472, True)
    v6 = parse_subnet_env(V6, "f")
    assert [str(n) for n in v6.ipv6_networks] == ["fc00::/48"]
    assert str(v6.ipv6_subnet) == "fc00::/64"
    assert v6.subnet is None and v6.networks == ()


def test_subnet_env_missing_everything() -> None:
    with pytest.raises(ParseError) as info:
        parse_subnet_env("foo=bar", "/x/subnet.env")
    assert str(info.value) == (
        "/x/subnet.env is missing FLANNEL_NETWORK, FLANNEL_IPV6_NETWORK, FLANNEL_SUBNET, "
        "FLANNEL_IPV6_SUBNET, FLANNEL_MTU, FLANNEL_IPMASQ"
    )


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("FLANNEL_NETWORK=10.1.0.0", "invalid CIDR address: 10.1.0.0"),
        ("FLANNEL_NETWORK=10.1.0.0/16,", "invalid CIDR address: "),
        ("FLANNEL_SUBNET=10.1.17.1/33", "invalid CIDR address: 10.1.17.1/33"),
        ("FLANNEL_SUBNET='10.1.17.1/24'", "invalid CIDR address: '10.1.17.1/24'"),
        ("FLANNEL_IPV6_NETWORK=fc00::/129", "invalid CIDR address: fc00::/129"),
        ("FLANNEL_IPV6_SUBNET=fe80::1%eth0/64", "invalid CIDR address: fe80::1%eth0/64"),
        ("FLANNEL_MTU=1472 ", 'strconv.ParseUint: parsing "1472 ": invalid syntax'),
        ("FLANNEL_MTU=-1", 'strconv.ParseUint: parsing "-1": invalid syntax'),
        ("FLANNEL_MTU=4294967296", 'strconv.ParseUint: parsing "4294967296": value out of range'),
    ],
)
def test_subnet_env_parse_failures(line: str, message: str) -> None:
    with pytest.raises(ParseError) as info:
        parse_subnet_env(V4 + line + "\n", "f")
    assert str(info.value) == message


def test_subnet_env_details() -> None:
    env = parse_subnet_env(
        "FLANNEL_NETWORK=10.1.0.0/16,10.1.5.5/16,10.2.0.0/16\r\n"
        "FLANNEL_SUBNET=10.9.9.9/24\nFLANNEL_SUBNET=10.1.17.1/24\n"
        "FLANNEL_MTU=01472\nFLANNEL_IPMASQ=True\nexport FLANNEL_MTU=x\n",
        "f",
    )
    assert [str(n) for n in env.networks] == ["10.1.0.0/16", "10.2.0.0/16"]  # dedup
    assert str(env.subnet) == "10.1.17.0/24"  # the last line wins, network form
    assert env.mtu == 1472
    assert env.ipmasq is False  # only exactly "true" is true


# --------------------------------------------------------------------------------------
# Requests and the process plumbing (no root needed: a fake delegate).

BASE_ENV = {
    "CNI_COMMAND": "ADD",
    "CNI_CONTAINERID": "ctr-1",
    "CNI_NETNS": "/var/run/netns/none",
    "CNI_IFNAME": "eth0",
    "CNI_PATH": "/nonexistent",
}


def failure(environ: dict[str, str], stdin: bytes) -> CniFailure:
    result = decode_request(environ, lambda: stdin)
    assert isinstance(result, CniFailure), result
    return result


def test_request_env_checks() -> None:
    assert decode_request({}, lambda: b"") is None  # prints "about", exits 0
    env = {k: v for k, v in BASE_ENV.items() if k not in ("CNI_NETNS", "CNI_PATH")}
    got = failure(env, b"{}")
    assert (got.code, got.msg) == (4, "required env variables [CNI_NETNS,CNI_PATH] missing")
    assert failure({**BASE_ENV, "CNI_COMMAND": "NOPE"}, conf_json().encode()).code == 4
    assert failure({**BASE_ENV, "CNI_CONTAINERID": "../x"}, conf_json().encode()).code == 4
    assert failure({**BASE_ENV, "CNI_IFNAME": "a" * 16}, conf_json().encode()).code == 4
    del_env = {**BASE_ENV, "CNI_COMMAND": "DEL"}
    del del_env["CNI_NETNS"]
    assert isinstance(decode_request(del_env, lambda: conf_json().encode()), Request)


def test_request_config_checks() -> None:
    assert failure(BASE_ENV, b"{not json").code == 6
    assert failure(BASE_ENV, b'{"type":"flannel"}').msg == "missing network name"
    assert failure(BASE_ENV, b'{"name":"a b"}').code == 7
    bad_version = failure(BASE_ENV, conf_json(cniVersion="9.9.9").encode())
    assert (bad_version.code, bad_version.msg) == (1, "incompatible CNI versions")
    check = {**BASE_ENV, "CNI_COMMAND": "CHECK"}
    assert failure(check, conf_json(cniVersion="0.3.1").encode()).code == 1
    assert isinstance(
        decode_request(check, lambda: conf_json(cniVersion="1.0.0").encode()), Request
    )
    assert failure(BASE_ENV, conf_json(subnetFile=5).encode()).code == 7
    deep = b'{"name":"n","delegate":' + b'{"a":[' * 5000 + b"1" + b"]}" * 5000 + b"}"
    assert failure(BASE_ENV, deep).code == 6


def test_version_never_reads_stdin() -> None:
    def explode() -> bytes:
        raise AssertionError("stdin read")

    request = decode_request({"CNI_COMMAND": "VERSION"}, explode)
    assert isinstance(request, Request) and request.command == "VERSION"
    assert json.loads(version_reply()) == {
        "cniVersion": "1.1.0",
        "supportedVersions": ["0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"],
    }


def test_network_wide_commands_need_no_container() -> None:
    env = {"CNI_COMMAND": "GC", "CNI_PATH": "/x"}
    assert isinstance(decode_request(env, lambda: conf_json(cniVersion="1.1.0").encode()), Request)
    assert failure(env, conf_json(cniVersion="1.0.0").encode()).code == 1
    env = {"CNI_COMMAND": "STATUS"}
    assert isinstance(decode_request(env, lambda: conf_json(cniVersion="1.1.0").encode()), Request)


def test_status_reports_whether_subnet_env_is_usable(tmp_path: Path) -> None:
    subnet = tmp_path / "subnet.env"
    stdin = conf_json(cniVersion="1.1.0", subnetFile=str(subnet)).encode()
    outcome, _ = run_handle({"CNI_COMMAND": "STATUS"}, stdin)
    reply = json.loads(outcome.stdout)
    assert (outcome.exit_code, reply["code"]) == (1, 50)
    assert "no such file or directory" in reply["msg"]
    subnet.write_text(V4)
    assert run_handle({"CNI_COMMAND": "STATUS"}, stdin)[0] == Outcome(0)


@settings(max_examples=500, deadline=None)
@given(
    st.sampled_from(["ADD", "DEL", "CHECK", "GC", "STATUS", "VERSION", "", "X"]),
    st.one_of(st.binary(), st.text().map(str.encode)),
)
def test_request_decoding_never_raises(command: str, stdin: bytes) -> None:
    result = decode_request({**BASE_ENV, "CNI_COMMAND": command}, lambda: stdin)
    assert result is None or isinstance(result, Request | CniFailure)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=12,
)
_KEYS = st.sampled_from(["name", "type", "delegate", "ipam", "routes", "dst", "gw", "mtu", "x"])


@settings(max_examples=500, deadline=None)
@given(st.dictionaries(_KEYS, _JSON), st.dictionaries(_KEYS, _JSON))
def test_delegate_construction_only_raises_parse_errors(
    delegate: dict[str, Any], ipam: dict[str, Any]
) -> None:
    env = FlannelSubnetEnv(
        networks=parse_subnet_env(V4, "f").networks,
        subnet=parse_subnet_env(V4, "f").subnet,
        mtu=1450,
        ipmasq=True,
    )
    try:
        conf = parse_netconf(json.dumps({"name": "n", "delegate": delegate, "ipam": ipam}))
        marshal(build_delegate(conf, env))
    except ParseError:
        pass


def run_handle(environ: dict[str, str], stdin: bytes) -> tuple[Outcome, str]:
    err = io.StringIO()
    outcome = handle(environ, lambda: stdin, err)
    return outcome, err.getvalue()


def test_add_without_subnet_env_is_try_again_later(tmp_path: Path) -> None:
    missing = tmp_path / "subnet.env"
    stdin = conf_json(cniVersion="0.3.1", subnetFile=str(missing), dataDir=str(tmp_path)).encode()
    outcome, _ = run_handle(BASE_ENV, stdin)
    assert outcome.exit_code == 1
    reply = json.loads(outcome.stdout)
    assert reply == {
        "cniVersion": "0.3.1",
        "code": 11,
        "msg": f"failed to load flannel 'subnet.env' file: open {missing}: no such file or "
        "directory. Check the flannel pod log for this node.",
        "details": "",
    }


@pytest.fixture
def fake_cni(tmp_path: Path) -> dict[str, Any]:
    """A CNI_PATH with a fake 'bridge' that logs its input and env and answers."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    script = bin_dir / "bridge"
    script.write_text(
        "#!/bin/sh\n"
        f'printf "%s %s\\n" "$CNI_COMMAND" "$(cat)" >> {log}\n'
        'if [ -n "$FAKE_FAIL" ]; then echo \'{"code":7,"msg":"nope","details":"d"}\'; '
        "exit 1; fi\n"
        'if [ "$CNI_COMMAND" = ADD ]; then echo \'{"cniVersion":"0.3.1","ips":[]}\'; fi\n'
    )
    script.chmod(0o755)
    subnet = tmp_path / "subnet.env"
    subnet.write_text(V4)
    data_dir = tmp_path / "data"
    env = {**BASE_ENV, "CNI_PATH": f"/nonexistent:{bin_dir}", "PATH": "/usr/bin:/bin"}
    stdin = conf_json(cniVersion="0.3.1", subnetFile=str(subnet), dataDir=str(data_dir))
    return {"env": env, "stdin": stdin.encode(), "log": log, "data": data_dir}


def test_add_and_del_through_a_fake_delegate(fake_cni: dict[str, Any]) -> None:
    env, stdin, log, data = fake_cni["env"], fake_cni["stdin"], fake_cni["log"], fake_cni["data"]
    outcome, err = run_handle(env, stdin)
    assert outcome == Outcome(0, b'{"cniVersion":"0.3.1","ips":[]}\n')
    saved = data / "ctr-1"
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    assert [p.name for p in data.iterdir()] == ["ctr-1"]
    assert log.read_text() == f"ADD {saved.read_text()}\n"
    assert "delegateAdd: netconf sent to delegate plugin:" in err

    outcome, _ = run_handle({**env, "CNI_COMMAND": "DEL"}, stdin)
    assert outcome == Outcome(0)
    assert not saved.exists()
    assert log.read_text().splitlines()[-1].startswith("DEL {")
    assert run_handle({**env, "CNI_COMMAND": "DEL"}, stdin)[0] == Outcome(0)


def test_delegate_error_is_passed_through_and_del_keeps_the_file(
    fake_cni: dict[str, Any],
) -> None:
    env, stdin, data = fake_cni["env"], fake_cni["stdin"], fake_cni["data"]
    assert run_handle(env, stdin)[0].exit_code == 0
    outcome, _ = run_handle({**env, "CNI_COMMAND": "DEL", "FAKE_FAIL": "1"}, stdin)
    assert outcome.exit_code == 1
    assert json.loads(outcome.stdout) == {
        "cniVersion": "0.3.1",
        "code": 7,
        "msg": "nope",
        "details": "d",
    }
    assert (data / "ctr-1").exists()  # kept for the runtime's retry


def test_del_with_unparseable_saved_file_succeeds(fake_cni: dict[str, Any]) -> None:
    data = fake_cni["data"]
    data.mkdir()
    (data / "ctr-1").write_text("{garbage")
    outcome, err = run_handle({**fake_cni["env"], "CNI_COMMAND": "DEL"}, fake_cni["stdin"])
    assert outcome == Outcome(0)
    assert "failed to parse netconf" in err
    assert not (data / "ctr-1").exists()


def test_missing_delegate_binary(fake_cni: dict[str, Any]) -> None:
    env = {**fake_cni["env"], "CNI_PATH": "/nonexistent"}
    outcome, _ = run_handle(env, fake_cni["stdin"])
    reply = json.loads(outcome.stdout)
    assert (outcome.exit_code, reply["code"]) == (1, 999)
    assert reply["msg"] == 'failed to find plugin "bridge" in path [/nonexistent]'
