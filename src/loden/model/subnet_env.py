"""``subnet.env``: what the agent tells Docker, the CNI plugin and systemd (spec §5.1).

Rendering is byte-exact with flannel. Reading back is tolerant like godotenv
(``export``, quotes, comments), because the file may have been rewritten by
``mk-docker-opts -d /run/flannel/subnet.env`` (the seed document does exactly that)
or edited by hand. A value may be a comma-separated list; flannel skips invalid items
and treats more than one valid item as "no previous subnet", and so do we.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network, ip_interface

from loden.errors import ParseError
from loden.model.net import first_host


@dataclass(frozen=True, slots=True)
class SubnetEnv:
    network: IPv4Network | None
    subnet: IPv4Network | None
    ipv6_network: IPv6Network | None
    ipv6_subnet: IPv6Network | None
    mtu: int
    ipmasq: bool

    def render(self) -> bytes:
        lines: list[str] = []
        if self.network is not None and self.subnet is not None:
            lines.append(f"FLANNEL_NETWORK={self.network}")
            lines.append(f"FLANNEL_SUBNET={first_host(self.subnet)}")
        if self.ipv6_network is not None and self.ipv6_subnet is not None:
            lines.append(f"FLANNEL_IPV6_NETWORK={self.ipv6_network}")
            lines.append(f"FLANNEL_IPV6_SUBNET={first_host(self.ipv6_subnet)}")
        lines.append(f"FLANNEL_MTU={self.mtu}")
        lines.append(f"FLANNEL_IPMASQ={'true' if self.ipmasq else 'false'}")
        return ("\n".join(lines) + "\n").encode()


def parse_env_text(text: str) -> dict[str, str]:
    """Parse dotenv/sh-assignment text into a dict; tolerant like godotenv.

    :raises ParseError: a non-blank, non-comment line is not ``KEY=VALUE``.
    """
    values: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.startswith("export "):
            stripped = stripped[len("export ") :].lstrip()
        key, sep, value = stripped.partition("=")
        key = key.strip()
        if not sep or not key or not (key.replace("_", "a").isalnum() and not key[0].isdigit()):
            raise ParseError(f"line {number}: expected KEY=VALUE, got {line[:80]!r}")
        values[key] = _unquote(value.strip())
    return values


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    if " #" in value:
        value = value.split(" #", 1)[0].rstrip()
    return value


def single_network(text: str | None, *, v6: bool) -> IPv4Network | IPv6Network | None:
    """The one valid CIDR in a comma-separated value, as a network (host bits masked).

    Invalid items are skipped; several valid items mean "none" (flannel's rule).
    """
    if not text:
        return None
    found: list[IPv4Network | IPv6Network] = []
    for item in text.split(","):
        try:
            iface = ip_interface(item.strip())
        except ValueError:
            continue
        if (iface.version == 6) == v6 and "/" in item:
            found.append(iface.network)
    return found[0] if len(found) == 1 else None


@dataclass(frozen=True, slots=True)
class PreviousSubnets:
    """What an earlier run wrote: used to prefer the same subnet and to recycle rules."""

    network: IPv4Network | None = None
    subnet: IPv4Network | None = None
    ipv6_network: IPv6Network | None = None
    ipv6_subnet: IPv6Network | None = None


def read_previous(text: str) -> PreviousSubnets:
    """Extract FLANNEL_{NETWORK,SUBNET,IPV6_*} from subnet.env text; never raises."""
    try:
        env = parse_env_text(text)
    except ParseError:
        env = {}
        # Best effort line by line: one bad line must not hide a good FLANNEL_SUBNET.
        for line in text.splitlines():
            key, sep, value = line.strip().partition("=")
            if sep:
                env[key.strip().removeprefix("export ").strip()] = _unquote(value.strip())
    net = single_network(env.get("FLANNEL_NETWORK"), v6=False)
    sub = single_network(env.get("FLANNEL_SUBNET"), v6=False)
    net6 = single_network(env.get("FLANNEL_IPV6_NETWORK"), v6=True)
    sub6 = single_network(env.get("FLANNEL_IPV6_SUBNET"), v6=True)
    return PreviousSubnets(
        network=net if isinstance(net, IPv4Network) else None,
        subnet=sub if isinstance(sub, IPv4Network) else None,
        ipv6_network=net6 if isinstance(net6, IPv6Network) else None,
        ipv6_subnet=sub6 if isinstance(sub6, IPv6Network) else None,
    )
