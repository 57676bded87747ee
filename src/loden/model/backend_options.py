"""The ``Backend`` options of a network config, typed and validated in one place.

Go flanneld decodes them only when its backend starts (``json.Unmarshal`` into the
backend's struct), so a wrong type stopped the node with "error decoding VXLAN backend
config: ..." while ``etcdctl`` had happily stored it. Loden decodes them with the rest
of the config (:meth:`NetworkConfig.validated`): ``loden config validate``/``set`` and
the agent's config check refuse them with the same first words as flanneld, then the
field, the value and what to use. Backends receive the parsed object through
:class:`loden.backend.base.BackendContext` and never read the JSON themselves.

Unknown keys are ignored, as Go does; unknown backend types have no options here
(the registry reports them).
"""

from __future__ import annotations

import base64
import binascii
import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from loden.errors import NetworkConfigError
from loden.model.gojson import GoJSONError, GoObject, as_any, as_bool, as_int, as_str

if TYPE_CHECKING:
    from loden.model.config import NetworkConfig

VXLAN_DEFAULT_PORT = 8472
UDP_DEFAULT_PORT = 8285
WIREGUARD_DEFAULT_PORT = 51820
WIREGUARD_DEFAULT_PORT_V6 = 51821

#: What flanneld calls each backend in "error decoding <name> backend config".
_DECODE_NAME = {"vxlan": "VXLAN", "udp": "UDP", "wireguard": "WireGuard"}


class _Reader:
    """Reads one backend's options; every error names the backend as flanneld does."""

    def __init__(self, kind: str, options: GoObject | None) -> None:
        self.kind = kind
        self.options = options

    def error(self, name: str, message: str, value: object = None) -> NetworkConfigError:
        label = _DECODE_NAME.get(self.kind, self.kind)
        return NetworkConfigError(
            f"error decoding {label} backend config: Backend.{name} {message}",
            field=f"Backend.{name}",
            value=value,
        )

    def get(self, name: str, kind: Any, default: Any, example: str) -> Any:
        if self.options is None:
            return default
        try:
            return self.options.get(name, kind, default)
        except GoJSONError as exc:
            detail = str(exc).removeprefix(f"{name}: ")
            raise self.error(name, f"is invalid: {detail} (e.g. {example})") from exc

    def port(self, name: str, default: int, *, zero_ok: bool = False) -> int:
        value: int = self.get(name, as_int, default, f'"{name}": {default}')
        low = 0 if zero_ok else 1
        if not low <= value <= 65535:
            raise self.error(
                name, f"{value} is not a UDP port: use {low}..65535 (default {default})", value
            )
        return value

    def mtu(self) -> int:
        value: int = self.get("MTU", as_int, 0, '"MTU": 1500')
        if value < 0:
            raise self.error(
                "MTU",
                f"{value} is negative: leave it out (external MTU) or give "
                "the underlay MTU, e.g. 1500",
                value,
            )
        return value


@dataclass(frozen=True, slots=True)
class NoOptions:
    """host-gw and alloc: flanneld reads no options for them."""


@dataclass(frozen=True, slots=True)
class VxlanOptions:
    vni: int = 1
    port: int = VXLAN_DEFAULT_PORT
    gbp: bool = False
    learning: bool = False
    direct_routing: bool = False
    mtu: int = 0
    #: Loden extension (Go flanneld ignores unknown Backend keys): tx checksum offload,
    #: and with it TSO, on ``flannel.<VNI>``. None (the default) is *auto*: see
    #: :func:`loden.backend.vxlan.tx_checksum_decision`.
    tx_checksum_offload: bool | None = None

    @classmethod
    def parse(cls, options: GoObject | None) -> VxlanOptions:
        r = _Reader("vxlan", options)
        vni: int = r.get("VNI", as_int, 1, '"VNI": 1')
        if not 0 <= vni < 1 << 24:
            raise r.error("VNI", f"{vni} is out of range: use 0..16777215 (default 1)", vni)
        return cls(
            vni=vni,
            # 0 is the kernel's default; made explicit so that default never matters.
            port=r.port("Port", VXLAN_DEFAULT_PORT, zero_ok=True) or VXLAN_DEFAULT_PORT,
            gbp=r.get("GBP", as_bool, False, '"GBP": true'),
            learning=r.get("Learning", as_bool, False, '"Learning": true'),
            direct_routing=r.get("DirectRouting", as_bool, False, '"DirectRouting": true'),
            mtu=r.mtu(),
            tx_checksum_offload=r.get(
                "TxChecksumOffload", _auto_or_bool, None, '"TxChecksumOffload": false'
            ),
        )

    @classmethod
    def from_config(cls, config: NetworkConfig) -> VxlanOptions:
        """:raises NetworkConfigError: an option has the wrong type or value."""
        return cls.parse(config.backend.options)


@dataclass(frozen=True, slots=True)
class UdpOptions:
    port: int = UDP_DEFAULT_PORT

    @classmethod
    def parse(cls, options: GoObject | None) -> UdpOptions:
        return cls(port=_Reader("udp", options).port("Port", UDP_DEFAULT_PORT))


class WireguardMode(enum.Enum):
    SEPARATE = "separate"
    AUTO = "auto"
    IPV4 = "ipv4"
    IPV6 = "ipv6"


