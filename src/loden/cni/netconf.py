"""Pure parts of the flannel CNI plugin: netconf, subnet.env, the delegate config.

Everything here follows ``flannel-io/cni-plugin`` (spec §9.2) closely enough that the
delegate JSON is the same document flannel would render:

* the netconf is decoded with Go ``encoding/json`` rules for a struct (keys match
  case-insensitively, the last match wins, ``null`` keeps the default, a value of the
  wrong JSON type is an error), while ``delegate``/``ipam``/``runtimeConfig`` are Go
  maps whose keys stay case-sensitive;
* ``subnet.env`` is read the plugin's way, which is much stricter than a shell: line
  by line, split at the first ``=``, no quotes, no ``export``;
* ``ipam.routes`` entries are re-encoded as the CNI library's ``types.Route`` (unknown
  keys dropped, ``dst`` keeps its host bits, zero ``mtu``/``advmss``/``priority``
  omitted) because flannel round-trips them through that type.

The only intentional difference is key order: Go sorts map keys when it marshals; we
emit ``cniVersion, name, type``, the caller's own delegate keys, the defaults flannel
adds, then ``ipam`` (``type``, other input keys, ``ranges``, ``routes``), which reads
like the documented examples. JSON consumers do not care about order.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

from loden.errors import NetworkConfigError, ParseError
from loden.model import gojson
from loden.model.gojson import GoObject, go_type_name

DEFAULT_SUBNET_FILE = "/run/flannel/subnet.env"
DEFAULT_DATA_DIR = "/var/lib/cni/flannel"

Network = IPv4Network | IPv6Network
JsonObject = dict[str, Any]

# --------------------------------------------------------------------------------------
# Go-like JSON decoding (loden.model.gojson), worded as Go's decoder words its errors.


def decode_json(data: bytes | str) -> Any:
    """Decode JSON text (objects kept as pairs: see :mod:`loden.model.gojson`).

    Invalid UTF-8 is replaced (Go does the same inside strings); ``NaN`` and
    ``Infinity`` are rejected as Go rejects them.

    :raises ParseError: the text is not JSON.
    """
    try:
        return gojson.decode(data, invalid_utf8="replace")
    except gojson.GoJSONSyntaxError as exc:
        where = f" at line {exc.line} column {exc.column}" if exc.line is not None else ""
        raise ParseError(f"{exc.reason}{where}") from exc


def _type_error(value: Any, struct: str, field: str, go_type: str) -> NetworkConfigError:
    return NetworkConfigError(
        f"json: cannot unmarshal {go_type_name(value)} into Go struct field "
        f"{struct}.{field} of type {go_type}",
        field=field,
        value=value,
    )


def _string_field(obj: GoObject, name: str, default: str, struct: str = "NetConf") -> str:
    value = obj.field(name)
    if value is None:
        return default
    if not isinstance(value, str):
        raise _type_error(value, struct, name, "string")
    return value


def _map_field(obj: GoObject, name: str, struct: str = "NetConf") -> JsonObject | None:
    value = obj.field(name)
    if value is None:
        return None
    if not gojson.is_object(value):
        raise _type_error(value, struct, name, "map[string]interface {}")
    try:
        result = gojson.map_plain(value)
    except RecursionError as exc:
        raise NetworkConfigError(f"{struct}.{name}: nested too deeply", field=name) from exc
    assert isinstance(result, dict)
    return result


def decode_object(data: bytes | str, what: str) -> GoObject:
    """Decode ``data`` and insist on a JSON object (``null`` counts as an empty one).

    :raises ParseError: not JSON, or JSON of another type.
    """
    value = decode_json(data)
    if value is None:
        return GoObject([])
    if not gojson.is_object(value):
        raise ParseError(
            f"json: cannot unmarshal {go_type_name(value)} into Go value of type {what}"
        )
    obj = GoObject.from_value(value, field=what)
    assert obj is not None
    return obj


# --------------------------------------------------------------------------------------
# The plugin's netconf.


@dataclass(frozen=True, slots=True)
class FlannelNetConf:
    """The flannel plugin's input config (standard fields plus flannel's own)."""

    cni_version: str
    name: str
    type: str
    subnet_file: str = DEFAULT_SUBNET_FILE
    data_dir: str = DEFAULT_DATA_DIR
    delegate: JsonObject | None = None
    ipam: JsonObject | None = None
    runtime_config: JsonObject | None = None


def parse_netconf(data: bytes | str) -> FlannelNetConf:
    """Decode the plugin's stdin like flannel's ``loadFlannelNetConf``.

    :raises ParseError: the input is not a JSON object.
    :raises NetworkConfigError: a known field has the wrong JSON type.
    """
    obj = decode_object(data, "main.NetConf")
    for name in ("capabilities", "dns", "prevResult"):
        value = obj.field(name)
        if value is not None and not gojson.is_object(value):
            raise _type_error(value, "NetConf", name, "object")
    capabilities = GoObject.from_value(obj.field("capabilities"), field="capabilities")
    if capabilities is not None:
        for key, value in capabilities.items():
            if not isinstance(value, bool):
                raise _type_error(value, "NetConf", f"capabilities.{key}", "bool")
    return FlannelNetConf(
        cni_version=_string_field(obj, "cniVersion", ""),
        name=_string_field(obj, "name", ""),
        type=_string_field(obj, "type", ""),
        subnet_file=_string_field(obj, "subnetFile", DEFAULT_SUBNET_FILE),
        data_dir=_string_field(obj, "dataDir", DEFAULT_DATA_DIR),
        delegate=_map_field(obj, "delegate"),
        ipam=_map_field(obj, "ipam"),
        runtime_config=_map_field(obj, "runtimeConfig"),
    )


def config_name(data: bytes | str) -> str:
    """The ``name`` the CNI library's ``validateConfig`` reads ("" when absent).

    :raises ParseError: not a JSON object, or ``name`` is not a string.
    """
    obj = decode_object(data, "struct { Name string }")
    value = obj.field("name")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ParseError(
            f"json: cannot unmarshal {go_type_name(value)} into Go struct field .name "
            "of type string"
        )
    return value


def config_version(data: bytes | str) -> str:
    """The config's ``cniVersion`` ("0.1.0" when absent), as the library decodes it.

    :raises ParseError: not a JSON object, or ``cniVersion`` is not a string.
    """
    obj = decode_object(data, "struct { CNIVersion string }")
    value = obj.field("cniVersion")
    if value is None or value == "":
        return "0.1.0"
    if not isinstance(value, str):
        raise ParseError(
            "decoding version from network config: json: cannot unmarshal "
            f"{go_type_name(value)} into Go struct field .cniVersion of type string"
        )
    return value


# --------------------------------------------------------------------------------------
# Addresses, Go style.

_PREFIX_RE = re.compile(r"[0-9]+")


def parse_ip(text: str) -> IPv4Address | IPv6Address:
    """Go's ``net.ParseIP``: dotted quad or IPv6 text; no zone, no whitespace.

    :raises ParseError: ``invalid IP address: <text>``.
    """
    if "%" in text or text.strip() != text:
        raise ParseError(f"invalid IP address: {text}")
    try:
        return ipaddress.ip_address(text)
    except ValueError as exc:
        raise ParseError(f"invalid IP address: {text}") from exc


def parse_cidr(text: str) -> tuple[IPv4Address | IPv6Address, Network]:
    """Go's ``net.ParseCIDR``: the address as written and its network (host bits off).

    :raises ParseError: ``invalid CIDR address: <text>`` (Go's message).
    """
    addr, sep, bits = text.partition("/")
    if not sep or not _PREFIX_RE.fullmatch(bits) or len(bits) > 8:
        raise ParseError(f"invalid CIDR address: {text}")
    try:
        ip = parse_ip(addr)
    except ParseError as exc:
        raise ParseError(f"invalid CIDR address: {text}") from exc
    prefix = int(bits)
    if prefix > ip.max_prefixlen:
        raise ParseError(f"invalid CIDR address: {text}")
    return ip, ipaddress.ip_network((ip, prefix), strict=False)


# --------------------------------------------------------------------------------------
# subnet.env, the plugin's way.

_MAX_LINE = 64 * 1024  # bufio.Scanner's default token limit
_UINT32_MAX = 2**32 - 1


@dataclass(frozen=True, slots=True)
class FlannelSubnetEnv:
    """What the plugin takes from ``subnet.env`` (all optional until validated)."""

    networks: tuple[Network, ...] = ()
    subnet: Network | None = None
    ipv6_networks: tuple[Network, ...] = ()
    ipv6_subnet: Network | None = None
    mtu: int | None = None
    ipmasq: bool | None = None

    def missing(self) -> str:
        """The comma-separated names flannel lists as missing ("" if complete)."""
        names: list[str] = []
        if not self.networks and not self.ipv6_networks:
            names += ["FLANNEL_NETWORK", "FLANNEL_IPV6_NETWORK"]
        if self.subnet is None and self.ipv6_subnet is None:
            names += ["FLANNEL_SUBNET", "FLANNEL_IPV6_SUBNET"]
        if self.mtu is None:
            names.append("FLANNEL_MTU")
        if self.ipmasq is None:
            names.append("FLANNEL_IPMASQ")
        return ", ".join(names)


def _go_quote(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _parse_networks(value: str) -> tuple[Network, ...]:
    found: list[Network] = []
    for item in value.split(","):
        _, network = parse_cidr(item)
        if network not in found:
            found.append(network)
    return tuple(found)


def _parse_mtu(value: str) -> int:
    if not re.fullmatch(r"[0-9]+", value):
        raise ParseError(f"strconv.ParseUint: parsing {_go_quote(value)}: invalid syntax")
    number = int(value)
    if number > _UINT32_MAX:
        raise ParseError(f"strconv.ParseUint: parsing {_go_quote(value)}: value out of range")
    return number


def parse_subnet_env(text: str, path: str) -> FlannelSubnetEnv:
    """Parse ``subnet.env`` exactly like flannel's ``loadFlannelSubnetEnv``.

    Each recognised line replaces the earlier value of its key; other keys are
    ignored. A recognised key without ``=`` is an error (flannel's Go code panics).

    :raises ParseError: a value does not parse (Go's message), or keys are missing
        (``<path> is missing FLANNEL_MTU, ...``).
    """
    networks: tuple[Network, ...] = ()
    ipv6_networks: tuple[Network, ...] = ()
    subnet: Network | None = None
    ipv6_subnet: Network | None = None
    mtu: int | None = None
    ipmasq: bool | None = None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    known = {
        "FLANNEL_NETWORK",
        "FLANNEL_SUBNET",
        "FLANNEL_IPV6_NETWORK",
        "FLANNEL_IPV6_SUBNET",
        "FLANNEL_MTU",
        "FLANNEL_IPMASQ",
    }
    for number, raw_line in enumerate(lines, start=1):
        if len(raw_line.encode("utf-8", "surrogateescape")) > _MAX_LINE:
            raise ParseError("bufio.Scanner: token too long")
        line = raw_line[:-1] if raw_line.endswith("\r") else raw_line
        key, sep, value = line.partition("=")
        if key not in known:
            continue
        if not sep:
            raise ParseError(f"{path}: line {number}: {key} has no '=' and no value")
        if key == "FLANNEL_NETWORK":
            networks = _parse_networks(value)
        elif key == "FLANNEL_SUBNET":
            subnet = parse_cidr(value)[1]
        elif key == "FLANNEL_IPV6_NETWORK":
            ipv6_networks = _parse_networks(value)
        elif key == "FLANNEL_IPV6_SUBNET":
            ipv6_subnet = parse_cidr(value)[1]
        elif key == "FLANNEL_MTU":
            mtu = _parse_mtu(value)
        else:
            ipmasq = value == "true"
    env = FlannelSubnetEnv(networks, subnet, ipv6_networks, ipv6_subnet, mtu, ipmasq)
    missing = env.missing()
    if missing:
        raise ParseError(f"{path} is missing {missing}")
    return env


# --------------------------------------------------------------------------------------
# The delegate config.

_ROUTE_INT_FIELDS = ("mtu", "advmss", "priority")
_ROUTE_PTR_FIELDS = ("table", "scope")
_ROUTE_FIELDS = ("dst", "gw", *_ROUTE_INT_FIELDS, *_ROUTE_PTR_FIELDS)


def _route_int(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise NetworkConfigError(
            f"json: cannot unmarshal {go_type_name(value)} into Go struct field "
            f"route.{field} of type int",
            field=field,
            value=value,
        )
    return value


def normalize_route(value: Any) -> JsonObject:
    """One ``ipam.routes`` entry re-encoded as the CNI library's ``types.Route``.

    :raises NetworkConfigError: not an object, no ``dst``, or a field that does not parse.
    """
    if not isinstance(value, dict):
        raise NetworkConfigError(
            f"json: cannot unmarshal {go_type_name(value)} into Go value of type types.route",
            field="routes",
            value=value,
        )
    fields: JsonObject = {}
    for key, item in value.items():
        folded = key.casefold()
        for name in _ROUTE_FIELDS:
            if folded == name:
                fields[name] = item
    dst = fields.get("dst")
    if not isinstance(dst, str):
        raise NetworkConfigError(
            f'route {json.dumps(value)[:80]} has no "dst" string', field="dst", value=dst
        )
    try:
        ip, network = parse_cidr(dst)
    except ParseError as exc:
        raise NetworkConfigError(str(exc), field="dst", value=dst) from exc
    out: JsonObject = {"dst": f"{ip}/{network.prefixlen}"}
    gw = fields.get("gw")
    if gw is not None:
        if not isinstance(gw, str):
            raise NetworkConfigError(
                f"json: cannot unmarshal {go_type_name(gw)} into Go struct field route.gw "
                "of type string",
                field="gw",
                value=gw,
            )
        if gw != "":
            try:
                out["gw"] = str(parse_ip(gw))
            except ParseError as exc:
                raise NetworkConfigError(str(exc), field="gw", value=gw) from exc
    for name in _ROUTE_INT_FIELDS:
        if fields.get(name) is not None:
            number = _route_int(fields[name], name)
            if number != 0:
                out[name] = number
    for name in _ROUTE_PTR_FIELDS:
        if fields.get(name) is not None:
            out[name] = _route_int(fields[name], name)
    return out


def delegate_ipam(conf: FlannelNetConf, env: FlannelSubnetEnv) -> JsonObject:
    """flannel's ``getDelegateIPAM``: the input ``ipam`` completed from subnet.env.

    ``type`` defaults to ``host-local``; ``ranges`` is replaced by one range set per
    family present; ``routes`` is the input routes followed by one route per cluster
    network; every other input key passes through.

    :raises NetworkConfigError: ``ipam.routes`` is not a list of valid routes.
    """
    given = conf.ipam or {}
    ipam: JsonObject = {"type": given["type"] if "type" in given else "host-local"}
    for key, value in given.items():
        if key not in ("type", "ranges", "routes"):
            ipam[key] = value
    ranges: list[list[JsonObject]] = []
    if env.subnet is not None:
        ranges.append([{"subnet": str(env.subnet)}])
    if env.ipv6_subnet is not None:
        ranges.append([{"subnet": str(env.ipv6_subnet)}])
    routes: list[JsonObject] = []
    given_routes = given.get("routes")
    if given_routes is not None:
        if not isinstance(given_routes, list):
            raise NetworkConfigError(
                "failed to assemble Delegate IPAM: failed to read IPAM routes: failed to "
                f"parse ipam.routes: json: cannot unmarshal {go_type_name(given_routes)} "
                "into Go value of type []types.Route",
                field="ipam.routes",
                value=given_routes,
            )
        for item in given_routes:
            try:
                routes.append(normalize_route(item))
            except NetworkConfigError as exc:
                raise NetworkConfigError(
                    "failed to assemble Delegate IPAM: failed to read IPAM routes: "
                    f"failed to parse ipam.routes: {exc}",
                    field="ipam.routes",
                    value=item,
                ) from exc
    routes += [{"dst": str(network)} for network in env.networks]
    routes += [{"dst": str(network)} for network in env.ipv6_networks]
    ipam["ranges"] = ranges
    ipam["routes"] = routes
    return ipam


def check_delegate(delegate: JsonObject | None) -> None:
    """flannel's checks on the input ``delegate`` (its exact messages).

    :raises NetworkConfigError: ``type`` is not a string, or ``name``/``ipam`` is set.
    """
    if delegate is None:
        return
    if "type" in delegate and not isinstance(delegate["type"], str):
        raise NetworkConfigError(
            "'delegate' dictionary, if present, must have (string) 'type' field",
            field="delegate.type",
            value=delegate["type"],
        )
    for forbidden in ("name", "ipam"):
        if forbidden in delegate:
            raise NetworkConfigError(
                f"'delegate' dictionary must not have '{forbidden}' field, it'll be set by flannel",
                field=f"delegate.{forbidden}",
                value=delegate[forbidden],
            )


def build_delegate(conf: FlannelNetConf, env: FlannelSubnetEnv) -> JsonObject:
    """The config flannel hands to the delegate plugin for ADD (spec §9.2 steps 1–6).

    ``env`` must be complete (as :func:`parse_subnet_env` returns it).

    :raises NetworkConfigError: the delegate or ``ipam.routes`` is invalid.
    :raises ParseError: ``env`` lacks ``FLANNEL_MTU`` or ``FLANNEL_IPMASQ``.
    """
    check_delegate(conf.delegate)
    if env.mtu is None or env.ipmasq is None:
        raise ParseError(f"{conf.subnet_file} is missing {env.missing()}")
    given: JsonObject = dict(conf.delegate or {})
    if conf.runtime_config is not None:
        given["runtimeConfig"] = conf.runtime_config
    plugin_type = given.get("type", "bridge")
    assert isinstance(plugin_type, str)  # check_delegate guarantees it

    out: JsonObject = {}
    if conf.cni_version:
        out["cniVersion"] = conf.cni_version
    elif "cniVersion" in given:
        out["cniVersion"] = given["cniVersion"]
    out["name"] = conf.name
    out["type"] = plugin_type
    for key, value in given.items():
        if key not in ("cniVersion", "name", "type"):
            out[key] = value
    if plugin_type == "bridge" and "isGateway" not in given:
        out["isGateway"] = True
    if "ipMasq" not in given:
        out["ipMasq"] = not env.ipmasq  # flannel masquerades itself unless told not to
    if "mtu" not in given:
        out["mtu"] = env.mtu
    out["ipam"] = delegate_ipam(conf, env)
    return out


def marshal(value: Any) -> bytes:
    """Compact JSON the way Go's ``json.Marshal`` writes it (HTML-safe escapes).

    :raises ParseError: the value is nested too deeply to encode.
    """
    try:
        return gojson.marshal(value).encode("utf-8")
    except RecursionError as exc:
        raise ParseError("the delegate config is nested too deeply to encode") from exc
