"""The etcd v2 :class:`~loden.subnet.store.LeaseStore` (the seed document's era).

Users of ``ETCDCTL_API=2 etcdctl set /coreos.com/network/config ...`` (etcd ≤ 3.5 with
``--enable-v2``) keep their flow. Semantics of flannel ≤ v0.17 (spec §3.9): keys carry
their own TTL; create is ``prevExist=false``; updates compare ``prevValue``; the watch
is a recursive long poll resumed by ``waitIndex``, and error 401 ("the event in
requested index is outdated and cleared") means we fell behind: relist. Lease values
are written in the v2-era form without ``PublicIPv6``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx

from loden.errors import LeaseConflict, StoreAuthError, StoreError, WatchCompacted
from loden.subnet.etcd_http import MALFORMED, EtcdHTTP, reading_reply
from loden.subnet.quick_http import Answer
from loden.subnet.store import Listing, StoredKV, StoreEvent, StoreEventKind, WatchBatch

log = logging.getLogger(__name__)

KEY_NOT_FOUND = 100
COMPARE_FAILED = 101
NODE_EXISTS = 105
EVENT_INDEX_CLEARED = 401
_DELETE_ACTIONS = {"delete", "expire", "compareAndDelete"}
#: Long-poll length: etcd sends nothing while idle, so re-poll well within proxies' limits.
POLL_SECONDS = 30.0


class EtcdV2Store:
    api = "v2"
    legacy_values = True

    def __init__(self, http: EtcdHTTP, prefix: str) -> None:
        self.http = http
        self.prefix = prefix.rstrip("/")
        self.subnets = f"{self.prefix}/subnets"
        self._config_target: str | None = None

    def _path(self, key: str) -> str:
        return "/v2/keys" + key

    def _name(self, key: str) -> str:
        return key[len(self.subnets) + 1 :] if key.startswith(self.subnets + "/") else key

    @staticmethod
    def _error(response: httpx.Response) -> tuple[int, str]:
        try:
            body = response.json()
            return int(body.get("errorCode", 0)), str(body.get("message", ""))
        except MALFORMED:
            return 0, response.text[:200]

    def _raise(self, what: str, response: httpx.Response) -> None:
        code, message = self._error(response)
        if response.status_code in (401, 403) and code != EVENT_INDEX_CLEARED:
            raise StoreAuthError(
                f"etcd v2 refused {what}: {message}; check -etcd-username/-etcd-password"
            )
        if code in (NODE_EXISTS, COMPARE_FAILED, KEY_NOT_FOUND):
            raise LeaseConflict(f"{what}: {message}")
        if response.status_code == 404:
            raise StoreError(
                f"etcd v2 API not available for {what} (HTTP 404): start etcd "
                "with --enable-v2=true or use -etcd-api=v3"
            )
        raise StoreError(f"etcd v2 {what} failed: HTTP {response.status_code} {message}")

    def _kv(self, node: dict[str, Any]) -> StoredKV:
        ttl = node.get("ttl")
        return StoredKV(
            self._name(node["key"]),
            str(node.get("value", "")).encode(),
            None if ttl is None else float(ttl),
            int(node.get("modifiedIndex", 0)),
            int(node.get("createdIndex", 0)),
        )

    # -- LeaseStore ---------------------------------------------------------------------------

    async def get_config(self) -> bytes | None:
        response = await self.http.request(
            "GET", self._path(f"{self.prefix}/config"), params={"quorum": "true"}
        )
        if response.status_code == 200:
            with reading_reply("get config"):
                return self._config_value(response.json())
        code, _ = self._error(response)
        if code == KEY_NOT_FOUND or response.status_code == 404:
            return None
        self._raise("get config", response)
        return None

    async def quick_config(self) -> tuple[bool, bytes | None]:
        """The read :meth:`get_config` makes, on the probe connection. A 404 is an
        answer, as there (the key is absent)."""
        if self._config_target is None:
            url = httpx.URL(self._path(f"{self.prefix}/config"), params={"quorum": "true"})
            self._config_target = url.raw_path.decode("ascii")
        value: list[bytes | None] = []

        def accept(answer: Answer) -> bool:
            if answer.status == 404:
                value.append(None)
                return True
            if answer.status != 200:
                return False
            value.append(self._config_value(json.loads(answer.body)))  # malformed: no answer
            return True

        answered = await self.http.quick("GET", self._config_target, accept=accept)
        return (True, value[0]) if answered and value else (False, None)

    @staticmethod
    def _config_value(reply: Any) -> bytes:
        return str(reply["node"].get("value", "")).encode()

    async def put_config(self, value: bytes) -> None:
        response = await self.http.request(
            "PUT", self._path(f"{self.prefix}/config"), data={"value": value.decode()}
        )
        if response.status_code not in (200, 201):
            self._raise("put config", response)

    async def pages(self) -> AsyncIterator[Listing]:
        yield await self.list()  # one reply holds them all: there are no pages to read

    async def list(self, *, with_ttl: bool = False) -> Listing:
        response = await self.http.request(
            "GET", self._path(self.subnets), params={"recursive": "true", "quorum": "true"}
        )
        with reading_reply("list subnets"):
            index = int(response.headers.get("X-Etcd-Index", "0"))
            if response.status_code == 200:
                nodes = response.json()["node"].get("nodes") or []
                kvs = tuple(self._kv(n) for n in nodes if not n.get("dir"))
                return Listing(kvs, index)
        code, _ = self._error(response)
        if code == KEY_NOT_FOUND:
            return Listing((), index)
        self._raise("list subnets", response)
        return Listing((), index)

    async def created_since(self, cursor: int) -> tuple[StoredKV, ...]:
        """v2 cannot filter by creation: the whole listing, filtered here."""
        listing = await self.list()
        return tuple(kv for kv in listing.kvs if kv.created > cursor)

    async def get(self, name: str) -> StoredKV | None:
        response = await self.http.request(
            "GET", self._path(f"{self.subnets}/{name}"), params={"quorum": "true"}
        )
        if response.status_code == 200:
            with reading_reply(f"get {name}"):
                return self._kv(response.json()["node"])
        code, _ = self._error(response)
        if code == KEY_NOT_FOUND:
            return None
        self._raise(f"get {name}", response)
        return None

    async def _set(
        self, name: str, value: bytes, ttl: int | None, params: dict[str, str]
    ) -> StoredKV:
        form = {"value": value.decode()}
        if ttl is not None:
            form["ttl"] = str(ttl)
        response = await self.http.request(
            "PUT", self._path(f"{self.subnets}/{name}"), params=params, data=form
        )
        if response.status_code not in (200, 201):
            self._raise(f"write {name}", response)
        with reading_reply(f"write {name}"):
            return self._kv(response.json()["node"])

    async def create(self, name: str, value: bytes, ttl: int | None) -> StoredKV:
        return await self._set(name, value, ttl, {"prevExist": "false"})

    async def update(
        self, name: str, value: bytes, ttl: int | None, *, expect_value: bytes
    ) -> StoredKV:
        return await self._set(name, value, ttl, {"prevValue": expect_value.decode()})

    async def delete(self, name: str, *, expect_value: bytes | None = None) -> bool:
        params = {} if expect_value is None else {"prevValue": expect_value.decode()}
        response = await self.http.request(
            "DELETE", self._path(f"{self.subnets}/{name}"), params=params
        )
        if response.status_code == 200:
            return True
        code, _ = self._error(response)
        if code in (KEY_NOT_FOUND, COMPARE_FAILED):
            return False
        self._raise(f"delete {name}", response)
        return False

    async def watch(self, cursor: int) -> AsyncIterator[WatchBatch]:
        while True:
            response = await self.http.long_poll(
                self._path(self.subnets),
                params={"wait": "true", "recursive": "true", "waitIndex": str(cursor + 1)},
                poll_seconds=POLL_SECONDS,
            )
            if response is None:
                continue
            if response.status_code != 200:
                code, message = self._error(response)
                if code == EVENT_INDEX_CLEARED:
                    raise WatchCompacted(f"v2 index {cursor + 1} cleared: {message}")
                if code == KEY_NOT_FOUND:
                    # The subnets directory does not exist yet: wait for it to appear.
                    with reading_reply("watch subnets"):
                        cursor = max(cursor, int(response.headers.get("X-Etcd-Index", cursor)))
                    continue
                self._raise("watch subnets", response)
            with reading_reply("watch subnets"):
                body = response.json()
                node = body.get("node") or {}
                cursor = max(cursor, int(node.get("modifiedIndex", cursor)))
                if node.get("dir"):
                    continue
                action = body.get("action", "")
                name = self._name(node.get("key", ""))
                if action in _DELETE_ACTIONS:
                    event = StoreEvent(StoreEventKind.DELETE, name, b"")
                else:
                    ttl = node.get("ttl")
                    event = StoreEvent(
                        StoreEventKind.PUT,
                        name,
                        str(node.get("value", "")).encode(),
                        None if ttl is None else float(ttl),
                        cursor,
                    )
            yield WatchBatch((event,), cursor)

    async def aclose(self) -> None:
        await self.http.aclose()
