"""Asyncio client for the etcd v3 JSON gateway (``/v3/...``), built on ``httpx``.

Why the gateway: no maintained asyncio gRPC etcd client exists (see the test-environment
facts), while every etcd >= 3.4 serves the same API as JSON over HTTP/1.1. Wire facts
(verified against etcd 3.4.23):

* bytes are base64, int64 fields are JSON *strings* and zero values are omitted
  (``"succeeded"`` is absent when false, a DELETE watch event is the only one carrying
  ``"type"``); we always send int64 as strings so lease IDs above 2**53 survive.
* errors are ``{"error", "message", "code"}`` (gRPC code) with HTTP 400/401/404/503;
  errors inside a stream are ``{"error": {"grpc_code", "message", ...}}``.
* ``/v3/watch`` stays open after the request body ends. The first line is
  ``{"result": {"created": true}}``; a compacted start revision then gets a separate
  ``{"canceled": true, "compact_revision": "N"}`` line and the stream stays open.
* during catch-up etcd sends at most 1000 revisions per response but stamps every one
  with the *current* header revision, so resume from :attr:`WatchBatch.next_revision`
  (last event + 1), never from ``header.revision + 1``.
* a simple auth token ``xxx.N`` for a raft index N the member has not reached makes the
  request *block*; a stale token gets ``invalid auth token`` (code 16).

The endpoint failover and TLS set-up (:class:`EndpointPool`) is shared with the v2
client in :mod:`loden.subnet.etcd_v2_client`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import socket
import ssl
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, TypeVar

import httpx

from loden.errors import ConfigError, StoreAuthError, StoreError, StoreUnavailable, WatchCompacted

log = logging.getLogger(__name__)
T = TypeVar("T")
Json = dict[str, Any]
KeyLike = bytes | str

# Errors that etcd returns before a request is proposed: safe to send elsewhere even for writes.
_NOT_APPLIED = ("no leader", "not capable", "server stopped", "too many requests", "unhealthy")
_TOKEN_STALE = ("invalid auth token", "revision of auth store is old")
_AUTH_FAILED = ("authentication failed", "user name", "permission denied", "role name")
# TCP keepalive so a member that vanished (host down, cable cut) breaks idle connections.
_SOCKET_OPTIONS = [
    (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
    (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 10),
    (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 5),
    (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3),
]


class LeaseNotFound(StoreError):
    """The etcd lease does not exist (expired or revoked); e.g. a put with a dead lease."""


class RevisionCompacted(WatchCompacted):
    """A watch or range asked for a revision that compaction removed; relist.

    ``compact_revision`` is the server's compaction point (0 when etcd did not say, as for
    a range request); a new watch must start above the relist's revision anyway.
    """

    def __init__(self, message: str, compact_revision: int = 0) -> None:
        super().__init__(message)
        self.compact_revision = compact_revision


def make_ssl_context(
    ca_file: str | None, cert_file: str | None, key_file: str | None
) -> ssl.SSLContext:
    """Build the one TLS context used for every https endpoint.

    Explicit on purpose: ``ssl.create_default_context`` / httpx's defaults honour
    ``SSL_CERT_FILE`` and friends, and these machines export CA-bundle variables that
    would replace our CA. Without ``ca_file`` we load OpenSSL's *compiled-in* default
    paths (not the environment-overridable ones). Hostnames are verified, TLS >= 1.2
    (as flannel). Unreadable or invalid files are an operator error (:class:`ConfigError`).
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    where = _tls_files(ca_file, cert_file, key_file)
    if bool(cert_file) != bool(key_file):
        raise ConfigError(f"etcd TLS needs both a certificate and a key file ({where})")
    try:
        if ca_file:
            ctx.load_verify_locations(cafile=ca_file)
        else:
            paths = ssl.get_default_verify_paths()
            cafile = paths.openssl_cafile if os.path.isfile(paths.openssl_cafile) else None
            capath = paths.openssl_capath if os.path.isdir(paths.openssl_capath) else None
            if cafile or capath:
                ctx.load_verify_locations(cafile=cafile, capath=capath)
        if cert_file and key_file:
            ctx.load_cert_chain(cert_file, key_file)
    except OSError as exc:  # ssl.SSLError is an OSError too
        raise ConfigError(f"cannot load etcd TLS files ({where}): {exc}; fix the paths") from exc
    return ctx


