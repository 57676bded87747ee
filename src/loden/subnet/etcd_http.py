"""HTTP transport to an etcd cluster: endpoint failover, TLS, error mapping.

Both store adapters (v3 JSON gateway, v2 keys API) speak HTTP through this one
class, so failover and TLS behave identically for both. Design points:

* Endpoints are tried in order starting from the last one that worked; a connection
  error, timeout or 5xx moves on to the next, within one bounded per-call deadline.
* TLS uses an explicit :class:`ssl.SSLContext` built from the configured files and
  ``trust_env=False``: these machines export ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE``,
  which would otherwise replace the CA. A TLS failure is never retried in plaintext.
* httpx exceptions are mapped to :mod:`loden.errors` here and nowhere else.
* :meth:`EtcdHTTP.quick` is the /healthz probe's fast path: the same request on one
  kept-open h11 connection (:mod:`loden.subnet.quick_http`, ~4x less CPU than httpx),
  to the preferred endpoint only; on any failure the caller uses :meth:`request`.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import httpx

from loden.errors import ConfigError, StoreAuthError, StoreUnavailable
from loden.subnet.quick_http import Answer, QuickHTTP

log = logging.getLogger(__name__)
#: Deadline of the probe's fast path (see ``_quick``).
QUICK_TIMEOUT_SECONDS = 1.0


def tls_context(cafile: str, certfile: str, keyfile: str) -> ssl.SSLContext:
    """A client context from explicit files (never from environment variables).

    :raises ConfigError: a file is missing or not PEM of the right kind.
    """
    # Not create_default_context(): it would also trust the system store, located via
    # SSL_CERT_FILE/SSL_CERT_DIR. With -etcd-cafile, that CA alone is trusted.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    for flag, path in (("cafile", cafile), ("certfile", certfile), ("keyfile", keyfile)):
        # Checked by name first: ssl's own FileNotFoundError does not say which file.
        if path and not os.path.isfile(path):
            raise ConfigError(f"etcd TLS file not found: {path} (-etcd-{flag}); fix the path")
    try:
        if cafile:
            context.load_verify_locations(cafile=cafile)
        else:
            context.load_default_certs(ssl.Purpose.SERVER_AUTH)
        if certfile and keyfile:
            context.load_cert_chain(certfile=certfile, keyfile=keyfile)
            context._loden_client_cert = True  # type: ignore[attr-defined]
    except FileNotFoundError as exc:
        raise ConfigError(
            f"etcd TLS file not found: {exc.filename}; check -etcd-cafile, "
            "-etcd-certfile and -etcd-keyfile"
        ) from exc
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"cannot load etcd TLS files (ca {cafile or '-'}, cert "
            f"{certfile or '-'}, key {keyfile or '-'}): {exc}"
        ) from exc
    return context


class EtcdHTTP:
    """A failover HTTP client over a list of etcd endpoints."""

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        context: ssl.SSLContext | None = None,
        timeout: float = 5.0,
        auth: tuple[str, str] | None = None,
    ) -> None:
        if not endpoints:
            raise ConfigError("no etcd endpoints given: set -etcd-endpoints")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.timeout = timeout
        self._preferred = 0
        self._client_cert = bool(context is not None and context_has_cert(context))
        # Plain http endpoints: no CA bundle at all (httpx would load certifi's ~140
        # certificates for nothing: ~1.4 MB of the agent's RSS).
        verify: ssl.SSLContext | bool = (
            context
            if context is not None
            else any(e.startswith("https://") for e in self.endpoints)
        )
        self._client = httpx.AsyncClient(
            verify=verify,
            trust_env=False,
            timeout=httpx.Timeout(timeout),
            auth=auth,
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=16),
        )
        self.headers: dict[str, str] = {}
        # The fast path sends the same credentials as httpx: the TLS context (an https
        # endpoint without one has no fast path) and the basic auth of the v2 API.
        # A shorter deadline than the full path's: a member that holds the connection
        # but does not answer goes to the failover path (and its precise error) within
        # about a second, so "not answering" is reported as early as before.
        self._quick = QuickHTTP(context=context, timeout=min(timeout, QUICK_TIMEOUT_SECONDS))
        self._quick_auth: list[tuple[str, str]] = []
        if auth is not None:
            pair = b":".join(part.encode() for part in auth)
            self._quick_auth = [("Authorization", "Basic " + base64.b64encode(pair).decode())]

    def _order(self) -> list[int]:
        n = len(self.endpoints)
        return [(self._preferred + i) % n for i in range(n)]

    @property
    def current(self) -> str:
        return self.endpoints[self._preferred]

    async def _first_answer(
        self,
        path: str,
        send: Callable[[str], Awaitable[httpx.Response]],
        *,
        idle_ok: bool = False,
    ) -> httpx.Response | None:
        """The one failover loop: try endpoints from the last good one; the first that
        answers below 500 wins. TLS failures end the search (retrying another member, or
        in plaintext, cannot fix them). ``idle_ok``: a read timeout means "nothing
        happened" (a long poll) and returns None.

        :raises StoreUnavailable: no endpoint answered (lists endpoints and errors).
        :raises StoreAuthError: TLS handshake or certificate verification failed.
        """
        errors: list[str] = []
        for index in self._order():
            url = self.endpoints[index] + path
            try:
                response = await send(url)
            except httpx.ReadTimeout as exc:
                if idle_ok:
                    self._use(index)
                    return None
                errors.append(f"{self.endpoints[index]}: {self._describe(exc, url)}")
                continue
            except ssl.SSLError as exc:  # httpx lets some alerts through unwrapped
                raise _tls_error(url, exc) from exc
            except (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError) as exc:
                self._raise_if_tls(exc, url)
                errors.append(f"{self.endpoints[index]}: {self._describe(exc, url)}")
                continue
            if response.status_code >= 500:
                await response.aread()
                await response.aclose()
                errors.append(
                    f"{self.endpoints[index]}: HTTP {response.status_code} "
                    f"{response.text[:120].strip()}"
                )
                continue
            self._use(index)
            return response
        raise StoreUnavailable("etcd unreachable: " + "; ".join(errors))

    def _use(self, index: int) -> None:
        if index != self._preferred:
            log.info("etcd: now using endpoint %s", self.endpoints[index])
            self._preferred = index

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, str] | None = None,
        data: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> httpx.Response:
        """Send to the first endpoint that answers; 4xx answers are returned as they are."""

        def send(url: str) -> Awaitable[httpx.Response]:
            return self._client.request(
                method,
                url,
                json=json,
                params=params,
                data=data,
                headers=self.headers,
                timeout=timeout if timeout is not None else self.timeout,
            )

        response = await self._first_answer(path, send)
        assert response is not None
        return response

    async def quick(
        self,
        method: str,
        path: str,
        *,
        json_body: bytes = b"",
        accept: Callable[[Answer], bool],
    ) -> bool:
        """Send one small request to :attr:`current` on the kept-open probe connection;
        True when ``accept`` takes the answer. False on anything else (no answer, a TLS
        or protocol failure, an answer ``accept`` refuses or raises on): the connection
        is closed and the caller asks :meth:`request`, which fails over, and whose
        errors say precisely what is wrong. ``path`` includes any query string, encoded.
        """
        headers = [*self._quick_auth, *self.headers.items()]
        if json_body:
            headers.append(("Content-Type", "application/json"))
        answer = await self._quick.send(
            method, self.current + path, headers=headers, body=json_body
        )
        if answer is None:
            return False
        try:
            if accept(answer):
                return True
        except Exception as exc:  # a malformed answer: the full path names it
            log.debug("quick %s %s: answer refused: %s", method, path, exc)
        self._quick.reset()
        return False

    async def long_poll(
        self, path: str, *, params: dict[str, str], poll_seconds: float
    ) -> httpx.Response | None:
        """GET that may legitimately stay silent: None when ``poll_seconds`` pass idle.

        Connection failures still fail over like :meth:`request`; only a read timeout
        on an established request means "nothing happened".
        """
        timeout = httpx.Timeout(self.timeout, read=poll_seconds)

        def send(url: str) -> Awaitable[httpx.Response]:
            return self._client.get(url, params=params, headers=self.headers, timeout=timeout)

        return await self._first_answer(path, send, idle_ok=True)

    @asynccontextmanager
    async def stream(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        read_timeout: float | None = None,
    ) -> AsyncIterator[httpx.Response]:
        """A streaming request to the first endpoint that accepts it."""
        timeout = httpx.Timeout(self.timeout, read=read_timeout)

        def send(url: str) -> Awaitable[httpx.Response]:
            request = self._client.build_request(
                method,
                url,
                json=json,
                params=params,
                headers={**self.headers, **(headers or {})},
                timeout=timeout,
            )
            return self._client.send(request, stream=True)

        response = await self._first_answer(path, send)
        assert response is not None
        try:
            yield response
        finally:
            await response.aclose()

    def _describe(self, exc: httpx.HTTPError, url: str) -> str:
        text = _short(exc)
        if (
            isinstance(exc, httpx.ReadError)
            and url.startswith("https://")
            and not self._client_cert
        ):
            # TLS 1.3: a server that requires client certificates drops the connection
            # after the handshake, which surfaces only as a broken pipe.
            text += (
                " (the server closed the TLS connection: it probably requires a client "
                "certificate; set -etcd-certfile and -etcd-keyfile)"
            )
        elif isinstance(exc, httpx.ReadTimeout):
            # A member that lost its quorum accepts the request and never answers a read.
            text += f" (connected, no answer within {self.timeout:.0f}s: has it lost its leader?)"
        return text

    @staticmethod
    def _raise_if_tls(exc: httpx.HTTPError, url: str) -> None:
        cause: BaseException | None = exc
        while cause is not None:
            if isinstance(cause, ssl.SSLError):
                raise _tls_error(url, cause) from exc
            cause = cause.__cause__ or cause.__context__
        if "SSL" in str(exc) or "certificate" in str(exc).lower():
            raise StoreAuthError(f"TLS with etcd at {url} failed: {exc}") from exc

    async def aclose(self) -> None:
        await self._quick.aclose()
        await self._client.aclose()


def _tls_error(url: str, exc: ssl.SSLError) -> StoreAuthError:
    return StoreAuthError(
        f"TLS with etcd at {url} failed: {exc.reason or exc}; check -etcd-cafile (does it "
        "sign the server certificate?) and the client certificate/key "
        "(-etcd-certfile/-etcd-keyfile)"
    )


#: What reading a reply that is not shaped like etcd's raises (json, base64, int(), keys).
MALFORMED = (ValueError, TypeError, KeyError, AttributeError, IndexError, OverflowError)


@contextlib.contextmanager
def reading_reply(what: str) -> Iterator[None]:
    """Map a reply that is not what etcd sends to :class:`StoreUnavailable`: whatever
    answers on the etcd port (a broken proxy, an impostor on the underlay) must never
    raise anything the agent's loops do not retry. Both store adapters read every reply
    inside this."""
    try:
        yield
    except MALFORMED as exc:
        raise StoreUnavailable(
            f"etcd {what}: malformed reply ({type(exc).__name__}: {str(exc)[:200]}); is this etcd?"
        ) from exc


def context_has_cert(context: ssl.SSLContext) -> bool:
    return bool(getattr(context, "_loden_client_cert", False))


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:160]