@dataclass(frozen=True, slots=True)
class WireguardOptions:
    listen_port: int = WIREGUARD_DEFAULT_PORT
    listen_port_v6: int = WIREGUARD_DEFAULT_PORT_V6
    mtu: int = 0
    psk: str | None = None
    keepalive: int = 0
    mode: WireguardMode = WireguardMode.SEPARATE

    @classmethod
    def parse(cls, options: GoObject | None) -> WireguardOptions:
        r = _Reader("wireguard", options)
        listen_port = r.port("ListenPort", WIREGUARD_DEFAULT_PORT)
        listen_port_v6 = r.port("ListenPortV6", WIREGUARD_DEFAULT_PORT_V6)
        mtu = r.mtu()
        psk: str = r.get("PSK", as_str, "", '"PSK": "<output of wg genpsk>"')
        if psk and not _is_wireguard_key(psk):
            # The value is a secret: never echo it.
            raise r.error(
                "PSK", "is not a base64 WireGuard key: use 44 characters as printed by `wg genpsk`"
            )
        keepalive: int = r.get(
            "PersistentKeepaliveInterval", as_int, 0, '"PersistentKeepaliveInterval": 25'
        )
        if not 0 <= keepalive <= 65535:
            raise r.error(
                "PersistentKeepaliveInterval",
                f"{keepalive} is out of range: use 0 (off) to 65535 seconds, e.g. 25",
                keepalive,
            )
        raw_mode: str = r.get("Mode", as_str, WireguardMode.SEPARATE.value, '"Mode": "auto"')
        try:
            mode = WireguardMode(raw_mode)
        except ValueError:
            # flanneld: "no valid Mode configured".
            raise NetworkConfigError(
                f"no valid Mode configured: Backend.Mode is {raw_mode!r}; use"
                ' "separate" (the default), "auto", "ipv4" or "ipv6"',
                field="Backend.Mode",
                value=raw_mode,
            ) from None
        return cls(
            listen_port=listen_port,
            listen_port_v6=listen_port_v6,
            mtu=mtu,
            psk=psk.strip() or None,
            keepalive=keepalive,
            mode=mode,
        )

    @classmethod
    def from_config(cls, config: NetworkConfig) -> WireguardOptions:
        """:raises NetworkConfigError: an option has the wrong type or value."""
        return cls.parse(config.backend.options)


@dataclass(frozen=True, slots=True)
class AwsVpcOptions:
    """aws-vpc: the route tables to write to; ``None`` auto-detects one (spec §2.1)."""

    route_table_ids: tuple[str, ...] | None = None

    @classmethod
    def parse(cls, options: GoObject | None) -> AwsVpcOptions:
        # flanneld checks the type only after its lease and cloud calls (as built); the
        # texts are flanneld's, checked here before anything is taken.
        raw = None if options is None else options.get("RouteTableID", as_any, None)
        if raw is None:
            return cls()
        if isinstance(raw, str):
            return cls((raw,))
        if isinstance(raw, list):
            if not all(isinstance(item, str) for item in raw):
                raise NetworkConfigError(
                    "Unexpected type in RouteTableID slice. Must be strings. (got"
                    f' {raw!r}; e.g. "RouteTableID": ["rtb-0123", "rtb-4567"])',
                    field="Backend.RouteTableID",
                    value=raw,
                )
            return cls(tuple(raw))
        raise NetworkConfigError(
            "Unexpected RouteTableID type. Must be string or array of strings. (got"
            f' {raw!r}; e.g. "RouteTableID": "rtb-0123", or leave it out to use the'
            " subnet's route table)",
            field="Backend.RouteTableID",
            value=raw,
        )


BackendOptions = NoOptions | VxlanOptions | UdpOptions | WireguardOptions | AwsVpcOptions

_PARSERS: dict[str, Callable[[GoObject | None], BackendOptions]] = {
    "vxlan": VxlanOptions.parse,
    "udp": UdpOptions.parse,
    "wireguard": WireguardOptions.parse,
    "aws-vpc": AwsVpcOptions.parse,
}


def parse_backend_options(kind: str, options: GoObject | None) -> BackendOptions:
    """The typed options of backend ``kind`` (lower-case ``Backend.Type``).

    :raises NetworkConfigError: an option has the wrong JSON type or an invalid value.
    """
    parser = _PARSERS.get(kind)
    return NoOptions() if parser is None else parser(options)


def _auto_or_bool(value: Any, field: str) -> bool | None:
    """``"auto"`` (None), ``true`` or ``false``."""
    if isinstance(value, str) and value.lower() == "auto":
        return None
    if not isinstance(value, bool):
        raise GoJSONError(f'{field}: expected "auto", true or false, got {value!r}', field=field)
    return value


def _is_wireguard_key(text: str) -> bool:
    value = text.strip()
    if len(value) != 44:
        return False
    try:
        return len(base64.b64decode(value, validate=True)) == 32
    except (binascii.Error, ValueError):
        return False


__all__ = [
    "AwsVpcOptions",
    "BackendOptions",
    "NoOptions",
    "UdpOptions",
    "VxlanOptions",
    "WireguardMode",
    "WireguardOptions",
    "parse_backend_options",
]
