"""Loden's one exception hierarchy.

Every error Loden raises on purpose derives from :class:`LodenError`; its ``str()``
is one line that says what was wrong and what to do. Third-party exceptions
(httpx, pyroute2, subprocess) are mapped into this tree at exactly one boundary
per dependency, always ``raise X(...) from exc``.

::

    LodenError
    ├── ConfigError              bad flag, env var, net-conf JSON or local file (exit 1)
    │   └── UsageError           bad command line (exit 2)
    ├── ParseError               a value from outside (JSON, key, subnet.env) does not parse
    │   ├── NetworkConfigError   the network config JSON is invalid (field, value, rule)
    │   ├── SubnetKeyError       a key under <prefix>/subnets does not parse
    │   └── LeaseFormatError     a stored lease value is malformed (key, raw value)
    ├── StoreError               the subnet store failed
    │   ├── StoreUnavailable     retryable: connection refused, 5xx, timeout, no leader
    │   ├── StoreAuthError       TLS/auth rejected: not retryable without operator action
    │   │   └── StoreForbidden   the Kubernetes API denies a verb (names verb and resource)
    │   ├── StoreNotFound        a Kubernetes object (node, pod) does not exist
    │   ├── ConfigNotFound       <prefix>/config does not exist (yet)
    │   ├── LeaseConflict        a compare-and-swap was lost; retry with a fresh candidate
    │   ├── SubnetsExhausted     no free subnet in [SubnetMin, SubnetMax]
    │   ├── LeaseRevoked         our own lease disappeared and could not be re-acquired
    │   └── WatchCompacted       a watch fell behind compaction/index clearing: relist
    ├── BackendError
    │   ├── UnknownBackend       Backend.Type not in the registry (lists the known ones)
    │   ├── InterfaceError       no usable external interface / public IP
    │   └── DataplaneError       a netlink or device operation failed (op, object, errno)
    │       └── NotificationsLost  the kernel dropped change notifications (ENOBUFS)
    └── TrafficRulesError        iptables/nft rules could not be applied
        └── CommandError         a subprocess exited non-zero (argv, exit code, stderr)
"""

from __future__ import annotations

from collections.abc import Sequence
from errno import ENOBUFS


class LodenError(Exception):
    """Base of every error Loden raises on purpose."""


class ConfigError(LodenError):
    """A flag, environment variable, config file or local file is wrong."""


class UsageError(ConfigError):
    """The command line itself is wrong (unknown flag, bad value); exit status 2."""


class ParseError(LodenError, ValueError):
    """A value that came from outside Loden does not parse."""


class NetworkConfigError(ParseError):
    """The network config JSON is invalid.

    ``field`` names the offending key (as flannel spells it), ``value`` what was
    found, and the message the rule it breaks.
    """

    def __init__(self, message: str, *, field: str | None = None, value: object = None) -> None:
        super().__init__(message)
        self.field = field
        self.value = value


class SubnetKeyError(ParseError):
    """A key under ``<prefix>/subnets`` is not of the form ``a.b.c.d-N[&v6-M]``."""

    def __init__(self, key: str, reason: str = "not of the form a.b.c.d-N[&ipv6-M]") -> None:
        super().__init__(f"bad subnet key {key!r}: {reason}")
        self.key = key


class LeaseFormatError(ParseError):
    """A stored lease value is not valid lease JSON."""

    def __init__(self, reason: str, *, key: str | None = None, raw: bytes | str | None = None):
        where = f" at {key}" if key else ""
        super().__init__(f"malformed lease value{where}: {reason}")
        self.key = key
        self.raw = raw


class StoreError(LodenError):
    """The subnet store (etcd v3, etcd v2 or the Kubernetes API) failed."""


class StoreUnavailable(StoreError):
    """The store cannot be reached right now; retrying later may succeed."""


class StoreAuthError(StoreError):
    """The store rejected our credentials or TLS handshake; an operator must fix it."""


class StoreForbidden(StoreAuthError):
    """The Kubernetes API answered 403: RBAC lacks ``verb`` on ``resource``."""

    def __init__(self, message: str, *, verb: str, resource: str) -> None:
        super().__init__(message)
        self.verb = verb
        self.resource = resource


class StoreNotFound(StoreError):
    """A Kubernetes object (node, pod) the agent needs does not exist."""


class ConfigNotFound(StoreError):
    """The network config key does not exist in the store (yet)."""


class LeaseConflict(StoreError):
    """A compare-and-swap on a lease key was lost to another writer."""


class SubnetsExhausted(StoreError):
    """No free subnet is left between SubnetMin and SubnetMax."""


class LeaseRevoked(StoreError):
    """Our own lease vanished and could not be taken back."""


class WatchCompacted(StoreError):
    """A watch resumed from a revision/index the store no longer has: relist."""


class BackendError(LodenError):
    """A backend could not be set up or run."""


class CloudError(BackendError):
    """A cloud API (EC2, Compute Engine) or metadata call failed; retried with backoff."""


class CloudPermissionError(CloudError):
    """The cloud refused a call for lack of a permission: ``action`` on ``resource``."""

    def __init__(self, message: str, *, action: str, resource: str) -> None:
        super().__init__(message)
        self.action = action
        self.resource = resource


class UnknownBackend(BackendError):
    """``Backend.Type`` names no registered backend."""

    def __init__(self, name: str, known: Sequence[str], reason: str = "") -> None:
        what = (
            f"backend type {name!r} is not supported ({reason})"
            if reason
            else (f"unknown backend type {name!r}")
        )
        super().__init__(f"{what}: known types are {', '.join(sorted(known))}")
        self.name = name
        self.known = tuple(known)


class InterfaceError(BackendError):
    """No usable external interface or public IP could be determined."""


class DataplaneError(BackendError):
    """A kernel (netlink, TUN, sysctl) operation failed."""

    def __init__(self, op: str, obj: str, detail: str, *, errno: int | None = None) -> None:
        super().__init__(f"{op} {obj} failed: {detail}")
        self.op = op
        self.obj = obj
        self.errno = errno


class NotificationsLost(DataplaneError):
    """The kernel dropped change notifications (netlink ENOBUFS): anything may have
    changed, so the caller must fall back to a full dump-and-diff."""

    def __init__(self) -> None:
        super().__init__(
            "read",
            "netlink notifications",
            "the receive buffer overflowed and the kernel dropped notifications",
            errno=ENOBUFS,
        )


class TrafficRulesError(LodenError):
    """iptables or nftables rules could not be applied."""


class CommandError(TrafficRulesError):
    """A subprocess exited non-zero."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        excerpt = stderr.strip().splitlines()[-3:] if stderr.strip() else []
        super().__init__(
            f"{' '.join(argv)} exited {returncode}: {' / '.join(excerpt) or 'no output'}"
        )
        self.argv = tuple(argv)
        self.returncode = returncode
        self.stderr = stderr
