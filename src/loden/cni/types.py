"""CNI protocol values: error codes, spec versions and the error reply.

A CNI plugin reports failure by printing an error object on stdout and exiting
non-zero; runtimes log ``msg`` and may act on ``code`` (11 means "retry later").
:class:`CniFailure` is that reply as a value, not an exception: the plugin's layers
return it up to ``main`` unchanged, which is also how a delegate's own error reply is
passed through verbatim (flannel does the same, through Go's ``errors.As``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from loden.errors import ParseError

#: The spec version this implementation speaks; also ``cniVersion`` of VERSION replies.
CURRENT_VERSION = "1.1.0"
#: Exactly what flannel's plugin supports (``version.All`` of the CNI library).
SUPPORTED_VERSIONS = ("0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")

# Error codes from the CNI specification ("Error codes"); 100+ are plugin-specific.
ERR_INCOMPATIBLE_CNI_VERSION = 1
ERR_UNSUPPORTED_FIELD = 2
ERR_UNKNOWN_CONTAINER = 3
ERR_INVALID_ENVIRONMENT_VARIABLES = 4
ERR_IO_FAILURE = 5
ERR_DECODING_FAILURE = 6
ERR_INVALID_NETWORK_CONFIG = 7
ERR_TRY_AGAIN_LATER = 11
#: STATUS (spec 1.1): the plugin cannot serve ADD requests now.
ERR_PLUGIN_NOT_AVAILABLE = 50
#: What Go's CNI library (and so flannel) uses for every error without its own code.
ERR_INTERNAL = 999


@dataclass(frozen=True, slots=True)
class CniFailure:
    """A CNI error reply: ``code``, one-line ``msg`` and optional ``details``."""

    code: int
    msg: str
    details: str = ""

    def to_json(self, cni_version: str) -> bytes:
        """The reply as printed on stdout (indented like Go's ``types.Error.Print``)."""
        body = {
            "cniVersion": cni_version,
            "code": self.code,
            "msg": self.msg,
            "details": self.details,
        }
        return (json.dumps(body, indent=4) + "\n").encode()


_VERSION_PART = re.compile(r"[+-]?[0-9]+")


def parse_version(text: str) -> tuple[int, int, int]:
    """A spec version as ``(major, minor, micro)``, like the CNI library's ParseVersion.

    The empty string means ``0.1.0`` (a config without ``cniVersion``).

    :raises ParseError: more than three parts or a part that is not an integer.
    """
    if text == "":
        return (0, 1, 0)
    parts = text.split(".")
    if len(parts) >= 4:
        raise ParseError(f"invalid version {text!r}: too many parts")
    numbers = [0, 0, 0]
    for index, (label, part) in enumerate(zip(("major", "minor", "micro"), parts, strict=False)):
        if not _VERSION_PART.fullmatch(part):
            raise ParseError(f"failed to convert {label} version part {part!r}: invalid syntax")
        numbers[index] = int(part)
    return (numbers[0], numbers[1], numbers[2])


def version_at_least(version: str, minimum: str) -> bool:
    """``version >= minimum`` in spec-version order.

    :raises ParseError: either version does not parse.
    """
    return parse_version(version) >= parse_version(minimum)


def version_reply() -> bytes:
    """The VERSION reply (compact with a newline, as Go's ``json.Encoder`` writes it)."""
    body = {"cniVersion": CURRENT_VERSION, "supportedVersions": list(SUPPORTED_VERSIONS)}
    return (json.dumps(body, separators=(",", ":")) + "\n").encode()
