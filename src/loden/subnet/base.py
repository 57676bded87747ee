"""The one interface the agent talks to for its network config, lease and peers.

Two implementations: :class:`loden.subnet.manager.EtcdSubnetManager` (etcd v3/v2, the
seed document's store) and the Kubernetes subnet manager (``--kube-subnet-mgr``: the
node's podCIDR is the lease, backend data lives in node annotations). The agent never
reaches behind this protocol (no ``manager.store``, no store-specific health): what it
needs to know about the store's health comes from :meth:`SubnetManager.probe` and
:attr:`SubnetManager.watch_restarts`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import Protocol

from loden.model.config import NetworkConfig
from loden.model.lease import Lease, LeaseAttrs, LeaseEvent
from loden.model.subnet_env import PreviousSubnets

#: How old a config read may be for the store probe and the periodic config check, which
#: wake on the same tick and ask the same question.
SHARED_READ_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class WatchResult:
    """Either a full snapshot (after start or a relist) or incremental events."""

    snapshot: tuple[Lease, ...] | None = None
    events: tuple[LeaseEvent, ...] = ()


@dataclass(frozen=True, slots=True)
class PublicIPOverride:
    """Public addresses the store imposes on this node (kube: the ``node-public-ip``
    annotations, spec §4.1 step 5); ``None`` keeps ``--public-ip``/detection."""

    ipv4: IPv4Address | None = None
    ipv6: IPv6Address | None = None


class SubnetManager(Protocol):
    """Config, lease and peer source for one node's agent."""

    @property
    def name(self) -> str:
        """Human-readable store name for logs (``etcd``, ``kube``): "<name> is not
        answering"."""
        ...

    @property
    def watch_restarts(self) -> int:
        """How often the peer watch had to be re-established (a metric)."""
        ...

    async def get_network_config(self, *, max_age: float = 0.0) -> NetworkConfig:
        """The validated network config; ``max_age``: an answer the store gave that many
        seconds ago (or is giving now, to another asker) will do.

        :raises ConfigNotFound: there is none yet.
        :raises NetworkConfigError: it does not validate.
        :raises StoreUnavailable: the store does not answer.
        """
        ...

    async def public_ip_override(self) -> PublicIPOverride:
        """Addresses that override ``--public-ip``/``--public-ipv6`` (asked once, before
        the interface is chosen). etcd: none.

        :raises StoreUnavailable: the store does not answer (the agent retries).
        """
        ...

    async def acquire_lease(self, attrs: LeaseAttrs, previous: PreviousSubnets) -> Lease:
        """Take (or keep) this node's lease and publish ``attrs`` in it.

        :raises SubnetsExhausted: nothing free (the agent retries).
        :raises StoreUnavailable: the store does not answer (the agent retries).
        :raises StoreError: anything else (the agent stops with the message).
        """
        ...

    async def complete_lease(self, lease: Lease) -> None:
        """Called once, after subnet.env is written and the data plane is up. etcd:
        nothing; kube: the ``NetworkUnavailable=False`` node condition (spec §4.5).

        :raises StoreUnavailable: the store does not answer (the agent retries).
        """
        ...

    async def renew_lease(self, lease: Lease) -> Lease:
        """Extend ``lease``; re-create it if it vanished and is still free. A store
        whose leases never expire (kube) returns ``lease`` unchanged.

        :raises LeaseRevoked: another node holds our subnet now (the agent exits 3).
        :raises StoreUnavailable: the store does not answer (the agent retries).
        :raises LeaseConflict: a compare-and-swap was lost (the agent retries at once).
        """
        ...

    def renew_delay(self, lease: Lease) -> float:
        """Seconds until ``lease`` should be renewed next."""
        ...

    def watch_leases(self, held: Mapping[str, Lease] | None = None) -> AsyncIterator[WatchResult]:
        """Peer leases: a snapshot first, then events (a snapshot again after a relist).
        A result with neither only says that the store is alive (an etcd progress
        notification). ``held``: the leases the caller holds now (a live view); a
        snapshot may give an equal lease as that object, so that it costs no memory.

        Store outages are retried inside (counted in :attr:`watch_restarts`); anything
        that escapes the iterator is fatal for the agent.
        """
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
