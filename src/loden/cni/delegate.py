"""The config the flannel CNI plugin hands to its delegate (spec §9.2 steps 1–6).

It is the same document flannel would render: ``ipam.routes`` entries are re-encoded
as the CNI library's ``types.Route`` (unknown keys dropped, ``dst`` keeps its host
bits, zero ``mtu``/``advmss``/``priority`` omitted) because flannel round-trips them
through that type.

The only intentional difference is key order: Go sorts map keys when it marshals; we
emit ``cniVersion, name, type``, the caller's own delegate keys, the defaults flannel
adds, then ``ipam`` (``type``, other input keys, ``ranges``, ``routes``), which reads
like the documented examples. JSON consumers do not care about order.
"""

from __future__ import annotations

import json
from typing import Any

from loden.cni.netconf import FlannelNetConf, JsonObject
from loden.cni.subnet_env import FlannelSubnetEnv, parse_cidr, parse_ip
from loden.errors import NetworkConfigError, ParseError
from loden.model.gojson import go_type_name

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
