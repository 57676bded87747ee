"""The one interface the agent talks to for its network config, lease and peers.

Two implementations: :class:`loden.subnet.manager.EtcdSubnetManager` (etcd v3/v2, the
seed document's store) and the Kubernetes subnet manager (``--kube-subnet-mgr``: the
node's podCIDR is the lease, backend data lives in node annotations). The agent never
reaches behind this protocol (no ``manager.store``, no store-specific health): what it
needs to know about the store's health comes from :meth:`SubnetManager.probe` and
:attr:`SubnetManager.watch_restarts`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from loden.model.config import NetworkConfig
from loden.model.lease import Lease, LeaseAttrs, LeaseEvent
from loden.model.subnet_env import PreviousSubnets


@dataclass(frozen=True, slots=True)
class WatchResult:
    """Either a full snapshot (after start or a relist) or incremental events."""

    snapshot: tuple[Lease, ...] | None = None
    events: tuple[LeaseEvent, ...] = ()


class SubnetManager(Protocol):
    """Config, lease and peer source for one node's agent."""

    @property
    def name(self) -> str:
        """Human-readable store name for logs (``etcd v3``, ``etcd v2``, ``kube``)."""
        ...

    @property
    def watch_restarts(self) -> int:
        """How often the peer watch had to be re-established (a metric)."""
        ...

    async def get_network_config(self) -> NetworkConfig:
        """The validated network config.

        :raises ConfigNotFound: there is none yet.
        :raises NetworkConfigError: it does not validate.
        :raises StoreUnavailable: the store does not answer.
        """
        ...

    async def acquire_lease(self, attrs: LeaseAttrs, previous: PreviousSubnets) -> Lease:
        """Take (or keep) this node's lease and publish ``attrs`` in it."""
        ...

    async def renew_lease(self, lease: Lease) -> Lease:
        """Extend ``lease``; re-create it if it vanished and is still free.

        :raises LeaseRevoked: another node holds our subnet now.
        """
        ...

    def renew_delay(self, lease: Lease) -> float:
        """Seconds until ``lease`` should be renewed next."""
        ...

    def watch_leases(self) -> AsyncIterator[WatchResult]:
        """Peer leases: a snapshot first, then events (a snapshot again after a relist)."""
        ...

    async def list_leases(self) -> list[Lease]:
        """Every lease the store holds now (operator commands)."""
        ...

    async def probe(self) -> None:
        """Ask the store one cheap question, for /healthz.

        :raises StoreUnavailable: it does not answer.
        """
        ...

    async def aclose(self) -> None: ...
