"""Network namespaces: the one way Loden code enters one, and runs a program in one.

Two jobs, two helpers, used everywhere (agent, backends, lab, tests, benchmarks):

* :func:`enter_netns` moves the *calling thread* into a namespace (``setns(2)``, through
  pyroute2's wrapper). A socket belongs to the namespace of the thread that creates it
  and nothing else in the process moves, so this is how one process drives several
  "hosts": call it first thing in a dedicated thread (an executor's ``initializer``, or
  :func:`call_in_netns`), never in a thread that does other work afterwards.
* :func:`netns_argv` prefixes a command with ``nsenter --net=...`` to start a *program*
  there. Entering between ``fork`` and ``exec`` (``preexec_fn``) is not safe in a
  threaded process, and nsenter execs, so the pid started is the program's own pid.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from loden.errors import LodenError

T = TypeVar("T")

#: Where ``ip netns add`` puts its named namespaces.
NETNS_DIR = Path("/var/run/netns")


def netns_path(netns: str) -> str:
    """The file of namespace ``netns``: a name under /var/run/netns, or a path as is."""
    return netns if "/" in netns else str(NETNS_DIR / netns)


def enter_netns(netns: str) -> None:
    """Move the calling thread into network namespace ``netns`` (a name or a path).

    :raises OSError: the namespace does not exist, or ``setns`` failed (EPERM, ...).
    """
    from pyroute2.netns import setns  # ~0.2 s to import: only where a namespace is entered

    path = netns_path(netns)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        # Given an fd, pyroute2 neither creates a missing namespace (its default for a
        # name) nor opens the file without O_CLOEXEC.
        setns(fd, flags=0)
    except OSError as exc:
        code = exc.errno or 0
        raise OSError(code, f"setns({path}): {os.strerror(code)}") from exc
    finally:
        os.close(fd)


def netns_argv(netns: str, argv: Sequence[str]) -> list[str]:
    """``argv`` run in network namespace ``netns`` (a name or a path) through nsenter."""
    return ["nsenter", f"--net={netns_path(netns)}", "--", *argv]


def call_in_netns(netns: str, fn: Callable[[], T], *, timeout: float = 10.0) -> T:
    """Run ``fn`` in a new thread that first enters network namespace ``netns``.

    :raises OSError: the namespace cannot be entered; whatever ``fn`` raises.
    :raises LodenError: ``fn`` did not return within ``timeout`` seconds (the thread
        is a daemon and is left to finish on its own).
    """
    path = netns_path(netns)
    box: dict[str, object] = {}

    def target() -> None:
        try:
            enter_netns(path)
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller below
            box["error"] = exc

    thread = threading.Thread(target=target, name=f"netns:{os.path.basename(path)}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise LodenError(f"request inside network namespace {path} took over {timeout:.0f}s")
    if "error" in box:
        error = box["error"]
        assert isinstance(error, BaseException)
        raise error
    return box["value"]  # type: ignore[return-value]


__all__ = ["NETNS_DIR", "call_in_netns", "enter_netns", "netns_argv", "netns_path"]
