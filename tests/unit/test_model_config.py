"""Network config: Go-JSON parsing, flannel's defaults and every validation error."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loden.errors import NetworkConfigError
from loden.model.config import NetworkConfig
from loden.model.gojson import as_int


def test_defaults_for_a_slash16() -> None:
    config = NetworkConfig.parse('{"network":"10.3.0.0/16"}')
    assert config.network == IPv4Network("10.3.0.0/16")
    assert config.subnet_len == 24
    assert config.subnet_min == IPv4Address("10.3.1.0")
    assert config.subnet_max == IPv4Address("10.3.255.0")
    assert config.backend_type == "udp"  # flannel's code default, not its docs
    assert config.enable_ipv4 and not config.enable_ipv6 and not config.enable_nftables
    assert config.subnet_capacity() == 255


def test_ipv6_only_defaults() -> None:
    config = NetworkConfig.parse(
        '{"enableIPv6":true,"ipv6Network":"fc00::/48","enableIPv4":false,'
        '"Backend":{"Type":"wireguard"}}'
    )
    assert config.ipv6_subnet_len == 64
    assert config.ipv6_subnet_min == IPv6Address("fc00:0:0:1::")
    assert config.ipv6_subnet_max == IPv6Address("fc00:0:0:ffff::")


@pytest.mark.parametrize(
    ("network", "length"),
    [("10.0.0.0/23", 25), ("10.0.0.0/28", 30), ("10.0.0.0/22", 24), ("10.0.0.0/8", 24)],
)
def test_subnet_len_derivation(network: str, length: int) -> None:
    assert NetworkConfig.parse(f'{{"Network":"{network}"}}').subnet_len == length


def test_explicit_values_and_host_bits_masked() -> None:
    config = NetworkConfig.parse(
        '{"Network": "10.1.2.3/16", "SubnetLen": 28, '
        '"SubnetMin": "10.1.5.0", "SubnetMax": "10.1.6.0"}'
    )
    assert config.network == IPv4Network("10.1.0.0/16")
    assert (config.subnet_len, str(config.subnet_min), str(config.subnet_max)) == (
        28,
        "10.1.5.0",
        "10.1.6.0",
    )


def test_go_json_rules_case_insensitive_last_duplicate_wins_unknown_ignored() -> None:
    config = NetworkConfig.parse(
        '{"NETWORK":"10.1.0.0/16","network":"10.2.0.0/16",'
        '"Whatever":1,"backend":{"type":"VXLAN","vni":4}}'
    )
    assert config.network == IPv4Network("10.2.0.0/16")
    assert config.backend_type == "vxlan"
    assert config.backend.option("VNI", as_int, 1) == 4


def test_backend_without_type_is_the_empty_type() -> None:
    assert NetworkConfig.parse('{"Network":"10.1.0.0/16","Backend":{"Port":1}}').backend_type == ""
    assert NetworkConfig.parse('{"Network":"10.1.0.0/16","Backend":{}}').backend_type == "udp"


@pytest.mark.parametrize(
    ("text", "field", "fragment"),
    [
        ("{}", "Network", "please define a correct Network parameter"),
        ('{"Network":"0.0.0.0/0"}', "Network", "please define a correct Network parameter"),
        ('{"Network":"10.0.0.0/16","SubnetLen":31}', "SubnetLen", "less than /31"),
        ('{"Network":"10.0.0.0/16","SubnetLen":17}', "SubnetLen", "at least four subnets"),
        ('{"Network":"10.0.0.0/29"}', "Network", "Minimum useful network prefix is /28"),
        ('{"Network":"10.0.0.0/16","SubnetMin":"10.1.0.0"}', "SubnetMin", "not in the range"),
        ('{"Network":"10.0.0.0/16","SubnetMax":"11.0.0.0"}', "SubnetMax", "not in the range"),
        (
            '{"Network":"10.0.0.0/16","SubnetMin":"10.0.1.5"}',
            "SubnetMin",
            "not on a SubnetLen boundary: 10.0.1.5",
        ),
        (
            '{"Network":"10.0.0.0/16","SubnetMax":"10.0.9.1"}',
            "SubnetMax",
            "not on a SubnetLen boundary: 10.0.9.1",
        ),
        ('{"EnableIPv4":false}', "EnableIPv4", "enable at least one family"),
        ('{"EnableIPv4":false,"EnableIPv6":true}', "IPv6Network", "correct IPv6Network"),
        (
            '{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fc00::/126"}',
            "IPv6Network",
            "Minimum useful network prefix is /124",
        ),
        (
            '{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fc00::/48","IPv6SubnetLen":127}',
            "IPv6SubnetLen",
            "less than /127",
        ),
        ('{"Network":"10.0.0.0/16x"}', "Network", "invalid IPv4 CIDR"),
        ('{"Network":"fc00::/16"}', "Network", "invalid IPv4 CIDR"),
        ('{"Network":16}', "Network", "expected a string"),
        ('{"Network":"10.0.0.0/16","SubnetLen":"24"}', "SubnetLen", "expected a number"),
        ('{"Network":"10.0.0.0/16","SubnetLen":-1}', "SubnetLen", "non-negative"),
        ('{"Network":"10.0.0.0/16","EnableIPv4":"yes"}', "EnableIPv4", "true or false"),
        ('{"Network":"10.0.0.0/16","Backend":"vxlan"}', "Backend", "expected a JSON object"),
        ('{"Network":"10.0.0.0/16","Backend":{"Type":7}}', "Type", "expected a string"),
    ],
)
def test_validation_errors_name_field_and_rule(text: str, field: str, fragment: str) -> None:
    with pytest.raises(NetworkConfigError) as info:
        NetworkConfig.parse(text)
    assert fragment in str(info.value)
    assert info.value.field == field


@pytest.mark.parametrize(
    "text",
    # The last two: numbers Python cannot convert (over 4300 digits; beyond float64).
    [
        "",
        "[]",
        "null",
        "{",
        '"x"',
        '{"a":NaN}',
        "\xff",
        '{"SubnetLen":1' + "0" * 5000 + "}",
        "1e999",
    ],
)
def test_not_a_json_object(text: str) -> None:
    with pytest.raises(NetworkConfigError, match="network config is not valid"):
        NetworkConfig.parse(text)


def test_kube_mode_parses_without_validation() -> None:
    config = NetworkConfig.parse('{"Network":"10.0.0.0/29"}', validate=False)
    assert config.subnet_len == 0


@given(st.text(max_size=200))
def test_parser_raises_only_its_own_error(text: str) -> None:
    try:
        NetworkConfig.parse(text)
    except NetworkConfigError:
        pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)


@given(
    st.dictionaries(
        st.sampled_from(
            [
                "Network",
                "network",
                "SubnetLen",
                "SubnetMin",
                "SubnetMax",
                "EnableIPv6",
                "IPv6Network",
                "Backend",
                "EnableIPv4",
                "IPv6SubnetLen",
            ]
        ),
        json_values,
        max_size=6,
    )
)
def test_structured_garbage_raises_only_its_own_error(obj: dict[str, object]) -> None:
    import json

    try:
        NetworkConfig.parse(json.dumps(obj))
    except NetworkConfigError:
        pass


_BACKEND_ERRORS = [
    ('{"Type":"vxlan","VNI":"x"}', "Backend.VNI", "error decoding VXLAN backend config"),
    ('{"Type":"vxlan","VNI":1.5}', "Backend.VNI", "error decoding VXLAN backend config"),
    ('{"Type":"vxlan","VNI":16777216}', "Backend.VNI", "out of range"),
    ('{"Type":"vxlan","Port":-1}', "Backend.Port", "is not a UDP port"),
    ('{"Type":"vxlan","Port":"8472"}', "Backend.Port", "expected a number"),
    ('{"Type":"vxlan","GBP":"yes"}', "Backend.GBP", "expected true or false"),
    ('{"Type":"vxlan","DirectRouting":1}', "Backend.DirectRouting", "expected true or false"),
    ('{"Type":"vxlan","Learning":null,"MTU":-5}', "Backend.MTU", "is negative"),
    ('{"Type":"vxlan","TxChecksumOffload":"on"}', "Backend.TxChecksumOffload", '"auto", true'),
    ('{"Type":"udp","Port":0}', "Backend.Port", "error decoding UDP backend config"),
    ('{"Type":"udp","Port":70000}', "Backend.Port", "1..65535 (default 8285)"),
    ('{"Type":"wireguard","ListenPort":"x"}', "Backend.ListenPort", "expected a number"),
    ('{"Type":"wireguard","ListenPortV6":0}', "Backend.ListenPortV6", "is not a UDP port"),
    ('{"Type":"wireguard","PSK":"c2VjcmV0"}', "Backend.PSK", "wg genpsk"),
    ('{"Type":"wireguard","PSK":7}', "Backend.PSK", "expected a string"),
    ('{"Type":"wireguard","Mode":"both"}', "Backend.Mode", "no valid Mode configured"),
    (
        '{"Type":"wireguard","PersistentKeepaliveInterval":-1}',
        "Backend.PersistentKeepaliveInterval",
        "out of range",
    ),
]


@pytest.mark.parametrize(("backend", "field", "fragment"), _BACKEND_ERRORS)
def test_backend_options_are_validated_with_the_config(
    backend: str, field: str, fragment: str
) -> None:
    """Go flanneld decodes the Backend options when its backend starts ("error decoding
    VXLAN backend config: ..."); Loden refuses them with the config, so `loden config
    validate`/`set` and the agent's config check see them."""
    with pytest.raises(NetworkConfigError) as caught:
        NetworkConfig.parse(f'{{"Network":"10.5.0.0/16","Backend":{backend}}}')
    assert caught.value.field == field
    assert fragment in str(caught.value)
    assert "c2VjcmV0" not in str(caught.value)  # a PSK is never echoed


@pytest.mark.parametrize(
    "backend",
    [
        '{"Type":"vxlan","VNI":4096,"Port":4789,"GBP":true,"Learning":false,"MTU":9000}',
        '{"Type":"vxlan","vni":0,"port":0,"directrouting":true,"TxChecksumOffload":false}',
        '{"Type":"vxlan","TxChecksumOffload":"auto"}',
        '{"Type":"udp","Port":8285}',
        '{"Type":"host-gw","Whatever":"ignored, as Go ignores unknown keys"}',
        '{"Type":"wireguard","ListenPort":51820,"PSK":"' + "A" * 43 + '=","Mode":"auto",'
        '"PersistentKeepaliveInterval":25}',
        '{"Type":"ipip","DirectRouting":"not checked: not a Loden backend"}',
    ],
)
def test_valid_backend_options_pass(backend: str) -> None:
    NetworkConfig.parse(f'{{"Network":"10.5.0.0/16","Backend":{backend}}}')


def test_config_validate_command_checks_backend_options(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from loden.tools import operator

    bad = '{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan","VNI":"x"}}'
    assert operator.main(["config", "validate", bad]) == 1
    err = capsys.readouterr().err
    assert "error decoding VXLAN backend config: Backend.VNI" in err
    good = '{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan","VNI":2}}'
    assert operator.main(["config", "validate", good]) == 0
