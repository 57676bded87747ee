"""The etcd v3 :class:`~loden.subnet.store.LeaseStore`, over the v3 JSON gateway.

Why the gateway and not gRPC: it is part of every etcd ≥ 3.3 server, needs no
generated code, and httpx gives us TLS, pooling and streaming. Keys and values travel
base64-encoded; 64-bit integers come back as JSON strings.

Semantics follow flannel (spec §3): each create/update grants a *new* etcd lease of
the lease TTL and attaches the key to it (the old etcd lease is left to expire,
compat item 4). A key with no etcd lease is a reservation. Creation is a transaction
on ``version == 0``; updates compare the value we read, so an operator's or another
node's write in between is never overwritten.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx

from loden.errors import (
    LeaseConflict,
    StoreAuthError,
    StoreError,
    StoreUnavailable,
    WatchCompacted,
)
from loden.subnet.etcd_http import EtcdHTTP, reading_reply
from loden.subnet.quick_http import Answer
from loden.subnet.store import Listing, StoredKV, StoreEvent, StoreEventKind, WatchBatch

log = logging.getLogger(__name__)


#: Leases per range request of a listing.
LIST_PAGE = 500


def _b64(data: bytes | str) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.b64encode(raw).decode()


def _unb64(text: str | None) -> bytes:
    return base64.b64decode(text or "")


def prefix_end(prefix: bytes) -> bytes:
    """The ``range_end`` that selects every key starting with ``prefix``."""
    end = bytearray(prefix)
    for i in range(len(end) - 1, -1, -1):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[: i + 1])
    return b"\0"


class EtcdV3Store:
    api = "v3"
    legacy_values = False

    def __init__(
        self, http: EtcdHTTP, prefix: str, *, username: str = "", password: str = ""
    ) -> None:
        self.http = http
        self.prefix = prefix.rstrip("/")
        self.subnets = f"{self.prefix}/subnets/"
        self._username = username
        self._password = password
        self._ttl_cache: dict[int, float] = {}
        self._range_body: bytes | None = None

    # -- plumbing ---------------------------------------------------------------------------

    async def _post(self, path: str, body: dict[str, Any], *, retry_auth: bool = True) -> Any:
        if self._username and "Authorization" not in self.http.headers:
            await self._authenticate()
        response = await self.http.request("POST", f"/v3/{path}", json=body)
        if response.status_code == 200:
            with reading_reply(path):
                return response.json()
        text = response.text
        if retry_auth and self._username and ("token" in text or response.status_code == 401):
            self.http.headers.pop("Authorization", None)
            return await self._post(path, body, retry_auth=False)
        if (
            response.status_code in (401, 403)
            or "permission denied" in text
            or "user name is empty" in text
        ):
            raise StoreAuthError(
                f"etcd refused {path}: {text.strip()[:200]}; check "
                "-etcd-username/-etcd-password and the user's role"
            )
        raise StoreError(f"etcd {path} failed: HTTP {response.status_code} {text.strip()[:200]}")

    async def _authenticate(self) -> None:
        response = await self.http.request(
            "POST",
            "/v3/auth/authenticate",
            json={"name": self._username, "password": self._password},
        )
        if response.status_code != 200:
            raise StoreAuthError(
                f"etcd authentication as {self._username!r} failed: {response.text.strip()[:200]}"
            )
        with reading_reply("auth/authenticate"):
            token = response.json()["token"]
            if not isinstance(token, str) or not token:
                raise ValueError(f"token is {token!r}, not a non-empty string")
        self.http.headers["Authorization"] = token

    def _key(self, name: str) -> str:
        return self.subnets + name

    def _name(self, key: bytes) -> str:
        text = key.decode("utf-8", "replace")
        return text[len(self.subnets) :] if text.startswith(self.subnets) else text

    async def _grant(self, ttl: int) -> int:
        reply = await self._post("lease/grant", {"TTL": ttl})
        with reading_reply("lease/grant"):
            return int(reply["ID"])

    async def _revoke(self, lease_id: int) -> None:
        try:
            await self._post("lease/revoke", {"ID": lease_id})
        except StoreError as exc:
            log.debug("revoking unused etcd lease %x failed: %s", lease_id, exc)

    async def _ttl(self, lease_id: int) -> float | None:
        if lease_id == 0:
            return None
        reply = await self._post("lease/timetolive", {"ID": lease_id})
        with reading_reply("lease/timetolive"):
            ttl = int(reply.get("TTL", -1))
        return float(ttl) if ttl >= 0 else 0.0

    def _kv(self, raw: dict[str, Any], ttl: float | None) -> StoredKV:
        return StoredKV(
            self._name(_unb64(raw.get("key"))),
            _unb64(raw.get("value")),
            ttl,
            int(raw.get("lease", 0)),
            int(raw.get("create_revision", 0)),
        )

    # -- LeaseStore ---------------------------------------------------------------------------

    async def get_config(self) -> bytes | None:
        reply = await self._post("kv/range", self._config_range())
        with reading_reply("kv/range"):
            return self._config_value(reply)

    async def quick_config(self) -> tuple[bool, bytes | None]:
        """The read :meth:`get_config` makes, on the probe connection (no token yet:
        only the full path can authenticate)."""
        if self._username and "Authorization" not in self.http.headers:
            return False, None
        if self._range_body is None:
            self._range_body = json.dumps(self._config_range()).encode()
        value: list[bytes | None] = []

        def accept(answer: Answer) -> bool:
            if answer.status != 200:
                return False
            # Parsed as get_config parses it: a 200 etcd would not send is no answer.
            value.append(self._config_value(json.loads(answer.body)))
            return True

        answered = await self.http.quick(
            "POST", "/v3/kv/range", json_body=self._range_body, accept=accept
        )
        return (True, value[0]) if answered and value else (False, None)

    def _config_range(self) -> dict[str, Any]:
        return {"key": _b64(f"{self.prefix}/config")}

    @staticmethod
    def _config_value(reply: Any) -> bytes | None:
        kvs = reply.get("kvs") or []
        return _unb64(kvs[0].get("value")) if kvs else None

    async def put_config(self, value: bytes) -> None:
        await self._post("kv/put", {"key": _b64(f"{self.prefix}/config"), "value": _b64(value)})

    async def list(self, *, with_ttl: bool = False) -> Listing:
        """Every lease, read in pages of :data:`LIST_PAGE` at one revision (as etcdctl
        pages): one 5,000-lease reply decoded at once peaked at ~10 MB of JSON objects,
        memory the agent kept as fragmented RSS afterwards (issue 14). Compacted between
        two pages: listed again from the start."""
        for attempt in range(3):
            try:
                kvs: list[StoredKV] = []
                revision = 0
                async for page in self.pages(with_ttl=with_ttl):
                    kvs += page.kvs
                    revision = page.cursor
                return Listing(tuple(kvs), revision)
            except WatchCompacted:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def pages(self, *, with_ttl: bool = False) -> AsyncIterator[Listing]:
        start = self.subnets.encode()
        end = _b64(prefix_end(start))
        key = start
        revision = 0
        while True:
            body: dict[str, Any] = {"key": _b64(key), "range_end": end, "limit": LIST_PAGE}
            if revision:
                body["revision"] = revision
            try:
                reply = await self._post("kv/range", body)
            except StoreError as exc:
                if revision and "compacted" in str(exc):
                    raise WatchCompacted(f"listing at revision {revision}: {exc}") from exc
                raise
            kvs = []
            with reading_reply("kv/range"):
                revision = revision or int(reply["header"]["revision"])
                page = reply.get("kvs") or []
                for raw in page:
                    lease_id = int(raw.get("lease", 0))
                    if lease_id == 0:
                        ttl: float | None = None
                    elif with_ttl:
                        ttl = await self._ttl(lease_id)
                    else:
                        ttl = float("nan")  # has a TTL; its length was not looked up
                    kvs.append(self._kv(raw, ttl))
                more = bool(reply.get("more")) and bool(page)
                if more:
                    key = _unb64(page[-1].get("key")) + b"\0"
            # The reply's decoded JSON goes before the consumer takes the page.
            del reply, page
            yield Listing(tuple(kvs), revision)
            if not more:
                return

    async def get(self, name: str) -> StoredKV | None:
        reply = await self._post("kv/range", {"key": _b64(self._key(name))})
        with reading_reply("kv/range"):
            kvs = reply.get("kvs") or []
            if not kvs:
                return None
            lease_id = int(kvs[0].get("lease", 0))
            return self._kv(kvs[0], None if lease_id == 0 else float("nan"))

    async def created_since(self, cursor: int) -> tuple[StoredKV, ...]:
        start = self.subnets.encode()
        body = {
            "key": _b64(start),
            "range_end": _b64(prefix_end(start)),
            "min_create_revision": cursor + 1,
            "keys_only": True,
        }
        reply = await self._post("kv/range", body)
        with reading_reply("kv/range"):
            return tuple(self._kv(raw, None) for raw in reply.get("kvs") or [])

    async def _put_if(
        self, name: str, value: bytes, ttl: int | None, compare: dict[str, Any]
    ) -> StoredKV:
        lease_id = await self._grant(ttl) if ttl is not None else 0
        put: dict[str, Any] = {"key": _b64(self._key(name)), "value": _b64(value)}
        if lease_id:
            put["lease"] = lease_id
        try:
            reply = await self._post(
                "kv/txn", {"compare": [compare], "success": [{"request_put": put}]}
            )
        except StoreUnavailable:
            raise
        with reading_reply("kv/txn"):
            succeeded = bool(reply.get("succeeded"))
        if not succeeded:
            if lease_id:
                await self._revoke(lease_id)
            raise LeaseConflict(f"{name}: compare-and-swap lost (key exists or changed)")
        return StoredKV(name, value, None if ttl is None else float(ttl), lease_id)

    async def create(self, name: str, value: bytes, ttl: int | None) -> StoredKV:
        return await self._put_if(
            name,
            value,
            ttl,
            {"key": _b64(self._key(name)), "target": "VERSION", "result": "EQUAL", "version": 0},
        )

    async def update(
        self, name: str, value: bytes, ttl: int | None, *, expect_value: bytes
    ) -> StoredKV:
        return await self._put_if(
            name,
            value,
            ttl,
            {
                "key": _b64(self._key(name)),
                "target": "VALUE",
                "result": "EQUAL",
                "value": _b64(expect_value),
            },
        )

    async def delete(self, name: str, *, expect_value: bytes | None = None) -> bool:
        key = _b64(self._key(name))
        if expect_value is None:
            reply = await self._post("kv/deleterange", {"key": key})
            with reading_reply("kv/deleterange"):
                return int(reply.get("deleted", 0)) > 0
        reply = await self._post(
            "kv/txn",
            {
                "compare": [
                    {"key": key, "target": "VALUE", "result": "EQUAL", "value": _b64(expect_value)}
                ],
                "success": [{"request_delete_range": {"key": key}}],
            },
        )
        with reading_reply("kv/txn"):
            return bool(reply.get("succeeded"))

    async def watch(self, cursor: int) -> AsyncIterator[WatchBatch]:
        start = self.subnets.encode()
        body = {
            "create_request": {
                "key": _b64(start),
                "range_end": _b64(prefix_end(start)),
                "start_revision": cursor + 1,
                # Progress notifications prove the store alive while no lease changes, so
                # the agent's probe stays quiet (only as often as the server's
                # --experimental-watch-progress-notify-interval, 10 min by default).
                "progress_notify": True,
            }
        }
        if self._username and "Authorization" not in self.http.headers:
            await self._authenticate()
        try:
            # "hasleader": a member that lost quorum ends the watch instead of going
            # silent, so the agent fails over and /healthz notices.
            async with self.http.stream(
                "POST", "/v3/watch", json=body, headers={"Grpc-Metadata-hasleader": "true"}
            ) as response:
                if response.status_code != 200:
                    raise StoreUnavailable(f"watch refused: HTTP {response.status_code}")
                async for line in response.aiter_lines():
                    if not line.strip():
                        continue
                    with reading_reply("watch"):
                        batch = self._batch(json.loads(line), cursor)
                    if batch is not None:
                        cursor = batch.cursor
                        yield batch
        except (httpx.TransportError, json.JSONDecodeError) as exc:
            raise StoreUnavailable(f"etcd watch stream broke: {exc or type(exc).__name__}") from exc
        raise StoreUnavailable("etcd closed the watch stream")

    def _batch(self, message: dict[str, Any], cursor: int) -> WatchBatch | None:
        if "error" in message:
            raise StoreUnavailable(f"etcd watch error: {message['error']}")
        result = message.get("result") or {}
        compact = int(result.get("compact_revision", 0))
        if compact:
            raise WatchCompacted(
                f"revision {cursor + 1} is compacted (etcd keeps history from {compact})"
            )
        if result.get("canceled"):
            raise StoreUnavailable(f"etcd canceled the watch: {result.get('cancel_reason')}")
        events = []
        for raw in result.get("events") or []:
            kv = raw.get("kv") or {}
            name = self._name(_unb64(kv.get("key")))
            cursor = max(cursor, int(kv.get("mod_revision", cursor)))
            if raw.get("type") == "DELETE":
                events.append(StoreEvent(StoreEventKind.DELETE, name, b""))
            else:
                lease_id = int(kv.get("lease", 0))
                events.append(
                    StoreEvent(
                        StoreEventKind.PUT,
                        name,
                        _unb64(kv.get("value")),
                        None if lease_id == 0 else float("nan"),
                        lease_id,
                    )
                )
        if not events and (result.get("created") or "header" not in result):
            return None
        # No events but a header: a progress notification, yielded as a liveness sign.
        return WatchBatch(tuple(events), cursor)

    async def aclose(self) -> None:
        await self.http.aclose()
