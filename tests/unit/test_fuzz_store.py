"""Fuzzing the store boundary (chaos issue, scenario 9).

Two promises, whatever is in etcd or whatever answers in its place:

* the v3 and v2 adapters turn any watch line and any reply into batches/listings or a
  :class:`~loden.errors.StoreError` (which the agent retries), never another exception
  (which would end the agent's watch task and so the agent);
* the subnet manager turns any key/value under ``<prefix>/subnets`` into a valid
  :class:`~loden.model.lease.Lease` or one warning for that item, however often the item
  is listed again or arrives as a watch event.

The pure parsers (config, subnet key, lease JSON, subnet.env) have their own property
tests in test_model_*.py.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from ipaddress import IPv4Network, IPv6Network
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loden.errors import StoreError, StoreUnavailable, SubnetKeyError
from loden.model.lease import EventKind
from loden.model.net import subnet_key
from loden.subnet.etcd_http import EtcdHTTP
from loden.subnet.etcd_v2 import EtcdV2Store
from loden.subnet.etcd_v3 import EtcdV3Store
from loden.subnet.manager import EtcdSubnetManager, parse_lease_name
from loden.subnet.memory import MemoryStore
from loden.subnet.store import StoreEvent, StoreEventKind

PREFIX = "/coreos.com/network"

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64)
    | st.floats(allow_nan=False)
    | st.text(max_size=12)
)
JSON = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=15,
)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


#: Field values the gateway could plausibly (or implausibly) send.
FIELD = (
    SCALARS
    | st.binary(max_size=40).map(b64)
    | st.integers(0, 2**63).map(str)
    | st.sampled_from(["", "=", "not base64!", "123abc", "-1"])
    | st.sampled_from([float("inf"), float("-inf"), float("nan"), 10**30])
)
KEYS = st.sampled_from(
    [f"{PREFIX}/subnets/10.1.2.0-24", f"{PREFIX}/subnets/x", f"{PREFIX}/other", ""]
).map(lambda k: b64(k.encode()))


@st.composite
def watch_lines(draw: st.DrawFn) -> str:
    """One line of a /v3/watch stream: mostly the right shape, with wrong parts."""
    if draw(st.integers(0, 5)) == 0:
        return draw(st.text(max_size=60) | JSON.map(json.dumps))
    kv = draw(
        st.fixed_dictionaries(
            {},
            optional={
                "key": KEYS | FIELD,
                "value": FIELD,
                "mod_revision": FIELD,
                "lease": FIELD,
                "create_revision": FIELD,
            },
        )
    )
    event = draw(
        st.fixed_dictionaries(
            {"kv": st.just(kv) | JSON},
            optional={"type": st.sampled_from(["PUT", "DELETE", 7, None])},
        )
    )
    result = draw(
        st.fixed_dictionaries(
            {"events": st.lists(st.just(event) | JSON, max_size=3) | JSON},
            optional={
                "compact_revision": FIELD,
                "canceled": st.booleans() | FIELD,
                "created": st.booleans(),
                "header": JSON,
            },
        )
    )
    error = draw(JSON)
    message: Any = draw(st.sampled_from([{"result": result}, {"error": error}, result, [result]]))
    return json.dumps(message)


class FakeResponse:
    def __init__(
        self,
        body: str = "",
        lines: Sequence[str] = (),
        status: int = 200,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.status_code = status
        self.headers = headers or {}
        self._body = body
        self._lines = lines

    @property
    def text(self) -> str:
        return self._body

    def json(self) -> Any:
        return json.loads(self._body)

    async def aiter_lines(self) -> AsyncIterator[str]:
        for line in self._lines:
            yield line


class FakeHTTP:
    """Stands in for :class:`EtcdHTTP`: answers every request with fixed content."""

    def __init__(
        self, body: str = "", lines: Sequence[str] = (), status: int = 200, index: str = "5"
    ) -> None:
        self.headers: dict[str, str] = {}
        self.body = body
        self.lines = lines
        self.status = status
        self.index = index
        self.polls = 0

    def _response(self) -> FakeResponse:
        return FakeResponse(self.body, status=self.status, headers={"X-Etcd-Index": self.index})

    async def request(self, method: str, path: str, **kwargs: object) -> FakeResponse:
        return self._response()

    async def long_poll(self, path: str, **kwargs: object) -> FakeResponse:
        self.polls += 1
        if self.polls > 1:  # one answer, then the stream "breaks"
            raise StoreUnavailable("fake: no more answers")
        return self._response()

    @asynccontextmanager
    async def stream(self, method: str, path: str, **kwargs: object) -> AsyncIterator[FakeResponse]:
        yield FakeResponse(lines=self.lines)

    async def aclose(self) -> None:
        return None


def v3_store(http: FakeHTTP) -> EtcdV3Store:
    return EtcdV3Store(cast(EtcdHTTP, http), PREFIX)


async def drain_watch(store: EtcdV3Store, cursor: int) -> list[StoreEvent]:
    events: list[StoreEvent] = []
    try:
        async for batch in store.watch(cursor):
            assert batch.cursor >= cursor
            events.extend(batch.events)
    except StoreError:
        pass
    return events


@settings(max_examples=400, deadline=None)
@given(st.lists(watch_lines(), min_size=1, max_size=4), st.integers(0, 10**6))
def test_any_watch_stream_yields_events_or_a_store_error(lines: list[str], cursor: int) -> None:
    events = asyncio.run(drain_watch(v3_store(FakeHTTP(lines=lines)), cursor))
    for event in events:
        assert isinstance(event.name, str) and isinstance(event.value, bytes)
        assert event.kind in (StoreEventKind.PUT, StoreEventKind.DELETE)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.text(max_size=80),
        JSON.map(json.dumps),
        st.lists(
            st.fixed_dictionaries(
                {}, optional={"key": KEYS | FIELD, "value": FIELD, "lease": FIELD}
            ),
            max_size=3,
        ).map(lambda kvs: json.dumps({"kvs": kvs, "header": {"revision": "5"}})),
        st.fixed_dictionaries({"kvs": JSON, "header": JSON}).map(json.dumps),
    )
)
def test_any_range_reply_gives_a_listing_or_a_store_error(body: str) -> None:
    async def main() -> None:
        store = v3_store(FakeHTTP(body=body))
        try:
            listing = await store.list()
        except StoreError:
            return
        assert all(isinstance(kv.value, bytes) for kv in listing.kvs)
        try:
            await store.get_config()
            await store.get("10.1.2.0-24")
        except StoreError:
            pass

    asyncio.run(main())


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(
        st.text(max_size=40),
        JSON.map(json.dumps),
        st.fixed_dictionaries({"token": JSON}).map(json.dumps),
    )
)
def test_any_auth_reply_gives_a_token_or_a_store_error(body: str) -> None:
    """``auth/authenticate`` is read inside the reply guard like every other reply: a
    non-etcd answer is a (retried) StoreError, never a KeyError out of the agent."""

    async def main() -> None:
        http = FakeHTTP(body=body)
        store = EtcdV3Store(cast(EtcdHTTP, http), PREFIX, username="u", password="p")
        try:
            await store.get_config()
        except StoreError:
            return
        token = http.headers.get("Authorization")
        assert isinstance(token, str) and token

    asyncio.run(main())


V2_NODES = st.fixed_dictionaries(
    {},
    optional={
        "key": st.sampled_from([f"{PREFIX}/subnets/10.1.2.0-24", f"{PREFIX}/subnets", ""]) | FIELD,
        "value": FIELD,
        "ttl": FIELD,
        "modifiedIndex": FIELD,
        "dir": st.booleans() | FIELD,
        "nodes": st.lists(JSON, max_size=2) | JSON,
    },
)
V2_BODIES = st.one_of(
    st.text(max_size=60),
    JSON.map(json.dumps),
    st.builds(
        lambda action, node: json.dumps({"action": action, "node": node}),
        st.sampled_from(["set", "delete", "expire", "create", "compareAndSwap"]) | FIELD,
        V2_NODES | JSON,
    ),
)


@settings(max_examples=300, deadline=None)
@given(
    V2_BODIES,
    st.sampled_from([200, 400, 404, 500]),
    st.sampled_from(["5", "", "x", "1e999", "-1"]),
)
def test_any_v2_reply_gives_events_or_a_store_error(body: str, status: int, index: str) -> None:
    async def main() -> None:
        store = EtcdV2Store(cast(EtcdHTTP, FakeHTTP(body=body, status=status, index=index)), PREFIX)
        try:
            async for batch in store.watch(0):
                assert all(isinstance(e.value, bytes) for e in batch.events)
        except StoreError:
            pass
        for call in (store.list(), store.get_config(), store.get("10.1.2.0-24")):
            try:
                await call
            except StoreError:
                pass

    asyncio.run(main())


# -- the manager: arbitrary keys and values under <prefix>/subnets ------------------------

NAMES = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["10.1.2.0-24", "10.1.3.0-24", "10.1.2.0-24&fd00::-64", "10.1.4.5-24"]),
)
VALUES = st.one_of(
    st.binary(max_size=60),
    st.builds(
        lambda ip, data: json.dumps(
            {"PublicIP": ip, "BackendType": "vxlan", "BackendData": data}
        ).encode(),
        st.sampled_from(["10.0.0.1", "10.0.0.300", "", "::1"]) | st.integers(),
        JSON,
    ),
)


class Counter(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(NAMES, VALUES, max_size=6))
def test_manager_turns_any_item_into_a_lease_or_one_warning(items: dict[str, bytes]) -> None:
    async def main() -> tuple[int, int, int]:
        store = MemoryStore()
        for name, value in items.items():
            await store.create(name, value, None)
        manager = EtcdSubnetManager(store)
        first = await manager.list_leases()
        again = await manager.list_leases()  # a relist: nothing new to say
        events = manager._to_events(
            tuple(StoreEvent(StoreEventKind.PUT, n, v) for n, v in items.items())
            + tuple(StoreEvent(StoreEventKind.DELETE, n, b"") for n in items)
        )
        assert [lease.key for lease in first] == [lease.key for lease in again]
        added = [e for e in events if e.kind is EventKind.ADDED]
        assert sorted(e.lease.key for e in added) == sorted(lease.key for lease in first)
        return len(first), len(items), len(events)

    handler = Counter()
    logger = logging.getLogger("loden.subnet.manager")
    logger.addHandler(handler)
    try:
        valid, total, _ = asyncio.run(main())
    finally:
        logger.removeHandler(handler)
    assert len(handler.messages) == total - valid, handler.messages
    assert all("\n" not in m and len(m) < 1000 for m in handler.messages)


# -- lease names: exactly canonical, so no key can alias another node's lease -------------

V4_SUBNETS = st.builds(
    lambda addr, plen: IPv4Network((addr, plen), strict=False),
    st.integers(0, 2**32 - 1),
    st.integers(0, 31),
)
V6_SUBNETS = st.none() | st.builds(
    lambda addr, plen: IPv6Network((addr, plen), strict=False),
    st.integers(0, 2**128 - 1),
    st.integers(0, 127),
)


@settings(max_examples=300, deadline=None)
@given(V4_SUBNETS, V6_SUBNETS, st.sampled_from(["x/", "/", "a/b/", " ", "0"]))
def test_only_canonical_lease_names_parse(
    v4: IPv4Network, v6: IPv6Network | None, junk: str
) -> None:
    name = subnet_key(v4, v6)
    assert parse_lease_name(name) == (v4, v6)
    with pytest.raises(SubnetKeyError):
        parse_lease_name(junk + name)  # e.g. x/10.5.3.0-24 would alias 10.5.3.0-24
    if v6 is not None:
        upper = name.upper()
        if upper != name:
            with pytest.raises(SubnetKeyError):
                parse_lease_name(upper)  # another spelling of the same IPv6 subnet
