"""aws-vpc: Backend option forms and errors, lease bytes (cloud-backends spec §2.1, §1)."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from loden.backend.aws_vpc import route_tag
from loden.errors import NetworkConfigError
from loden.model.backend_options import AwsVpcOptions
from loden.model.config import NetworkConfig
from loden.model.lease import LeaseAttrs


def options(backend: str) -> AwsVpcOptions:
    cfg = NetworkConfig.parse(f'{{"Network":"10.20.0.0/16","Backend":{backend}}}')
    typed = cfg.backend.typed()
    assert isinstance(typed, AwsVpcOptions)
    return typed


@pytest.mark.parametrize(
    ("backend", "tables"),
    [
        ('{"Type":"aws-vpc"}', None),
        ('{"Type":"AWS-VPC","RouteTableID":null}', None),
        ('{"Type":"aws-vpc","RouteTableID":"rtb-1"}', ("rtb-1",)),
        ('{"Type":"aws-vpc","routetableid":"rtb-1"}', ("rtb-1",)),
        ('{"Type":"aws-vpc","RouteTableID":["rtb-1","rtb-2"]}', ("rtb-1", "rtb-2")),
        ('{"Type":"aws-vpc","RouteTableID":[]}', ()),
    ],
)
def test_route_table_forms(backend: str, tables: tuple[str, ...] | None) -> None:
    assert options(backend).route_table_ids == tables


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("42", "Unexpected RouteTableID type. Must be string or array of strings."),
        ('{"a":1}', "Unexpected RouteTableID type. Must be string or array of strings."),
        ('["rtb-1", 7]', "Unexpected type in RouteTableID slice. Must be strings."),
    ],
)
def test_route_table_errors(value: str, message: str) -> None:
    with pytest.raises(NetworkConfigError) as info:
        options(f'{{"Type":"aws-vpc","RouteTableID":{value}}}')
    assert str(info.value).startswith(message)
    assert info.value.field == "Backend.RouteTableID"
    assert "e.g." in str(info.value)


def test_lease_bytes_are_flannels() -> None:
    attrs = LeaseAttrs(public_ip=IPv4Address("10.0.1.11"))
    assert attrs.to_json(legacy=True) == '{"PublicIP":"10.0.1.11"}'
    # etcd v3 era (flannel >= v0.15 writes PublicIPv6 there; no BackendType either way)
    assert attrs.to_json() == '{"PublicIP":"10.0.1.11","PublicIPv6":null}'


def test_route_tag_names_the_cidr() -> None:
    assert route_tag("10.20.5.0/24") == "loden.io/route/10.20.5.0/24"