def _tls_files(ca: str | None, cert: str | None, key: str | None) -> str:
    return f"ca-file={ca or '-'} cert-file={cert or '-'} key-file={key or '-'}"


def _ssl_cause(exc: BaseException) -> ssl.SSLError | None:
    """The ssl error at the root of an httpx exception chain, if any (bounded walk)."""
    cur: BaseException | None = exc
    for _ in range(8):
        if cur is None:
            return None
        if isinstance(cur, ssl.SSLError):
            return cur
        cur = cur.__cause__ or cur.__context__
    return None


class AttemptFailed(Exception):
    """One endpoint failed in a way that another endpoint may not (internal signal).

    ``maybe_applied``: the request may have reached etcd (a write must not be re-sent).
    ``auth``: a TLS/credential failure (all endpoints failing this way is final).
    """

    def __init__(self, reason: str, *, maybe_applied: bool = False, auth: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.maybe_applied = maybe_applied
        self.auth = auth


class EndpointPool:
    """Endpoints, one ``httpx.AsyncClient`` and the failover loop for one logical call.

    A call tries the endpoint that worked last, then the others in order, in rounds with
    a short back-off, until ``call_timeout`` has passed. One attempt is bounded by
    ``request_timeout``: when a leader dies, etcd 3.4 holds a proposal on a follower for
    ~7 s before answering "request timed out"; giving up earlier lets reads and
    idempotent writes move to a member that already has the new leader. Writes that are
    not idempotent (``idempotent=False``) are only re-sent when the failure proves the
    request was not applied (connection refused, "no leader"); otherwise
    :class:`StoreUnavailable` says the outcome is unknown so the caller re-reads instead
    of, e.g., losing its own create to its own retry.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        call_timeout: float = 10.0,
        connect_timeout: float = 3.0,
        request_timeout: float = 3.0,
        auth: httpx.Auth | None = None,
    ) -> None:
        urls = [e.strip().rstrip("/") for e in endpoints if e.strip()]
        if not urls:
            raise ConfigError("no etcd endpoints given; pass e.g. http://127.0.0.1:2379")
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise ConfigError(f"etcd endpoint {url!r} must start with http:// or https://")
        self.endpoints: tuple[str, ...] = tuple(urls)
        self.tls_files = _tls_files(ca_file, cert_file, key_file)
        if any(u.startswith("https://") for u in urls):
            ctx = make_ssl_context(ca_file, cert_file, key_file)
        else:  # never used for http://, but keeps httpx from building its env-driven default
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            if ca_file or cert_file:
                log.warning("etcd TLS files given but all endpoints are http://: plaintext")
        self.call_timeout = call_timeout
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        transport = httpx.AsyncHTTPTransport(
            verify=ctx, trust_env=False, retries=0, socket_options=_SOCKET_OPTIONS
        )
        self.client = httpx.AsyncClient(transport=transport, trust_env=False, auth=auth)
        self._ssl = ctx
        self._current = 0

    @property
    def current(self) -> str:
        """The endpoint the next call starts with (the last one that worked)."""
        return self.endpoints[self._current]

    def timeout(self, remaining: float, *, stream: bool = False) -> httpx.Timeout:
        """httpx timeouts for one attempt; a ``stream`` has no read timeout."""
        remaining = max(remaining, 0.05)
        return httpx.Timeout(
            None if stream else remaining,
            connect=min(self.connect_timeout, remaining),
            pool=min(self.connect_timeout, remaining),
            write=remaining,
        )

    async def call(
        self,
        what: str,
        attempt: Callable[[str, float], Awaitable[T]],
        *,
        idempotent: bool,
        attempt_timeout: float | None = None,
    ) -> T:
        """Run ``attempt(base_url, remaining_seconds)`` with failover; see the class doc.

        ``attempt_timeout`` overrides the per-attempt bound (long polls outlive a call).
        """
        deadline = time.monotonic() + self.call_timeout
        errors: dict[str, str] = {}
        delay = 0.05
        n = len(self.endpoints)
        while True:  # bounded: every pass sleeps and the deadline ends it
            start, round_auth = self._current, 0
            for step in range(n):
                idx = (start + step) % n
                url = self.endpoints[idx]
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                bound = attempt_timeout or min(self.request_timeout, remaining)
                try:
                    async with asyncio.timeout(bound):
                        result = await attempt(url, bound)
                except AttemptFailed as exc:
                    failure = exc
                except TimeoutError:
                    failure = AttemptFailed(f"timed out after {bound:.1f}s", maybe_applied=True)
                except (httpx.RequestError, OSError) as exc:  # anyio leaks raw ssl.SSLError
                    failure = await self._classify(url, exc)
                else:
                    if idx != self._current:
                        log.info("etcd: now using endpoint %s", url)
                    self._current = idx
                    return result
                errors[url] = failure.reason
                round_auth += failure.auth
                if self._current == idx:
                    self._current = (idx + 1) % n
                log.debug("etcd %s on %s failed: %s", what, url, failure.reason)
                if failure.maybe_applied and not idempotent:
                    raise StoreUnavailable(
                        f"etcd {what} on {url} failed after it was sent ({failure.reason}); "
                        "it may have been applied: re-read before retrying"
                    )
            tried = "; ".join(f"{u}: {r}" for u, r in errors.items())
            if "disconnected without sending" in tried:
                tried += " (a TLS-only etcd drops plaintext requests: use https:// endpoints)"
            if round_auth == n:
                raise StoreAuthError(f"etcd {what} rejected by every endpoint ({tried})")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise StoreUnavailable(
                    f"etcd {what} failed on all endpoints within {self.call_timeout:.1f}s "
                    f"({tried}); check that etcd is running and reachable"
                )
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 2, 1.0)

    async def _classify(self, url: str, exc: Exception) -> AttemptFailed:
        sslerr = _ssl_cause(exc)
        broken = isinstance(exc, httpx.ReadError | httpx.WriteError | httpx.RemoteProtocolError)
        if sslerr is None and broken and url.startswith("https://"):
            sslerr = await self._tls_probe(url)
        if sslerr is not None:
            reason, verify = sslerr.reason or "", getattr(sslerr, "verify_message", None)
            if verify:
                detail = f"server certificate not trusted: {verify}"
            elif "ALERT" in reason and "CERTIFICATE" in reason:
                detail = f"the server rejected our client certificate ({reason})"
            else:
                detail = reason or str(sslerr)
            return AttemptFailed(f"TLS failure: {detail} (check {self.tls_files})", auth=True)
        not_sent = isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)
        return AttemptFailed(f"{type(exc).__name__}: {exc}", maybe_applied=not not_sent)

    async def _tls_probe(self, url: str) -> ssl.SSLError | None:
        """Why did an https connection break? With TLS 1.3 the server checks our client
        certificate *after* our side of the handshake is done, so httpx only sees a closed
        connection (``ReadError('')``). A bare TLS connection that waits briefly for the
        server's alert recovers the reason (``SSLV3_ALERT_BAD_CERTIFICATE``)."""
        parsed = httpx.URL(url)
        host = parsed.host
        try:
            async with asyncio.timeout(self.connect_timeout + 0.5):
                reader, writer = await asyncio.open_connection(
                    host, parsed.port or 443, ssl=self._ssl, server_hostname=host
                )
                try:
                    async with asyncio.timeout(0.5):  # an alert comes within one round trip
                        await reader.read(1)
                finally:
                    writer.close()
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()
        except ssl.SSLError as exc:
            return exc
        except (OSError, TimeoutError):
            return None
        return None

    async def aclose(self) -> None:
        await self.client.aclose()


# --------------------------------------------------------------------------- values


@dataclass(frozen=True, slots=True)
class KeyValue:
    """One key as etcd stores it (a DELETE event's kv carries only key + mod_revision)."""

    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int


@dataclass(frozen=True, slots=True)
class RangeResult:
    kvs: tuple[KeyValue, ...]
    revision: int
    count: int = 0
    more: bool = False


@dataclass(frozen=True, slots=True)
class PutResult:
    revision: int
    prev_kv: KeyValue | None = None


@dataclass(frozen=True, slots=True)
class DeleteResult:
    deleted: int
    revision: int
    prev_kvs: tuple[KeyValue, ...] = ()


@dataclass(frozen=True, slots=True)
class TxnResult:
    succeeded: bool
    revision: int
    responses: tuple[RangeResult | PutResult | DeleteResult, ...]


@dataclass(frozen=True, slots=True)
class WatchEvent:
    type: Literal["PUT", "DELETE"]
    kv: KeyValue
    prev_kv: KeyValue | None = None


@dataclass(frozen=True, slots=True)
class WatchBatch:
    """One watch response. ``progress`` batches have no events (a heartbeat at ``revision``).

    ``revision`` is the header revision, which during catch-up is *ahead* of the events.
    """

    events: tuple[WatchEvent, ...]
    revision: int
    progress: bool = False

    @property
    def next_revision(self) -> int:
        """Where a resumed watch must start so nothing is missed or repeated."""
        if self.events:
            return self.events[-1].kv.mod_revision + 1
        return self.revision + 1


def _b(x: KeyLike) -> bytes:
    return x.encode() if isinstance(x, str) else x


def _enc(x: bytes) -> str:
    return base64.b64encode(x).decode("ascii")


def _int(d: Json, name: str) -> int:
    return int(d.get(name, 0))


def _kv(d: Json) -> KeyValue:
    return KeyValue(
        key=base64.b64decode(d.get("key", "")),
        value=base64.b64decode(d.get("value", "")),
        create_revision=_int(d, "create_revision"),
        mod_revision=_int(d, "mod_revision"),
        version=_int(d, "version"),
        lease=_int(d, "lease"),
    )


def _rev(d: Json) -> int:
    return _int(d.get("header", {}), "revision")


def _range(d: Json) -> RangeResult:
    kvs = tuple(_kv(k) for k in d.get("kvs", []))
    return RangeResult(kvs, _rev(d), _int(d, "count"), bool(d.get("more", False)))


def _delete(d: Json) -> DeleteResult:
    prev = tuple(_kv(k) for k in d.get("prev_kvs", []))
    return DeleteResult(_int(d, "deleted"), _rev(d), prev)


def _put(d: Json) -> PutResult:
    return PutResult(_rev(d), _kv(d["prev_kv"]) if "prev_kv" in d else None)


def prefix_range_end(prefix: bytes) -> bytes:
    """etcd's range_end for "every key starting with prefix" (clientv3 GetPrefixRangeEnd)."""
    end = bytearray(prefix)
    for i in range(len(end) - 1, -1, -1):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[: i + 1])
    return b"\0"


