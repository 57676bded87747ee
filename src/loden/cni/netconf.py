"""The flannel CNI plugin's input config (netconf) and JSON, as flannel reads and writes it.

The netconf is decoded with Go ``encoding/json`` rules for a struct (keys match
case-insensitively, the last match wins, ``null`` keeps the default, a value of the
wrong JSON type is an error), while ``delegate``/``ipam``/``runtimeConfig`` are Go
maps whose keys stay case-sensitive. The decoding is :mod:`loden.model.gojson`'s;
errors are worded as Go's decoder words them, since the plugin's callers see them.

The other pure parts of the plugin: :mod:`loden.cni.subnet_env` (subnet.env, the
plugin's way) and :mod:`loden.cni.delegate` (the delegate config it renders).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from loden.errors import NetworkConfigError, ParseError
from loden.model import gojson
from loden.model.gojson import GoObject, go_type_name

DEFAULT_SUBNET_FILE = "/run/flannel/subnet.env"
DEFAULT_DATA_DIR = "/var/lib/cni/flannel"

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


def marshal(value: Any) -> bytes:
    """Compact JSON the way Go's ``json.Marshal`` writes it (HTML-safe escapes).

    :raises ParseError: the value is nested too deeply to encode.
    """
    try:
        return gojson.marshal(value).encode("utf-8")
    except RecursionError as exc:
        raise ParseError("the delegate config is nested too deeply to encode") from exc
