"""The key-value seam under the etcd subnet manager: one adapter per etcd API.

flannel splits allocation policy (``LocalManager``) from storage (``Registry``); Loden
does the same. :class:`LeaseStore` is the storage half: raw keys and values under
``<prefix>/subnets``, compare-and-swap writes, TTLs and a resumable watch. The v3
adapter uses etcd leases and revisions, the v2 adapter TTL keys and indexes, and
:mod:`loden.subnet.memory` is an in-process double with the same semantics.

Every write is conditional, so two nodes can never both believe they hold a subnet:
``create`` succeeds only if the key does not exist, ``update`` only if the value is
still the one we read (or wrote) last.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class StoredKV:
    """One key under ``<prefix>/subnets`` as stored (key relative: ``10.1.2.0-24``)."""

    name: str
    value: bytes
    #: Seconds to live; ``None`` means no TTL (a reservation); NaN: has a TTL whose
    #: length was not looked up (a v3 lookup costs one request per key).
    ttl: float | None
    #: Adapter handle: etcd v3 lease id or v2 modifiedIndex.
    ref: int = 0
    #: When the key was created, in the store's own order (etcd v3 create_revision, v2
    #: createdIndex; 0: unknown): which of two overlapping leases came first.
    created: int = 0


class StoreEventKind(enum.Enum):
    PUT = "put"
    DELETE = "delete"


@dataclass(frozen=True, slots=True)
class StoreEvent:
    kind: StoreEventKind
    name: str
    value: bytes  # empty for DELETE
    ttl: float | None = None
    ref: int = 0


@dataclass(frozen=True, slots=True)
class WatchBatch:
    events: tuple[StoreEvent, ...]
    #: Resume a broken watch from here (the revision/index of the last event).
    cursor: int


@dataclass(frozen=True, slots=True)
class Listing:
    kvs: tuple[StoredKV, ...]
    #: Revision (v3) or index (v2) the listing is consistent at; watch from ``cursor``.
    cursor: int


class LeaseStore(Protocol):
    """Storage for the network config and lease keys of one etcd prefix."""

    api: str  # "v3" | "v2" | "memory"
    #: Lease values in the era of this API (spec §3.9): v2 omits ``PublicIPv6``.
    legacy_values: bool

    async def get_config(self) -> bytes | None:
        """The raw ``<prefix>/config`` value, or None when absent."""
        ...

    async def quick_config(self) -> tuple[bool, bytes | None]:
        """:meth:`get_config` on a cheap path: (True, its value) when the store answered
        that read just now; (False, None) means "no answer here" (none, or no cheap
        path at all), never an error: the caller then asks :meth:`get_config`, whose
        failure says what is wrong. For the agent's periodic reads (the /healthz probe
        every 3 s, the config check every 30 s): through httpx they were most of an
        idle agent's CPU.
        """
        ...

    async def put_config(self, value: bytes) -> None: ...

    async def list(self, *, with_ttl: bool = False) -> Listing:
        """All lease keys. ``with_ttl`` also looks up remaining TTLs (costly on v3)."""
        ...

    def pages(self) -> AsyncIterator[Listing]:
        """The keys :meth:`list` gives, a page at a time, every page at one cursor: a
        reader that keeps only what it needs of each page never holds all raw values.

        :raises WatchCompacted: the listing's revision was compacted between two pages:
            list again.
        """
        ...

    async def get(self, name: str) -> StoredKV | None: ...

    async def created_since(self, cursor: int) -> tuple[StoredKV, ...]:
        """The lease keys created after ``cursor`` (a :class:`Listing` cursor), with
        ``created`` set; values may be left empty. What a node that planned from a
        listing at ``cursor`` may have raced with."""
        ...

    async def create(self, name: str, value: bytes, ttl: int | None) -> StoredKV:
        """Create ``name`` only if absent; ``ttl`` None makes no TTL.

        :raises LeaseConflict: the key exists.
        """
        ...

    async def update(
        self, name: str, value: bytes, ttl: int | None, *, expect_value: bytes
    ) -> StoredKV:
        """Overwrite ``name`` only if its current value is ``expect_value``.

        :raises LeaseConflict: the key is gone or holds another value.
        """
        ...

    async def delete(self, name: str, *, expect_value: bytes | None = None) -> bool:
        """Delete (conditionally); returns whether a key was deleted."""
        ...

    def watch(self, cursor: int) -> AsyncIterator[WatchBatch]:
        """Events after ``cursor`` (exclusive), in order.

        :raises WatchCompacted: the store no longer has history from ``cursor``: relist.
        :raises StoreUnavailable: the stream broke; the caller resumes from its cursor.
        """
        ...

    async def aclose(self) -> None: ...