def _key_range(key: KeyLike, prefix: bool) -> Json:
    k = _b(key)
    return {"key": _enc(k), "range_end": _enc(prefix_range_end(k))} if prefix else {"key": _enc(k)}


# --------------------------------------------------------------------------- transactions

CompareOp = Literal["==", "!=", ">", "<"]
_RESULTS = {"==": "EQUAL", "!=": "NOT_EQUAL", ">": "GREATER", "<": "LESS"}
_TARGETS = {
    "VERSION": "version",
    "CREATE": "create_revision",
    "MOD": "mod_revision",
    "LEASE": "lease",
}


@dataclass(frozen=True, slots=True)
class Compare:
    """One txn comparison; build with :meth:`version`, :meth:`create_revision`, ..."""

    key: bytes
    target: Literal["VERSION", "CREATE", "MOD", "VALUE", "LEASE"]
    op: CompareOp
    operand: int | bytes

    @classmethod
    def version(cls, key: KeyLike, op: CompareOp, n: int) -> Compare:
        return cls(_b(key), "VERSION", op, n)

    @classmethod
    def create_revision(cls, key: KeyLike, op: CompareOp, rev: int) -> Compare:
        return cls(_b(key), "CREATE", op, rev)

    @classmethod
    def mod_revision(cls, key: KeyLike, op: CompareOp, rev: int) -> Compare:
        return cls(_b(key), "MOD", op, rev)

    @classmethod
    def value(cls, key: KeyLike, op: CompareOp, value: KeyLike) -> Compare:
        return cls(_b(key), "VALUE", op, _b(value))

    @classmethod
    def lease(cls, key: KeyLike, op: CompareOp, lease_id: int) -> Compare:
        return cls(_b(key), "LEASE", op, lease_id)

    def to_json(self) -> Json:
        body: Json = {"key": _enc(self.key), "target": self.target, "result": _RESULTS[self.op]}
        if isinstance(self.operand, bytes):
            body["value"] = _enc(self.operand)
        else:
            body[_TARGETS[self.target]] = str(self.operand)
        return body


