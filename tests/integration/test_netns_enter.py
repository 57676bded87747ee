"""loden.kernel.netns, the one way into a network namespace: a thread moves, the rest of
the process stays; a program started through netns_argv runs there; errors name the path."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
from collections.abc import Iterator

import pytest

from loden.errors import LodenError
from loden.kernel.netns import call_in_netns, enter_netns, netns_argv, netns_path

pytestmark = pytest.mark.root


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"ldns{os.urandom(3).hex()}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=20)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=20)


def inode(path: str) -> int:
    return os.stat(path).st_ino


def test_only_the_calling_thread_moves(netns: str) -> None:
    own = inode("/proc/thread-self/ns/net")
    inside = call_in_netns(netns, lambda: inode("/proc/thread-self/ns/net"))
    assert inside == inode(netns_path(netns)) != own
    assert inode("/proc/thread-self/ns/net") == own  # this thread never moved


def test_sockets_made_there_see_its_devices(netns: str) -> None:
    def names() -> list[str]:
        return [name for _, name in socket.if_nameindex()]

    assert call_in_netns(netns, names) == ["lo"]  # a fresh namespace has lo only


def test_a_path_works_like_a_name(netns: str) -> None:
    assert call_in_netns(netns_path(netns), lambda: inode("/proc/thread-self/ns/net")) == inode(
        netns_path(netns)
    )


def test_a_missing_namespace_is_an_oserror_naming_it() -> None:
    with pytest.raises(FileNotFoundError):
        call_in_netns("ld-no-such-netns", lambda: None)
    box: list[BaseException] = []

    def run() -> None:
        try:
            enter_netns("/proc/self/ns/mnt")  # a namespace, but not a network one
        except OSError as exc:
            box.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(10)
    assert box and "setns(/proc/self/ns/mnt)" in str(box[0])


def test_a_slow_call_times_out(netns: str) -> None:
    done = threading.Event()
    with pytest.raises(LodenError, match="took over"):
        call_in_netns(netns, lambda: done.wait(5), timeout=0.2)
    done.set()


def test_programs_run_there(netns: str) -> None:
    out = subprocess.run(
        netns_argv(netns, ["readlink", "/proc/self/ns/net"]),
        capture_output=True,
        text=True,
        check=True,
        timeout=20,
    ).stdout
    assert out.strip() == f"net:[{inode(netns_path(netns))}]"
