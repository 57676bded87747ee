"""Node objects → leases (flanneld's ``nodeToLease``, spec §4.3, §4.4).

Only what a lease needs is kept from a Node (name, podCIDR(s), six annotations), so
5,000 nodes cost a few MB, not the size of their JSON.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import (
    IPv4Address,
    IPv4Network,
    IPv6Address,
    IPv6Network,
    ip_network,
)
from typing import Any

from loden.errors import ParseError
from loden.model.gojson import compact
from loden.model.lease import Lease, LeaseAttrs
from loden.model.net import NO_IPV4
from loden.subnet.kube.annotations import AnnotationKeys


class NodeSkipped(ParseError):
    """A node cannot become a peer lease (the message says why and what to do)."""


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """The parts of a Node object flannel reads."""

    name: str
    resource_version: str
    pod_cidr: str
    pod_cidrs: tuple[str, ...]
    annotations: Mapping[str, str]

    @classmethod
    def from_object(cls, obj: Mapping[str, Any], keys: AnnotationKeys | None = None) -> NodeInfo:
        """Extract from decoded JSON; ``keys``: keep only the annotations a lease needs.

        :raises NodeSkipped: not a Node-shaped object.
        """
        meta = obj.get("metadata")
        spec = obj.get("spec", {})
        if not isinstance(meta, dict) or not isinstance(meta.get("name"), str):
            raise NodeSkipped("a node object without metadata.name")
        name = meta["name"]
        if spec is None:
            spec = {}
        if not isinstance(spec, dict):
            raise NodeSkipped(f'node "{name}": spec is not an object')
        # A Node without metadata.annotations made Go flanneld panic (spec §4.7).
        raw = meta.get("annotations") or {}
        annotations = {
            k: v
            for k, v in (raw.items() if isinstance(raw, dict) else ())
            if isinstance(k, str) and isinstance(v, str) and (keys is None or k in _wanted(keys))
        }
        cidrs = spec.get("podCIDRs") or []
        pod_cidr = spec.get("podCIDR")
        return cls(
            name=name,
            resource_version=str(meta.get("resourceVersion", "")),
            pod_cidr=pod_cidr if isinstance(pod_cidr, str) else "",
            pod_cidrs=tuple(c for c in cidrs if isinstance(c, str))
            if isinstance(cidrs, list)
            else (),
            annotations=annotations,
        )


def _wanted(keys: AnnotationKeys) -> frozenset[str]:
    cached = _WANTED.get(keys.prefix)
    if cached is None:
        cached = _WANTED[keys.prefix] = frozenset(
            (
                *keys.relevant(),
                keys.public_ip_overwrite,
                keys.public_ipv6_overwrite,
                keys.node_public_ip,
                keys.node_public_ipv6,
            )
        )
    return cached


_WANTED: dict[str, frozenset[str]] = {}


def pod_cidrs(node: NodeInfo) -> tuple[IPv4Network | None, IPv6Network | None]:
    """The node's IPv4 and IPv6 podCIDR (spec §4.3 step 2).

    :raises NodeSkipped: none assigned, more than two, or one that does not parse.
    """
    if not node.pod_cidr and not node.pod_cidrs:
        raise NodeSkipped(
            f'node "{node.name}" pod cidr not assigned: the controller-manager must assign '
            "podCIDRs (kube-controller-manager --allocate-node-cidrs=true --cluster-cidr=..., "
            "or kubeadm init --pod-network-cidr=10.244.0.0/16)"
        )
    texts = node.pod_cidrs or (node.pod_cidr,)
    if len(texts) > 2:
        raise NodeSkipped(
            f'node "{node.name}": pod cidrs should be IPv4/IPv6 only or dualstack '
            f"(spec.podCIDRs has {len(texts)} entries: {', '.join(texts)})"
        )
    v4: IPv4Network | None = None
    v6: IPv6Network | None = None
    for text in texts:
        try:
            # Go's net.ParseCIDR masks host bits; so does strict=False.
            net = ip_network(text, strict=False)
        except ValueError:
            raise NodeSkipped(f'node "{node.name}": podCIDR {text!r} is not a CIDR') from None
        if isinstance(net, IPv4Network):
            v4 = v4 or net
        else:
            v6 = v6 or net
    return v4, v6


def _backend_data(node: NodeInfo, key: str) -> str | None:
    raw = node.annotations.get(key, "")
    if raw in ("", "null"):
        return None
    try:
        return compact(json.loads(raw))
    except ValueError:
        raise NodeSkipped(
            f'node "{node.name}": annotation {key} is not JSON ({raw[:80]!r})'
        ) from None


def node_to_lease(
    node: NodeInfo, keys: AnnotationKeys, *, ipv4: bool = True, ipv6: bool = False
) -> Lease:
    """A peer lease from a flannel-managed node.

    :raises NodeSkipped: not marked ``kube-subnet-manager: "true"``, or an annotation or
        podCIDR that does not parse (the message names the node and the annotation).
    """
    if node.annotations.get(keys.managed) != "true":
        raise NodeSkipped(f'node "{node.name}" is not managed by flannel ({keys.managed} unset)')
    v4net, v6net = pod_cidrs(node)
    public_ip = IPv4Address(0)
    data: str | None = None
    if ipv4:
        text = node.annotations.get(keys.public_ip, "")
        try:
            public_ip = IPv4Address(text)
        except ValueError:
            raise NodeSkipped(
                f'node "{node.name}": annotation {keys.public_ip}={text!r} is not an IPv4 address'
            ) from None
        data = _backend_data(node, keys.backend_data)
        if v4net is None:
            raise NodeSkipped(f'node "{node.name}" has no IPv4 podCIDR')
    public_ipv6: IPv6Address | None = None
    v6data: str | None = None
    subnet6: IPv6Network | None = None
    if ipv6:
        text = node.annotations.get(keys.public_ipv6, "")
        try:
            public_ipv6 = IPv6Address(text)
        except ValueError:
            raise NodeSkipped(
                f'node "{node.name}": annotation {keys.public_ipv6}={text!r} is not an IPv6 address'
            ) from None
        v6data = _backend_data(node, keys.backend_v6_data)
        if v6net is None:
            raise NodeSkipped(f'node "{node.name}" has no IPv6 podCIDR')
        subnet6 = v6net
    if v4net is None:
        if ipv4 or subnet6 is None:
            raise NodeSkipped(f'node "{node.name}" has no IPv4 podCIDR')
        v4net = NO_IPV4  # IPv6-only: the lease's empty IPv4 part, as over etcd
    return Lease(
        subnet=v4net,
        ipv6_subnet=subnet6,
        attrs=LeaseAttrs(
            public_ip=public_ip,
            backend_type=node.annotations.get(keys.backend_type, ""),
            backend_data=data,
            public_ipv6=public_ipv6,
            backend_v6_data=v6data,
        ),
        reserved=True,  # a podCIDR never expires (no TTL in kube mode)
    )
