"""flannel's node annotations: the prefix, the keys, and the patches Go flanneld sends.

Byte-compatibility matters here: a cluster may mix Go flanneld and Loden nodes, and an
operator moves nodes from one to the other one at a time (spec §4.2, §4.3, §4.5). The
patch bodies are what client-go's ``CreateTwoWayMergePatch`` produces for flanneld's
change: only the annotations whose value changes, keys sorted, compact JSON with Go's
HTML-safe escaping.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass

from loden.errors import ConfigError
from loden.model.lease import LeaseAttrs

DEFAULT_PREFIX = "flannel.alpha.coreos.com"

# flannel's regex (pkg/subnet/kube/annotations.go), unanchored at the start like Go's
# MatchString: only the end must be a fqdn/ followed by an optional "name-".
_PREFIX_RE = re.compile(r"(?:[a-z0-9_-]+\.)+[a-z0-9_-]+/(?:[a-z0-9_-]+-)?$")


def normalise_prefix(prefix: str) -> str:
    """``--kube-annotation-prefix`` as flannel normalises it (spec §4.2).

    :raises ConfigError: more than one ``/``, or not ``fqdn/[0-9a-z-_]*``.
    """
    given = prefix
    slashes = prefix.count("/")
    if slashes > 1:
        raise ConfigError(
            f"subnet/kube: prefix can contain at most single slash (--kube-annotation-prefix "
            f"{prefix!r}); use e.g. {DEFAULT_PREFIX!r} or 'example.com/name'"
        )
    if slashes == 0:
        prefix += "/"
    if not prefix.endswith(("/", "-")):
        prefix += "-"
    if not _PREFIX_RE.search(prefix):
        raise ConfigError(
            "subnet/kube: prefix must be in a format: fqdn/[0-9a-z-_]* "
            f"(--kube-annotation-prefix {given!r} became {prefix!r}: lower-case letters, digits, "
            "'-' and "
            "'_' only, and a dotted domain before the slash)"
        )
    return prefix


@dataclass(frozen=True, slots=True)
class AnnotationKeys:
    """The full annotation names for one normalised prefix."""

    prefix: str

    @classmethod
    def for_flag(cls, flag_value: str) -> AnnotationKeys:
        return cls(normalise_prefix(flag_value))

    def _k(self, name: str) -> str:
        return self.prefix + name

    @property
    def managed(self) -> str:
        return self._k("kube-subnet-manager")

    @property
    def backend_type(self) -> str:
        return self._k("backend-type")

    @property
    def backend_data(self) -> str:
        return self._k("backend-data")

    @property
    def backend_v6_data(self) -> str:
        return self._k("backend-v6-data")

    @property
    def public_ip(self) -> str:
        return self._k("public-ip")

    @property
    def public_ipv6(self) -> str:
        return self._k("public-ipv6")

    @property
    def public_ip_overwrite(self) -> str:
        return self._k("public-ip-overwrite")

    @property
    def public_ipv6_overwrite(self) -> str:
        return self._k("public-ipv6-overwrite")

    @property
    def node_public_ip(self) -> str:
        return self._k("node-public-ip")

    @property
    def node_public_ipv6(self) -> str:
        return self._k("node-public-ipv6")

    def relevant(self) -> tuple[str, ...]:
        """The annotations a peer's lease is built from (what the watch keeps per node)."""
        return (
            self.managed,
            self.backend_type,
            self.backend_data,
            self.backend_v6_data,
            self.public_ip,
            self.public_ipv6,
        )


def go_json(value: object) -> str:
    """Go ``encoding/json`` of maps and strings: keys sorted, compact, HTML-safe."""
    text = json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=False)
    return (
        text.replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("&", "\\u0026")
        .replace("\u2028", "\\u2028")
        .replace("\u2029", "\\u2029")
    )


def _raw(data: str | None) -> str:
    """Go's ``json.RawMessage.MarshalJSON``: ``null`` for no data."""
    return "null" if data is None else data


def desired_annotations(
    keys: AnnotationKeys, current: Mapping[str, str], attrs: LeaseAttrs
) -> dict[str, str]:
    """The annotations flanneld's ``AcquireLease`` writes for ``attrs`` onto a node whose
    annotations are ``current``: the changed ones only (empty: nothing to patch).

    Mirrors kube.go: the change test first, then which keys are written per backend, the
    overwrite annotations taking precedence over the detected public IPs.
    """
    bd, v6bd = _raw(attrs.backend_data), _raw(attrs.backend_v6_data)
    btype = attrs.backend_type
    ip4 = str(attrs.public_ip)
    ip6 = None if attrs.public_ipv6 is None else str(attrs.public_ipv6)
    over4 = current.get(keys.public_ip_overwrite, "")
    over6 = current.get(keys.public_ipv6_overwrite, "")
    differs = (
        current.get(keys.backend_data) != bd
        or current.get(keys.backend_type) != btype
        or current.get(keys.public_ip) != ip4
        or current.get(keys.managed) != "true"
        or (over4 != "" and over4 != ip4)
    ) or (
        ip6 is not None
        and (
            current.get(keys.backend_v6_data) != v6bd
            or current.get(keys.backend_type) != btype
            or current.get(keys.public_ipv6) != ip6
            or (over6 != "" and over6 != ip6)
        )
    )
    if not differs:
        return {}
    wanted: dict[str, str] = {keys.backend_type: btype}
    if (btype in ("vxlan", "wireguard") and bd != "null") or btype not in ("vxlan", "wireguard"):
        wanted[keys.backend_data] = bd
        wanted[keys.public_ip] = over4 if over4 else ip4
    if (
        (btype == "vxlan" and v6bd != "null")
        or (btype == "wireguard" and v6bd != "null" and ip6 is not None)
        or (btype in ("host-gw", "extension") and ip6 is not None)
    ):
        wanted[keys.backend_v6_data] = v6bd
        if over6:
            wanted[keys.public_ipv6] = over6
        elif ip6 is not None:
            wanted[keys.public_ipv6] = ip6
    wanted[keys.managed] = "true"
    return {k: v for k, v in wanted.items() if current.get(k) != v}


def annotations_patch(changed: Mapping[str, str]) -> bytes:
    """The strategic-merge patch body for ``nodes/<name>/status`` (spec §4.7)."""
    return go_json({"metadata": {"annotations": dict(changed)}}).encode()


def _rfc3339(when: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


def network_unavailable_patch(now: float | None = None) -> bytes:
    """``--set-node-network-unavailable``: flanneld's condition patch, byte for byte
    (``v1.NodeCondition`` field order; ``metav1.Time`` is RFC 3339 in UTC, seconds)."""
    stamp = _rfc3339(time.time() if now is None else now)
    condition = (
        '{"type":"NetworkUnavailable","status":"False",'
        f'"lastHeartbeatTime":"{stamp}","lastTransitionTime":"{stamp}",'
        '"reason":"FlannelIsUp","message":"Flannel is running on this node"}'
    )
    return ('{"status":{"conditions":[' + condition + "]}}").encode()