@dataclass(frozen=True, slots=True)
class TxnOp:
    """A txn request: :meth:`put`, :meth:`delete` or :meth:`range`."""

    kind: Literal["put", "delete", "range"]
    key: bytes
    value: bytes = b""
    lease: int = 0
    prefix: bool = False
    prev_kv: bool = False

    @classmethod
    def put(cls, key: KeyLike, value: KeyLike, *, lease: int = 0) -> TxnOp:
        return cls("put", _b(key), _b(value), lease=lease)

    @classmethod
    def delete(cls, key: KeyLike, *, prefix: bool = False, prev_kv: bool = False) -> TxnOp:
        return cls("delete", _b(key), prefix=prefix, prev_kv=prev_kv)

    @classmethod
    def range(cls, key: KeyLike, *, prefix: bool = False) -> TxnOp:
        return cls("range", _b(key), prefix=prefix)

    def to_json(self) -> Json:
        if self.kind == "put":
            put: Json = {"key": _enc(self.key), "value": _enc(self.value)}
            if self.lease:
                put["lease"] = str(self.lease)
            return {"request_put": put}
        body = _key_range(self.key, self.prefix)
        if self.kind == "delete":
            return {"request_delete_range": body | {"prev_kv": self.prev_kv}}
        return {"request_range": body}


