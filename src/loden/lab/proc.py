"""Running commands for the lab: bounded, argv-only, and findable again later.

* :func:`run` waits for a command with a timeout and maps failures to
  :class:`~loden.errors.CommandError` (the message has the argv, status and stderr).
* :func:`spawn` starts a long-running process in its own session with its output in a
  log file, so it outlives ``loden lab up``; the caller records its pid and
  :func:`start_time` (the kernel's start tick) so a recycled pid is never killed.
* :func:`lab_processes` finds what a killed ``up`` could not record: processes carrying
  ``LODEN_LAB=<name>`` in their environment or living in one of the lab's namespaces,
  plus all their descendants (docker containers are children of containerd shims).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

from loden.errors import CommandError, LodenError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 20.0
#: What systemd gives a service when the unit sets nothing (plus the lab's marker).
SERVICE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def run(
    argv: Sequence[str],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    check: bool = True,
    input: bytes | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run ``argv`` to completion within ``timeout`` seconds.

    :raises CommandError: non-zero exit (with ``check``), timeout, or not executable.
    """
    try:
        proc = subprocess.run(
            list(argv),
            input=input,
            capture_output=True,
            timeout=timeout,
            check=False,
            env=None if env is None else dict(env),
        )
    except subprocess.TimeoutExpired as exc:
        raise CommandError(argv, -1, f"timed out after {timeout:.0f}s") from exc
    except OSError as exc:
        raise CommandError(argv, -1, f"cannot run: {exc.strerror or exc}") from exc
    if check and proc.returncode != 0:
        raise CommandError(
            argv, proc.returncode, (proc.stderr or proc.stdout).decode(errors="replace")
        )
    return proc


def out(argv: Sequence[str], *, timeout: float = DEFAULT_TIMEOUT) -> str:
    """stdout of a successful :func:`run`, decoded."""
    return run(argv, timeout=timeout).stdout.decode(errors="replace")


def spawn(
    argv: Sequence[str], *, env: Mapping[str, str], log_path: Path
) -> subprocess.Popen[bytes]:
    """Start ``argv`` detached (own session, stdin from /dev/null, output to ``log_path``).

    :raises CommandError: the program cannot be started.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as handle:
        try:
            return subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=handle,
                stderr=subprocess.STDOUT,
                env=dict(env),
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            raise CommandError(argv, -1, f"cannot start: {exc.strerror or exc}") from exc


def start_time(pid: int) -> int:
    """The process's start time in clock ticks since boot (0 if it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat.rsplit(")", 1)[1].split()[19])


def alive(pid: int, start: int) -> bool:
    """True while ``pid`` is the process that had start time ``start`` (zombies count)."""
    return pid > 0 and start_time(pid) == start


def running(pid: int, start: int) -> bool:
    """:func:`alive` and not a zombie (a dead process its parent has not reaped yet)."""
    return alive(pid, start) and not _zombie(pid)


def tail(path: Path | str, lines: int = 15) -> str:
    """The last ``lines`` lines of a log file (empty if unreadable)."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


def wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> int | None:
    """The exit status, or None if still running after ``timeout`` seconds."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return None


# -- finding and stopping a lab's processes ------------------------------------------------


def _all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def ns_id(path: str) -> tuple[int, int]:
    """(device, inode) of a namespace file; (0, 0) if it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return 0, 0
    return st.st_dev, st.st_ino


def _parent(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat.rsplit(")", 1)[1].split()[1])


def lab_processes(marker: bytes, namespaces: Collection[tuple[int, int]]) -> set[int]:
    """Pids that belong to a lab, with all their descendants.

    ``marker`` is ``b"LODEN_LAB=<name>"``; ``namespaces`` the :func:`ns_id` of the lab's
    network and mount namespaces. Our own process and its ancestors are never included.
    """
    me = os.getpid()
    ancestors = {me}
    current = me
    while current > 1:
        current = _parent(current)
        ancestors.add(current)
    found: set[int] = set()
    children: dict[int, list[int]] = {}
    for pid in _all_pids():
        children.setdefault(_parent(pid), []).append(pid)
        if pid in ancestors:
            continue
        if ns_id(f"/proc/{pid}/ns/net") in namespaces or ns_id(f"/proc/{pid}/ns/mnt") in namespaces:
            found.add(pid)
            continue
        with contextlib.suppress(OSError):
            if marker in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                found.add(pid)
    stack = list(found)
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found and child not in ancestors:
                found.add(child)
                stack.append(child)
    return found


def stop_all(pids: Collection[int], *, grace: float = 3.0) -> list[int]:
    """SIGTERM, wait up to ``grace`` s, then SIGKILL; returns pids still alive after that.

    Pids are captured with their start times first so a recycled pid is left alone.
    """
    targets = {pid: start_time(pid) for pid in pids}
    targets = {pid: start for pid, start in targets.items() if start}
    for pid in targets:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(running(p, s) for p, s in targets.items()):
        _reap(targets)
        time.sleep(0.05)
    for pid, start in targets.items():
        if running(pid, start):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and any(running(p, s) for p, s in targets.items()):
        _reap(targets)
        time.sleep(0.05)
    return [p for p, s in targets.items() if running(p, s)]


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def _reap(pids: Collection[int]) -> None:
    """Collect those of ``pids`` that are our own exited children (else they stay zombies)."""
    for pid in pids:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


def require(program: str, package: str) -> str:
    """The absolute path of ``program`` on PATH.

    :raises LodenError: it is not installed (names the Debian package).
    """
    for directory in (os.environ.get("PATH", "") + ":" + SERVICE_PATH).split(":"):
        candidate = Path(directory or ".") / program
        if directory and candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise LodenError(
        f"{program} is not installed: apt-get install --no-install-recommends {package} "
        "(or run `make deps`)"
    )
