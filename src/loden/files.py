"""Atomic file writes and reading back what an earlier run wrote.

subnet.env is read by Docker, systemd and the CNI plugin at moments Loden does not
control, so it must never be seen half-written (user pain point 1): write a temp file
in the same directory, fsync, fix the mode regardless of umask, rename over the target,
fsync the directory. Every file Loden replaces (subnet.env, the VTEP MAC, the WireGuard
key, the CNI plugin's delegate configs, mk-docker-opts' output, rendered units, the
lab's state) goes through :func:`replace_file`.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from loden.errors import ConfigError
from loden.model.subnet_env import PreviousSubnets, read_previous

log = logging.getLogger(__name__)


def replace_file(
    path: Path, data: bytes, *, mode: int = 0o644, dir_mode: int = 0o755, parents: bool = True
) -> None:
    """Replace ``path`` with ``data`` atomically, with exactly ``mode``; the one way
    Loden writes a file that something else may read at any moment.

    A temp file in the same directory is written, fsync-ed and given ``mode`` (umask
    aside), renamed over ``path``, and the directory is fsync-ed so the rename survives
    a crash. ``parents``: create missing directories, each with exactly ``dir_mode``
    (otherwise a missing directory is an error, as for a shell's ``>``).

    :raises OSError: as the failing call reported it (callers add what to do).
    """
    if parents:
        _make_dirs(path.parent, dir_mode)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write(path: Path, data: bytes, *, mode: int = 0o644, dir_mode: int = 0o755) -> None:
    """:func:`replace_file` for the agent's own files (subnet.env).

    :raises ConfigError: the directory cannot be created or written (names the path).
    """
    try:
        replace_file(path, data, mode=mode, dir_mode=dir_mode)
    except OSError as exc:
        raise ConfigError(
            f"cannot write {path}: {exc.strerror or exc}; check that its "
            "directory exists and is writable"
        ) from exc


def ensure_private_dir(directory: Path, mode: int = 0o700) -> None:
    """``mkdir -p directory`` (directories created here get exactly ``mode``).

    :raises ConfigError: it cannot be created, or it exists and is not a directory.
    """
    try:
        _make_dirs(directory, mode)
    except OSError as exc:
        raise ConfigError(
            f"cannot create directory {directory}: {exc.strerror or exc}; fix or change -state-dir"
        ) from exc
    if not directory.is_dir():
        raise ConfigError(f"{directory} is not a directory; fix or change -state-dir")


def check_writable(path: Path, *, dir_mode: int = 0o755) -> None:
    """Fail early, before any kernel or etcd state exists, if ``path`` cannot be
    written later by :func:`atomic_write` (a directory in its place, a read-only or
    missing parent that cannot be created). Creates missing parents like it would.

    :raises ConfigError: names the path and what is wrong.
    """
    if path.is_dir():
        raise ConfigError(f"cannot write {path}: it is a directory; fix or change -subnet-file")
    try:
        _make_dirs(path.parent, dir_mode)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise ConfigError(
            f"cannot write {path}: {exc.strerror or exc}; check that its directory exists "
            "and is writable, or change -subnet-file"
        ) from exc


def _make_dirs(directory: Path, mode: int) -> None:
    """mkdir -p where every directory *we* create gets exactly ``mode`` (umask aside)."""
    missing: list[Path] = []
    current = directory
    while not current.exists():
        missing.append(current)
        current = current.parent
    for path in reversed(missing):
        try:
            path.mkdir()
        except FileExistsError:
            continue
        os.chmod(path, mode)


def read_previous_subnets(path: Path) -> PreviousSubnets:
    """What the subnet file says we had before; empty when missing or unreadable."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return PreviousSubnets()
    except OSError as exc:
        log.warning("cannot read previous subnet file %s (%s); allocating afresh", path, exc)
        return PreviousSubnets()
    previous = read_previous(text)
    if previous.subnet is None and previous.ipv6_subnet is None and text.strip():
        log.warning(
            "previous subnet file %s has no usable FLANNEL_SUBNET or FLANNEL_IPV6_SUBNET: "
            "ignoring it and allocating afresh (it is rewritten once a lease is held)",
            path,
        )
    return previous
