#!/usr/bin/env python3
"""atheris harness: the etcd adapters' reading of replies (v3 watch lines and ranges, v2
long polls and key reads).

Whatever answers on the etcd port, the adapter yields events/listings or raises a
StoreError (which the agent retries); any other exception would end the agent's watch
task, i.e. the agent. (This harness found that, and the fix, in the chaos issue.)
Run: python fuzz/fuzz_etcd_watch.py -runs=50000
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, cast

from _harness import instrumented, run, text

with instrumented():
    from loden.errors import StoreError, StoreUnavailable
    from loden.subnet.etcd_http import EtcdHTTP
    from loden.subnet.etcd_v2 import EtcdV2Store
    from loden.subnet.etcd_v3 import EtcdV3Store


class _Response:
    status_code = 200

    def __init__(self, body: str) -> None:
        self.text = body
        self.headers = {"X-Etcd-Index": body[:3]}

    def json(self) -> Any:
        return json.loads(self.text)

    async def aiter_lines(self) -> AsyncIterator[str]:
        for line in self.text.splitlines():
            yield line


class _HTTP:
    def __init__(self, body: str) -> None:
        self.body = body
        self.headers: dict[str, str] = {}
        self.polls = 0

    async def request(self, method: str, path: str, **kwargs: object) -> _Response:
        return _Response(self.body)

    async def long_poll(self, path: str, **kwargs: object) -> _Response:
        if self.polls:
            raise StoreUnavailable("no more answers")  # ends the v2 watch
        self.polls += 1
        return _Response(self.body)

    @asynccontextmanager
    async def stream(self, method: str, path: str, **kwargs: object) -> AsyncIterator[_Response]:
        yield _Response(self.body)

    async def aclose(self) -> None:
        return None


async def _exercise(body: str) -> None:
    http = cast(EtcdHTTP, _HTTP(body))
    for store in (
        EtcdV3Store(http, "/coreos.com/network"),
        EtcdV2Store(http, "/coreos.com/network"),
    ):
        try:
            async for _ in store.watch(0):
                pass
        except StoreError:
            pass
        for call in (store.list(), store.get_config(), store.get("10.1.2.0-24")):
            try:
                await call
            except StoreError:
                pass


SEEDS = [
    b'{"result":{"header":{"revision":"7"},"events":[{"kv":{"key":"L2NvcmVvcy5jb20vbmV0d2'
    b'9yay9zdWJuZXRzLzEwLjEuMi4wLTI0","value":"e30=","mod_revision":"7","lease":"5"}},'
    b'{"type":"DELETE","kv":{"key":"eA==","mod_revision":"8"}}]}}',
    b'{"header":{"revision":"3"},"kvs":[{"key":"eA==","value":"eA==","lease":"0"}]}',
    b'{"result":{"canceled":true,"compact_revision":"2"}}',
    b'{"action":"set","node":{"key":"/coreos.com/network/subnets/10.1.2.0-24",'
    b'"value":"{}","modifiedIndex":7,"ttl":30}}',
]


def test_one_input(data: bytes) -> None:
    asyncio.run(_exercise(text(data)))


if __name__ == "__main__":
    run(test_one_input, SEEDS)
