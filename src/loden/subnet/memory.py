"""An in-process :class:`~loden.subnet.store.LeaseStore` with etcd's semantics.

The test double for the subnet manager (httpx's ``MockTransport`` idea): revisions,
compare-and-swap, TTL expiry that emits DELETE events, bounded history with
compaction. Contract tests run the same cases against it and the real etcd adapters.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from loden.errors import LeaseConflict, StoreUnavailable, WatchCompacted
from loden.subnet.store import Listing, StoredKV, StoreEvent, StoreEventKind, WatchBatch


@dataclass(slots=True)
class _Entry:
    value: bytes
    expires: float | None
    revision: int
    created: int


class MemoryStore:
    api = "memory"

    def __init__(
        self,
        *,
        legacy_values: bool = False,
        history: int = 1000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.legacy_values = legacy_values
        self._clock = clock
        self._config: bytes | None = None
        self._data: dict[str, _Entry] = {}
        self._events: list[tuple[int, StoreEvent]] = []
        self._history = history
        self._revision = 1
        self._compacted = 0
        self._changed = asyncio.Condition()
        self._generation = 0
        self.requests = 0

    # -- helpers used by tests --------------------------------------------------------------

    def break_watches(self) -> None:
        """Make every open watch fail as if the connection dropped."""
        self._generation += 1

    def compact(self) -> None:
        self._compacted = self._revision
        self._events.clear()

    async def expire_now(self) -> None:
        await self._expire()

    async def _expire(self) -> None:
        now = self._clock()
        for name in [
            n for n, e in self._data.items() if e.expires is not None and e.expires <= now
        ]:
            del self._data[name]
            await self._emit(StoreEvent(StoreEventKind.DELETE, name, b""))

    async def _emit(self, event: StoreEvent) -> int:
        self._revision += 1
        self._events.append((self._revision, event))
        if len(self._events) > self._history:
            drop = len(self._events) - self._history
            self._compacted = self._events[drop - 1][0]
            del self._events[:drop]
        async with self._changed:
            self._changed.notify_all()
        return self._revision

    def _kv(self, name: str, entry: _Entry) -> StoredKV:
        ttl = None if entry.expires is None else max(0.0, entry.expires - self._clock())
        return StoredKV(name, entry.value, ttl, entry.revision, entry.created)

    # -- LeaseStore -------------------------------------------------------------------------

    async def get_config(self) -> bytes | None:
        self.requests += 1
        return self._config

    async def quick_config(self) -> tuple[bool, bytes | None]:
        return False, None  # get_config is the cheap path here (and faults go there)

    async def put_config(self, value: bytes) -> None:
        self.requests += 1
        self._config = value

    async def pages(self) -> AsyncIterator[Listing]:
        yield await self.list()  # one reply holds them all: there are no pages to read

    async def list(self, *, with_ttl: bool = False) -> Listing:
        self.requests += 1
        await self._expire()
        kvs = tuple(self._kv(n, e) for n, e in sorted(self._data.items()))
        return Listing(kvs, self._revision)

    async def created_since(self, cursor: int) -> tuple[StoredKV, ...]:
        self.requests += 1
        await self._expire()
        return tuple(self._kv(n, e) for n, e in sorted(self._data.items()) if e.created > cursor)

    async def get(self, name: str) -> StoredKV | None:
        self.requests += 1
        await self._expire()
        entry = self._data.get(name)
        return None if entry is None else self._kv(name, entry)

    async def _put(self, name: str, value: bytes, ttl: int | None) -> StoredKV:
        expires = None if ttl is None else self._clock() + ttl
        revision = await self._emit(
            StoreEvent(
                StoreEventKind.PUT,
                name,
                value,
                None if ttl is None else float(ttl),
                self._revision + 1,
            )
        )
        old = self._data.get(name)
        self._data[name] = _Entry(
            value, expires, revision, revision if old is None else old.created
        )
        return self._kv(name, self._data[name])

    async def create(self, name: str, value: bytes, ttl: int | None) -> StoredKV:
        self.requests += 1
        await self._expire()
        if name in self._data:
            raise LeaseConflict(f"{name} already exists")
        return await self._put(name, value, ttl)

    async def update(
        self, name: str, value: bytes, ttl: int | None, *, expect_value: bytes
    ) -> StoredKV:
        self.requests += 1
        await self._expire()
        entry = self._data.get(name)
        if entry is None or entry.value != expect_value:
            raise LeaseConflict(f"{name} changed under us")
        return await self._put(name, value, ttl)

    async def delete(self, name: str, *, expect_value: bytes | None = None) -> bool:
        self.requests += 1
        entry = self._data.get(name)
        if entry is None or (expect_value is not None and entry.value != expect_value):
            return False
        del self._data[name]
        await self._emit(StoreEvent(StoreEventKind.DELETE, name, b""))
        return True

    async def watch(self, cursor: int) -> AsyncIterator[WatchBatch]:
        self.requests += 1
        generation = self._generation
        while True:
            if generation != self._generation:
                raise StoreUnavailable("watch stream broken (test)")
            if cursor < self._compacted:
                raise WatchCompacted(f"revision {cursor} compacted (now {self._compacted})")
            pending = [(rev, ev) for rev, ev in self._events if rev > cursor]
            if pending:
                cursor = pending[-1][0]
                yield WatchBatch(tuple(ev for _, ev in pending), cursor)
                continue
            timed_out = False
            async with self._changed:
                # asyncio.timeout, not wait_for: Python 3.11's wait_for swallows a
                # cancellation that arrives as the notification does (gh-86296), and the
                # agent then never stops.
                try:
                    async with asyncio.timeout(0.5):
                        await self._changed.wait()
                except TimeoutError:
                    timed_out = True
            if timed_out:
                await self._expire()

    async def aclose(self) -> None:
        return None
