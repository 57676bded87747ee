"""Backend registry: ``Backend.Type`` name -> implementation, imported lazily.

Nothing registers itself by import side effect (anyio style): the table below is the
one place that lists the backends, so a vxlan node never imports the udp data path.
Each module exposes ``create(ctx: BackendContext) -> Backend``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import cast

from loden.backend.base import Backend, BackendContext
from loden.errors import UnknownBackend
from loden.model.families import check_families

_REGISTRY: dict[str, str] = {
    "alloc": "loden.backend.alloc",
    "aws-vpc": "loden.backend.aws_vpc",
    "gce": "loden.backend.gce",
    "host-gw": "loden.backend.hostgw",
    "vxlan": "loden.backend.vxlan",
    "udp": "loden.backend.udp",
    "wireguard": "loden.backend.wireguard",
}

#: Types flannel knows that Loden does not implement (with the reason). The reasons state
#: facts about Loden and about what flannel requires, never about the machine Loden was
#: built or tested on: the kernel that runs the agent may well have ipip or ESP.
UNSUPPORTED: dict[str, str] = {
    "ipip": "Loden does not implement the ipip backend (flannel's needs the kernel's ipip"
    " module); use vxlan or host-gw",
    "ipsec": "Loden does not implement the ipsec backend (flannel's needs strongSwan and"
    " kernel ESP); use wireguard for encryption",
    "extension": "the extension backend is not implemented by Loden",
    "tencent-vpc": "the tencent-vpc backend is not implemented by Loden",
}


def known_backends() -> list[str]:
    return sorted(_REGISTRY)


def create_backend(name: str, ctx: BackendContext) -> Backend:
    """Build the backend registered as ``name`` (lower-cased, like flannel).

    :raises UnknownBackend: no such backend; the message lists the known ones.
    """
    key = name.lower()
    if key not in _REGISTRY:
        if key in UNSUPPORTED:
            raise UnknownBackend(key, known_backends(), UNSUPPORTED[key])
        raise UnknownBackend(name, known_backends())
    # Kube mode never validates the config (spec §2.2): the family check happens here too.
    check_families(key, enable_ipv4=ctx.config.enable_ipv4, enable_ipv6=ctx.config.enable_ipv6)
    module = importlib.import_module(_REGISTRY[key])
    factory = cast(Callable[[BackendContext], Backend], module.create)
    return factory(ctx)