@dataclass(frozen=True, slots=True)
class Txn:
    """Immutable builder: ``Txn().when(c).then(op).otherwise(op)`` (each call appends)."""

    compare: tuple[Compare, ...] = ()
    success: tuple[TxnOp, ...] = ()
    failure: tuple[TxnOp, ...] = ()

    def when(self, *compares: Compare) -> Txn:
        return replace(self, compare=self.compare + compares)

    def then(self, *ops: TxnOp) -> Txn:
        return replace(self, success=self.success + ops)

    def otherwise(self, *ops: TxnOp) -> Txn:
        return replace(self, failure=self.failure + ops)

    @property
    def read_only(self) -> bool:
        return all(op.kind == "range" for op in self.success + self.failure)


def _txn_response(d: Json) -> RangeResult | PutResult | DeleteResult:
    if "response_range" in d:
        return _range(d["response_range"])
    if "response_put" in d:
        return _put(d["response_put"])
    return _delete(d.get("response_delete_range", {}))


# --------------------------------------------------------------------------- client


class _TokenStale(Exception):
    """The cached auth token was refused; authenticate again (internal)."""


def _check(status: int, data: Json, where: str) -> None:
    """Map an etcd gateway answer to success (return) or the right exception."""
    err = data.get("error")
    if status == 200 and err is None:
        return
    if isinstance(err, dict):  # stream error object
        code, msg = int(err.get("grpc_code", 0)), str(err.get("message", ""))
    else:
        code, msg = int(data.get("code", 0)), str(data.get("message") or err or "")
    if any(s in msg for s in _TOKEN_STALE):
        raise _TokenStale(msg)
    if code == 14 or status >= 500:
        applied = not any(s in msg for s in _NOT_APPLIED)
        raise AttemptFailed(f"{msg or f'HTTP {status}'}", maybe_applied=applied)
    if "compacted" in msg:
        raise RevisionCompacted(f"etcd {where}: {msg}; relist and watch from the new revision")
    if "requested lease not found" in msg:
        raise LeaseNotFound(f"etcd {where}: {msg}")
    if code in (7, 16) or status == 401 or any(s in msg for s in _AUTH_FAILED):
        raise StoreAuthError(
            f"etcd refused {where}: {msg}; check the etcd username, password and role"
        )
    raise StoreError(f"etcd {where} failed: {msg or f'HTTP {status}'} (gRPC code {code})")


