"""The network config (``<prefix>/config`` or net-conf.json) as a frozen value.

Parsing follows Go ``encoding/json`` (see :mod:`loden.model.gojson`); defaults and
validation follow flannel's ``CheckNetworkConfig`` (spec §2.2), with messages that
keep flannel's wording and add the field, the value and what to do. Missing
``Backend`` means ``udp`` (flannel's code, not its docs: spec §11 item 1).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

from loden.errors import NetworkConfigError
from loden.model.backend_options import BackendOptions, parse_backend_options
from loden.model.families import check_families
from loden.model.gojson import GoJSONError, GoObject, as_bool, as_str, as_uint
from loden.model.net import subnet_count

DEFAULT_BACKEND = "udp"


@dataclass(frozen=True, slots=True)
class BackendSpec:
    """``Backend`` object: its lower-cased ``Type`` and the options, Go-JSON style."""

    type: str
    options: GoObject | None = field(default=None, compare=False, repr=False)
    raw: str = "{}"

    def typed(self) -> BackendOptions:
        """The options of this backend type, typed.

        :raises NetworkConfigError: an option has the wrong type or value.
        """
        return parse_backend_options(self.type, self.options)

    def option(self, name: str, kind: Any, default: Any) -> Any:
        """Option ``name`` (case-insensitive) converted by a ``gojson.as_*`` function.

        :raises NetworkConfigError: the option has the wrong JSON type.
        """
        if self.options is None:
            return default
        try:
            return self.options.get(name, kind, default)
        except GoJSONError as exc:
            raise NetworkConfigError(
                f"invalid Backend.{name}: {exc}", field=f"Backend.{name}"
            ) from exc


@dataclass(frozen=True, slots=True)
class NetworkConfig:
    """A parsed (and, for the etcd store, validated and defaulted) network config."""

    network: IPv4Network | None
    subnet_len: int
    subnet_min: IPv4Address | None
    subnet_max: IPv4Address | None
    enable_ipv4: bool
    enable_ipv6: bool
    ipv6_network: IPv6Network | None
    ipv6_subnet_len: int
    ipv6_subnet_min: IPv6Address | None
    ipv6_subnet_max: IPv6Address | None
    enable_nftables: bool
    backend: BackendSpec
    raw: str = field(default="", compare=False, repr=False)

    @property
    def backend_type(self) -> str:
        return self.backend.type

    @classmethod
    def parse(cls, text: str | bytes, *, validate: bool = True) -> NetworkConfig:
        """Parse config JSON; with ``validate`` (etcd mode) also apply defaults/checks.

        :raises NetworkConfigError: not a JSON object, a field of the wrong type, or a
            value that breaks one of flannel's rules.
        """
        raw = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
        try:
            obj = GoObject.parse(text)
            config = cls._from_object(obj, raw)
        except GoJSONError as exc:
            raise NetworkConfigError(
                f"network config is not valid: {exc}", field=exc.field
            ) from exc
        return config.validated() if validate else config

    @classmethod
    def _from_object(cls, obj: GoObject, raw: str) -> NetworkConfig:
        backend_obj = GoObject.from_value(
            obj.raw("Backend") if obj.has("Backend") else None, field="Backend"
        )
        if backend_obj is None or not backend_obj.keys():
            backend = BackendSpec(type=DEFAULT_BACKEND, options=backend_obj)
        else:
            backend = BackendSpec(
                type=backend_obj.get("Type", as_str, "").lower(),
                options=backend_obj,
                raw=_dump(backend_obj.to_plain()),
            )
        return cls(
            network=_v4_net(obj, "Network"),
            subnet_len=obj.get("SubnetLen", as_uint, 0),
            subnet_min=_v4_addr(obj, "SubnetMin"),
            subnet_max=_v4_addr(obj, "SubnetMax"),
            enable_ipv4=obj.get("EnableIPv4", as_bool, True),
            enable_ipv6=obj.get("EnableIPv6", as_bool, False),
            ipv6_network=_v6_net(obj, "IPv6Network"),
            ipv6_subnet_len=obj.get("IPv6SubnetLen", as_uint, 0),
            ipv6_subnet_min=_v6_addr(obj, "IPv6SubnetMin"),
            ipv6_subnet_max=_v6_addr(obj, "IPv6SubnetMax"),
            enable_nftables=obj.get("EnableNFTables", as_bool, False),
            backend=backend,
            raw=raw,
        )

    def validated(self) -> NetworkConfig:
        """Apply flannel's defaults and checks (``CheckNetworkConfig``)."""
        if not self.enable_ipv4 and not self.enable_ipv6:
            raise NetworkConfigError(
                "neither EnableIPv4 nor EnableIPv6 is true: enable at least one family",
                field="EnableIPv4",
            )
        config = self
        if self.enable_ipv4:
            config = config._validated_v4()
        if self.enable_ipv6:
            config = config._validated_v6()
        self.backend.typed()  # the backend's options too, as its backend will read them
        check_families(
            self.backend.type, enable_ipv4=self.enable_ipv4, enable_ipv6=self.enable_ipv6
        )
        return config

    def _validated_v4(self) -> NetworkConfig:
        net = self.network
        if net is None or net.prefixlen == 0:
            raise NetworkConfigError(
                "please define a correct Network parameter in the flannel config "
                f'(got {self.network}); e.g. "Network": "10.244.0.0/16"',
                field="Network",
                value=str(self.network) if self.network else None,
            )
        min_, max_, length = _ranges(
            net.prefixlen,
            int(net.network_address),
            self.subnet_len,
            int(self.subnet_min) if self.subnet_min else None,
            int(self.subnet_max) if self.subnet_max else None,
            bits=32,
            family="",
            net_text=str(net),
        )
        return _replace(
            self, subnet_len=length, subnet_min=IPv4Address(min_), subnet_max=IPv4Address(max_)
        )

    def _validated_v6(self) -> NetworkConfig:
        net = self.ipv6_network
        if net is None or net.prefixlen == 0:
            raise NetworkConfigError(
                "please define a correct IPv6Network parameter in the flannel config "
                f"(got {self.ipv6_network})",
                field="IPv6Network",
            )
        min_, max_, length = _ranges(
            net.prefixlen,
            int(net.network_address),
            self.ipv6_subnet_len,
            int(self.ipv6_subnet_min) if self.ipv6_subnet_min else None,
            int(self.ipv6_subnet_max) if self.ipv6_subnet_max else None,
            bits=128,
            family="IPv6",
            net_text=str(net),
        )
        return _replace(
            self,
            ipv6_subnet_len=length,
            ipv6_subnet_min=IPv6Address(min_),
            ipv6_subnet_max=IPv6Address(max_),
        )

    def subnet_capacity(self) -> int:
        """How many IPv4 node subnets fit between SubnetMin and SubnetMax."""
        if self.subnet_min is None or self.subnet_max is None:
            return 0
        return subnet_count(int(self.subnet_min), int(self.subnet_max), self.subnet_len)

    def contains_v4(self, subnet: IPv4Network) -> bool:
        """Is ``subnet`` one this config could hand out (flannel's compatibility test)?"""
        if self.subnet_min is None or self.subnet_max is None:
            return False
        return (
            subnet.prefixlen == self.subnet_len
            and self.subnet_min <= subnet.network_address <= self.subnet_max
        )

    def contains_v6(self, subnet: IPv6Network | None) -> bool:
        if not self.enable_ipv6:
            return subnet is None
        if subnet is None or self.ipv6_subnet_min is None or self.ipv6_subnet_max is None:
            return False
        return (
            subnet.prefixlen == self.ipv6_subnet_len
            and self.ipv6_subnet_min <= subnet.network_address <= self.ipv6_subnet_max
        )


