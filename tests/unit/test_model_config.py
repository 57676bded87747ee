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
