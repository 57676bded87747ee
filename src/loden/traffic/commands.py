"""Running iptables/nft binaries: argv only (never a shell), stdin bytes, a deadline.

Rule managers reach the kernel only through a :class:`Runner`, so that

* tests can run every command inside a network namespace they created, by giving
  the :class:`Commands` runner a prefix such as ``("ip", "netns", "exec", "ld1a2b3c")``
  (the agent itself uses the empty prefix: it runs in the host namespace);
* unit tests can substitute a fake runner and check which commands would be issued.

A command that exits non-zero raises :class:`~loden.errors.CommandError` (argv, exit
status, the last lines of stderr) unless the caller asked for ``check=False``. A
command that outlives its timeout is killed: iptables-restore ``--wait`` can block
for as long as another process holds the xtables lock, and a resync loop must not
hang forever on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from loden.errors import CommandError, TrafficRulesError

log = logging.getLogger(__name__)

#: Seconds a single iptables/nft invocation may take before it is killed.
DEFAULT_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class CommandResult:
    """What a finished command produced."""

    argv: tuple[str, ...]
    returncode: int
    stdout: bytes
    stderr: bytes

    @property
    def text(self) -> str:
        """stdout decoded as UTF-8 (iptables/nft print ASCII; odd bytes are replaced)."""
        return self.stdout.decode("utf-8", errors="replace")

    @property
    def error_text(self) -> str:
        return self.stderr.decode("utf-8", errors="replace")


async def run_command(
    argv: Sequence[str],
    *,
    stdin: bytes | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    check: bool = True,
) -> CommandResult:
    """Run ``argv`` (no shell), feed it ``stdin``, wait at most ``timeout`` seconds.

    :raises CommandError: the command exited non-zero and ``check`` is true.
    :raises TrafficRulesError: the binary does not exist, or the command timed out
        (it is killed first, so no process is left behind).
    """
    args = tuple(argv)
    if not args:
        raise TrafficRulesError("run_command got an empty argv: pass the program to run")
    try:
        proc = await asyncio.create_subprocess_exec(
            *args,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except FileNotFoundError as exc:
        raise TrafficRulesError(
            f"{args[0]} not found: install it (Debian: apt-get install iptables nftables) "
            "or fix PATH"
        ) from exc
    except PermissionError as exc:
        raise TrafficRulesError(f"{args[0]} cannot be executed: {exc}; run Loden as root") from exc
    try:
        # Not wait_for: on Python 3.11 it swallows a SIGTERM cancellation that arrives as
        # the command finishes (gh-86296), and the agent would not stop.
        async with asyncio.timeout(timeout):
            stdout, stderr = await proc.communicate(stdin)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise TrafficRulesError(
            f"{' '.join(args)} did not finish within {timeout:g} s and was killed: "
            "check for a process holding the xtables lock (/run/xtables.lock)"
        ) from None
    result = CommandResult(args, proc.returncode or 0, stdout, stderr)
    if check and result.returncode != 0:
        raise CommandError(args, result.returncode, result.error_text)
    return result


class Runner(Protocol):
    """How the traffic managers run commands (real: :class:`Commands`; tests: fakes)."""

    async def run(
        self, argv: Sequence[str], *, stdin: bytes | None = None, check: bool = True
    ) -> CommandResult: ...

    def has(self, program: str) -> bool:
        """True if ``program`` can be found (on PATH, or as an absolute path)."""
        ...


@dataclass(frozen=True, slots=True)
class Commands:
    """The real :class:`Runner`: ``prefix + argv``, each call bounded by ``timeout``.

    ``prefix`` is empty for the agent; tests pass ``("ip", "netns", "exec", NAME)`` so
    the host's own rules are never touched.
    """

    prefix: tuple[str, ...] = ()
    timeout: float = DEFAULT_TIMEOUT

    async def run(
        self, argv: Sequence[str], *, stdin: bytes | None = None, check: bool = True
    ) -> CommandResult:
        full = (*self.prefix, *argv)
        log.debug("running %s", " ".join(full))
        return await run_command(full, stdin=stdin, timeout=self.timeout, check=check)

    def has(self, program: str) -> bool:
        # ``ip netns exec`` keeps the mount namespace's binaries, so PATH lookup in
        # this process answers for the prefixed command too.
        return shutil.which(program) is not None
