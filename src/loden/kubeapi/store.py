"""Objects, the global resourceVersion counter, the event history and the watchers.

As in kube-apiserver over etcd: every write takes the next value of one counter for the
whole store (so versions are monotonic across kinds), an object's
``metadata.resourceVersion`` is the counter value of its last write, a list carries the
counter value at read time, and a write that changes nothing is not a write (no new
version, no event). The history of events is kept from the last compaction on; it
serves watches from a version (replay, then live) and reads *at* an old version (a
paged list's next page, ``resourceVersionMatch=Exact``). A version older than the
compacted window is answered ``410``. A DELETED event carries the object's last state
with the version of the deletion, as the etcd3 watcher hands it out.

Single-threaded by design: every method runs on the server's event loop.
"""

from __future__ import annotations

import asyncio
import copy
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from loden.kubeapi.status import expired

JsonObject = dict[str, Any]
Key = tuple[str, str, str]
"""(resource, namespace, name); namespace is "" for cluster-scoped kinds."""


@dataclass(frozen=True, slots=True)
class Event:
    """One committed write."""

    rv: int
    type: str  # ADDED, MODIFIED, DELETED
    key: Key
    obj: JsonObject  # the object after the write (DELETED: last state, version of the delete)
    prev: JsonObject | None  # the object before the write (None for ADDED)

    @property
    def resource(self) -> str:
        return self.key[0]


@dataclass(eq=False)
class Watcher:
    """A live subscription: committed events for ``resource`` are put on ``queue``.

    A watcher whose queue holds more than ``limit`` events is closed (``overflowed``) the
    way the real watch cache drops a consumer that cannot keep up.
    """

    resource: str
    queue: asyncio.Queue[Event | None] = field(default_factory=asyncio.Queue)
    limit: int = 100_000
    overflowed: bool = False

    def offer(self, event: Event) -> None:
        if self.overflowed:
            return
        if self.queue.qsize() >= self.limit:
            self.overflowed = True
            self.queue.put_nowait(None)
            return
        self.queue.put_nowait(event)

    def close(self) -> None:
        self.queue.put_nowait(None)


class Store:
    """All objects of all kinds, versioned by one counter."""

    def __init__(self, *, history_limit: int = 100_000, start_rv: int = 0) -> None:
        self.rv = start_rv
        self.compacted = start_rv  # events with rv <= compacted are gone
        self.history_limit = history_limit
        self.objects: dict[Key, JsonObject] = {}
        self.history: deque[Event] = deque()
        self.watchers: set[Watcher] = set()
        self.on_commit: Callable[[], None] | None = None  # persistence hook

    # -------------------------------------------------------------- reads

    def get(self, key: Key) -> JsonObject | None:
        obj = self.objects.get(key)
        return copy.deepcopy(obj) if obj is not None else None

    def items(self, resource: str, namespace: str | None = None) -> list[JsonObject]:
        """Current objects of ``resource`` (optionally one namespace), sorted by key.

        Read-only views (no copies: a list of thousands of nodes is served often); a
        stored object is only ever replaced, never changed in place, so the views stay
        valid, but callers must not modify them.
        """
        return [
            self.objects[key]
            for key in sorted(self.objects)
            if key[0] == resource and (namespace is None or key[1] == namespace)
        ]

    def items_at(self, resource: str, rv: int, namespace: str | None = None) -> list[JsonObject]:
        """The objects of ``resource`` as they were right after version ``rv``.

        :raises ApiError: 410 when ``rv`` is older than the compacted window.
        """
        if rv >= self.rv:
            return self.items(resource, namespace)
        self.check_not_compacted(rv)
        state: dict[Key, JsonObject] = {
            key: obj
            for key, obj in self.objects.items()
            if key[0] == resource and (namespace is None or key[1] == namespace)
        }
        for event in reversed(self.history):
            if event.rv <= rv:
                break
            if event.key[0] != resource or (namespace is not None and event.key[1] != namespace):
                continue
            if event.type == "ADDED":
                state.pop(event.key, None)
            elif event.prev is not None:
                state[event.key] = event.prev
        return [state[key] for key in sorted(state)]  # read-only views, as items()

    def check_not_compacted(self, rv: int) -> None:
        if rv < self.compacted:
            raise expired(f"too old resource version: {rv} ({self.compacted + 1})")

    def events_since(self, rv: int) -> Iterator[Event]:
        """Committed events with a version above ``rv``, oldest first.

        :raises ApiError: 410 ``Expired`` when events after ``rv`` were compacted.
        """
        self.check_not_compacted(rv)
        for event in self.history:
            if event.rv > rv:
                yield event

    # -------------------------------------------------------------- writes

    def commit(self, key: Key, obj: JsonObject | None) -> Event | None:
        """Write ``obj`` at ``key`` (``None`` deletes); returns the event, or None for a no-op.

        Sets ``metadata.resourceVersion`` of the stored object to the new version.
        """
        prev = self.objects.get(key)
        if obj is None:
            if prev is None:
                return None
            self.rv += 1
            gone = copy.deepcopy(prev)
            gone["metadata"]["resourceVersion"] = str(self.rv)
            del self.objects[key]
            return self._record(Event(self.rv, "DELETED", key, gone, prev))
        if prev is not None:
            candidate = copy.deepcopy(obj)
            candidate["metadata"]["resourceVersion"] = prev["metadata"]["resourceVersion"]
            if candidate == prev:
                return None
        self.rv += 1
        stored = copy.deepcopy(obj)
        stored["metadata"]["resourceVersion"] = str(self.rv)
        self.objects[key] = stored
        kind = "ADDED" if prev is None else "MODIFIED"
        return self._record(Event(self.rv, kind, key, copy.deepcopy(stored), prev))

    def _record(self, event: Event) -> Event:
        self.history.append(event)
        while len(self.history) > self.history_limit:
            self.compacted = self.history.popleft().rv
        for watcher in list(self.watchers):
            if watcher.resource == event.resource:
                watcher.offer(event)
        if self.on_commit is not None:
            self.on_commit()
        return event

    def compact(self, rv: int | None = None) -> int:
        """Drop the history up to ``rv`` (default: everything); returns the compacted version."""
        target = self.rv if rv is None else min(rv, self.rv)
        while self.history and self.history[0].rv <= target:
            self.history.popleft()
        self.compacted = max(self.compacted, target)
        return self.compacted

    # -------------------------------------------------------------- watchers

    def subscribe(self, resource: str) -> Watcher:
        watcher = Watcher(resource)
        self.watchers.add(watcher)
        return watcher

    def unsubscribe(self, watcher: Watcher) -> None:
        self.watchers.discard(watcher)

    def close_watchers(self) -> int:
        """End every live watch (their streams finish); returns how many there were."""
        count = len(self.watchers)
        for watcher in list(self.watchers):
            watcher.close()
        return count