def _ranges(
    prefix: int,
    base: int,
    length: int,
    min_: int | None,
    max_: int | None,
    *,
    bits: int,
    family: str,
    net_text: str,
) -> tuple[int, int, int]:
    name = f"{family}SubnetLen"
    limit = 30 if bits == 32 else 126
    netname = "Network" if bits == 32 else "IPv6Network"
    if length > 0:
        if length > limit:
            raise NetworkConfigError(
                f"SubnetLen must be less than /{limit + 1} ({name} is {length})",
                field=name,
                value=length,
            )
        if length < prefix + 2:
            raise NetworkConfigError(
                f"network must be able to accommodate at least four subnets ({name} {length} "
                f"with {netname} {net_text}: use a {name} of at least {prefix + 2})",
                field=name,
                value=length,
            )
    else:
        smallest = 28 if bits == 32 else 124
        if prefix > smallest:
            prefix_name = "network" if bits == 32 else "IPv6Network"
            raise NetworkConfigError(
                f"{prefix_name} is too small. Minimum useful network prefix is /{smallest} "
                f"({netname} is {net_text})",
                field=netname,
                value=net_text,
            )
        default_len = 24 if bits == 32 else 64
        length = default_len if prefix <= default_len - 2 else prefix + 2
    size = 1 << (bits - length)
    end = base + (1 << (bits - prefix))

    def fmt(value: int) -> str:
        return str(IPv4Address(value) if bits == 32 else IPv6Address(value))

    if min_ is None:
        min_ = base + size
    elif not base <= min_ < end:
        raise NetworkConfigError(
            f"{family}SubnetMin is not in the range of the {netname} "
            f"({fmt(min_)} is outside {net_text})",
            field=f"{family}SubnetMin",
            value=fmt(min_),
        )
    if max_ is None:
        max_ = end - size
    elif not base <= max_ < end:
        raise NetworkConfigError(
            f"{family}SubnetMax is not in the range of the {netname} "
            f"({fmt(max_)} is outside {net_text})",
            field=f"{family}SubnetMax",
            value=fmt(max_),
        )
    if min_ % size:
        raise NetworkConfigError(
            f"{family}SubnetMin is not on a SubnetLen boundary: {fmt(min_)}",
            field=f"{family}SubnetMin",
            value=fmt(min_),
        )
    if max_ % size:
        raise NetworkConfigError(
            f"{family}SubnetMax is not on a SubnetLen boundary: {fmt(max_)}",
            field=f"{family}SubnetMax",
            value=fmt(max_),
        )
    return min_, max_, length


