"""``--state-file``: objects and the version counter survive a restart of the process.

A real kube-apiserver keeps nothing itself: etcd does, so after a restart every object
is there and versions go on from where they were, while the watch cache starts empty at
the current version (a client that was behind gets ``410`` and relists). This module
gives the double the same: after each burst of writes (debounced, ``delay`` seconds)
the objects and the counter are written atomically to the state file, and at start they
are read back with an empty history. A process killed within ``delay`` of a write loses
that write, as an API server whose etcd write was not acknowledged would.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

from loden.files import replace_file
from loden.kubeapi.store import Store

log = logging.getLogger(__name__)

FORMAT = 1


def dump(store: Store) -> bytes:
    objects = [[*key, obj] for key, obj in sorted(store.objects.items())]
    return json.dumps({"format": FORMAT, "resourceVersion": store.rv, "objects": objects}).encode()


def load(store: Store, path: Path) -> bool:
    """Fill an empty ``store`` from ``path``; False when there is no state file yet.

    :raises ValueError: the file is not a state file of this format.
    """
    try:
        data: Any = json.loads(path.read_bytes())
    except FileNotFoundError:
        return False
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path} is not a loden.kubeapi state file (format {FORMAT})")
    for resource, namespace, name, obj in data["objects"]:
        store.objects[(str(resource), str(namespace), str(name))] = obj
    store.rv = store.compacted = int(data["resourceVersion"])
    return True


class Saver:
    """Writes the store to ``path`` shortly after writes stop, and once more on close."""

    def __init__(self, store: Store, path: Path, *, delay: float = 0.2) -> None:
        self.store = store
        self.path = path
        self.delay = delay
        self._handle: asyncio.TimerHandle | None = None

    def schedule(self) -> None:
        if self._handle is None:
            self._handle = asyncio.get_running_loop().call_later(self.delay, self.flush)

    def flush(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        try:
            replace_file(self.path, dump(self.store), mode=0o600)
        except OSError as exc:  # the server goes on; a later write tries again
            log.error("cannot write the state file %s: %s", self.path, exc)
