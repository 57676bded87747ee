"""The nf_tables ruleset generation id: "has any rule changed since I last looked?"

The kernel counts committed nf_tables transactions per network namespace
(``nft_net->base_seq``) and answers ``NFT_MSG_GETGEN`` with it. iptables-nft,
iptables-nft-restore and nft all commit through nf_tables, so every edit an admin,
Docker or kube-proxy makes bumps it; reading rules (``iptables-save``, ``nft list``,
``iptables -S``) and packet counters do not. Measured here (kernel 6.18, iptables
1.8.9, nft 1.0.6): ``iptables-nft -A/-D/-P``, ``nft add table/chain/rule``, a rule in an
unrelated table and ``iptables-nft-restore --noflush`` each bump it by one; saves and
listings leave it alone; iptables-legacy never touches it (it is not nf_tables).

One read is one netlink request and reply (a few microseconds), against a fork+exec
of ``iptables-save`` or ``nft list`` plus parsing: the traffic managers read it before
each dump and skip the dump when the chain was verified at this very generation
(:class:`VerifiedAt`). Anything doubtful (a failed read, a legacy backend, no source)
means "dump as always".
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
import weakref
from collections.abc import Hashable
from typing import Final, Literal, Protocol

from loden.kernel import rtnl
from loden.traffic.commands import Commands, Runner

log = logging.getLogger(__name__)

NETLINK_NETFILTER: Final = 12
NFNL_SUBSYS_NFTABLES: Final = 10
NFT_MSG_NEWGEN: Final = 15
NFT_MSG_GETGEN: Final = 16
NFTA_GEN_ID: Final = 1
NFNETLINK_V0: Final = 0

NLMSG_ERROR: Final = 2
NLM_F_REQUEST: Final = 0x1

_HDR = struct.Struct("=IHHII")
#: nfgenmsg: family (AF_UNSPEC), version (NFNETLINK_V0), res_id (big endian, 0).
_NFGENMSG = struct.Struct("=BBH")
_ERR = struct.Struct("=i")
_BE32 = struct.Struct(">I")

GETGEN_TYPE: Final = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN
NEWGEN_TYPE: Final = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN

#: Messages read while looking for the reply to one request (stale replies of a request
#: that timed out earlier are skipped by sequence number).
_MAX_MESSAGES: Final = 16


class GenerationSource(Protocol):
    """Where the traffic managers read the generation id (real: :class:`NftGeneration`)."""

    def read(self) -> int:
        """The current generation id. :raises OSError: it cannot be read now."""
        ...


def getgen_request(seq: int) -> bytes:
    """The ``NFT_MSG_GETGEN`` request with sequence number ``seq``."""
    body = _NFGENMSG.pack(socket.AF_UNSPEC, NFNETLINK_V0, 0)
    return _HDR.pack(_HDR.size + len(body), GETGEN_TYPE, NLM_F_REQUEST, seq, 0) + body


def parse_reply(data: bytes, seq: int) -> int | None:
    """The generation id in the datagram ``data`` answering request ``seq``; None if the
    datagram holds no answer to it (e.g. a late reply to an earlier request).

    :raises OSError: the kernel answered ``seq`` with an error, or the reply is malformed.
    """
    for offset, length, kind, _flags, msg_seq, _pid in rtnl.messages(data):
        if msg_seq != seq:
            continue
        if kind == NLMSG_ERROR:
            code = -_ERR.unpack_from(data, offset + _HDR.size)[0]
            raise OSError(code, f"NFT_MSG_GETGEN failed: {errno.errorcode.get(code, code)}")
        if kind == NEWGEN_TYPE:
            message = data[offset : offset + length]
            raw = rtnl.attrs(message, _HDR.size + _NFGENMSG.size).get(NFTA_GEN_ID)
            if raw is None or len(raw) < _BE32.size:
                raise OSError(errno.EBADMSG, "NFT_MSG_NEWGEN without NFTA_GEN_ID")
            return int(_BE32.unpack_from(raw)[0])
    return None


def _open_socket(timeout: float) -> socket.socket:
    kind = socket.SOCK_RAW | socket.SOCK_CLOEXEC
    sock = socket.socket(socket.AF_NETLINK, kind, NETLINK_NETFILTER)
    try:
        sock.bind((0, 0))
        sock.settimeout(timeout)
    except BaseException:
        sock.close()
        raise
    return sock


class NftGeneration:
    """Reads the generation id of one network namespace through one kept-open socket.

    ``netns=None`` is the calling process's namespace (the agent runs inside its own).
    A name or path opens the socket in that namespace instead (tests and the lab drive
    namespaces from outside; this needs pyroute2's setns, so it is imported only then):
    a socket stays in the namespace it was created in. Blocking, but bounded by
    ``timeout``; the kernel answers at once. Not thread-safe (the managers serialise).
    """

    def __init__(self, netns: str | None = None, *, timeout: float = 1.0) -> None:
        self.netns = netns
        self._timeout = timeout
        self._sock: socket.socket | None = None
        self._closer: weakref.finalize[[], NftGeneration] | None = None
        self._seq = 0

    def __repr__(self) -> str:
        where = "own namespace" if self.netns is None else f"netns {self.netns}"
        return f"NftGeneration({where})"

    def read(self) -> int:
        """The current generation id. :raises OSError: it cannot be read (the socket is
        dropped and reopened by the next read)."""
        sock = self._sock if self._sock is not None else self._open()
        self._seq = (self._seq + 1) & 0xFFFFFFFF or 1
        try:
            sock.send(getgen_request(self._seq))
            for _ in range(_MAX_MESSAGES):
                gen = parse_reply(sock.recv(65536), self._seq)
                if gen is not None:
                    return gen
            raise OSError(errno.EBADMSG, "no reply to NFT_MSG_GETGEN among the messages read")
        except OSError:
            self.close()
            raise

    def close(self) -> None:
        if self._closer is not None:
            self._closer()
        self._sock = self._closer = None

    def _open(self) -> socket.socket:
        if self.netns is None:
            sock = _open_socket(self._timeout)
        else:
            from loden.kernel.netns import call_in_netns

            netns = self.netns
            sock = call_in_netns(netns, lambda: _open_socket(self._timeout))
        self._sock = sock
        # Closed when this reader goes (a manager has no close of its own); while open,
        # the socket also keeps a deleted namespace alive.
        self._closer = weakref.finalize(self, sock.close)
        return sock


class VerifiedAt:
    """Which wanted state each chain was last verified in, and at which generation.

    ``key`` is where (family, chain), ``wanted`` what was checked there (the spec, any
    stale rules): one record per key, so a changed spec simply fails to match and dumps.
    Only a dump that showed no drift is recorded; Loden's own writes are not (the next
    pass dumps and records what it then sees).
    """

    def __init__(self, source: GenerationSource | None) -> None:
        self.source = source
        self._records: dict[Hashable, tuple[Hashable, int]] = {}
        self._failing = False

    def generation(self) -> int | None:
        """The generation now, or None (no source, or it failed: dump, never skip)."""
        if self.source is None:
            return None
        try:
            gen = self.source.read()
        except Exception as exc:  # any doubt means "dump": never skip on a bad read
            if not self._failing:
                log.warning(
                    "rules check: cannot read the nf_tables generation id (%s); dumping the "
                    "rules on every pass until it can be read again",
                    exc,
                )
            self._failing = True
            return None
        if self._failing:
            log.info("rules check: the nf_tables generation id can be read again")
            self._failing = False
        return gen

    def unchanged(self, key: Hashable, wanted: Hashable, gen: int | None) -> bool:
        """True if ``wanted`` was verified at ``key`` at generation ``gen`` (skip the dump)."""
        return gen is not None and self._records.get(key) == (wanted, gen)

    def verified(self, key: Hashable, wanted: Hashable, gen: int | None) -> None:
        """A dump read at generation ``gen`` (read before it) showed ``wanted`` intact."""
        if gen is None:
            self._records.pop(key, None)
        else:
            self._records[key] = (wanted, gen)

    def forget(self, key: Hashable | None = None) -> None:
        """Drop the record of ``key`` (or all): the next check dumps."""
        if key is None:
            self._records.clear()
        else:
            self._records.pop(key, None)


#: A manager's ``generation`` argument: a source, "auto" (from the runner), None (off).
GenerationChoice = GenerationSource | Literal["auto"] | None


def generation_source(runner: Runner, choice: GenerationChoice) -> GenerationSource | None:
    """The source for ``choice``; "auto" reads the namespace a :class:`Commands` runner
    runs in, and nothing for any other runner (a fake's rules are not in the kernel)."""
    if choice != "auto":
        return choice
    if isinstance(runner, Commands):
        return source_for_prefix(runner.prefix)
    return None


def source_for_prefix(prefix: tuple[str, ...]) -> GenerationSource | None:
    """The generation of the namespace a :class:`~loden.traffic.commands.Commands` prefix
    runs its commands in: the own one (empty prefix), ``ip netns exec NAME`` or
    ``nsenter --net=PATH --``; None for any other prefix (dump every pass)."""
    if not prefix:
        return NftGeneration()
    if len(prefix) == 4 and prefix[:3] == ("ip", "netns", "exec"):
        return NftGeneration(prefix[3])
    if (
        len(prefix) == 3
        and prefix[0] == "nsenter"
        and prefix[1].startswith("--net=")
        and prefix[2] == "--"
    ):
        return NftGeneration(prefix[1].removeprefix("--net="))
    return None


__all__ = [
    "GenerationChoice",
    "GenerationSource",
    "NftGeneration",
    "VerifiedAt",
    "generation_source",
    "getgen_request",
    "parse_reply",
    "source_for_prefix",
]