def _json(resp: httpx.Response, where: str) -> Json:
    try:
        data = json.loads(resp.content)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        if resp.status_code >= 500:
            raise AttemptFailed(f"HTTP {resp.status_code}", maybe_applied=True)
        raise StoreError(f"etcd {where}: HTTP {resp.status_code} without JSON; is it etcd >= 3.4?")
    return data


@dataclass(frozen=True, slots=True)
class _Stream:
    url: str
    resp: httpx.Response
    lines: AsyncIterator[str]


class EtcdClient:
    """etcd v3 client: KV, txn, leases, watch; failover, TLS and token auth.

    ``call_timeout`` bounds each call including failover, ``request_timeout`` one attempt
    on one member (see :class:`EndpointPool`); the caller decides whether to retry a
    :class:`StoreUnavailable`. Use ``async with EtcdClient(...) as c`` or
    :meth:`aclose`.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        username: str | None = None,
        password: str | None = None,
        call_timeout: float = 10.0,
        connect_timeout: float = 3.0,
        request_timeout: float = 3.0,
    ) -> None:
        self._pool = EndpointPool(
            endpoints,
            ca_file=ca_file,
            cert_file=cert_file,
            key_file=key_file,
            call_timeout=call_timeout,
            connect_timeout=connect_timeout,
            request_timeout=request_timeout,
        )
        self._creds = (username, password or "") if username else None
        self._token: str | None = None
        self._auth_lock = asyncio.Lock()

    @property
    def endpoint(self) -> str:
        return self._pool.current

    async def __aenter__(self) -> EtcdClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._pool.aclose()

    async def _headers(self, url: str, remaining: float) -> dict[str, str]:
        """Auth header; authenticates (once, under a lock) when there is no token."""
        if self._creds is None:
            return {}
        async with self._auth_lock:
            if self._token is None:
                name, password = self._creds
                resp = await self._pool.client.post(
                    url + "/v3/auth/authenticate",
                    json={"name": name, "password": password},
                    timeout=self._pool.timeout(remaining),
                )
                data = _json(resp, "authenticate")
                try:
                    _check(resp.status_code, data, f"authenticate as {name!r}")
                except _TokenStale as exc:
                    raise StoreAuthError(f"etcd authenticate as {name!r}: {exc}") from exc
                self._token = str(data["token"])
            return {"Authorization": self._token}

    async def _with_token(
        self, url: str, remaining: float, send: Callable[[dict[str, str]], Awaitable[T]]
    ) -> T:
        """Run ``send(headers)``; on a stale token authenticate again and retry once."""
        headers = await self._headers(url, remaining)
        try:
            return await send(headers)
        except _TokenStale as exc:
            if self._creds is None:
                raise StoreAuthError(f"etcd wants a token ({exc}); set a username") from exc
            if self._token == headers.get("Authorization"):
                self._token = None
            headers = await self._headers(url, remaining)
        try:
            return await send(headers)
        except _TokenStale as exc:
            raise StoreAuthError(f"etcd refused a fresh auth token: {exc}") from exc

    async def _post(self, path: str, body: Json, *, idempotent: bool = True) -> Json:
        async def attempt(url: str, remaining: float) -> Json:
            async def send(headers: dict[str, str]) -> Json:
                resp = await self._pool.client.post(
                    url + path, json=body, headers=headers, timeout=self._pool.timeout(remaining)
                )
                data = _json(resp, path)
                _check(resp.status_code, data, f"{path} on {url}")
                return data

            return await self._with_token(url, remaining, send)

        return await self._pool.call(path, attempt, idempotent=idempotent)

    # ---- KV

    async def range(
        self,
        key: KeyLike,
        *,
        prefix: bool = False,
        revision: int = 0,
        limit: int = 0,
        keys_only: bool = False,
        serializable: bool = False,
    ) -> RangeResult:
        """Read one key or a prefix (linearizable unless ``serializable``)."""
        body = _key_range(key, prefix) | {
            "revision": str(revision),
            "limit": str(limit),
            "keys_only": keys_only,
            "serializable": serializable,
        }
        return _range(await self._post("/v3/kv/range", body))

    async def get(self, key: KeyLike) -> KeyValue | None:
        res = await self.range(key)
        return res.kvs[0] if res.kvs else None

    async def put(
        self, key: KeyLike, value: KeyLike, *, lease: int = 0, prev_kv: bool = False
    ) -> PutResult:
        """Write a key; ``lease`` attaches it (a dead lease raises :class:`LeaseNotFound`)."""
        body: Json = {"key": _enc(_b(key)), "value": _enc(_b(value)), "prev_kv": prev_kv}
        if lease:
            body["lease"] = str(lease)
        return _put(await self._post("/v3/kv/put", body))

    async def delete(
        self, key: KeyLike, *, prefix: bool = False, prev_kv: bool = False
    ) -> DeleteResult:
        body = _key_range(key, prefix) | {"prev_kv": prev_kv}
        return _delete(await self._post("/v3/kv/deleterange", body))

    async def txn(self, txn: Txn) -> TxnResult:
        """Run a transaction; never re-sent after an ambiguous failure unless read-only."""
        body = {
            "compare": [c.to_json() for c in txn.compare],
            "success": [op.to_json() for op in txn.success],
            "failure": [op.to_json() for op in txn.failure],
        }
        data = await self._post("/v3/kv/txn", body, idempotent=txn.read_only)
        responses = tuple(_txn_response(r) for r in data.get("responses", []))
        return TxnResult(bool(data.get("succeeded", False)), _rev(data), responses)

    async def compact(self, revision: int, *, physical: bool = True) -> None:
        await self._post("/v3/kv/compaction", {"revision": str(revision), "physical": physical})

    # ---- leases

    async def grant(self, ttl: int, *, lease_id: int = 0) -> int:
        """Grant a lease of ``ttl`` seconds and return its ID (never re-sent: it would leak)."""
        body = {"TTL": str(ttl), "ID": str(lease_id)}
        return _int(await self._post("/v3/lease/grant", body, idempotent=False), "ID")

    async def revoke(self, lease_id: int) -> bool:
        """Revoke a lease (its keys are deleted). False if it did not exist (any more)."""
        try:
            await self._post("/v3/lease/revoke", {"ID": str(lease_id)})
        except LeaseNotFound:
            return False
        return True

    async def keepalive_once(self, lease_id: int) -> int:
        """Refresh a lease; returns the new TTL, 0 when the lease does not exist.

        The gateway's keepalive is a stream that ends with our request body: one POST
        gives exactly one ``{"result": {...}}`` line.
        """
        data = await self._post("/v3/lease/keepalive", {"ID": str(lease_id)})
        return _int(data.get("result", {}), "TTL")

    async def time_to_live(self, lease_id: int) -> int:
        """Remaining TTL in seconds; -1 when the lease does not exist (etcd's answer)."""
        return _int(await self._post("/v3/lease/timetolive", {"ID": str(lease_id)}), "TTL")

    # ---- watch

    async def watch(
        self,
        key: KeyLike,
        *,
        prefix: bool = False,
        start_revision: int = 0,
        prev_kv: bool = False,
        progress_notify: bool = True,
        idle_timeout: float | None = 60.0,
    ) -> AsyncGenerator[WatchBatch, None]:
        """Stream watch batches for ``key`` (or the prefix) from ``start_revision``.

        Resume after an error from the last batch's :attr:`WatchBatch.next_revision`.
        Errors: :class:`RevisionCompacted` (a :class:`WatchCompacted`: relist),
        :class:`StoreUnavailable` (stream broke, member lost its leader or went quiet and
        failed a probe), :class:`StoreAuthError`. Dead streams: after ``idle_timeout``
        seconds without a line the member gets a ``/v3/maintenance/status`` probe; the
        watch goes on only if the member answers and has a leader (quiet is normal).
        The request asks for leader-loss cancellation (``hasleader`` metadata). Close
        with ``contextlib.aclosing`` when leaving early.
        """
        create: Json = _key_range(key, prefix) | {
            "start_revision": str(start_revision),
            "prev_kv": prev_kv,
            "progress_notify": progress_notify,
        }

        async def attempt(url: str, remaining: float) -> _Stream:
            return await self._with_token(
                url, remaining, lambda h: self._open_watch(url, remaining, h, create)
            )

        stream = await self._pool.call("/v3/watch", attempt, idempotent=True)
        try:
            while True:  # one iteration per server line; each line wait is bounded (probe)
                line = await self._next_line(stream, idle_timeout)
                try:
                    msg = json.loads(line)
                    _check(200, msg, f"watch on {stream.url}")
                except (ValueError, AttemptFailed, _TokenStale) as exc:
                    raise StoreUnavailable(f"etcd watch on {stream.url} failed: {exc}") from exc
                res: Json = msg.get("result", {})
                if res.get("canceled"):
                    raise self._cancel_error(res, stream.url)
                events = tuple(
                    WatchEvent(
                        "DELETE" if e.get("type") == "DELETE" else "PUT",
                        _kv(e.get("kv", {})),
                        _kv(e["prev_kv"]) if "prev_kv" in e else None,
                    )
                    for e in res.get("events", [])
                )
                if events or not res.get("created"):
                    yield WatchBatch(events, _rev(res), progress=not events)
        finally:
            await stream.resp.aclose()

    async def _open_watch(
        self, url: str, remaining: float, headers: dict[str, str], create: Json
    ) -> _Stream:
        """Open the stream and read the ``created`` line (bounded by ``remaining``)."""
        req = self._pool.client.build_request(
            "POST",
            url + "/v3/watch",
            json={"create_request": create},
            headers=headers | {"Grpc-Metadata-hasleader": "true"},
            timeout=self._pool.timeout(remaining, stream=True),
        )
        resp = await self._pool.client.send(req, stream=True)
        try:
            if resp.status_code != 200:
                await resp.aread()
                _check(resp.status_code, _json(resp, "/v3/watch"), f"watch on {url}")
            lines = resp.aiter_lines()
            try:
                async with asyncio.timeout(remaining):
                    first = json.loads(await anext(lines))
            except StopAsyncIteration:
                raise AttemptFailed("watch stream ended before it was created") from None
            _check(200, first, f"watch on {url}")
            res = first.get("result", {})
            if res.get("canceled"):
                raise self._cancel_error(res, url)
            return _Stream(url, resp, lines)
        except BaseException:
            await resp.aclose()
            raise

    def _cancel_error(self, res: Json, url: str) -> Exception:
        compact = _int(res, "compact_revision")
        if compact:
            return RevisionCompacted(
                f"etcd watch on {url}: start revision compacted at {compact}; relist", compact
            )
        reason = str(res.get("cancel_reason", "no reason given"))
        if any(s in reason for s in _TOKEN_STALE):
            return _TokenStale(reason)
        if "Unauthenticated" in reason or "permission denied" in reason:
            return StoreAuthError(f"etcd watch on {url} refused: {reason}")
        return StoreUnavailable(f"etcd watch on {url} canceled: {reason}; watch again")

    async def _next_line(self, stream: _Stream, idle_timeout: float | None) -> str:
        async def read() -> str | None:
            while True:  # skips keep-alive blank lines; ends with the stream
                try:
                    line = await anext(stream.lines)
                except StopAsyncIteration:
                    return None
                if line.strip():
                    return line

        task = asyncio.ensure_future(read())
        try:
            while True:  # each pass waits idle_timeout, then a bounded probe
                done, _ = await asyncio.wait({task}, timeout=idle_timeout)
                if done:
                    break
                await self._probe(stream.url, min(5.0, idle_timeout or 5.0))
            try:
                line = task.result()
            except (httpx.RequestError, OSError) as exc:
                raise StoreUnavailable(f"etcd watch stream from {stream.url} broke: {exc}") from exc
            if line is None:
                raise StoreUnavailable(f"etcd watch stream from {stream.url} ended; watch again")
            return line
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    async def _probe(self, url: str, timeout: float) -> None:
        """Raise StoreUnavailable unless the member answers ``status`` and has a leader."""
        try:
            resp = await self._pool.client.post(
                url + "/v3/maintenance/status", json={}, timeout=self._pool.timeout(timeout)
            )
            leader = _int(_json(resp, "status"), "leader")
        except (httpx.RequestError, AttemptFailed, StoreError) as exc:
            raise StoreUnavailable(
                f"etcd watch on {url} is dead: status probe failed ({exc})"
            ) from exc
        if not leader:
            raise StoreUnavailable(f"etcd watch on {url} is stale: the member has no leader")