def _replace(config: NetworkConfig, **changes: Any) -> NetworkConfig:
    return dataclasses.replace(config, **changes)


def _dump(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _v4_net(obj: GoObject, name: str) -> IPv4Network | None:
    text = obj.get(name, as_str, "")
    if not text:
        return None
    try:
        net = IPv4Network(text, strict=False)
    except ValueError as exc:
        raise GoJSONError(f"{name}: invalid IPv4 CIDR format {text!r} ({exc})", field=name) from exc
    return net


def _v6_net(obj: GoObject, name: str) -> IPv6Network | None:
    text = obj.get(name, as_str, "")
    if not text:
        return None
    try:
        return IPv6Network(text, strict=False)
    except ValueError as exc:
        raise GoJSONError(f"{name}: invalid IPv6 CIDR format {text!r} ({exc})", field=name) from exc


def _v4_addr(obj: GoObject, name: str) -> IPv4Address | None:
    text = obj.get(name, as_str, "")
    if not text:
        return None
    try:
        addr = IPv4Address(text)
    except ValueError as exc:
        raise GoJSONError(f"{name}: invalid IPv4 address {text!r} ({exc})", field=name) from exc
    return None if int(addr) == 0 else addr


def _v6_addr(obj: GoObject, name: str) -> IPv6Address | None:
    text = obj.get(name, as_str, "")
    if not text:
        return None
    try:
        addr = IPv6Address(text)
    except ValueError as exc:
        raise GoJSONError(f"{name}: invalid IPv6 address {text!r} ({exc})", field=name) from exc
    return None if int(addr) == 0 else addr


__all__ = ["DEFAULT_BACKEND", "BackendSpec", "NetworkConfig"]
